"""A tiny real MoE model whose routing answer is known by design, with a synthetic parallel corpus.

    pm = planted_model()                       # OlmoeForCausalLM, 5 languages, 8 layers, E=16, k=2
    pm.corpus["eng"], pm.corpus["lang3"]        # [N, S] token ids; row i of every language is
                                                # the same concepts (parallel "sentences")
    pm.truth.middle_layers, pm.truth.task_experts   # (2, 3, 4, 5), {2: (2, 3), ...}
    pm.accuracy_by_language()                   # {"eng": 1.0, ..., "lang4": 0.0}: task accuracy

What is planted (``PlantedTruth``), for the analyses of *Multilingual Routing in MoE*:

* **early and late layers route by language**: every token of language l goes to the same top-k
  experts ``language_experts[layer][l]``, disjoint between languages, so the routing divergence
  from the reference language is high there;
* **middle layers route by concept**: a token goes to ``concept_experts[layer][c]`` whatever its
  language, so parallel sentences route alike and the divergence is low (a U-shaped curve);
* **task experts**: in middle layers the task concepts route to ``task_experts[layer]``, which no
  general concept uses, so their activation frequency on task data exceeds that on general
  (baseline) data by ``task_delta`` (``task_fraction`` with the defaults) and no other expert's
  does;
* **a middle-layer language leak that costs accuracy**: language l adds ``middle_leak[l]`` (0 for
  the reference, rising linearly to ``middle_leak`` for the last language) to the logit of one
  expert of its own (``leak_experts``). It stays below the concept logit, so the top-k does not
  change, but it moves routing probability away from the chosen experts: the divergence from the
  reference in middle layers grows with l, and so does the loss of task-expert weight;
* **an accuracy that depends on routing to the task experts** (``accuracy``): the task experts
  write into an "answer" direction that the LM head reads, so at a task-concept position the
  model predicts the ``answer_token`` over the ``distractor_token`` iff the task experts' mean
  routing weight over the middle layers (the "task score") exceeds the concept's difficulty.
  Difficulties are placed between the languages' task scores, so accuracy falls from 1.0 (the
  reference) to 0.0 (the leakiest language), and steering that promotes the task experts raises
  it: the paper's A/B, with a known direction.

How the weights give that (``planted_model`` builds a randomly initialised model from
``OlmoeConfig``, then overwrites):

* **Token = concept + language.** The vocabulary is languages x concepts (general concepts, then
  task concepts) plus the answer and distractor tokens: token ``l * (C + T) + c``. Its embedding is
  ``u_c + v_l + k`` for orthonormal directions (one per concept, one per language, a constant
  direction k, and an answer direction a), all rotated by one random orthogonal matrix so that
  nothing is axis-aligned. Every corpus token has the same norm (sqrt 3).
* **The residual stream stays the embedding.** Every attention ``o_proj`` is zero (attention adds
  exactly 0, so tokens do not mix and position does not matter) and every expert's
  ``down_proj`` is zero except the task experts' single answer-writing unit. So the hidden state
  entering every layer is the token's embedding (plus a small multiple of a in and after the
  middle layers).
* **The router reads through the real RMSNorm.** The router sees ``post_attention_layernorm(h)``
  = ``h * s`` with ``s = 1 / sqrt(|h|^2 / H + eps)`` (norm weights are ones; a uniform weight keeps
  the norm rotation-invariant). Router rows are written in logit units divided by the ``s`` of a
  corpus token: early/late row e = ``route_logit / s * v_l`` for e in language l's set; middle row
  e = ``route_logit / s * u_c`` for every concept c routed to e, plus ``middle_leak[l] / s * v_l``
  on l's leak expert. Each also reads the "other" component with bounded random coefficients
  (``noise``, uniform in [-noise, noise] logits), so distributions are not degenerate; parameters
  are checked so that no noise or leak can change a top-k (``route_logit > middle_leak + 2 *
  noise``). The answer direction a grows a token's norm by a relative (ANSWER_SCALE * middle
  layers)^2 / 6 at most (3e-4 with the defaults), which moves logits far less than any margin.
* **Task experts write the answer.** Their first intermediate unit reads the constant direction
  (``silu(g) * g`` for every token) and writes ``ANSWER_SCALE * a``, so after the middle layers
  a token's a-coordinate is ``ANSWER_SCALE`` times the sum of its task-expert routing weights.
  The LM head's answer row reads a, its distractor row reads the concept directions weighted by
  each concept's difficulty; both go through the same final norm, so the comparison is exactly
  "task score > difficulty". OLMoE's ``norm_topk_prob=False`` makes the routing weights the dense
  softmax probabilities of the chosen experts: the leak's probability is taken from them.

The truth's numbers (``task_score``, ``task_accuracy``, ``task_delta``) are computed from the built
model with its own modules in fp32, not from formulas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from moe_route._checks import check_int

__all__ = ["planted_model", "PlantedModel", "PlantedTruth", "ANSWER_SCALE"]

# Amplitude of the answer direction a task expert writes per unit of routing weight: small so
# that the norm (hence every later router's logits) barely moves, exactly readable by the LM head.
ANSWER_SCALE = 1e-2
# pre-activation of the task experts' answer unit on every token: silu(2) * 2 ~ 3.5
_ANSWER_UNIT_INPUT = 2.0
# difficulty of a general (non-task) concept: the LM head prefers the answer there only when on
# average half the middle layers' routing weight goes to task experts
_GENERAL_DIFFICULTY = 0.5


@dataclass(frozen=True)
class PlantedTruth:
    """The planted answer of a ``PlantedModel`` (see the module docstring).

    Layers are decoder-layer indices (the int layer keys of ``SteeringPlan`` and
    ``LayerStats.index``); experts are sorted tuples of expert ids; concepts are concept ids
    (``0 .. C-1`` general, ``C .. C+T-1`` task).

    layer_roles: "early", "middle" or "late" per decoder layer.
    language_experts: ``{early/late layer: {language: experts}}`` (disjoint between languages).
    concept_experts: ``{middle layer: {concept: experts}}`` (general and task concepts).
    task_experts: ``{middle layer: experts}`` used only by task concepts.
    leak_experts: ``{middle layer: {language: expert}}`` for languages with a leak > 0.
    middle_leak: ``{language: logit}`` added to its leak expert in middle layers.
    task_difficulty: ``{concept: difficulty}`` (task concepts; general ones are 0.5).
    task_score: ``{language: mean task-expert routing weight per middle layer}`` of a task token.
    task_accuracy: ``{language: accuracy on task_corpus[language]}`` with no steering.
    task_delta: ``{middle layer: {expert: Δ}}``: activation frequency (tokens with the expert in
        the top-k / tokens) on ``task_corpus[reference]`` minus that on
        ``baseline_corpus[reference]``, exact for these corpora; every other expert of every
        layer has Δ <= 0 in expectation (baseline frequency of a task expert is 0).
    router_names: ``{layer: router module path}``.
    """

    languages: Tuple[str, ...]
    reference: str
    layer_roles: Tuple[str, ...]
    language_experts: Dict[int, Dict[str, Tuple[int, ...]]]
    concept_experts: Dict[int, Dict[int, Tuple[int, ...]]]
    task_experts: Dict[int, Tuple[int, ...]]
    leak_experts: Dict[int, Dict[str, int]]
    middle_leak: Dict[str, float]
    general_concepts: Tuple[int, ...]
    task_concepts: Tuple[int, ...]
    task_difficulty: Dict[int, float]
    task_score: Dict[str, float]
    task_accuracy: Dict[str, float]
    task_delta: Dict[int, Dict[int, float]]
    router_names: Dict[int, str]

    @property
    def early_layers(self) -> Tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.layer_roles) if r == "early")

    @property
    def middle_layers(self) -> Tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.layer_roles) if r == "middle")

    @property
    def late_layers(self) -> Tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.layer_roles) if r == "late")

    @property
    def divergence_shape(self) -> Tuple[str, ...]:
        """Expected routing divergence from the reference per layer: "high" where routing is
        language-specific (early, late), "low" where it is shared (middle): a U."""
        return tuple("low" if r == "middle" else "high" for r in self.layer_roles)


@dataclass
class PlantedModel:
    """A planted-structure model with its data (built by ``planted_model``).

    model: an ``OlmoeForCausalLM`` in eval mode.
    corpus, task_corpus, baseline_corpus: ``{language: int64 [N, S]}``; row i is the same
        concepts in every language (parallel). ``corpus`` is general text (the FLORES analogue),
        ``task_corpus`` mixes in task concepts (``task_fraction`` of each row), and
        ``baseline_corpus`` is more general text, independent of ``corpus`` (the paper's
        baseline for Δ-experts; the reference rows are the ones to use). The concept ids
        behind a corpus are ``corpus[language] % concepts_per_language``.
    """

    model: torch.nn.Module
    corpus: Dict[str, torch.Tensor]
    task_corpus: Dict[str, torch.Tensor]
    baseline_corpus: Dict[str, torch.Tensor]
    truth: PlantedTruth
    answer_token: int
    distractor_token: int
    num_general_concepts: int
    num_task_concepts: int

    @property
    def languages(self) -> Tuple[str, ...]:
        return self.truth.languages

    @property
    def reference(self) -> str:
        return self.truth.reference

    @property
    def concepts_per_language(self) -> int:
        return self.num_general_concepts + self.num_task_concepts

    def token_ids(self, language: str, concepts) -> torch.Tensor:
        """Token ids of ``concepts`` (an int tensor or sequence) in ``language``."""
        if language not in self.languages:
            raise ValueError(f"PlantedModel.token_ids: language={language!r} must be one of "
                             f"{list(self.languages)}")
        concepts = torch.as_tensor(concepts, dtype=torch.int64)
        n = self.concepts_per_language
        if concepts.numel() and (int(concepts.min()) < 0 or int(concepts.max()) >= n):
            raise ValueError(f"PlantedModel.token_ids: concepts must be in [0, {n}), got "
                             f"[{int(concepts.min())}, {int(concepts.max())}]")
        return self.languages.index(language) * n + concepts

    def is_task_token(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of the positions holding a task-concept token (any language)."""
        n = self.concepts_per_language
        in_text = ids < len(self.languages) * n
        return in_text & (ids % n >= self.num_general_concepts)

    @torch.no_grad()
    def accuracy(self, sequences: torch.Tensor) -> float:
        """Fraction of task-concept positions of ``sequences`` ([N, S] or [S] token ids) where the
        model's next-token logits put ``answer_token`` above ``distractor_token``.

        True exactly where the task experts' mean routing weight over the middle layers exceeds
        the concept's difficulty, so it depends on routing (and on any active ``steer``).
        """
        ids = torch.as_tensor(sequences, dtype=torch.int64)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"PlantedModel.accuracy: sequences must be [N, S] or [S] token ids, "
                             f"got shape {tuple(ids.shape)}")
        mask = self.is_task_token(ids)
        if not bool(mask.any()):
            raise ValueError("PlantedModel.accuracy: sequences hold no task-concept token; "
                             "accuracy is measured at task positions (use task_corpus)")
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=ids.to(device)).logits.float().cpu()
        right = logits[..., self.answer_token] > logits[..., self.distractor_token]
        return float(right[mask].float().mean())

    def accuracy_by_language(self, corpus: Optional[Mapping[str, torch.Tensor]] = None
                             ) -> Dict[str, float]:
        """``{language: accuracy(corpus[language])}``; ``corpus`` defaults to ``task_corpus``."""
        corpus = self.task_corpus if corpus is None else corpus
        return {lang: self.accuracy(seqs) for lang, seqs in corpus.items()}

    def choice_items(self, corpus: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
        """The task as multiple-choice questions for ``analysis.choice_accuracy``: one per
        task-concept position of each row (``corpus`` defaults to ``task_corpus``), prompt =
        the row up to that token, options ``answer_token`` (right) and ``distractor_token``.

        Attention adds nothing in the planted model, so each answer depends on its last token
        alone and the accuracy on these equals ``accuracy_by_language``.
        """
        from moe_route.analysis.evaluation import ChoiceItem

        corpus = self.task_corpus if corpus is None else corpus
        options = ([self.answer_token], [self.distractor_token])
        items = {}
        for lang, seqs in corpus.items():
            rows, cols = self.is_task_token(torch.as_tensor(seqs)).nonzero(as_tuple=True)
            items[lang] = [ChoiceItem(seqs[r, :c + 1], options, 0)
                           for r, c in zip(rows.tolist(), cols.tolist())]
        return items


def planted_model(num_languages: int = 5, num_layers: int = 8, num_experts: int = 16,
                  top_k: int = 2, *, num_concepts: int = 24, num_task_concepts: int = 4,
                  num_task_experts: Optional[int] = None, edge_layers: Optional[int] = None,
                  num_sentences: int = 32, num_task_sentences: int = 32, seq_len: int = 16,
                  task_fraction: float = 0.5, route_logit: float = 6.0,
                  middle_leak: float = 5.0, noise: float = 0.25,
                  hidden_size: Optional[int] = None,
                  languages: Optional[Sequence[str]] = None, seed: int = 0) -> PlantedModel:
    """Build a planted-structure ``OlmoeForCausalLM`` and its data (module docstring).

    num_languages: languages; the first is the reference, named "eng" unless ``languages`` names
        them all.
    num_layers, num_experts, top_k: the model's layers (all MoE), experts and experts per token.
    num_concepts, num_task_concepts: general and task concepts (C, T); vocabulary
        ``num_languages * (C + T) + 2``.
    num_task_experts: planted task experts per middle layer (default ``top_k``: every task
        token routes to all of them). Task concept j routes to ``top_k`` consecutive ones from j.
    edge_layers: how many layers are "early" and how many "late" (default ``num_layers // 4``,
        at least 1); the rest are "middle".
    num_sentences, num_task_sentences, seq_len: corpus sizes (``baseline_corpus`` has
        ``num_sentences`` rows).
    task_fraction: share of each task sentence's positions holding a task concept (rounded).
    route_logit: logit of the experts a token is routed to (others ~0).
    middle_leak: middle-layer leak logit of the last language (0 for the reference, linear).
    noise: bound of the random readout of the "other" component, in logits.
    hidden_size: default the smallest multiple of 16 >= max(64, C + T + num_languages + 2).
    seed: every random choice (sets, corpus, rotation, the model's initialisation).
    """
    try:
        from transformers import OlmoeConfig, OlmoeForCausalLM
    except ImportError as exc:  # pragma: no cover - transformers is a test dependency
        raise ImportError("planted_model needs transformers (pip install transformers)") from exc

    where = "planted_model"
    L = check_int(where, "num_languages", num_languages, 1)
    num_layers = check_int(where, "num_layers", num_layers, 3)
    E = check_int(where, "num_experts", num_experts, 2)
    k = check_int(where, "top_k", top_k, 1)
    C = check_int(where, "num_concepts", num_concepts, 1)
    T = check_int(where, "num_task_concepts", num_task_concepts, 1)
    num_sentences = check_int(where, "num_sentences", num_sentences, 1)
    num_task_sentences = check_int(where, "num_task_sentences", num_task_sentences, 1)
    seq_len = check_int(where, "seq_len", seq_len, 1)
    seed = check_int(where, "seed", seed)
    n_task = (k if num_task_experts is None
              else check_int(where, "num_task_experts", num_task_experts, k))
    edge = (max(1, num_layers // 4) if edge_layers is None
            else check_int(where, "edge_layers", edge_layers, 1))
    if 2 * edge >= num_layers:
        raise ValueError(f"planted_model: edge_layers={edge} leaves no middle layer of "
                         f"num_layers={num_layers} (needs 2 * edge_layers < num_layers)")
    if L * k > E:
        raise ValueError(f"planted_model: num_languages * top_k = {L * k} must be <= "
                         f"num_experts={E} (each language gets top_k experts of its own in "
                         f"early/late layers)")
    if n_task + k > E:
        raise ValueError(f"planted_model: num_task_experts + top_k = {n_task + k} must be <= "
                         f"num_experts={E} (general concepts need top_k non-task experts)")
    if not 0.0 < task_fraction <= 1.0:
        raise ValueError(f"planted_model: task_fraction={task_fraction!r} must be in (0, 1]")
    n_task_pos = max(1, round(task_fraction * seq_len))
    if noise < 0 or middle_leak < 0:
        raise ValueError(f"planted_model: noise={noise!r} and middle_leak={middle_leak!r} must be "
                         f">= 0")
    if not route_logit > middle_leak + 2 * noise:
        raise ValueError(f"planted_model: route_logit={route_logit!r} must exceed middle_leak + "
                         f"2 * noise = {middle_leak + 2 * noise!r}, so that no leak or noise "
                         f"changes a top-k")
    if languages is None:
        names = ("eng",) + tuple(f"lang{i}" for i in range(1, L))
    else:
        names = tuple(str(n) for n in languages)
        if len(names) != L or len(set(names)) != L:
            raise ValueError(f"planted_model: languages={list(names)} must be {L} distinct names "
                             f"(num_languages={L})")
    dims = C + T + L + 2
    H = (16 * math.ceil(max(64, dims) / 16) if hidden_size is None
         else check_int(where, "hidden_size", hidden_size, dims))
    if H % 4:
        raise ValueError(f"planted_model: hidden_size={H} must be a multiple of 4 (4 heads)")

    g = torch.Generator().manual_seed(seed)
    roles = tuple("early" if i < edge else "late" if i >= num_layers - edge else "middle"
                  for i in range(num_layers))
    middle = [i for i, r in enumerate(roles) if r == "middle"]
    leak = {lang: middle_leak * i / (L - 1) if L > 1 else 0.0 for i, lang in enumerate(names)}

    config = OlmoeConfig(vocab_size=L * (C + T) + 2, hidden_size=H, intermediate_size=8,
                         num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=4, num_experts=E, num_experts_per_tok=k,
                         norm_topk_prob=False, max_position_embeddings=max(64, seq_len),
                         pad_token_id=None, bos_token_id=None, eos_token_id=None,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OlmoeForCausalLM(config)
    model.eval()

    # orthonormal directions: concepts 0..C+T-1, languages, constant k, answer a (columns of D)
    D = torch.linalg.qr(torch.randn(H, H, generator=g, dtype=torch.float64)).Q
    lang_dim = {lang: C + T + i for i, lang in enumerate(names)}
    K_DIM, A_DIM = C + T + L, C + T + L + 1
    eps = config.rms_norm_eps
    s = 1.0 / math.sqrt(3.0 / H + eps)  # RMSNorm scale of a corpus token (|x|^2 = 3)

    def uniform(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * noise

    # -- routing tables ------------------------------------------------------------------------
    language_experts, concept_experts, task_experts, leak_experts = {}, {}, {}, {}
    router_rows = []  # per layer [E, H] in direction coordinates, logit units
    for layer, role in enumerate(roles):
        perm = torch.randperm(E, generator=g).tolist()
        R = torch.zeros(E, H, dtype=torch.float64)
        if role != "middle":
            sets = {lang: tuple(sorted(perm[i * k:(i + 1) * k])) for i, lang in enumerate(names)}
            for lang, experts in sets.items():
                R[list(experts), lang_dim[lang]] = route_logit
            R[:, :C + T] += uniform(E, C + T)
            language_experts[layer] = sets
        else:
            tasks, rest = perm[:n_task], perm[n_task:]
            leaky = [lang for lang in names if leak[lang] > 0]
            # leak experts are reserved (not concept experts) when enough experts are left
            reserve = len(rest) - len(leaky) >= 2 * k
            leaks = {lang: rest[i % len(rest)] for i, lang in enumerate(leaky)}
            pool = rest[len(leaky):] if reserve else rest
            table = {}
            for c in range(C):
                table[c] = tuple(sorted(pool[j] for j in
                                        torch.randperm(len(pool), generator=g)[:k].tolist()))
            for j in range(T):
                table[C + j] = tuple(sorted(tasks[(j + i) % n_task] for i in range(k)))
            for c, experts in table.items():
                R[list(experts), c] = route_logit
            for lang, e in leaks.items():
                R[e, lang_dim[lang]] += leak[lang]
            R[:, C + T:C + T + L] += uniform(E, L)
            concept_experts[layer] = table
            task_experts[layer] = tuple(sorted(tasks))
            leak_experts[layer] = leaks
        router_rows.append(R)

    # -- corpora ---------------------------------------------------------------------------------
    general = torch.randint(0, C, (num_sentences, seq_len), generator=g)
    task = torch.randint(0, C, (num_task_sentences, seq_len), generator=g)
    for row in task:
        pos = torch.randperm(seq_len, generator=g)[:n_task_pos]
        row[pos] = torch.randint(C, C + T, (n_task_pos,), generator=g)
    baseline = torch.randint(0, C, (num_sentences, seq_len), generator=g)

    def in_languages(concepts):
        return {lang: i * (C + T) + concepts for i, lang in enumerate(names)}

    # -- weights ---------------------------------------------------------------------------------
    answer_token, distractor_token = L * (C + T), L * (C + T) + 1
    V = config.vocab_size
    emb = torch.zeros(V, H, dtype=torch.float64)
    for i, lang in enumerate(names):
        rows = torch.arange(C + T) + i * (C + T)
        emb[rows, torch.arange(C + T)] = 1.0
        emb[rows, lang_dim[lang]] = 1.0
    emb[:, K_DIM] = 1.0
    to_model = D.T  # coordinates [.., H] @ D.T -> hidden vectors

    unit = _ANSWER_UNIT_INPUT
    silu = unit / (1 + math.exp(-unit))
    inter = config.intermediate_size
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(emb @ to_model)
        model.model.norm.weight.fill_(1.0)
        for layer, decoder in enumerate(model.model.layers):
            decoder.self_attn.o_proj.weight.zero_()
            decoder.input_layernorm.weight.fill_(1.0)
            decoder.post_attention_layernorm.weight.fill_(1.0)
            decoder.mlp.gate.weight.copy_((router_rows[layer] / s) @ to_model)
            experts = decoder.mlp.experts
            experts.down_proj.zero_()
            for e in task_experts.get(layer, ()):
                read = torch.zeros(H, dtype=torch.float64)
                read[K_DIM] = unit / s
                experts.gate_up_proj[e, 0] = (read @ to_model).float()      # gate unit 0
                experts.gate_up_proj[e, inter] = (read @ to_model).float()  # up unit 0
                write = torch.zeros(H, dtype=torch.float64)
                write[A_DIM] = ANSWER_SCALE / (silu * unit)
                experts.down_proj[e, :, 0] = (D @ write).float()
    router_names = {layer: f"model.layers.{layer}.mlp.gate" for layer in range(num_layers)}

    # -- the truth's numbers, from the built model ---------------------------------------------
    task_ids = torch.tensor([[i * (C + T) + C + j for j in range(T)] for i in range(L)])
    score = _task_score(model, task_ids, D[:, A_DIM], len(middle))  # [L, T]
    per_lang = score.mean(1)
    difficulty = _difficulties(score.flatten().tolist(), T)
    _check_margins(score, difficulty)
    lm = torch.zeros(V, H, dtype=torch.float64)
    lm[answer_token, A_DIM] = 1.0 / (ANSWER_SCALE * len(middle))
    lm[distractor_token, :C] = _GENERAL_DIFFICULTY
    lm[distractor_token, C:C + T] = torch.tensor(difficulty, dtype=torch.float64)
    with torch.no_grad():
        model.lm_head.weight.copy_(lm @ to_model)

    task_accuracy = {}
    for i, lang in enumerate(names):
        c = task[task >= C] - C
        task_accuracy[lang] = float((score[i, c] > torch.tensor(difficulty)[c]).double().mean())
    delta = {}
    for layer in middle:
        delta[layer] = {}
        for e in task_experts[layer]:
            uses = torch.tensor([e in concept_experts[layer][C + j] for j in range(T)])
            hits = uses[(task[task >= C] - C)].sum()
            delta[layer][e] = float(hits) / task.numel()

    truth = PlantedTruth(
        languages=names, reference=names[0], layer_roles=roles,
        language_experts=language_experts, concept_experts=concept_experts,
        task_experts=task_experts, leak_experts=leak_experts, middle_leak=leak,
        general_concepts=tuple(range(C)), task_concepts=tuple(range(C, C + T)),
        task_difficulty={C + j: difficulty[j] for j in range(T)},
        task_score={lang: float(per_lang[i]) for i, lang in enumerate(names)},
        task_accuracy=task_accuracy, task_delta=delta, router_names=router_names)
    return PlantedModel(model=model, corpus=in_languages(general),
                        task_corpus=in_languages(task), baseline_corpus=in_languages(baseline),
                        truth=truth, answer_token=answer_token,
                        distractor_token=distractor_token, num_general_concepts=C,
                        num_task_concepts=T)


@torch.no_grad()
def _task_score(model, ids: torch.Tensor, answer_dir: torch.Tensor, n_middle: int
                ) -> torch.Tensor:
    """The answer coordinate each token ends with / (ANSWER_SCALE * middle layers): the task
    experts' mean routing weight per middle layer, run through the model's own modules (attention
    is skipped: its o_proj is zero, so it adds exactly 0)."""
    h = model.model.embed_tokens(ids)
    for decoder in model.model.layers:
        h = h + decoder.mlp(decoder.post_attention_layernorm(h))
    return (h.double() @ answer_dir) / (ANSWER_SCALE * n_middle)


def _difficulties(scores: Sequence[float], T: int) -> list:
    """T difficulties between the task scores of the (language, task concept) pairs: midpoints
    of the gaps > 1e-3 between distinct scores, spread over the gaps, so every score is >= 5e-4
    from every difficulty and accuracy steps down language by language (each language's scores
    are one tight cluster: its task tokens share the task experts and its leak)."""
    ordered = sorted(set(round(x, 6) for x in scores), reverse=True)
    mids = [(a + b) / 2 for a, b in zip(ordered, ordered[1:]) if a - b > 1e-3]
    if not mids:  # one language, or no leak: every language solves every task concept
        return [min(scores) / 2] * T
    return [mids[(j * len(mids)) // T] for j in range(T)]


def _check_margins(score: torch.Tensor, difficulty: Sequence[float]) -> None:
    gap = (score[..., None] - torch.tensor(difficulty, dtype=score.dtype)).abs().min()
    if gap < 1e-4:  # pragma: no cover - the midpoints keep scores at least 5e-4 away
        raise RuntimeError(f"planted_model: a task score is within {float(gap):.2e} of a "
                           f"difficulty; the planted accuracy would depend on rounding")
