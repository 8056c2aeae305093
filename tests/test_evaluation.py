"""Task evaluation: multiple-choice and generative accuracy against unbatched reference loops,
the paired comparison and McNemar test against known answers, result files, loaders, the CLI."""
import json
import math
import subprocess
import sys
import types

import pytest
import torch

import moe_route
from moe_route import _atomic
from moe_route.analysis import evaluation as ev
from moe_route.analysis import pipeline

transformers = pytest.importorskip("transformers")
from hub_repos import datasets_serving, write_repo  # noqa: E402
from tiny_models import build, word_tokenizer  # noqa: E402


# -- statistics --------------------------------------------------------------------------------

@pytest.mark.parametrize("gained,lost,p", [(10, 0, 2 / 1024), (0, 10, 2 / 1024),
                                           (8, 2, 112 / 1024), (5, 5, 1.0), (0, 0, 1.0),
                                           (1, 0, 1.0), (6, 0, 2 / 64)])
def test_mcnemar_exact_known_answers(gained, lost, p):
    assert ev.mcnemar_exact(gained, lost) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_matches_a_binomial_enumeration():
    """Two-sided: the probability of every split at most as likely as the observed one, which
    for the symmetric Bin(n, 1/2) is twice the smaller tail (capped at 1)."""
    for n in range(1, 30):
        pmf = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
        for gained in range(n + 1):
            observed = pmf[gained]
            p = sum(q for q in pmf if q <= observed * (1 + 1e-12))
            assert ev.mcnemar_exact(gained, n - gained) == pytest.approx(min(1.0, p), rel=1e-9)
    # large counts stay exact (integer arithmetic): a 3000/2900 split
    assert 0.19 < ev.mcnemar_exact(3000, 2900) < 0.21


def test_mcnemar_past_the_integer_sum_agrees_with_it_and_scales():
    """Above 4000 changed questions the tail is summed in float64 from its largest term; the
    integer sum took 46 s at 10000/10000 (quadratic in n)."""
    for n in (4001, 6000):
        for m in (0, 1, 25, n // 2 - 150, n // 2 - 20, n // 2):
            want = min(1.0, 2 * sum(math.comb(n, i) for i in range(m + 1)) / 2 ** n)
            assert ev.mcnemar_exact(m, n - m) == pytest.approx(want, rel=1e-10, abs=1e-300)
    assert ev.mcnemar_exact(10 ** 6, 10 ** 6) == 1.0
    # 3 sqrt(n) fewer losses than gains out of 2 million: two-sided p ~ 2 Phi(-2.12) = 0.034
    assert ev.mcnemar_exact(10 ** 6 - 3000, 10 ** 6) == pytest.approx(0.0338, abs=5e-4)


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError),
                                        ("3", TypeError)])
def test_mcnemar_exact_rejects_non_counts(bad, error):
    with pytest.raises(error, match="gained=.* must be an int >= 0"):
        ev.mcnemar_exact(bad, 3)


def _result(**correct):
    return ev.EvalResult({k: torch.tensor(v, dtype=torch.bool) for k, v in correct.items()},
                         {k: [int(x) for x in v] for k, v in correct.items()})


def test_paired_comparison_known_answer():
    base = _result(eng=[1, 1, 0, 0, 1], swh=[0, 0, 0, 0])
    steered = _result(eng=[1, 0, 1, 1, 1], swh=[1, 1, 1, 0])
    out = ev.paired_comparison(base, steered)
    assert list(out) == ["eng", "swh", "all"]
    eng = out["eng"]
    assert (eng.n, eng.gained, eng.lost) == (5, 2, 1)
    assert (eng.baseline, eng.steered, eng.delta) == pytest.approx((0.6, 0.8, 0.2))
    # Wald+2 (Agresti and Min): centre (2 - 1) / 7, sd sqrt(2 + 1 + 1 - 1 / 7) / 7
    assert (eng.ci_low, eng.ci_high) == pytest.approx((-0.4070418, 0.6927561))
    assert eng.p_value == 1.0
    swh = out["swh"]
    assert (swh.gained, swh.lost, swh.p_value) == (3, 0, 0.25)
    assert (swh.ci_low, swh.ci_high) == pytest.approx((-0.01649586, 1.0))
    pooled = out["all"]
    assert (pooled.n, pooled.gained, pooled.lost) == (9, 5, 1)
    assert pooled.p_value == pytest.approx(2 * 7 / 64)
    assert pooled.baseline == pytest.approx(3 / 9)


def test_paired_interval_stays_within_minus_one_and_one_and_never_collapses():
    """Three of four questions gained: the interval ends past 1 and is clipped there. Four of
    four gained: the plain Wald interval was the point [1, 1] (variance 0), at McNemar p 0.125;
    Wald+2's is [0.168, 1]. No question changed: a width that shrinks with n."""
    out = ev.paired_comparison(_result(eng=[0, 0, 0, 1]), _result(eng=[1, 1, 1, 1]))["eng"]
    assert (out.delta, out.ci_low, out.ci_high) == pytest.approx((0.75, -0.01649586, 1.0))
    out = ev.paired_comparison(_result(eng=[1, 1, 1, 0]), _result(eng=[0, 0, 0, 0]))["eng"]
    assert (out.delta, out.ci_low, out.ci_high) == pytest.approx((-0.75, -1.0, 0.01649586))
    out = ev.paired_comparison(_result(eng=[0] * 4), _result(eng=[1] * 4))["eng"]
    assert (out.delta, out.ci_low, out.ci_high, out.p_value) == \
        pytest.approx((1.0, 0.1676843, 1.0, 0.125))
    for n, width in ((2, 0.9799820), (50, 0.0753832)):   # 1.96 / (n + 2) * 2
        out = ev.paired_comparison(_result(eng=[1] * n), _result(eng=[1] * n))["eng"]
        assert (out.delta, out.ci_high - out.ci_low) == pytest.approx((0.0, width))


def test_paired_comparison_refuses_unpaired_results():
    with pytest.raises(ValueError, match="different languages"):
        ev.paired_comparison(_result(eng=[1]), _result(fra=[1]))
    with pytest.raises(ValueError, match="same questions"):
        ev.paired_comparison(_result(eng=[1, 0]), _result(eng=[1]))
    with pytest.raises(TypeError, match="steered must be an EvalResult"):
        ev.paired_comparison(_result(eng=[1]), {"eng": 1.0})


