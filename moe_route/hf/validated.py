"""The transformers code moe_route's adapters were tested against, as fingerprints.

An adapter restates what a router's forward computes. A router class keeps its name across
transformers releases while its forward may change (GraniteMoe's router returned its ids first in
transformers 5.17 and its logits first in 5.23), and routing a changed forward by the old rules is
silently wrong. ``adapters.unvalidated`` therefore trusts the code named here only where its
fingerprint (``adapters.fingerprint``: a hash of the forward's syntax tree, the same on every
Python version) is listed, that is, where the test suite passed with it; other code of those
names is reported unsupported, with the reason.

After the test suite passes with another transformers release, add its fingerprints, then move
the bound on transformers in pyproject.toml's ``test`` extra past that release:

    python -m moe_route.hf.validated > moe_route/hf/validated_new.py   # review, then replace
"""
from __future__ import annotations

# Releases the fingerprints below were taken from.
TRANSFORMERS = ("5.23.0", "5.24.0",)

# Patched block methods, with the module that defines their class.
BLOCK_METHODS = {
    "DbrxFFN.route_tokens_to_experts": "transformers.models.dbrx.modeling_dbrx",
    "Mxfp4GptOssMLP.forward": "transformers.integrations.mxfp4",
}

# "Class.method" -> fingerprints the test suite passed with.
FINGERPRINTS: dict[str, frozenset[str]] = {
    "AXK2TopkRouter.forward": frozenset({"58cb9ae753bdcce1"}),
    "AfmoeTokenChoiceRouter.forward": frozenset({"a92738267aef8254"}),
    "AriaTextTopKRouter.forward": frozenset({"2d0e3d56f6b79c92"}),
    "BeamTopKRouter.forward": frozenset({"8800deec643faa5f"}),
    "Cohere2MoeTopKRouter.forward": frozenset({"64f5386887d3c32f"}),
    "DbrxFFN.route_tokens_to_experts": frozenset({"0ad66d5e239a4659"}),
    "DbrxRouter.forward": frozenset({"e702ddfc5e1c5f90"}),
    "DeepseekV2TopkRouter.forward": frozenset({"2c0e24040bcd0ce4"}),
    "DeepseekV3TopkRouter.forward": frozenset({"1e1855d13a17672f"}),
    "DeepseekV4HashRouter.forward": frozenset({"78508717458bd8f3"}),
    "DeepseekV4TopKRouter.forward": frozenset({"377b17a8c2e888a0"}),
    "DogeCDMoE.forward": frozenset({"8b7d291a5d0edda1"}),
    "Ernie4_5_MoeTopKRouter.forward": frozenset({"9027560fd22f9ce1"}),
    "FlintTopKRouter.forward": frozenset({"a0dd4a67c80c0e09"}),
    "Gemma4TextRouter.forward": frozenset({"982f0b10850199aa"}),
    "GptOssTopKRouter.forward": frozenset({"990aec670020ab52"}),
    "GraniteMoeTopKRouter.forward": frozenset({"855ed6f28de22ce9"}),
    "HYV3TopKRouter.forward": frozenset({"1793525cd25c4c4c"}),
    "HunYuanMoEV1Gate.forward": frozenset({"cffce3cfc7a1cc1b"}),
    "Inkling2LoopTopKRouter.forward": frozenset({"01e0f1427dde135a"}),
    "Inkling2TopKRouter.forward": frozenset({"01e0f1427dde135a"}),
    "InklingTopkRouter.forward": frozenset({"f49662b6f0030456"}),
    "JambaTopKRouter.forward": frozenset({"db303e06e115d49d"}),
    "JetMoeTopKGating.forward": frozenset({"a4db037abda5c2ab"}),
    "Kolibri1TopKRouter.forward": frozenset({"6d642d557fcafaf9"}),
    "LagunaTopKRouter.forward": frozenset({"6c20113824b5beee"}),
    "LaraMiniTopKRouter.forward": frozenset({"ea196368312f14d1"}),
    "Lfm2MoeTopKRouter.forward": frozenset({"30702bd8fc54a50f"}),
    "Llama4Router.forward": frozenset({"985f7266d72920b8"}),
    "LongcatFlashTopkRouter.forward": frozenset({"1a763bb96b7ef6fb"}),
    "MiniMaxM2TopKRouter.forward": frozenset({"52571336d175894b"}),
    "MiniMaxM3VLTopKRouter.forward": frozenset({"b62df998c3d27505"}),
    "Mistral4TopkRouter.forward": frozenset({"879749c38ca046ba"}),
    "MistralLarge4TextTopkRouter.forward": frozenset({"5eff6ab391cb41cd"}),
    "MixtralTopKRouter.forward": frozenset({"f902a41dfcd3bace"}),
    "MuseSparkTopkRouter.forward": frozenset({"1b413cc1710fb1ce"}),
    "Mxfp4GptOssMLP.forward": frozenset({"6bff9ce5403a9c58"}),
    "NllbMoeTop2Router.forward": frozenset({"7e3e71a46d854b73"}),
    "OlmoeTopKRouter.forward": frozenset({"1ede3f7abbea8dad"}),
    "OpenAIPrivacyFilterTopKRouter.forward": frozenset({"c98969c9d315882f"}),
    "PhimoeTopKRouter.forward": frozenset({"3bf403cb72fc82dd"}),
    "Qwen3VLMoeTextTopKRouter.forward": frozenset({"0bb03d027e33e115"}),
    "SwitchTransformersTop1Router.forward": frozenset({"b79069860f594215"}),
    "ZayaRouter.forward": frozenset({"ee8448dbda4f5d85"}),
}


def _installed() -> dict[str, str]:
    """Fingerprints of the installed transformers' exemplar forwards and block methods."""
    from moe_route.hf.adapters import EXEMPLARS, family_module, fingerprint, transformers_class

    where = {f"{name}.forward": family_module(family) for name, (_, family) in EXEMPLARS.items()}
    where.update(BLOCK_METHODS)
    found = {}
    for qualname, module_name in where.items():
        cls_name, method = qualname.split(".")
        cls, _ = transformers_class(module_name, cls_name)
        if cls is not None and (value := fingerprint(cls, method)) is not None:
            found[qualname] = value
    return found


def _main() -> None:
    """Print this module with the installed transformers' fingerprints merged in."""
    import re

    import transformers

    table = {name: set(values) for name, values in FINGERPRINTS.items()}
    for name, value in _installed().items():
        table.setdefault(name, set()).add(value)
    versions = sorted(set(TRANSFORMERS) | {transformers.__version__},
                      key=lambda v: tuple(int(p) if p.isdigit() else 0 for p in v.split(".")))
    with open(__file__) as f:
        source = f.read()
    head, rest = source.split("TRANSFORMERS = ", 1)
    middle, rest = rest.split("FINGERPRINTS: dict[str, frozenset[str]] = {\n", 1)
    middle = middle.split("\n", 1)[1]
    tail = re.split(r"^}\n", rest, maxsplit=1, flags=re.M)[1]  # after the table's closing line
    quoted = lambda values: ", ".join(f'"{v}"' for v in values)  # noqa: E731
    rows = "".join(f'    "{name}": frozenset({{{quoted(sorted(values))}}}),\n'
                   for name, values in sorted(table.items()))
    print(f"{head}TRANSFORMERS = ({quoted(versions)},)\n{middle}"
          f"FINGERPRINTS: dict[str, frozenset[str]] = {{\n{rows}}}\n{tail}", end="")


if __name__ == "__main__":
    _main()