@pytest.mark.parametrize("text,number", [
    ("so the answer is 42.", "42"), ("1,234.50 dollars", "1234.5"), ("-7 then 3", "3"),
    ("it is -7", "-7"), ("\u22125", "-5"), ("\u09ea\u09e8", "42"), ("\u0e51\u0e52", "12"),
    ("007", "7"), ("0.000", "0"), ("-0", "0"), ("3.14 m", "3.14"), ("no digits", None),
    ("", None), ("5km", "5"), ("$18.", "18"), ("4 then H2O", "4"), ("w30", None),
    ("\u7b54\u6848\u662f42\u3002", "42"), ("\u0e04\u0e37\u0e2d42", "42"),
    # separators: grouping commas end in three digits (Indian groups of two before), any other
    # comma separates numbers; Arabic and full-width marks; spaced French/Russian thousands
    ("1,234,567", "1234567"), ("1,23,456", "123456"), ("1,2,3", "3"), ("3,45", "45"),
    ("1234,567", "567"), ("-1,234", "-1234"), ("\uff11\uff0c\uff12\uff13\uff14", "1234"),
    ("\uff13\uff0e\uff15\uff10", "3.5"), ("\uff0d\uff18", "-8"),
    ("\u0661\u066c\u0662\u0663\u0664\u066b\u0665", "1234.5"),
    ("1\u00a0234 \u20ac", "1234"), ("1\u202f234\u202f567", "1234567"), ("2\u2009500", "2500"),
    ("1\u00a02345", "2345"), ("page 1 234", "234"), ("5\u00a0km", "5"),
    # Swiss apostrophe thousands (ASCII and typographic); feet and inches are two numbers
    ("1'234'567", "1234567"), ("CHF 2\u2019500.50", "2500.5"), ("1'2345", "2345"),
    ("5'10\"", "10"), ("Peter's 3", "3"),
    # dot groups (German, Spanish, Indonesian...): three digits after each dot, behind one to
    # three that do not start with 0, are thousands, as the paper's punctuation-blind scoring
    # reads them; a comma after them is the decimal mark. Other dots are decimal points.
    ("Die Antwort ist 18.000.", "18000"), ("1.234.567", "1234567"), ("-1.500", "-1500"),
    ("3.140 m", "3140"), ("10.000,50 \u20ac", "10000.5"), ("1.000,2.000", "2000"),
    ("0.125", "0.125"), ("1234.567", "1234.567"), ("1.2345", "1.2345"), ("12.50", "12.5"),
    ("1,234.567", "1234.567"), ("\u0661\u0662.\u0660\u0660\u0660", "12000"),
    # in any script's digits; the Arabic and full-width decimal marks stay decimal points
    ("\u0967.\u0966\u0966\u0966.\u0966\u0966\u0966", "1000000"),
    ("\u09e7\u09e6.\u09e6\u09e6\u09e6,\u09eb\u09e6", "10000.5"),
    ("\u0664\u0662\u066b\u0665\u0660\u0660", "42.5"), ("\uff13\uff0e\uff11\uff14\uff10", "3.14"),
    # the rest of a word's digits after a decimal mark is not a number of its own
    ("x18.000", None), ("v1.5", None), ("7 apples, see v1.5", "7"),
    ("x\uff11\uff0e\uff15", None), ("x18.000 and 4", "4"), ("1.2.3", "1.2"),
    # ... but a sign there starts a number
    ("5.-3", "-3"), ("from 2.\u22125 to", "-5")])
def test_last_number(text, number):
    assert ev.last_number(text) == number


# -- result files ------------------------------------------------------------------------------

def test_eval_result_round_trip_and_errors(tmp_path):
    result = ev.EvalResult({"eng": torch.tensor([True, False]), "fra": torch.tensor([True])},
                           {"eng": [0, 2], "fra": ["42"]}, {"kind": "choice"})
    path = tmp_path / "sub" / "r.json"
    result.save(path)
    back = ev.EvalResult.load(path)
    assert back.accuracy() == {"eng": 0.5, "fra": 1.0}
    assert back.predictions == result.predictions and back.meta == {"kind": "choice"}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]      # no temporary left
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a moe_route evaluation result"):
        ev.EvalResult.load(bad)
    data = result.to_dict()
    data["version"] = 99
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 99"):
        ev.EvalResult.load(bad)
    data["version"] = True  # == 1 in Python
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="has version True; this moe_route reads version 1"):
        ev.EvalResult.load(bad)
    data = result.to_dict()
    data["languages"]["eng"]["predictions"].append(1)
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="2 outcomes but 3 predictions"):
        ev.EvalResult.load(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ev.EvalResult.load(bad)
    # meta that would not read back as it was (a tuple, an int key) or not as strict JSON (NaN)
    for meta, why in (({"languages": ("eng", "fra")}, "read back from JSON unchanged"),
                      ({0: "shots"}, "read back from JSON unchanged"),
                      ({"temperature": math.nan}, "be JSON-serialisable")):
        with pytest.raises(ValueError, match=f"^EvalResult: meta must {why}"):
            ev.EvalResult({"eng": [True]}, {"eng": [0]}, meta)
    with pytest.raises(ValueError, match="Out of range float values"):
        ev.EvalResult({"eng": [True]}, {"eng": [math.nan]}).save(tmp_path / "nan.json")
    assert not (tmp_path / "nan.json").exists()


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("languages"), r"'languages' must be an object .*, got nothing"),
    (lambda d: d.update(languages=[1]), r"'languages' must be an object .*, got list"),
    (lambda d: d["languages"].update(eng={}), r"language 'eng' must be an object with 'correct' "
                                              r"and 'predictions'"),
    (lambda d: d["languages"]["eng"].update(correct=["x", 1]),
     r"correct\['eng'\] must hold one bool \(or 0/1 int\) per question, got \['x', 1\]"),
    (lambda d: d["languages"]["eng"].update(correct=[2, -1]),
     r"correct\['eng'\] must hold .*, got \[2, -1\]"),
    (lambda d: d["languages"]["eng"].update(correct=[0.5, 1]),
     r"correct\['eng'\] must hold .*, got \[0.5, 1\]"),
    (lambda d: d["languages"]["eng"].update(correct=1), r"correct\['eng'\] must be a bool tensor "
                                                        r"or a list of bools, got int"),
    (lambda d: d["languages"]["eng"].update(predictions="ab"), r"predictions\['eng'\] must be a "
                                                               r"list, got str"),
    (lambda d: d.update(meta=[1]), r"meta must be a dict, got list"),
])
def test_eval_result_file_errors_name_the_field(tmp_path, change, message):
    """A damaged result file gave KeyError/AttributeError, or turned outcomes like 2 or 0.5 into
    True without a word; every one is now a ValueError naming the file and the field."""
    data = ev.EvalResult({"eng": torch.tensor([True, False])}, {"eng": [0, 2]}).to_dict()
    change(data)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"^EvalResult.load: {tmp_path}/r.json: {message}"):
        ev.EvalResult.load(path)


def test_eval_result_takes_outcomes_as_lists_and_checks_them():
    """Lists of bools (or 0/1 ints) become bool tensors, so ``accuracy`` and
    ``paired_comparison`` work on them (they raised AttributeError); anything else is refused."""
    a = ev.EvalResult({"eng": [True, False, 1, 0]}, {"eng": [0, 1, 2, 3]})
    assert a.correct["eng"].dtype == torch.bool and a.accuracy() == {"eng": 0.5}
    b = ev.EvalResult({"eng": torch.tensor([1, 1, 0, 0])}, {"eng": [0, 1, 2, 3]})
    assert ev.paired_comparison(a, b)["eng"].gained == 1
    with pytest.raises(ValueError, match=r"EvalResult: correct\['eng'\] must hold one bool .* got "
                                         r"a torch.float32 tensor of shape \(2,\)"):
        ev.EvalResult({"eng": torch.tensor([1.0, 0.0])}, {"eng": [0, 1]})
    with pytest.raises(ValueError, match=r"got a torch.int64 tensor of shape \(2,\)"):
        ev.EvalResult({"eng": torch.tensor([2, 0])}, {"eng": [0, 1]})
    with pytest.raises(ValueError, match=r"correct and predictions must cover the same languages"):
        ev.EvalResult({"eng": [True]}, {"fra": [0]})
    with pytest.raises(ValueError, match=r"language 'eng' has 1 outcomes but 2 predictions"):
        ev.EvalResult({"eng": [True]}, {"eng": [0, 1]})
    with pytest.raises(TypeError, match=r"EvalResult: correct must be a dict, got list"):
        ev.EvalResult([True], {"eng": [0]})


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _atomic.write_atomic(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    _atomic.write_text_atomic(path, "new")
    assert path.read_text() == "new"


# -- multiple choice ---------------------------------------------------------------------------

def _reference_choice(model, items, normalize="none"):
    """One unpadded forward per (question, option): summed log-probabilities of its tokens."""
    predictions = {}
    with torch.no_grad():
        for lang, questions in items.items():
            predictions[lang] = []
            for item in questions:
                scores = []
                prompt = torch.as_tensor(item.prompt).tolist()
                for option in item.options:
                    option = torch.as_tensor(option).tolist()
                    ids = torch.tensor([prompt + option])
                    lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                    s = sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(option))
                    scores.append(s / len(option) if normalize == "tokens" else s)
                predictions[lang].append(max(range(len(scores)), key=lambda j: (scores[j], -j)))
    return predictions


def _attentive(model):
    """The tiny model with attention weights large enough that what a token attends to (the
    padding, if the mask were wrong) changes which option wins."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "self_attn" in name and name.endswith("proj.weight"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model


def _random_items(seed, n, vocab=96):
    g = torch.Generator().manual_seed(seed)
    items = []
    for q in range(n):
        prompt = torch.randint(0, vocab, (int(torch.randint(1, 12, (1,), generator=g)),),
                               generator=g)
        if q % 3 == 0:     # single-token options: the one-forward path
            options = [[int(t)] for t in torch.randperm(vocab, generator=g)[:4]]
        else:              # options of 1..3 tokens: one row per option
            options = [torch.randint(0, vocab, (int(torch.randint(1, 4, (1,), generator=g)),),
                                     generator=g).tolist() for _ in range(3)]
        items.append(ev.ChoiceItem(prompt, options, q % len(options)))
    return items


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("normalize", ["none", "tokens"])
def test_choice_accuracy_matches_unbatched_scoring(family, normalize):
    """Left-padded batches of mixed lengths (position ids from the mask, only the last logits
    kept) pick the same option as one unpadded forward per option."""
    model = _attentive(build(family))
    items = {"eng": _random_items(0, 24), "fra": _random_items(1, 16)}
    got = ev.choice_accuracy(model, items, normalize=normalize, batch_size=5)
    want = _reference_choice(model, items, normalize)
    assert got.predictions == want
    for lang in items:
        answers = torch.tensor([item.answer for item in items[lang]])
        assert got.correct[lang].tolist() == (torch.tensor(want[lang]) == answers).tolist()
    assert got.meta["normalize"] == normalize


def test_left_padding_gives_absolute_positions_from_the_mask():
    """On a model with learned absolute positions (GPT-2), a left-padded batch scores as the
    unpadded forwards only because position ids are taken from the mask; rotary models cannot
    tell (a common shift cancels), so this is the test of it."""
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.normal_(0, 2.0)     # positions move the scores a lot
    items = {"eng": _random_items(3, 30)}
    got = ev.choice_accuracy(model, items, batch_size=6)
    assert got.predictions == _reference_choice(model, items)
    # the same batch without position ids scores differently: the model is position-sensitive
    ids, mask = ev._left_pad([[5, 6, 7], [8]], 0)
    with torch.no_grad():
        shifted = model(input_ids=ids, attention_mask=mask).logits[1, -1]
        alone = model(input_ids=torch.tensor([[8]])).logits[0, -1]
    assert not torch.allclose(shifted, alone, atol=1e-3)


WORDS = (["<pad>", "<s>", "<unk>", "user", ":", "assistant"] + [str(d) for d in range(10)]
         + [f"w{i}" for i in range(16, 96)])


def test_choice_accuracy_on_text_matches_the_token_ids():
    """Text prompts and options give the option tokens that follow the prompt; the chat
    template wraps the prompt; both score as the same questions given as token ids."""
    model, tok = _attentive(build("olmoe")), word_tokenizer(WORDS)
    text = {"eng": [ev.ChoiceItem("w20 w21 w22", [" w30", " w31 w32", " 7"], 1),
                    ev.ChoiceItem("w40", [" w41", " w42"], 0)]}
    ids = {"eng": [ev.ChoiceItem(tok(i.prompt)["input_ids"],
                                 [tok(o, add_special_tokens=False)["input_ids"] for o in i.options],
                                 i.answer) for i in text["eng"]]}
    assert ev.choice_accuracy(model, text, tokenizer=tok).predictions == \
        _reference_choice(model, ids)
    chat = ev.choice_accuracy(model, text, tokenizer=tok, chat_template=True)
    wrapped = {"eng": [ev.ChoiceItem(tok("<s> user : " + i.prompt + " assistant :")["input_ids"],
                                     j.options, i.answer)
                       for i, j in zip(text["eng"], ids["eng"])]}
    assert chat.predictions == _reference_choice(model, wrapped)
    normalized = ev.choice_accuracy(model, text, tokenizer=tok, normalize="bytes")
    assert normalized.meta["normalize"] == "bytes"
    chars = ev.choice_accuracy(model, text, tokenizer=tok, normalize="chars")
    assert chars.predictions == normalized.predictions  # ASCII options: as many bytes as chars
    for normalize in ("bytes", "chars"):
        with pytest.raises(ValueError, match=f"normalize='{normalize}' needs text options"):
            ev.choice_accuracy(model, ids, normalize=normalize)


class _FixedLogits(torch.nn.Module):
    """Next-token logits ``row`` at every position; NaN everywhere in a row that holds token 3
    (as a model that overflows on some inputs)."""

    def __init__(self, row):
        super().__init__()
        self.row = torch.nn.Parameter(torch.tensor(row), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        logits = self.row.expand(*input_ids.shape, -1).clone()
        logits[(input_ids == 3).any(1)] = float("nan")
        return types.SimpleNamespace(logits=logits)


def test_choice_ties_go_to_the_lower_option_and_nan_never_wins():
    model = _FixedLogits([0.0, 1.0, 1.0, 1.0, 5.0])
    items = {"x": [ev.ChoiceItem([0], [[1], [2]], 1),           # tie: option 0
                   ev.ChoiceItem([0], [[3], [0, 0]], 0),        # NaN vs a number: option 1
                   ev.ChoiceItem([0], [[3], [3, 3]], 0)]}       # NaN everywhere: option 0
    assert ev.choice_accuracy(model, items).predictions == {"x": [0, 1, 0]}


def test_chars_normalisation_leaves_out_the_options_leading_space():
    """lm-eval's acc_norm divides by the option's length without the space before it: " w30"
    (log-likelihood -3) counts 3 characters and " w31 w32" (-6.5) counts 7, so the longer option
    wins (-0.93 against -1.0); counting the spaces (4 and 8) gave the shorter one."""
    row = torch.full((len(WORDS),), -1e4)
    row[30], row[31], row[32] = -3.0, -3.25, -3.25
    row[0] = math.log(1 - math.exp(-3.0) - 2 * math.exp(-3.25))    # log-softmax == row
    model, tok = _FixedLogits(row.tolist()), word_tokenizer(WORDS)
    items = {"eng": [ev.ChoiceItem("w20", [" w30", " w31 w32"], 1)]}
    want = {"none": 0, "tokens": 0, "chars": 1, "bytes": 1}
    for normalize, best in want.items():
        got = ev.choice_accuracy(model, items, tokenizer=tok, normalize=normalize)
        assert got.predictions == {"eng": [best]}, normalize


def test_choice_refuses_token_ids_outside_the_vocabulary():
    model = build("olmoe")
    vocab = model.get_input_embeddings().num_embeddings
    for prompt, options in (([1, 2], [[3], [vocab]]), ([-1], [[3], [4]])):
        with pytest.raises(ValueError, match=rf"language 'x', item 0: token id -?\d+ is not in the "
                                             rf"model's vocabulary \[0, {vocab}\)"):
            ev.choice_accuracy(model, {"x": [ev.ChoiceItem(prompt, options, 0)]})


def test_planted_task_as_questions_gives_the_planted_accuracy():
    """On the planted model the accuracy is known (task score vs difficulty): the questions of
    ``choice_items`` reproduce it, with and without steering of the task experts."""
    from moe_route.testing import planted_model

    pm = planted_model()
    questions = pm.choice_items()
    assert ev.choice_accuracy(pm.model, questions, batch_size=128).accuracy() == \
        pm.accuracy_by_language()
    plan = moe_route.SteeringPlan.promote(layers=list(pm.truth.middle_layers),
                                          experts=list(pm.truth.task_experts[2]), std=0.5)
    result = pipeline.ab_test(pm.model, plan,
                              lambda: ev.choice_accuracy(pm.model, questions, batch_size=128))
    with moe_route.steer(pm.model, plan):
        steered = pm.accuracy_by_language()
    assert result["steered"] == steered
    assert result["baseline"] == pm.accuracy_by_language()
    paired = result["paired"]
    assert set(paired) == set(pm.languages) | {"all"}
    for lang in pm.languages:
        assert paired[lang]["delta"] == pytest.approx(steered[lang] - result["baseline"][lang])
        assert paired[lang]["n"] == len(questions[lang])


def test_choice_accuracy_errors():
    model = build("olmoe")
    ok = ev.ChoiceItem([1, 2], [[3], [4]], 0)
    with pytest.raises(ValueError, match="non-empty"):
        ev.choice_accuracy(model, {})
    with pytest.raises(TypeError, match=r"items\['eng'\] must hold ChoiceItem items, got dict"):
        ev.choice_accuracy(model, {"eng": [{"prompt": "x"}]})
    with pytest.raises(ValueError, match="normalize='max' must be one of"):
        ev.choice_accuracy(model, {"eng": [ok]}, normalize="max")
    with pytest.raises(ValueError, match="batch_size=0 must be an int >= 1"):
        ev.choice_accuracy(model, {"eng": [ok]}, batch_size=0)
    with pytest.raises(ValueError, match=r"item 0: answer=2 must be an option index in \[0, 2\)"):
        ev.choice_accuracy(model, {"eng": [ev.ChoiceItem([1], [[3], [4]], 2)]})
    with pytest.raises(ValueError, match="needs >= 2 options"):
        ev.choice_accuracy(model, {"eng": [ev.ChoiceItem([1], [[3]], 0)]})
    with pytest.raises(ValueError, match="is text; pass tokenizer="):
        ev.choice_accuracy(model, {"eng": [ev.ChoiceItem("hi", ["a", "b"], 0)]})
    with pytest.raises(TypeError, match="token-id prompts need token-id options"):
        ev.choice_accuracy(model, {"eng": [ev.ChoiceItem([1], ["a", "b"], 0)]})
    with pytest.raises(ValueError, match=r"options \[1\] have no tokens"):
        ev.choice_accuracy(model, {"eng": [ev.ChoiceItem([1], [[2], []], 0)]})
    with pytest.raises(ValueError, match="the prompt has no tokens"):
        ev.choice_accuracy(model, {"eng": [ev.ChoiceItem([], [[2], [3]], 0)]})
    with pytest.raises(ValueError, match="1-D sequence of token ids"):
        ev.choice_accuracy(model, {"eng": [ev.ChoiceItem([[1]], [[2], [3]], 0)]})


def test_prompts_keep_bos_but_not_an_appended_eos():
    """A tokenizer that writes ``<s> TEXT </s>``: the options are scored right after the prompt
    and generation starts right after it, with the BOS in front and no EOS in between."""
    words = WORDS[:-1] + ["</s>"]                      # ids stay in the model's vocabulary
    tok, eos = word_tokenizer(words, eos="</s>"), len(words) - 1
    assert tok("w20 w21")["input_ids"] == [1, tok.convert_tokens_to_ids("w20"),
                                           tok.convert_tokens_to_ids("w21"), eos]
    model = _attentive(build("olmoe"))
    text = {"eng": [ev.ChoiceItem("w20 w21 w22", [" w30", " w31 w32", " 7"], 1),
                    ev.ChoiceItem("w40", [" w41", " w42"], 0)]}
    ids = {"eng": [ev.ChoiceItem(tok(i.prompt)["input_ids"][:-1],
                                 [tok(o, add_special_tokens=False)["input_ids"] for o in i.options],
                                 i.answer) for i in text["eng"]]}
    assert all(i.prompt[0] == 1 and eos not in i.prompt for i in ids["eng"])
    assert ev.choice_accuracy(model, text, tokenizer=tok).predictions == \
        _reference_choice(model, ids)
    w = tok.convert_tokens_to_ids
    scripted = _ScriptedModel({1: [w("4"), w("2")]})
    items = {"eng": [ev.GenerationItem("w20 w21", "2"), ev.GenerationItem("w40", "2")]}   # "4 2"
    got = ev.generation_accuracy(scripted, items, tokenizer=tok, max_new_tokens=2, stop=())
    assert got.correct["eng"].tolist() == [True, True]
    sent, mask, _ = scripted.calls[0]
    assert sent.tolist() == [[1, w("w20"), w("w21")], [0, 1, w("w40")]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match="the prompt '' has no tokens"):
        ev.generation_accuracy(scripted, {"eng": [ev.GenerationItem("", "1")]}, tokenizer=tok)


# -- generation --------------------------------------------------------------------------------

def test_generation_accuracy_matches_a_greedy_loop():
    """Batched, left-padded ``generate`` extracts the same answers as greedy decoding of each
    prompt alone; an item is right iff its last number equals the answer's."""
    model, tok = _attentive(build("olmoe")), word_tokenizer(WORDS)
    prompts = ["w20 w21 3", "w40", "w50 w51 w52 w53 w54", "7 7"]
    new_tokens = 6
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"]
            for _ in range(new_tokens):
                nxt = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
            text = tok.decode(ids[0, len(tok(p)["input_ids"]):], skip_special_tokens=True)
            expected.append(ev.last_number(text))
    answers = [e if e is not None else "1" for e in expected]
    answers[1] = "12345"                              # one wrong answer on purpose
    items = {"eng": [ev.GenerationItem(p, a) for p, a in zip(prompts[:2], answers[:2])],
             "fra": [ev.GenerationItem(p, a) for p, a in zip(prompts[2:], answers[2:])]}
    got = ev.generation_accuracy(model, items, tokenizer=tok, max_new_tokens=new_tokens,
                                 batch_size=3, stop=())
    assert got.predictions == {"eng": expected[:2], "fra": expected[2:]}
    right = [e is not None and e == a for e, a in zip(expected, answers)]
    assert got.correct["eng"].tolist() == right[:2] and got.correct["fra"].tolist() == right[2:]
    with pytest.raises(ValueError, match="max_new_tokens=0 must be an int >= 1"):
        ev.generation_accuracy(model, items, tokenizer=tok, max_new_tokens=0)
    with pytest.raises(ValueError, match="pass tokenizer="):
        ev.generation_accuracy(model, items, tokenizer=None)
    with pytest.raises(TypeError, match=r"stop must be a sequence of strings \(one stop string "
                                        r"is \('Question',\)\)"):
        ev.generation_accuracy(model, items, tokenizer=tok, stop="Question")
    with pytest.raises(TypeError, match="stop must be a sequence of strings"):
        ev.generation_accuracy(model, items, tokenizer=tok, stop=("Question:", None))
    with pytest.raises(TypeError, match="extract must be callable .* got NoneType"):
        ev.generation_accuracy(model, items, tokenizer=tok, extract=None)


class _ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: ``generate`` appends a fixed continuation per prompt (by its
    first token) and records what it was called with."""

    def __init__(self, continuations):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations, self.calls = continuations, []

    def generate(self, input_ids, attention_mask, **options):
        self.calls.append((input_ids.clone(), attention_mask.clone(), options))
        first = [int(row[mask.bool()][0]) for row, mask in zip(input_ids, attention_mask)]
        new = torch.tensor([self.continuations[f] for f in first])
        return torch.cat([input_ids, new], 1)


def test_generation_cuts_at_stop_strings_and_reads_the_last_number():
    tok = word_tokenizer(WORDS)
    w = tok.convert_tokens_to_ids
    model = _ScriptedModel({w("w20"): [w("w30"), w("5"), w("w21"), w("7"), w("w31")],
                            w("w40"): [w("4"), w("2"), w("w30"), w("w30"), w("w30")],
                            w("w50"): [w("w30"), w("w31"), w("w30"), w("w31"), w("w30")]})
    items = {"eng": [ev.GenerationItem("w20 w22 w23", "5"), ev.GenerationItem("w40", "2"),
                     ev.GenerationItem("w50 w51", "0")]}
    got = ev.generation_accuracy(model, items, tokenizer=tok, max_new_tokens=5, stop=("w21",))
    # "w30 5 | w21 7 w31" -> 5; "4 2 w30 ..." -> 2 (the last number); no number -> None
    assert got.predictions == {"eng": ["5", "2", None]}
    assert got.correct["eng"].tolist() == [True, True, False]
    ids, mask, options = model.calls[0]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]        # left-padded
    assert options == {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    again = ev.generation_accuracy(model, items, tokenizer=tok, max_new_tokens=5, stop=())
    assert again.predictions["eng"][0] == "7"


# -- few-shot prompts --------------------------------------------------------------------------

def test_few_shot_prompts_known_answer():
    """Examples drawn from the task itself skip the question; a sequence serves every
    language; a choice example shows its right option, a generation example its answer."""
    gen = {"eng": [ev.GenerationItem("Q: 1+1\nA:", "2"), ev.GenerationItem("Q: 2+2\nA:", "4"),
                   ev.GenerationItem("Q: 3+3\nA:", "6")]}
    got = ev.few_shot(gen, gen, 2)
    assert [g.prompt for g in got["eng"]] == [
        "Q: 2+2\nA: 4\n\nQ: 3+3\nA: 6\n\nQ: 1+1\nA:",
        "Q: 1+1\nA: 2\n\nQ: 3+3\nA: 6\n\nQ: 2+2\nA:",
        "Q: 1+1\nA: 2\n\nQ: 2+2\nA: 4\n\nQ: 3+3\nA:"]
    assert [g.answer for g in got["eng"]] == ["2", "4", "6"]
    assert ev.few_shot(gen, gen, 0) == gen
    choice = {"fra": [ev.ChoiceItem("Le chat ?", [" A", " B"], 1)],
              "swh": [ev.ChoiceItem("Paka ?", [" A", " B"], 0)]}
    english = [ev.ChoiceItem("The cat?", [" A", " B"], 0), ev.ChoiceItem("A dog?", [" A", " B"], 1)]
    got = ev.few_shot(choice, english, 2, separator="\n")
    assert got["fra"][0] == ev.ChoiceItem("The cat? A\nA dog? B\nLe chat ?", [" A", " B"], 1)
    assert got["swh"][0].prompt == "The cat? A\nA dog? B\nPaka ?"
    # a worked solution as a generation example: its last number is the answer
    worked = [ev.GenerationItem("Q: 5-2\nA:", "5 take away 2 leaves 3. The answer is 3")]
    assert ev.few_shot(gen, worked, 1)["eng"][0].prompt.startswith("Q: 5-2\nA: 5 take away")
    assert ev.last_number(worked[0].answer) == "3"


def test_few_shot_errors():
    gen = {"eng": [ev.GenerationItem("a", "1"), ev.GenerationItem("b", "2")]}
    with pytest.raises(ValueError, match="shots=-1 must be an int >= 0"):
        ev.few_shot(gen, gen, -1)
    with pytest.raises(ValueError, match=r"items\['eng'\]\[0\] needs 2 examples, the exemplars "
                                         r"for 'eng' give 1"):
        ev.few_shot(gen, gen, 2)
    with pytest.raises(ValueError, match=r"exemplars has no \['eng'\]; it has \['fra'\]"):
        ev.few_shot(gen, {"fra": gen["eng"]}, 1)
    with pytest.raises(TypeError, match="exemplars must be a"):
        ev.few_shot(gen, "examples", 1)
    with pytest.raises(TypeError, match="exemplar 0 for 'eng' must be a ChoiceItem or "
                                        "GenerationItem with a text prompt"):
        ev.few_shot(gen, [{"prompt": "x"}], 1)
    with pytest.raises(TypeError, match="token-id prompt"):
        ev.few_shot({"eng": [ev.ChoiceItem([1, 2], [[3], [4]], 0)]}, gen["eng"], 1)
    with pytest.raises(ValueError, match="answer=5 must index a text option"):
        ev.few_shot(gen, [ev.ChoiceItem("q", [" a", " b"], 5)], 1)


# -- data --------------------------------------------------------------------------------------

def test_load_choice_and_generation_tasks_from_jsonl(tmp_path):
    choice = tmp_path / "mc.jsonl"
    rows = [{"language": "eng", "prompt": "Q1", "options": [" a", " b"], "answer": 1},
            {"language": "swh", "prompt": "Q1s", "options": [" a", " b"], "answer": 0},
            {"language": "eng", "prompt": "Q2", "options": [" a", " b", " c"], "answer": 2}]
    choice.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    items = ev.load_choice_task(choice)
    assert list(items) == ["eng", "swh"] and len(items["eng"]) == 2
    assert items["eng"][1] == ev.ChoiceItem("Q2", [" a", " b", " c"], 2)
    assert ev.load_choice_task(choice, ["swh"]) == {"swh": [ev.ChoiceItem("Q1s", [" a", " b"], 0)]}
    assert len(ev.load_choice_task(choice, limit=1)["eng"]) == 1
    with pytest.raises(ValueError, match=r"languages \['fra'\] are not in the data"):
        ev.load_choice_task(choice, ["fra"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match="line 1: answer=5 is not an index of its 2 options"):
        ev.load_choice_task(bad)
    bad.write_text(json.dumps({"language": "eng", "prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1: expected language, prompt, options and answer"):
        ev.load_choice_task(bad)
    for field, value, message in (("options", " yes", "options must be a list of strings"),
                                  ("options", [" a", 2], "options must be a list of strings"),
                                  ("answer", 1.9, r"answer must be an option index \(an int\), "
                                                  r"got 1.9"),
                                  ("answer", True, "answer must be an option index")):
        bad.write_text(json.dumps({**rows[0], field: value}) + "\n")
        with pytest.raises(ValueError, match=f"line 1: {message}"):
            ev.load_choice_task(bad)
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        ev.load_choice_task(bad)
    with pytest.raises(ValueError, match="must be a .jsonl file or a known dataset name"):
        ev.load_choice_task(tmp_path / "x.tsv")
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"language": "bn", "prompt": "Question: 2+2?", "answer": 4}) + "\n")
    assert ev.load_generation_task(gen) == {"bn": [ev.GenerationItem("Question: 2+2?", "4")]}
    gen.write_text(json.dumps({"language": "bn", "prompt": "Q", "answer": None}) + "\n")
    with pytest.raises(ValueError, match="line 1: answer must be a finite number or a string, "
                                         "got None"):
        ev.load_generation_task(gen)
    # a float answer is written out positionally: str(1e20) is "1e+20", read back as 20
    gen.write_text("".join(json.dumps({"language": "bn", "prompt": "Q", "answer": a}) + "\n"
                           for a in (1e20, 2.5, 18.0)))
    answers = [item.answer for item in ev.load_generation_task(gen)["bn"]]
    assert answers == ["100000000000000000000", "2.5", "18.0"]
    assert [ev.last_number(a) for a in answers] == ["100000000000000000000", "2.5", "18"]
    gen.write_text('{"language": "bn", "prompt": "Q", "answer": NaN}\n')
    with pytest.raises(ValueError, match="line 1: answer must be a finite number or a string, "
                                         "got nan"):
        ev.load_generation_task(gen)
    # a null language or prompt was the text "None"
    for loader, extra in ((ev.load_generation_task, {"answer": 1}),
                          (ev.load_choice_task, {"options": [" a", " b"], "answer": 0})):
        for field in ("language", "prompt"):
            row = {"language": "bn", "prompt": "Q", **extra, field: None}
            gen.write_text(json.dumps(row) + "\n")
            with pytest.raises(ValueError, match=f"gen.jsonl line 1: {field} must be a string, "
                                                 f"got None"):
                loader(gen)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no questions"):
        ev.load_generation_task(empty)


@pytest.mark.parametrize("limit, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                          (True, TypeError)])
def test_task_loaders_refuse_a_limit_that_is_not_a_count(tmp_path, limit, error):
    """``limit`` is the first N questions, N >= 1: 0 loaded nothing (accuracy NaN, reported as
    a result) and -1 silently dropped the last question (a Python slice)."""
    choice = tmp_path / "mc.jsonl"
    choice.write_text("\n".join(json.dumps({"language": "eng", "prompt": f"Q{i}",
                                            "options": [" a", " b"], "answer": 0})
                                for i in range(3)) + "\n", encoding="utf-8")
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"language": "eng", "prompt": "2+2?", "answer": 4}) + "\n")
    assert [len(ev.load_choice_task(choice, limit=n)["eng"]) for n in (None, 2, 5)] == [3, 2, 3]
    with pytest.raises(error, match=rf"load_choice_task: limit={limit!r} must be None"):
        ev.load_choice_task(choice, limit=limit)
    with pytest.raises(error, match=rf"load_generation_task: limit={limit!r} must be"):
        ev.load_generation_task(gen, limit=limit)


def test_belebele_rows_become_letter_questions():
    """lm-eval's Belebele prompt (the question stripped, as Global-MMLU's)."""
    row = {"flores_passage": "The cat sat.", "question": " Who sat?\n", "mc_answer1": "a dog",
           "mc_answer2": "the cat", "mc_answer3": "a bird", "mc_answer4": "nobody",
           "correct_answer_num": "2"}
    item = ev._belebele_item(row)
    assert item.prompt == ("P: The cat sat.\nQ: Who sat?\nA: a dog\nB: the cat\nC: a bird\n"
                           "D: nobody\nAnswer:")
    assert item.options == [" A", " B", " C", " D"] and item.answer == 1


def test_hub_tasks_from_the_hub_layouts(monkeypatch, tmp_path):
    """Belebele by language config (test split; the legacy layout too), Global-MGSM by language
    config and its test split (prompted with the row's instruction and answer prefix), with the
    limit; read by the real ``datasets`` from local copies
    of the Hub layouts. ``juletxara/mgsm`` (a loading script ``datasets`` 4 refuses) names its
    replacement."""
    belebele = {"flores_passage": "P.", "question": "Q?", "mc_answer1": "a", "mc_answer2": "b",
                "mc_answer3": "c", "mc_answer4": "d", "correct_answer_num": "4"}
    by_lang = {lang: {"test": [belebele] * 3} for lang in ("eng_Latn", "swh_Latn")}
    solve = "Tatua swali."
    mgsm = {"sw": {"test": [{"question": "2+2?", "answer": "4", "answer_prefix": "Jibu",
                             "instruction": solve},
                            {"question": "3+3?", "answer": "6", "answer_prefix": "Jibu",
                             "instruction": solve}]}}
    repos = {"facebook/belebele": write_repo(tmp_path / "belebele", by_lang),
             "CohereLabs/global-mgsm": write_repo(tmp_path / "mgsm", mgsm)}
    calls = datasets_serving(monkeypatch, tmp_path, repos)
    items = ev.load_choice_task("belebele", ["eng_Latn", "swh_Latn"], limit=2)
    assert [len(v) for v in items.values()] == [2, 2] and items["swh_Latn"][0].answer == 3
    gen = ev.load_generation_task("mgsm", ["sw"])
    assert gen == {"sw": [ev.GenerationItem(f"{solve}\n\nQuestion: 2+2?\n\nJibu:", "4"),
                          ev.GenerationItem(f"{solve}\n\nQuestion: 3+3?\n\nJibu:", "6")]}
    # a copy of MGSM without the instruction and the prefix: English labels
    assert ev._mgsm_item({"question": "2+2?", "answer": 4}) == \
        ev.GenerationItem("Question: 2+2?\nAnswer:", "4")
    assert calls == [("facebook/belebele", "eng_Latn", "split=test"),
                     ("facebook/belebele", "swh_Latn", "split=test"),
                     ("CohereLabs/global-mgsm", "sw", "split=test")]
    repos["facebook/belebele"] = write_repo(tmp_path / "legacy", {
        "default": {lang: splits["test"] for lang, splits in by_lang.items()}})
    assert ev.load_choice_task("facebook/belebele", ["swh_Latn"]) == {
        "swh_Latn": [items["swh_Latn"][0]] * 3}
    with pytest.raises(ValueError, match="source='mgsm' needs languages"):
        ev.load_generation_task("mgsm")
    with pytest.raises(ValueError, match=r"source='juletxara/mgsm' is a loading-script dataset"
                                         r".*; use 'mgsm' \(CohereLabs/global-mgsm\)"):
        ev.load_generation_task("juletxara/mgsm", ["sw"])
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        ev.load_choice_task("belebele", ["eng_Latn"])


def test_global_mmlu_from_the_hub_layout(monkeypatch, tmp_path):
    """Global-MMLU by language config and split, the question stripped (as lm-eval does), the
    letter answer as the option index, the subject filter (subject or category, any case)
    before the limit; read by the real ``datasets`` from a local copy of the Hub layout."""

    def row(i, subject, category, answer):
        return {"sample_id": f"{subject}/{i}", "subject": subject, "subject_category": category,
                "question": f"q{i}? ", "option_a": "a", "option_b": "b", "option_c": "c",
                "option_d": "d", "answer": answer}

    data = [row(0, "astronomy", "STEM", "B"), row(1, "anatomy", "Medical", "D"),
            row(2, "virology", "Medical", "A"), row(3, "nutrition", "Medical", "C")]

    def repo(name, rows):
        return write_repo(tmp_path / name, {lang: {"test": rows, "dev": rows}
                                             for lang in ("en", "sw")})

    repos = {"CohereLabs/Global-MMLU": repo("mmlu", data)}
    calls = datasets_serving(monkeypatch, tmp_path, repos)
    items = ev.load_choice_task("global_mmlu", ["sw"])
    assert items["sw"][0] == ev.ChoiceItem("q0?\nA. a\nB. b\nC. c\nD. d\nAnswer:",
                                           [" A", " B", " C", " D"], 1)
    assert [i.answer for i in items["sw"]] == [1, 3, 0, 2]
    medical = ev.load_choice_task("CohereLabs/Global-MMLU", ["en", "sw"], subjects=["MEDICAL"],
                                  limit=2)
    assert [i.prompt[:3] for i in medical["en"]] == ["q1?", "q2?"]
    assert [i.prompt[:3] for i in ev.load_choice_task(
        "global_mmlu", ["en"], subjects=["astronomy", "nutrition"], split="dev")["en"]] == \
        ["q0?", "q3?"]
    assert calls == [("CohereLabs/Global-MMLU", "sw", "split=test"),
                     ("CohereLabs/Global-MMLU", "en", "split=test"),
                     ("CohereLabs/Global-MMLU", "sw", "split=test"),
                     ("CohereLabs/Global-MMLU", "en", "split=dev")]
    with pytest.raises(ValueError, match="subjects= applies to Global-MMLU, not 'belebele'"):
        ev.load_choice_task("belebele", ["eng_Latn"], subjects=["medical"])
    with pytest.raises(ValueError, match="split='dev' applies to Global-MMLU"):
        ev.load_choice_task("belebele", ["eng_Latn"], split="dev")
    with pytest.raises(TypeError, match="subjects must be a list of names"):
        ev.load_choice_task("global_mmlu", ["en"], subjects="medical")
    with pytest.raises(ValueError, match=r"no Global-MMLU 'en' test question has a subject or "
                                         r"category in \['law'\]; the categories are "
                                         r"\['Medical', 'STEM'\]"):
        ev.load_choice_task("global_mmlu", ["en"], subjects=["law"])
    repos["CohereLabs/Global-MMLU"] = repo("bad", data + [row(4, "anatomy", "Medical", "E")])
    with pytest.raises(ValueError, match="'anatomy/4' has answer 'E', expected a letter A-D"):
        ev.load_choice_task("global_mmlu", ["en"])


# -- CLI ---------------------------------------------------------------------------------------

def test_cli_evaluate_with_a_plan_on_a_saved_model(tmp_path):
    """``moe-route evaluate`` on a local model directory: baseline.json equals choice_accuracy
    run in Python; with --plan also steered.json and ab.json with the paired comparison."""
    model_dir = tmp_path / "model"
    build("olmoe").save_pretrained(model_dir)
    tok = word_tokenizer(WORDS)
    tok.save_pretrained(model_dir)
    task = tmp_path / "mc.jsonl"
    rows = [{"language": lang, "prompt": f"w{20 + i} w{30 + i} w{40 + i}",
             "options": [" w50", " w51 w52", " 3"], "answer": i % 3}
            for lang in ("eng", "swh") for i in range(6)]
    task.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    plan_path = tmp_path / "plan.json"
    plan = moe_route.SteeringPlan.force(0, 3)
    plan.save(plan_path)
    run = lambda *args: subprocess.run([sys.executable, "-m", "moe_route.cli", *args],  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    out = run("evaluate", str(model_dir), "--task", str(task), "--plan", str(plan_path),
              "--dtype", "fp32", "--out", str(tmp_path / "res"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "McNemar" in out.stdout
    base = ev.EvalResult.load(tmp_path / "res" / "baseline.json")
    steered = ev.EvalResult.load(tmp_path / "res" / "steered.json")
    model = build("olmoe")
    items = ev.load_choice_task(task)
    assert base.predictions == ev.choice_accuracy(model, items, tokenizer=tok).predictions
    with moe_route.steer(model, plan):
        assert steered.predictions == ev.choice_accuracy(model, items, tokenizer=tok).predictions
    ab = json.loads((tmp_path / "res" / "ab.json").read_text())
    assert ab["paired"]["all"]["n"] == 12 and base.meta["model"] == str(model_dir)
    assert steered.meta["plan"] == str(plan_path) and base.meta["plan"] is None
    # a plan for layers the model lacks: refused before the baseline runs (it was a traceback
    # after it, and the baseline's results were lost)
    moe_route.SteeringPlan.promote([5], [1]).save(tmp_path / "far.json")
    out = run("evaluate", str(model_dir), "--task", str(task), "--plan", str(tmp_path / "far.json"),
              "--out", str(tmp_path / "res5"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "moe-route evaluate: steer: layer 5 is not an MoE layer of the model" in out.stderr
    assert not list((tmp_path / "res5").iterdir())
    out = run("evaluate", str(model_dir), "--task", str(tmp_path / "nope.tsv"), "--out",
              str(tmp_path / "res2"))
    assert out.returncode == 2 and "must be belebele, global_mmlu, mgsm or a .jsonl" in out.stderr
    # the older MGSM copy is named as such, with its replacement (was the line above)
    out = run("evaluate", str(model_dir), "--task", "juletxara/mgsm", "--out",
              str(tmp_path / "res6"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert ("moe-route evaluate: --task: source='juletxara/mgsm' is a loading-script dataset, "
            "which `datasets` 4 and later no longer load; use mgsm (CohereLabs/global-mgsm)"
            in out.stderr), out.stderr
    # --shots: the first 2 other questions of the language before each (and recorded in meta)
    out = run("evaluate", str(model_dir), "--task", str(task), "--shots", "2", "--dtype", "fp32",
              "--out", str(tmp_path / "res3"))
    assert out.returncode == 0, out.stdout + out.stderr
    shot = ev.EvalResult.load(tmp_path / "res3" / "baseline.json")
    assert shot.predictions == ev.choice_accuracy(model, ev.few_shot(items, items, 2),
                                                  tokenizer=tok).predictions
    assert shot.meta["shots"] == 2 and shot.meta["shots_from"] is None
    out = run("evaluate", str(model_dir), "--task", str(task), "--shots-from", str(task),
              "--out", str(tmp_path / "res4"))
    assert out.returncode == 2 and "--shots-from needs --shots N" in out.stderr
    out = run("evaluate", str(model_dir), "--task", str(task), "--shots", "1", "--shots-from",
              "dev", "--out", str(tmp_path / "res5"))
    assert out.returncode == 2 and "(a split name works with --task global_mmlu)" in out.stderr
    out = run("evaluate", str(model_dir), "--task", "mgsm", "--languages", "sw", "--subjects",
              "medical", "--out", str(tmp_path / "res6"))
    assert out.returncode == 2 and "--subjects applies to --task global_mmlu, not 'mgsm'" in \
        out.stderr
