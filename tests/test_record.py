"""moe_route.record: statistics against counts computed independently from the unpatched model."""
import copy
import dataclasses
import json
import os
import stat
import traceback
from collections.abc import Sequence

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moe_route
from moe_route.hf import adapters, find_routers

from tiny_models import (build, cache_argument, enable_checkpointing, inputs, model_type,
                         selected_experts, word_tokenizer)
from test_patch import SUPPORTED

pytest.importorskip("transformers")


def _ids(seed=0, shape=(3, 8)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _unpatched_routing(model, family, ids, **kw):
    """(name -> [(ids [T, k], weights [T, k] or None)]) from hooks on the unpatched routers' own
    outputs (weights where the router returns them as ``out[1]``)."""
    log, hooks = {}, []
    for name, router, block in find_routers(model):
        adapter = moe_route.hf.adapter_for(router)
        k = adapter.k(router, block)
        standard = adapter.returns is None

        def hook(mod, args, out, name=name, k=k, standard=standard):
            sel = selected_experts(model_type(family), out, k).view(-1, k)
            log.setdefault(name, []).append((sel, out[1].detach().float() if standard else None))
        hooks.append(router.register_forward_hook(hook))
    with torch.no_grad():
        model(**inputs(family, ids, model), **kw)
    for h in hooks:
        h.remove()
    return log


# Families whose routers see a different token set than the model's input (Ernie-VL splits text
# and vision tokens between two routers): record() refuses to guess their groups.
SPLIT_TOKENS = {"ernie4_5_vl_moe"}


@pytest.mark.parametrize("family", SUPPORTED)
def test_counts_and_weights_match_unpatched_routing(family):
    """Exact mode keeps the model's own routing, so the recorded statistics of every layer can be
    compared with numbers computed from the unpatched routers' outputs. A loop layer's router
    (Inkling2-Loop) runs once per pass; pass p's statistics, layer "<router>@pass<p>", are
    those of its p-th call, and the layers come in the order the forward routes them."""
    model = build(family)
    ids = _ids()
    if family in SPLIT_TOKENS:
        with pytest.raises(RuntimeError, match="different token set"):
            with moe_route.record(model), torch.no_grad():
                model(**inputs(family, ids, model))
        return
    expected = _unpatched_routing(model, family, ids)
    with moe_route.patch(model, exact=True), moe_route.record(model, coact=True) as rec:
        with torch.no_grad():
            model(**inputs(family, ids, model))
    stats = rec.stats
    routers = [name for name, _, _ in find_routers(model)]
    if family == "inkling2_loop":  # layer 1 of the tiny model loops twice
        routers = [routers[0], f"{routers[1]}@pass0", f"{routers[1]}@pass1", routers[2]]
    assert stats.layer_names == routers  # the order the forward routes them
    assert stats.group_names == ["all"]
    for layer in stats:
        router, _, p = layer.name.partition("@pass")
        calls = expected[router]
        assert len(calls) == (2 if p else 1)
        sel, w = calls[int(p or 0)]
        E = layer.num_experts
        assert layer.tokens.tolist() == [sel.shape[0]]
        assert torch.equal(layer.counts[0], torch.bincount(sel.reshape(-1), minlength=E))
        if w is not None:  # else the family post-processes the gate's weights (docs)
            want_w = torch.zeros(E, dtype=torch.float64)
            want_w.index_add_(0, sel.reshape(-1), w.reshape(-1).double())
            torch.testing.assert_close(layer.weight_sum[0].double(), want_w, rtol=1e-5, atol=1e-5)
        onehot = torch.nn.functional.one_hot(sel, E).sum(1)
        assert torch.equal(layer.coact, onehot.T @ onehot)
        assert layer.prob_sum[0].sum().item() == pytest.approx(sel.shape[0], rel=1e-5)


def test_groups_masks_and_ignored_tokens():
    model = build("olmoe")
    ids = _ids(1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                      # left padding of sequence 1
    ids[2, 0] = 7                         # a "special" token to ignore
    routing = _unpatched_routing(model, "olmoe", ids, attention_mask=mask)
    with moe_route.patch(model, exact=True), moe_route.record(model, ignore_token_ids=[7]) as rec:
        rec.set_groups(torch.tensor([0, 1, 0]), names=["eng", "fra"])
        with torch.no_grad():
            model(ids, attention_mask=mask)
        with rec.group("deu"):
            rec.set_groups(None)
            with torch.no_grad():
                model(ids[:1])
    stats = rec.stats
    assert stats.group_names == ["eng", "fra", "deu"]
    keep = (mask != 0) & (ids != 7)
    group = torch.tensor([0, 1, 0])[:, None].expand_as(ids)
    layer0 = stats[0]
    sel = routing[layer0.name][0][0].view(3, 8, -1)
    for g, name in enumerate(["eng", "fra"]):
        m = keep & (group == g)
        assert int(layer0.tokens[g]) == int(m.sum())
        assert torch.equal(layer0.counts[g], torch.bincount(sel[m].reshape(-1), minlength=8))
    assert int(layer0.tokens[2]) == 8


@pytest.mark.parametrize("family", ["qwen3_moe", "minimax"])
def test_generate_records_prompt_and_decode_tokens(family):
    """The phases of generate(): the prompt call has no cache, each decoding step continues one.
    MiniMax's layer 0 is a linear-attention layer, whose cache layer reports no positions."""
    model = build(family)
    prompt = _ids(2, (2, 5))
    new = 4
    for tokens, want in (("all", 2 * 5 + 2 * (new - 1)), ("prompt", 10),
                         ("generated", 2 * (new - 1))):
        with moe_route.record(model, tokens=tokens) as rec, torch.no_grad():
            model.generate(prompt, max_new_tokens=new, do_sample=False)
        assert [int(layer.tokens.sum()) for layer in rec.stats] == [want] * 2, tokens


def test_trace_tokens_are_the_ids_each_row_was_routed_for():
    """A trace's "tokens" are the input id of each row: the prompt, then at each decoding step
    the token generate() fed (the one generated before it); -1 for a call given embeddings."""
    model = build("qwen3_moe")
    prompt, new = _ids(3, (2, 5)), 4
    with moe_route.record(model, trace=True) as rec, torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new, do_sample=False)
        model(inputs_embeds=model.get_input_embeddings()(prompt))
    fed = torch.cat([prompt.reshape(-1), out[:, 5:5 + new - 1].T.reshape(-1),
                     torch.full((prompt.numel(),), -1)])
    for layer in rec.trace.values():
        assert layer["experts"] == 8 and torch.equal(layer["tokens"].long(), fed)


def test_generate_phases_follow_the_prompt_not_the_cache():
    """Inside generate() the prompt is the ids it was given: a conversation continued on its
    cache has its new turn counted as prompt, and use_cache=False (every step re-runs the
    sequence) counts each position once, as with a cache."""
    model = build("qwen3_moe")
    turn1, more = _ids(1, (1, 5)), _ids(2, (1, 5))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        first = model.generate(turn1, return_dict_in_generate=True, **kw)
    turn2 = torch.cat([first.sequences, more], 1)
    cached = first.past_key_values.get_seq_length()
    for tokens, want in (("prompt", turn2.shape[1] - cached), ("generated", 2)):
        cache = copy.deepcopy(first.past_key_values)
        with moe_route.record(model, tokens=tokens) as rec, torch.no_grad():
            model.generate(turn2, **{cache_argument(model): cache}, **kw)
        assert [int(layer.tokens.sum()) for layer in rec.stats] == [want] * 2, tokens
    prompt = _ids(3, (2, 5))
    for tokens in ("all", "prompt", "generated"):
        got = []
        for use_cache in (True, False):
            with moe_route.record(model, tokens=tokens) as rec, torch.no_grad():
                model.generate(prompt, use_cache=use_cache, **kw)
            got.append(rec.stats.stack("counts"))
        assert torch.equal(got[0], got[1]), tokens
    assert "generate" not in vars(model)  # the wrapper is gone


def test_a_sequence_that_ended_is_not_counted_while_the_batch_goes_on():
    """Batched generate() feeds a sequence that produced its EOS the EOS, then padding, until the
    batch ends; neither counts, so each sequence's statistics are those of it generated alone
    (its last token, EOS or not, is never fed back)."""
    model = build("mixtral")
    ids = _ids(4, (2, 5))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        free = model.generate(ids, **kw)
    eos = int(free[0, 5])  # sequence 0's first new token ends it
    assert eos not in free[1, 5:].tolist() and eos != 0
    with moe_route.record(model, tokens="generated") as rec, torch.no_grad():
        rec.per_sequence(["a", "b"])
        out = model.generate(ids, eos_token_id=eos, **kw)
    assert out[0, 5:].tolist() == [eos] + [0] * (out.shape[1] - 6)
    alone = []
    for b in range(2):
        with moe_route.record(model, tokens="generated") as rec_b, torch.no_grad():
            model.generate(ids[b:b + 1], eos_token_id=eos, **kw)
        alone.append(int(rec_b.stats[0].tokens.sum()))
    assert alone == [0, out.shape[1] - 6]
    for layer in rec.stats:
        assert layer.tokens.tolist() == alone


def test_without_an_eos_the_pad_id_is_a_token_like_any_other():
    """generate() pads finished sequences only when an EOS can finish them. Without one, a
    generated token equal to pad_token_id was taken for padding and the rest of its sequence was
    not counted."""
    model = build("mixtral")
    model.generation_config.eos_token_id = None
    ids = _ids(4, (2, 5))
    with torch.no_grad():
        free = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    pad = int(free[0, 6])                               # sequence 0's second new token
    with moe_route.record(model, tokens="generated") as rec, torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=pad)
    assert torch.equal(out, free)
    fed = ids.shape[0] * (out.shape[1] - ids.shape[1] - 1)  # the last new token is never fed
    assert [int(layer.tokens.sum()) for layer in rec.stats] == [fed] * len(rec.stats)


def _alone(model, ids, tokens, **kw):
    """Tokens recorded for each sequence of ``ids`` generated alone (its own generate())."""
    counts = []
    for b in range(ids.shape[0]):
        with moe_route.record(model, tokens=tokens) as rec, torch.no_grad():
            model.generate(ids[b:b + 1], **kw)
        counts.append(int(rec.stats[0].tokens.sum()))
    return counts


@pytest.mark.parametrize("given_mask", [True, False])
def test_left_padding_is_skipped_with_a_static_cache(given_mask):
    """With a static cache generate() hands the forward a 4-D mask, not the 2-D one: the left
    padding must still be skipped (read from the 2-D mask generate() was given, or, without
    one, from the 4-D mask generate() builds from the pad ids), so each sequence counts as the
    same sequence generated alone, unpadded."""
    model = build("qwen3_moe")
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    ids[1, :2] = 0
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                                  # sequence 1: 2 left pads
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    given = {"attention_mask": mask} if given_mask else {}
    for tokens in ("all", "prompt"):
        alone = [_alone(model, ids[:1], tokens, **kw)[0],
                 _alone(model, ids[1:, 2:], tokens, **kw)[0]]
        assert alone == {"all": [9, 7], "prompt": [6, 4]}[tokens]
        for cache in ("dynamic", "static"):
            with moe_route.record(model, tokens=tokens) as rec, torch.no_grad():
                rec.per_sequence(["a", "b"])
                model.generate(ids, cache_implementation=cache, **given, **kw)
            for layer in rec.stats:
                assert layer.tokens.tolist() == alone, (tokens, cache)


class _ScalarReads(TorchDispatchMode):
    """Counts the reads of a tensor's value into a Python number (``aten._local_scalar_dense``:
    a host sync on a GPU) that moe_route's own code makes."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f.filename for f in traceback.extract_stack()[:-1]]  # not this one
            caller = next(f for f in reversed(frames) if f"{os.sep}torch{os.sep}" not in f)
            self.reads += os.path.dirname(moe_route.__file__) in caller
        return func(*args, **(kwargs or {}))


def test_a_static_cache_length_is_read_once_per_generate():
    """A static cache keeps its length in a device tensor: record() read it at every decoding
    step, a host sync each, where it now reads it once per generate() (then follows it from the
    calls' lengths) and counts the same tokens as with a dynamic cache."""
    model = build("qwen3_moe")
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
              attention_mask=mask)
    counts, reads = {}, {}
    for cache in ("dynamic", "static"):
        with moe_route.record(model) as rec, torch.no_grad(), _ScalarReads() as log:
            rec.per_sequence(["a", "b"])
            model.generate(ids, cache_implementation=cache, **kw)
        counts[cache], reads[cache] = rec.stats.stack("counts"), log.reads
    assert reads == {"dynamic": 0, "static": 1}
    assert torch.equal(counts["static"], counts["dynamic"])


def test_assisted_decoding_with_a_static_cache_counts_as_with_a_dynamic_one():
    """Prompt-lookup decoding crops its rejected candidates from the cache: a static cache's
    length, followed from call to call without reading it, is read again after a crop, so the
    padding read from the 4-D masks' diagonals at the cache's positions (no 2-D mask given)
    and the counts are those of a dynamic cache."""
    from transformers import StaticCache

    class LoggedStaticCache(StaticCache):
        def crop(self, max_length):
            crops.append((len(calls), max_length))
            super().crop(max_length)
    model = build("qwen3_moe")
    ids = torch.randint(3, 12, (1, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None,
              prompt_lookup_num_tokens=3)
    counts, calls, crops = {}, [], []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        for cache in ("dynamic", "static"):
            calls.clear()
            given = {"cache_implementation": "dynamic"} if cache == "dynamic" else \
                {cache_argument(model): LoggedStaticCache(config=model.config, max_cache_len=64)}
            with moe_route.record(model) as rec, torch.no_grad():
                model.generate(ids, **given, **kw)
            counts[cache] = rec.stats.stack("counts")
    finally:
        hook.remove()
    # rejected candidates cropped after the second call: the first whose length (read at its
    # start; the prompt's call found the cache empty) was followed, not read again
    assert any(n >= 2 and cut < 0 for n, cut in crops), crops
    assert torch.equal(counts["static"], counts["dynamic"])


def test_a_4d_attention_mask_skips_padding_outside_generate():
    """A model call given a 4-D mask (bool, True attends; or additive float, 0 attends) has its
    padding read from the mask's diagonal: a token that does not attend to itself is padding.
    A mask record() cannot read counts every token, with a warning."""
    model = build("qwen3_moe")
    ids = _ids(1, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    attend = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None] & \
        mask.bool()[:, None, None, :]
    additive = torch.zeros(attend.shape).masked_fill(~attend, torch.finfo(torch.float32).min)
    for given in (mask, attend, additive):
        with moe_route.record(model) as rec, torch.no_grad():
            rec.per_sequence(["a", "b"])
            model(ids, attention_mask=given)
        assert rec.stats[0].tokens.tolist() == [6, 4]
    rec = moe_route.record(model)
    with pytest.warns(UserWarning, match="cannot read"):
        assert rec._attended(None, {"attention_mask": attend[:, :, :, :3]}, 2, 6) is None


def test_a_generated_token_equal_to_the_pad_id_is_counted():
    """With an EOS defined, a live sequence that generates the pad id goes on (generate() pads
    only sequences its stopping criteria have finished): its tokens after it count, batched and
    alone."""
    model = build("mixtral")
    ids = _ids(4, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        free = model.generate(ids, pad_token_id=0, eos_token_id=None, **kw)
    pad = int(free[0, 6])                            # sequence 0's second new token
    eos = next(t for t in range(95, 0, -1) if t not in free[:, 5:].reshape(-1).tolist())
    kw.update(pad_token_id=pad, eos_token_id=eos)
    with moe_route.record(model, tokens="generated") as rec, torch.no_grad():
        rec.per_sequence(["a", "b"])
        out = model.generate(ids, **kw)
    assert torch.equal(out, free)                    # no sequence ended
    assert _alone(model, ids, "generated", **kw) == [5, 5]   # the last new token is not fed
    for layer in rec.stats:
        assert layer.tokens.tolist() == [5, 5]


@pytest.mark.parametrize("eos", [True, False])
def test_a_sequence_finished_by_a_stopping_criterion_counts_as_alone(eos):
    """A sequence that a custom StoppingCriteria or stop_strings finishes is fed its last token
    again (then padding, or, without an EOS, tokens generated on) while the batch goes on: none
    of it counts, so batched it counts what it counts alone (its first new token: the second
    finished it)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class SecondNewToken(StoppingCriteria):  # sequence 0 is done once it has 2 new tokens
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            done[0] = input_ids.shape[1] >= 5 + 2
            return done
    model = build("mixtral")
    ids = _ids(4, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        free = model.generate(ids, eos_token_id=None, **kw)
    stop = int(free[0, 6])
    assert stop not in free[1, 5:].tolist()
    free_ids = free[:, 5:].reshape(-1).tolist()
    kw["eos_token_id"] = next(t for t in range(95, 0, -1) if t not in free_ids) if eos else None
    # one word per model token id, and the prefix StopStringCriteria reads its vocabulary with
    words = ("<pad>", "<s>", "<unk>") + tuple(f"t{i:02d}" for i in range(3, 96)) + ("abcdef",)
    finish = {"criteria": dict(stopping_criteria=StoppingCriteriaList([SecondNewToken()])),
              "stop_strings": dict(stop_strings=[words[stop]],
                                   tokenizer=word_tokenizer(words))}
    for how, extra in finish.items():
        with moe_route.record(model, tokens="generated") as rec, torch.no_grad():
            rec.per_sequence(["a", "b"])
            out = model.generate(ids, **extra, **kw)
        assert out[0, 5:7].tolist() == free[0, 5:7].tolist()
        if eos:
            assert out[0, 7:].tolist() == [0] * (out.shape[1] - 7)
        assert _alone(model, ids[:1], "generated", **extra, **kw) == [1], how
        for layer in rec.stats:
            assert layer.tokens.tolist() == [1, out.shape[1] - 6], how
    assert "_get_stopping_criteria" not in vars(model) and "generate" not in vars(model)


def test_sequence_groups_cover_generates_copies_and_skipped_calls_name_their_groups():
    model = build("olmoe")
    ids = _ids(5, (2, 4))
    with moe_route.record(model) as rec, torch.no_grad():
        rec.per_sequence(["x", "y"])
        out = model.generate(ids, max_new_tokens=3, do_sample=True, num_return_sequences=3,
                             pad_token_id=0, eos_token_id=None)
    assert out.shape[0] == 6
    for layer in rec.stats:
        assert layer.tokens.tolist() == [3 * (4 + 2)] * 2
    # tokens="generated" and one new token: no token is counted, the group is still there
    with moe_route.record(model, tokens="generated") as rec, torch.no_grad():
        with rec.group("only_prompt"):
            model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert rec.stats.group_names == ["only_prompt"]
    assert all(int(layer.tokens.sum()) == 0 for layer in rec.stats)


def test_ignore_token_ids_warns_on_a_call_given_only_embeddings():
    model = build("olmoe")
    ids = _ids(6, (1, 4))
    with moe_route.record(model, ignore_token_ids=[int(ids[0, 0])]) as rec, torch.no_grad():
        with pytest.warns(UserWarning, match="inputs_embeds without input_ids"):
            model(inputs_embeds=model.get_input_embeddings()(ids))
    assert int(rec.stats[0].tokens.sum()) == 4


def test_per_sequence_groups_flush_without_losing_counts():
    model = build("mixtral")
    batches = [_ids(s, (3, 6)) for s in range(4)]

    def run(max_groups):
        with moe_route.record(model, max_groups=max_groups) as rec, torch.no_grad():
            for b, ids in enumerate(batches):
                rec.per_sequence([f"seq{3 * b + i}" for i in range(3)])
                model(ids)
        return rec.stats

    small, big = run(4), run(64)
    assert small.group_names == big.group_names == [f"seq{i}" for i in range(12)]
    for a, b in zip(small, big):
        assert torch.equal(a.counts, b.counts) and torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(a.weight_sum, b.weight_sum)


def test_a_large_max_groups_allocates_device_rows_as_groups_arrive():
    """max_groups bounds the device rows, it does not allocate them: with max_groups=2**40 the
    buffers grow past their first rows, keeping the groups already counted, and the statistics
    are those of a max_groups that flushes before each batch."""
    model = build("mixtral")
    batches = [_ids(s, (300, 2)) for s in range(2)]

    def run(max_groups):
        with moe_route.record(model, max_groups=max_groups) as rec, torch.no_grad():
            for b, ids in enumerate(batches):
                rec.per_sequence([f"seq{300 * b + i}" for i in range(300)])
                model(ids)
        return rec.stats

    grown, flushed = run(2**40), run(300)
    assert grown.group_names == flushed.group_names == [f"seq{i}" for i in range(600)]
    for a, b in zip(grown, flushed):
        assert a.tokens.tolist() == [2] * 600
        assert torch.equal(a.counts, b.counts)
        torch.testing.assert_close(a.weight_sum, b.weight_sum)


def test_sparse_group_ids_count_like_their_dense_numbering():
    """Group ids may be document ids or hashes: huge, sparse ids (and -1, skipped) group tokens
    as dense ids named after them do, with no table of max(id) + 1 entries."""
    model = build("olmoe")
    ids = _ids(7)
    dense = torch.arange(24).reshape(3, 8) % 4 - 1          # -1, 0, 1, 2: six tokens each
    big = torch.tensor([5, 2**40, 2**62])
    sparse = torch.where(dense >= 0, big[dense.clamp(min=0)], -1)
    runs = []
    for groups, names in ((dense, [str(i) for i in big.tolist()]), (sparse, None)):
        with moe_route.record(model) as rec, torch.no_grad():
            rec.set_groups(groups, names)
            model(ids)
        runs.append(rec.stats)
    by_dense, by_sparse = runs
    assert by_sparse.group_names == by_dense.group_names == ["5", str(2**40), str(2**62)]
    for a, b in zip(by_sparse, by_dense):
        assert a.tokens.tolist() == [6, 6, 6]
        assert torch.equal(a.counts, b.counts)
        torch.testing.assert_close(a.weight_sum, b.weight_sum)


class _NamesTable(Sequence):
    """``n`` names, ``doc<i>``, indexed by id (a corpus's names by document id), that log which
    items are read and refuse to be iterated over (or copied) whole."""

    def __init__(self, n: int, twice: tuple = ()):
        self.n, self.twice, self.read = n, twice, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not isinstance(i, int) or not 0 <= i < self.n:
            raise AssertionError(f"names[{i!r}] read")
        self.read.append(i)
        return "twice" if i in self.twice else f"doc{i}"

    def __iter__(self):
        raise AssertionError("the whole names table was read")


def test_set_groups_reads_only_the_names_of_the_ids_it_is_given():
    """With names indexed by sparse ids (a corpus's names by document id), set_groups reads the
    names of the batch's ids only: it read, copied and checked the whole table at every call,
    a cost that grew as the corpus squared. The names it reads must be distinct; a repeated
    name among the ids not given is not its concern."""
    model = build("olmoe")
    ids = _ids(8, (4, 6))
    table = _NamesTable(10**6, twice=(7, 8))
    with moe_route.record(model) as rec, torch.no_grad():
        rec.set_groups(torch.tensor([5, 10**6 - 1, 5, -1]), names=table)
        model(ids)
    assert sorted(set(table.read)) == [5, 10**6 - 1]
    assert rec.stats.group_names == ["doc5", f"doc{10**6 - 1}"]
    assert rec.stats[0].tokens.tolist() == [12, 6]
    with moe_route.record(model) as rec:
        with pytest.raises(ValueError, match=r"names must be distinct, got \['twice'\]"):
            rec.set_groups(torch.tensor([7, 8]), names=table)
        with pytest.raises(ValueError, match=r"id 1000000 has no name \(len\(names\)=1000000\)"):
            rec.set_groups(torch.tensor([3, 10**6]), names=table)


class _HostToDevice(TorchDispatchMode):
    """Counts the copies of tensors from the host to another device: on a CUDA device each is a
    host sync unless it is ``non_blocking`` from pinned memory. The tests stand the "meta"
    device in for an accelerator."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = {torch.ops.aten._to_copy.default: 0, torch.ops.aten.copy_.default: 1}.get(func)
        if source is not None and args[source].device.type == "cpu" and out.device.type != "cpu":
            self.copies += 1
        return out


def test_model_calls_copy_nothing_from_the_host_after_the_first():
    """The hook that maps a model call's tokens to statistics rows copies the set_groups table,
    its codes, ignore_token_ids and generate()'s EOS ids to the call's device once: it copied
    them (and, inside generate(), the masks of the positions a call keeps) at every call, a host
    sync on a GPU at every forward and decoding step."""
    from moe_route.recording import _Generation
    model = build("olmoe")
    meta = torch.device("meta")
    B, S = 4, 6
    ids = torch.empty(B, S, dtype=torch.long, device=meta)

    def calls(rec, steps, past=0, new=S):
        with _HostToDevice() as log:
            for t in range(steps):
                mask = torch.empty(B, past + t + new, dtype=torch.long, device=meta)
                rec._on_call("", {"input_ids": ids[:, :new], "attention_mask": mask})
                rec._end_call("")
        return log.copies

    with moe_route.record(model, ignore_token_ids=[0, 1]) as rec:
        rec.set_groups(torch.tensor([3, 9, 3, -1]))
        assert calls(rec, 1) > 0              # the first call copies (the log sees them)
        assert calls(rec, 3) == 0
        # generate(): its prompt of 4 tokens, a step without a cache (the whole sequence again,
        # its last 2 positions new), then decoding steps, with the EOS fallback of a batch its
        # stopping criteria's flags do not cover (a beam search's) and with the flags
        rec._generation = _Generation(prompt=4, stop_ids=torch.tensor([7]))
        rec._generation.done = torch.zeros(B // 2, dtype=torch.bool, device=meta)
        calls(rec, 1, new=4)
        assert calls(rec, 1) == 0
        assert calls(rec, 4, past=S, new=1) == 0
        rec._generation.done = torch.zeros(B, dtype=torch.bool, device=meta)
        assert calls(rec, 4, past=S + 4, new=1) == 0
        rec._generation = None


def test_stats_save_load_round_trip(tmp_path):
    model = build("deepseek_v3")
    with moe_route.record(model, coact=True) as rec, torch.no_grad():
        model(_ids(3))
    stats = rec.stats
    stats.save(tmp_path / "run")
    back = moe_route.RoutingStats.load(tmp_path / "run")
    assert back.layer_names == stats.layer_names
    for a, b in zip(stats, back):
        assert torch.equal(a.counts, b.counts) and torch.equal(a.weight_sum, b.weight_sum)
        assert a.index == b.index and a.top_k == b.top_k


def test_record_option_errors():
    model = build("olmoe")
    with pytest.raises(ValueError, match="tokens='some'"):
        moe_route.record(model, tokens="some")
    with pytest.raises(ValueError, match="max_groups=0"):
        moe_route.record(model, max_groups=0)
    with moe_route.record(model) as rec:
        rec.set_groups(torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"shape \(2,\).*\[3, 8\]"):
            with torch.no_grad():
                model(_ids())
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("options,error,msg", [
    (dict(ignore_token_ids=[1.5]), TypeError, r"ignore_token_ids must be ints, got 1.5"),
    (dict(ignore_token_ids="abc"), TypeError, r"ignore_token_ids must be an iterable of ints"),
    (dict(ignore_token_ids=torch.tensor([1.0])), TypeError, r"must hold ints, got a torch.float"),
    (dict(dense="no"), TypeError, r"record: dense='no' must be a bool, got str"),
    (dict(coact=2), TypeError, r"record: coact=2 must be a bool, got int"),
    (dict(max_groups=True), TypeError, r"max_groups=True must be an int >= 1, got bool"),
    (dict(max_groups=0), ValueError, r"max_groups=0 must be an int >= 1"),
])
def test_record_options_are_not_coerced(options, error, msg):
    with pytest.raises(error, match=msg):
        moe_route.record(build("olmoe"), **options)


def test_set_groups_refuses_ids_below_minus_one_and_repeated_names():
    model = build("olmoe")
    with moe_route.record(model, ignore_token_ids=torch.tensor([3, 4])) as rec:
        assert rec.ignore_token_ids.tolist() == [3, 4]
        with pytest.raises(ValueError, match=r"group ids >= 0 or -1 \(skip\), got -5"):
            rec.set_groups(torch.tensor([0, -5]))
        with pytest.raises(ValueError, match=r"names must be distinct, got \['a'\]"):
            rec.set_groups(torch.tensor([0, 1]), ["a", "a"])


def test_per_token_groups_with_generate():
    model = build("olmoe")
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, -1, 0, 0]])
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with moe_route.record(model) as rec, torch.no_grad():
        rec.set_groups(groups, ["a", "b"])
        with pytest.raises(ValueError, match=r"\[2, 1\] tokens; per-token ids cover only .*"
                                             r"tokens='prompt'"):
            model.generate(ids, **kw)
    # recording the prompt only, the decoding steps are skipped and the prompt's groups hold
    with moe_route.record(model, tokens="prompt") as rec, torch.no_grad():
        rec.set_groups(groups, ["a", "b"])
        model.generate(ids, **kw)
    for layer in rec.stats:
        assert layer.tokens.tolist() == [5, 6]
        assert layer.counts.sum().item() == 11 * layer.top_k


def test_trace_matches_statistics_and_round_trips(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = build("olmoe")
    ids = _ids(5)
    with moe_route.record(model, trace=True, trace_logits=True) as rec, torch.no_grad():
        with rec.group("a"):
            model(ids[:2])
        with rec.group("b"):
            model(ids[2:])
    trace, stats = rec.trace, rec.stats
    for layer in stats:
        t = trace[layer.name]
        assert t["ids"].dtype == torch.int16 and t["weights"].dtype == torch.float16
        assert t["group"] == ["a"] * 16 + ["b"] * 8
        for g, name in enumerate(stats.group_names):
            rows = torch.tensor([x == name for x in t["group"]])
            want = torch.bincount(t["ids"][rows].long().reshape(-1), minlength=8)
            assert torch.equal(layer.counts[g], want)
        assert t["logits"].shape == (24, 8) and t["experts"] == 8
        assert t["tokens"].dtype == torch.int32 and torch.equal(t["tokens"].long(),
                                                                 ids.reshape(-1))
    rec.save_trace(tmp_path / "run" / "trace.safetensors")
    raw = safetensors.load_file(tmp_path / "run" / "trace.safetensors")
    assert torch.equal(raw[f"{stats[0].name}.ids"], trace[stats[0].name]["ids"])
    back = moe_route.load_trace(tmp_path / "run" / "trace.safetensors")
    assert list(back) == list(trace)
    for name, layer in trace.items():
        assert sorted(back[name]) == sorted(layer) == ["experts", "group", "ids", "logits",
                                                       "tokens", "weights"]
        assert back[name]["group"] == layer["group"] and back[name]["experts"] == 8
        for key in ("ids", "weights", "tokens", "logits"):
            assert back[name][key].dtype == layer[key].dtype
            assert torch.equal(back[name][key], layer[key])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["trace.safetensors"]


_CORPUS = [_ids(1, (2, 5)), _ids(2, (2, 4)), _ids(3, (2, 3))]
for _call in _CORPUS:
    _call[0, 1] = 7                     # ignored: ungrouped in the trace
# each call's groups (per token, in row order): a context group, then per-sequence groups over
# more sequences than max_groups=2 rows (statistics flushed and rows reused between calls)
_CORPUS_GROUPS = [["a"] * 10, ["s0"] * 4 + ["s1"] * 4, ["s2"] * 3 + ["a"] * 3]


def _record_corpus(model, **options):
    with moe_route.record(model, max_groups=2, ignore_token_ids=[7], **options) as rec, \
            torch.no_grad():
        with rec.group("a"):
            model(_CORPUS[0])
        rec.set_groups(torch.tensor([0, 1]), ["s0", "s1"])
        model(_CORPUS[1])
        rec.set_groups(torch.tensor([0, 1]), ["s2", "a"])
        model(_CORPUS[2])
    return rec


@pytest.mark.parametrize("buffer", [1, 1 << 30])
def test_streamed_trace_is_the_trace_held_in_memory(tmp_path, monkeypatch, buffer):
    """record(trace_path=) writes, through a spill file, the trace that record(trace=True)
    holds: the same layers, tensors, dtypes, group names (rows reused after a flush resolve to
    the names of their time) and meta, and the same statistics. A 1-byte buffer spills at every
    router call, a 1 GiB one once at the end (three calls, three row tables); the spill is gone
    afterwards."""
    from moe_route import traces

    monkeypatch.setattr(traces, "TRACE_BUFFER_BYTES", buffer)
    model = build("olmoe")
    options = dict(trace_logits=True, trace_dtype=torch.bfloat16, meta={"run": 3})
    held = _record_corpus(model, trace=True, **options)
    path = tmp_path / "out" / "trace.safetensors"
    streamed = _record_corpus(model, trace_path=path, **options)
    back, trace = moe_route.load_trace(path), held.trace
    assert back.meta == trace.meta == {"run": 3}
    assert list(back) == list(trace) and len(trace) == 2
    tokens = torch.cat([c.reshape(-1) for c in _CORPUS])
    groups = [None if t == 7 else g
              for t, g in zip(tokens.tolist(), sum(_CORPUS_GROUPS, []))]
    assert groups.count(None) == 3
    for name, layer in trace.items():
        assert back[name]["group"] == layer["group"] == groups
        assert back[name]["experts"] == layer["experts"] == 8
        assert torch.equal(layer["tokens"].long(), tokens)
        for key in ("ids", "weights", "tokens", "logits"):
            assert back[name][key].dtype == layer[key].dtype
            assert torch.equal(back[name][key], layer[key])
        assert layer["logits"].dtype == torch.bfloat16
    assert streamed.stats.group_names == held.stats.group_names
    assert torch.equal(streamed.stats.stack("counts"), held.stats.stack("counts"))
    assert [p.name for p in path.parent.iterdir()] == ["trace.safetensors"]   # no spill left
    # the file save_trace writes: the same tensors under the same names, the same metadata
    from safetensors import safe_open

    moe_route.save_trace(trace, tmp_path / "held.safetensors")
    with safe_open(path, "pt") as f, safe_open(tmp_path / "held.safetensors", "pt") as g:
        assert f.metadata() == g.metadata() and sorted(f.keys()) == sorted(g.keys())
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), g.get_tensor(key))


@pytest.mark.parametrize("stage", [1, 5000, 1 << 30])
@pytest.mark.parametrize("streamed", [False, True])
def test_trace_parts_wait_on_their_device_and_come_to_the_host_together(tmp_path, monkeypatch,
                                                                        stage, streamed):
    """A trace's rows stay on the device of the router that made them until TRACE_STAGE_BYTES
    of them have gathered, or the trace is read or spilled; then they come over in one copy per
    dtype, a call's token ids (shared by its layers) once. Run on the CPU with every tensor taken
    for a device one, so that the staged path copies for real: the trace is the one recorded
    without staging, held or streamed, and the copies are those expected (a 1-byte stage copies
    each router call's rows, one of 5000 bytes every second call, as each part takes a 512-byte
    block of device memory at least; a 1 GiB one all of them at the read or at the end)."""
    from moe_route import recording

    model = build("olmoe")
    options = dict(trace_logits=True, meta={"run": 1})
    want = _record_corpus(model, trace=True, **options).trace
    copies, flat_copy, to_host = [], recording._flat_copy, recording.Recorder._trace_to_host
    staging = []   # the statistics' flushes copy through _flat_copy too: count the trace's

    def trace_to_host(self):
        staging.append(True)
        to_host(self)
        staging.pop()

    monkeypatch.setattr(recording, "_is_host", lambda t: False)
    monkeypatch.setattr(recording, "TRACE_STAGE_BYTES", stage)
    monkeypatch.setattr(recording.Recorder, "_trace_to_host", trace_to_host)
    monkeypatch.setattr(recording, "_flat_copy", lambda ts: (
        staging and copies.append((ts[0].dtype, sum(t.numel() for t in ts)))) or flat_copy(ts))
    path = tmp_path / "trace.safetensors"
    rec = _record_corpus(model, **(dict(trace_path=path) if streamed else dict(trace=True)),
                         **options)
    got = moe_route.load_trace(path) if streamed else rec.trace
    assert list(got) == list(want) and got.meta == want.meta
    for name, layer in want.items():
        assert got[name]["group"] == layer["group"] and got[name]["experts"] == 8
        for key in ("ids", "weights", "tokens", "logits"):
            assert got[name][key].dtype == layer[key].dtype
            assert torch.equal(got[name][key], layer[key]), (name, key)
    N, E, L, k = 24, 8, 2, 2   # tokens, experts, layers, experts per token
    int32 = torch.int32
    if stage == 1:   # each router call: ids, weights and logits, groups and tokens
        T = [t for c in _CORPUS for t in [c.numel()] * L]
        assert copies == [c for t in T for c in ((torch.int16, t * k),
                                                 (torch.float16, t * (k + E)), (int32, 2 * t))]
    elif stage == 5000:   # each part counts as a 512-byte device block: 5 parts, 2 calls each
        assert len(copies) == 3 * len(_CORPUS) * L // 2
    else:   # all at once, tokens once per call
        assert copies == [(torch.int16, N * k * L), (torch.float16, N * (k + E) * L),
                          (int32, N * L + N)]


@pytest.mark.parametrize("buffer, spilled", [(1, [True, True]), (6000, [False, True]),
                                             (None, [False, False])])
def test_trace_buffer_bytes_is_what_a_streamed_trace_holds_before_it_spills(tmp_path, buffer,
                                                                            spilled):
    """The spill file beside trace_path grows once the parts held pass trace_buffer_bytes: at
    every call with 1 byte, at the second with 6000 (a call of 4 tokens holds 4224 bytes: two
    layers' parts and their objects), never before the end with the default 256 MiB. The file
    is the same trace whichever the buffer."""
    model = build("olmoe")
    path = tmp_path / "t.safetensors"
    options = {} if buffer is None else {"trace_buffer_bytes": buffer}
    grew = []
    with moe_route.record(model, trace_path=path, **options) as rec, torch.no_grad():
        for seed in (1, 2):
            size = os.path.getsize(rec._spill.file)
            model(_ids(seed, (1, 4)))
            grew.append(os.path.getsize(rec._spill.file) > size)
    assert grew == spilled
    with moe_route.record(model, trace=True) as held, torch.no_grad():
        for seed in (1, 2):
            model(_ids(seed, (1, 4)))
    back = moe_route.load_trace(path)
    for name, layer in held.trace.items():
        assert torch.equal(back[name]["ids"], layer["ids"])


def test_trace_buffer_bytes_is_refused_unless_a_positive_int_with_trace_path(tmp_path):
    model = build("olmoe")
    path = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match="trace_buffer_bytes bounds .* pass trace_path too"):
        moe_route.record(model, trace=True, trace_buffer_bytes=1 << 20)
    for bad, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError),
                       ("1M", TypeError)):
        with pytest.raises(error, match=f"record: trace_buffer_bytes={bad!r} must be an "
                                        r"int >= 1 \(bytes"):
            moe_route.record(model, trace_path=path, trace_buffer_bytes=bad)
    assert not path.exists()


def test_streamed_trace_refusals_and_an_error_inside_the_context(tmp_path, monkeypatch):
    """A streamed recorder has no trace in memory (rec.trace and rec.save_trace say where it
    is), is entered once, and after an error inside its context writes nothing (the path keeps
    its old file) and leaves no spill; a path that is a directory or no path is refused."""
    model = build("olmoe")
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"old")
    rec = moe_route.record(model, trace_path=path)
    with pytest.raises(RuntimeError, match="boom"):
        with rec, torch.no_grad():
            model(_ids(1, (1, 4)))
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(RuntimeError, match="cannot be entered again; make a new record"):
        with rec:
            pass
    rec = moe_route.record(model, trace_path=str(path))
    with rec, torch.no_grad():
        model(_ids(1, (1, 4)))
        with pytest.raises(RuntimeError, match=r"Recorder.trace: this recorder streams its trace "
                                               r"to trace_path=.*load_trace\(trace_path\)"):
            rec.trace
    with pytest.raises(RuntimeError, match="Recorder.save_trace: this recorder streams"):
        rec.save_trace(tmp_path / "other.safetensors")
    assert moe_route.load_trace(path)["model.layers.0.mlp.gate"]["ids"].shape == (4, 2)
    with pytest.raises(ValueError, match="record: trace_path=.* is a directory"):
        moe_route.record(model, trace_path=tmp_path)
    with pytest.raises(TypeError, match="record: trace_path must be a str or os.PathLike"):
        moe_route.record(model, trace_path=1)
    # a directory that cannot be written fails as the context starts (root writes anywhere, so
    # the refusal is made up here)
    from moe_route import traces

    def refuse(parent, *args, **kwargs):
        raise PermissionError(13, "Permission denied", parent)
    monkeypatch.setattr(traces, "make_temp", refuse)
    rec = moe_route.record(model, trace_path=tmp_path / "locked" / "t.safetensors")
    with pytest.raises(PermissionError, match="record: cannot write trace_path=.*locked.*"
                                              "Permission denied"):
        with rec, torch.no_grad():
            model(_ids(1, (1, 4)))
    with moe_route.record(model) as again, torch.no_grad():   # nothing was left attached
        model(_ids(1, (1, 4)))
    assert int(again.stats.stack("tokens").sum()) == 4 * 2


def _spill_size(directory) -> int:
    spills = [p for p in directory.iterdir() if p.name.endswith(".spill")]
    assert len(spills) == 1
    return spills[0].stat().st_size


def test_streamed_trace_goes_to_disk_while_recording(tmp_path, monkeypatch):
    """The parts leave memory during the run, not at its end: one-token calls (generate()'s
    steps), whose data is a few bytes, spill by the objects that hold them too. Every tensor of
    the file starts at a multiple of its element size (int16 ids of an odd length before fp32
    weights would not), and group names are numbered by first appearance, as save_trace does."""
    import json
    import struct
    from moe_route import traces

    from transformers import OlmoeConfig, OlmoeForCausalLM

    monkeypatch.setattr(traces, "TRACE_BUFFER_BYTES", 32 << 10)
    torch.manual_seed(0)     # top-1: 31 int16 ids take 62 bytes
    model = OlmoeForCausalLM(OlmoeConfig(
        hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=1, vocab_size=96)).eval()
    path = tmp_path / "t.safetensors"
    with moe_route.record(model, trace_path=path, trace_dtype=torch.float32) as rec, \
            torch.no_grad():
        rec.set_groups(torch.tensor([1]), ["late", "early"])   # row order is not first use
        sizes = []
        for step in range(31):
            model(_ids(step, (1, 1)))
            sizes.append(_spill_size(tmp_path))
    assert sizes[0] == 0 and 0 < sizes[10] < sizes[-1]   # 14 B of data per layer and step
    trace = moe_route.load_trace(path)
    assert all(layer["group"] == ["early"] * 31 for layer in trace.values())
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert json.loads(header.pop("__metadata__")["group_names"]) == ["early"]
    for key, entry in header.items():
        width = {"F32": 4, "I32": 4, "I16": 2}[entry["dtype"]]
        assert entry["data_offsets"][0] % width == 0, (key, entry)
    assert header["model.layers.0.mlp.gate.ids"]["shape"] == [31, 1]


def test_streamed_trace_failures_leave_no_spill(tmp_path, monkeypatch):
    """A recorder that fails to start (a model with no router, a router already recorded) leaves
    no spill and can start later; a spill write that fails, even if the error is caught inside
    the context, fails the context's end instead of writing a file from a broken spill; a
    trace_path whose directory is a file keeps its OSError type; trace=True with a trace_path
    is refused."""
    from moe_route import traces

    model = build("olmoe")
    path = tmp_path / "t.safetensors"
    with pytest.raises(moe_route.UnsupportedModelError):
        with moe_route.record(torch.nn.Linear(2, 2), trace_path=path):
            pass
    inner = moe_route.record(model, trace_path=path)
    with moe_route.record(model), torch.no_grad():
        with pytest.raises(RuntimeError, match="already being recorded"):
            with inner:
                pass
        assert list(tmp_path.iterdir()) == []
    with inner, torch.no_grad():        # it never started, so it may now
        model(_ids(1, (1, 3)))
    assert moe_route.load_trace(path)["model.layers.0.mlp.gate"]["ids"].shape == (3, 2)

    before = path.read_bytes()
    failing = {"left": 1}
    real = traces.TraceSpill.append

    def append(self, *args):
        if failing["left"]:
            failing["left"] -= 1
            self._out.write(b"half")           # part of a write, then the disk is full
            self._failed = OSError(28, "No space left on device")
            raise self._failed
        return real(self, *args)
    monkeypatch.setattr(traces.TraceSpill, "append", append)
    monkeypatch.setattr(traces, "TRACE_BUFFER_BYTES", 1)
    with pytest.raises(RuntimeError, match="writing the spill file .* failed earlier .*No space"):
        with moe_route.record(model, trace_path=path), torch.no_grad():
            with pytest.raises(OSError, match="No space left"):
                model(_ids(1, (1, 3)))
            model(_ids(2, (1, 3)))            # the caller went on
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]

    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="record: cannot write trace_path="):
        with moe_route.record(model, trace_path=tmp_path / "file" / "t.safetensors"):
            pass
    with pytest.raises(ValueError, match="trace=True keeps the trace in host memory .* pass one"):
        moe_route.record(model, trace=True, trace_path=path)


def _tensors_read(monkeypatch) -> list:
    """The names of the tensors read from safetensors files from now on (``safe_open``'s)."""
    import safetensors

    real, read = safetensors.safe_open, []

    class Counting:
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)
    monkeypatch.setattr(safetensors, "safe_open", Counting)
    return read


def test_load_trace_reads_the_layers_asked_for(tmp_path, monkeypatch):
    """load_trace(layers=) gives those layers (in saved order) as the whole load gives them, and
    reads no other layer's tensors; an unknown layer or a bare string is refused."""
    model = build("olmoe")
    path = tmp_path / "t.safetensors"
    _record_corpus(model, trace_path=path, meta={"m": 1})
    whole = moe_route.load_trace(path)
    last, first = list(whole)[::-1]
    read = _tensors_read(monkeypatch)
    part = moe_route.load_trace(path, layers=[last])
    assert list(part) == [last] and part.meta == {"m": 1}
    assert sorted(read) == sorted(f"{last}.{k}" for k in ("ids", "weights", "tokens", "group"))
    assert part[last]["group"] == whole[last]["group"]
    for key in ("ids", "weights", "tokens"):
        assert torch.equal(part[last][key], whole[last][key])
    assert list(moe_route.load_trace(path, layers=(last, first))) == [first, last]
    # as everywhere, an int is a decoder-layer index and a str may be the MoE block's path
    assert list(moe_route.load_trace(path, layers=[1])) == [last]
    assert list(moe_route.load_trace(path, layers=["model.layers.0.mlp", 1])) == [first, last]
    with pytest.raises(ValueError, match=r"t.safetensors': layers holds 'model.layers.9.mlp.gate', "
                                         r"which is not a layer here; the layers are decoder "
                                         r"layers \[0, 1\], named \['model.layers.0.mlp.gate'"):
        moe_route.load_trace(path, layers=["model.layers.9.mlp.gate"])
    for bare in (first, first.encode()):
        with pytest.raises(TypeError, match="layers must be a list of layer keys .* or None"):
            moe_route.load_trace(path, layers=bare)


def test_open_trace_reads_a_layer_when_asked_and_the_analyses_take_it(tmp_path, monkeypatch):
    """open_trace is a mapping of the file's layers that reads a layer (and nothing else) when it
    is looked up; the trace analyses give the same answers on it as on the loaded trace."""
    from moe_route import analysis

    model = build("olmoe")
    path = tmp_path / "t.safetensors"
    _record_corpus(model, trace_path=path, meta={"m": 2})
    loaded, opened = moe_route.load_trace(path), moe_route.open_trace(path)
    assert list(opened) == list(loaded) and len(opened) == 2 and opened.meta == {"m": 2}
    first, last = list(loaded)
    assert first in opened and "model.layers.5.mlp.gate" not in opened
    with pytest.raises(KeyError):
        opened["model.layers.5.mlp.gate"]
    read = _tensors_read(monkeypatch)
    layer = opened[last]
    assert sorted(read) == sorted(f"{last}.{k}" for k in ("ids", "weights", "tokens", "group"))
    assert layer["group"] == loaded[last]["group"] and layer["experts"] == 8
    for key in ("ids", "weights", "tokens"):
        assert torch.equal(layer[key], loaded[last][key])

    def same(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if hasattr(x, "__dataclass_fields__") or hasattr(x, "_fields"):
            names = getattr(x, "_fields", None) or x.__dataclass_fields__
            return all(same(getattr(x, n), getattr(y, n)) for n in names)
        return x == y
    assert same(analysis.trace_agreement(opened, opened), analysis.trace_agreement(loaded, loaded))
    assert same(analysis.trace_token_routing(opened), analysis.trace_token_routing(loaded))
    assert same(analysis.trace_transitions(opened, 0, 1), analysis.trace_transitions(loaded, 0, 1))
    a = analysis.trace_statistics(opened, renormalize=True, coact=True)
    b = analysis.trace_statistics(loaded, renormalize=True, coact=True)
    assert a.group_names == b.group_names and a.meta == b.meta
    for field in ("tokens", "counts", "weight_sum", "coact"):
        assert torch.equal(a.stack(field), b.stack(field))
    with pytest.raises(FileNotFoundError, match="open_trace: .* is not a file"):
        moe_route.open_trace(tmp_path / "missing.safetensors")


def _small_trace():
    return {"model.layers.0.mlp.gate": {"ids": torch.tensor([[0, 1], [2, 3]], dtype=torch.int16),
                                        "weights": torch.rand(2, 2).half(),
                                        "group": ["a", None]}}


def test_save_trace_writes_version_2_when_the_trace_has_nothing_of_version_3(tmp_path):
    """A trace with neither token ids nor expert counts (made by hand) is written as version 2,
    which moe_route releases before version 3 read; an expert count of a numpy int is written
    as a JSON int, and the file is version 3."""
    import numpy as np
    from safetensors import safe_open

    def version(path):
        with safe_open(path, framework="pt") as f:
            return f.metadata()["version"]

    moe_route.save_trace(_small_trace(), tmp_path / "plain.safetensors")
    assert version(tmp_path / "plain.safetensors") == "2"
    assert "experts" not in moe_route.load_trace(tmp_path / "plain.safetensors")[
        "model.layers.0.mlp.gate"]
    counted = _small_trace()
    counted["model.layers.0.mlp.gate"]["experts"] = np.int64(8)
    moe_route.save_trace(counted, tmp_path / "counted.safetensors")
    assert version(tmp_path / "counted.safetensors") == "3"
    back = moe_route.load_trace(tmp_path / "counted.safetensors")["model.layers.0.mlp.gate"]
    assert back["experts"] == 8 and type(back["experts"]) is int


def test_save_trace_checks_the_trace_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "t.safetensors"
    bad = _small_trace()
    bad["model.layers.0.mlp.gate"]["group"] = ["a"]
    with pytest.raises(ValueError, match=r"\['group'\] must hold N=2 group names .* got 1"):
        moe_route.save_trace(bad, path)
    bad = _small_trace()
    bad["model.layers.0.mlp.gate"]["weights"] = torch.rand(2, 3)
    with pytest.raises(ValueError, match=r"\['weights'\] must be a float tensor of the ids' "
                                         r"shape \(2, 2\)"):
        moe_route.save_trace(bad, path)
    with pytest.raises(TypeError, match="trace must be a mapping"):
        moe_route.save_trace([1], path)
    assert not path.exists()

    moe_route.save_trace(_small_trace(), path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    newer = _small_trace()
    newer["model.layers.0.mlp.gate"]["group"] = ["b", "b"]
    with pytest.raises(OSError, match="disk full"):
        moe_route.save_trace(newer, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temporary left


def test_save_trace_gives_the_mode_of_a_plain_create(tmp_path, umask):
    """save_trace's temporary file came from mkstemp, and safetensors writes 0o600 too: every
    trace was 0o600 whatever the umask, unreadable to colleagues on a shared machine."""
    path = tmp_path / "t.safetensors"
    moe_route.save_trace(_small_trace(), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    os.chmod(path, 0o604)                 # a replaced file keeps its mode
    moe_route.save_trace(_small_trace(), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o604
    assert moe_route.load_trace(path).keys() == _small_trace().keys()


def test_load_trace_errors_name_the_file_and_the_problem(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="is not a file"):
        moe_route.load_trace(tmp_path / "missing.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="damaged.safetensors' is not a readable safetensors"):
        moe_route.load_trace(damaged)
    ids = torch.tensor([[0, 1]], dtype=torch.int16)
    other = tmp_path / "other.safetensors"
    save_file({"x": ids}, other, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is not a moe_route trace: .*format='pt', expected "
                                         "'moe_route.trace'"):
        moe_route.load_trace(other)

    def write(tensors, version="2", **meta):
        f = tmp_path / "t.safetensors"
        save_file(tensors, f, metadata={"format": "moe_route.trace", "version": version,
                                        **meta})
        return f

    w, group = torch.ones(1, 2), torch.tensor([0], dtype=torch.int32)
    ok = dict(layers=json.dumps(["l"]), group_names=json.dumps(["a"]))
    assert moe_route.load_trace(write({"l.ids": ids, "l.weights": w, "l.group": group},
                                      **ok))["l"]["group"] == ["a"]
    # version 1 (group names as JSON per layer) is still read
    v1 = moe_route.load_trace(write({"l.ids": ids, "l.weights": w}, "1",
                                    groups=json.dumps({"l": [None]})))
    assert v1["l"]["group"] == [None] and torch.equal(v1["l"]["ids"], ids)
    with pytest.raises(ValueError, match="version '4'; this moe_route reads versions '1' to '3'"):
        moe_route.load_trace(write({"l.ids": ids, "l.weights": w, "l.group": group}, "4", **ok))
    # version 3 adds the token ids (a tensor per layer) and the expert counts (metadata)
    v3 = dict(ok, experts=json.dumps([8]))
    tokens = torch.tensor([17], dtype=torch.int32)
    back = moe_route.load_trace(write({"l.ids": ids, "l.weights": w, "l.group": group,
                                       "l.tokens": tokens}, "3", **v3))["l"]
    assert back["experts"] == 8 and torch.equal(back["tokens"], tokens)
    for experts, error in (([8, 8], r"'experts' metadata must list one count per layer \(1\), "
                                    r"got 2"),
                           ([1], r"\['ids'\] must be in \[0, experts=1\), got \[0, 1\]"),
                           (["8"], r"\['experts'\] must be the layer's expert count, an int "
                                   r">= 1, got '8'")):
        with pytest.raises(ValueError, match=error):
            moe_route.load_trace(write({"l.ids": ids, "l.weights": w, "l.group": group}, "3",
                                       **dict(ok, experts=json.dumps(experts))))
    with pytest.raises(ValueError, match=r"\['tokens'\] must be an int tensor \[N=1\]"):
        moe_route.load_trace(write({"l.ids": ids, "l.weights": w, "l.group": group,
                                    "l.tokens": tokens.repeat(2)}, "3", **v3))
    with pytest.raises(ValueError, match="'layers' metadata is not valid JSON"):
        moe_route.load_trace(write({"l.ids": ids, "l.weights": w, "l.group": group},
                                   layers="[", group_names="[]"))
    with pytest.raises(ValueError, match="'group_names' metadata is not valid JSON .*recursion"):
        moe_route.load_trace(write({"l.ids": ids, "l.weights": w, "l.group": group},
                                   layers='["l"]', group_names="[" * 100_000))
    with pytest.raises(ValueError, match=r"t.safetensors': trace\['l'\] has no 'weights'"):
        moe_route.load_trace(write({"l.ids": ids, "l.group": group}, **ok))
    with pytest.raises(ValueError, match="layer 'l': needs a 'group' tensor, int32"):
        moe_route.load_trace(write({"l.ids": ids, "l.weights": w}, **ok))
    with pytest.raises(ValueError, match=r"group codes must be in \[-1, 1\) .* got \[3, 3\]"):
        moe_route.load_trace(write({"l.ids": ids, "l.weights": w, "l.group": group + 3}, **ok))
    with pytest.raises(ValueError, match=r"tensors of no listed layer: \['m.ids'\]"):
        moe_route.load_trace(write({"l.ids": ids, "l.weights": w, "l.group": group,
                                    "m.ids": ids.clone()}, **ok))
    with pytest.raises(ValueError, match=r"\['group'\] must hold N=1 group names"):
        moe_route.load_trace(write({"l.ids": ids, "l.weights": w}, "1",
                                   groups=json.dumps({"l": []})))


def test_trace_and_statistics_carry_the_recorder_meta_and_the_model_path(tmp_path, capsys):
    """A saved trace says which model and run it came from: the recorder's meta (with the model's
    config._name_or_path as "model" unless given) is the statistics' meta and the trace's
    .meta, survives save and load, and moe-route compare names each file's model."""
    from safetensors import safe_open

    from moe_route.cli import main

    model = build("olmoe")
    model.config._name_or_path = "org/tiny-olmoe"
    with moe_route.record(model, trace=True, meta={"run": 3}) as rec, torch.no_grad():
        model(_ids(2, (2, 5)))
    assert rec.stats.meta == {"model": "org/tiny-olmoe", "run": 3}
    trace = rec.trace
    assert isinstance(trace, moe_route.Trace) and trace.meta == rec.stats.meta
    trace.meta["run"] = 4                   # a copy: the recorder's meta is not changed
    assert rec.meta["run"] == 3 and rec.trace.meta["run"] == 3
    path = tmp_path / "a.safetensors"
    rec.save_trace(path)
    back = moe_route.load_trace(path)
    assert isinstance(back, moe_route.Trace) and back.meta == {"model": "org/tiny-olmoe", "run": 3}
    assert list(back) == list(trace) and back.keys() == rec.trace.keys()
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["moe_route_version"] == moe_route.__version__
    # an explicit meta wins over the trace's, and a given "model" over the model's path
    moe_route.save_trace(trace, tmp_path / "b.safetensors", meta={"model": "other", "step": 100})
    assert moe_route.load_trace(tmp_path / "b.safetensors").meta == {"model": "other",
                                                                     "step": 100}
    with moe_route.record(model, meta={"model": "mine"}) as rec2, torch.no_grad():
        model(_ids(2, (1, 3)))
    assert rec2.stats.meta == {"model": "mine"}
    model.config._name_or_path = ""          # a model built from a config: no path to record
    with moe_route.record(model) as rec3, torch.no_grad():
        model(_ids(2, (1, 3)))
    assert rec3.stats.meta == {}
    # a plain dict has no meta; neither has a file written without one (hand-made, or older)
    moe_route.save_trace(_small_trace(), tmp_path / "c.safetensors")
    assert moe_route.load_trace(tmp_path / "c.safetensors").meta == {}
    capsys.readouterr()
    assert main(["compare", str(path), str(tmp_path / "b.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == [f"a: {path} (model org/tiny-olmoe)",
                          f"b: {tmp_path / 'b.safetensors'} (model other)"]
    with pytest.raises(TypeError, match="save_trace: meta must be a dict or None, got list"):
        moe_route.save_trace(trace, tmp_path / "d.safetensors", meta=[("run", 1)])
    with pytest.raises(ValueError, match="save_trace: meta must be JSON-serialisable"):
        moe_route.save_trace(trace, tmp_path / "d.safetensors", meta={"dtype": torch.float16})
    with pytest.raises(TypeError, match="record: meta must be a dict or None, got list"):
        moe_route.record(model, meta=[("run", 1)])
    with pytest.raises(TypeError, match="Trace: meta must be a dict or None, got list"):
        moe_route.Trace({}, meta=[("run", 1)])
    trace.meta = [("run", 1)]
    with pytest.raises(TypeError, match=r"save_trace: trace.meta must be a dict or None"):
        moe_route.save_trace(trace, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()
    # copy() keeps the meta, as a copy
    again = back.copy()
    assert isinstance(again, moe_route.Trace) and again.meta == back.meta
    again.meta["run"] = 9
    assert back.meta["run"] == 3


def test_save_trace_writes_views_and_shared_memory_as_their_values(tmp_path):
    """A hand-made trace may hold views: a transposed (non-contiguous) tensor, a slice at an
    offset, two tensors of one storage, one tensor in two layers (safetensors refuses to write
    shared memory as such). Each is written as its values; a recorded trace's own tensors are
    written without a copy."""
    base = torch.randn(6, 8)
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int16).t()     # [3, 2], a view
    layer = {"ids": ids, "weights": base[1:4, 2:4], "logits": base[1:4], "group": ["a"] * 3,
             "experts": 8, "tokens": torch.arange(10, dtype=torch.int32)[5:8]}
    own = {"ids": ids.contiguous(), "weights": base[:3, :2].clone(), "group": ["b"] * 3}
    empty = {"ids": torch.zeros(0, 2, dtype=torch.int16), "weights": torch.zeros(0, 2),
             "group": []}
    moe_route.save_trace({"l": layer, "m": own, "n": own, "e": empty, "f": dict(empty)},
                         tmp_path / "v.safetensors")
    back = moe_route.load_trace(tmp_path / "v.safetensors")
    for key in ("ids", "weights", "logits", "tokens"):
        assert torch.equal(back["l"][key], layer[key]) and back["l"][key].is_contiguous()
    for name in ("m", "n"):
        assert torch.equal(back[name]["ids"], own["ids"])
    assert back["f"]["ids"].shape == (0, 2) and back["f"]["group"] == []
    # a lazily negated view is written as its values, not as its memory
    negated = torch.rand(3, 2)._neg_view()
    moe_route.save_trace({"l": dict(own, weights=negated)}, tmp_path / "neg.safetensors")
    assert torch.equal(moe_route.load_trace(tmp_path / "neg.safetensors")["l"]["weights"],
                       negated.resolve_neg())
    # what is written without a copy: a tensor that is all of a storage not written yet
    from moe_route.traces import _own_storage

    whole, written = torch.ones(4), set()
    assert _own_storage(whole, written) is whole
    for shared in (whole, whole[:2], torch.ones(2, 2).t()):
        copied = _own_storage(shared, written)
        assert copied is not shared and torch.equal(copied, shared)
        assert copied.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()


def test_trace_read_during_recording_then_extended():
    """Reading rec.trace joins each layer's calls into one tensor; calls after the read are
    appended to it, and a second read gives the first read's rows, then the new ones."""
    model = build("olmoe")
    with moe_route.record(model, trace=True) as rec, torch.no_grad():
        model(_ids(1, (2, 4)))
        model(_ids(2, (1, 3)))
        first = {name: {k: layer[k].clone() for k in ("ids", "weights", "tokens")}
                 for name, layer in rec.trace.items()}
        model(_ids(3, (1, 5)))
        second = rec.trace
    for name, layer in second.items():
        assert layer["ids"].shape[0] == 8 + 3 + 5 and len(layer["group"]) == 16
        for key in ("ids", "weights", "tokens"):
            assert torch.equal(layer[key][:11], first[name][key])
        assert layer["tokens"][11:].tolist() == _ids(3, (1, 5)).flatten().tolist()
    assert all(torch.equal(a["ids"], b["ids"]) for a, b in zip(second.values(),
                                                               rec.trace.values()))


def test_load_trace_rejects_a_damaged_meta(tmp_path):
    from safetensors.torch import save_file

    tensors = {"l.ids": torch.tensor([[0, 1]], dtype=torch.int16), "l.weights": torch.ones(1, 2),
               "l.group": torch.tensor([0], dtype=torch.int32)}
    for meta, error in (("{", "the 'meta' metadata is not valid JSON"),
                        ("[1]", "the 'meta' metadata must be a JSON object, got list")):
        path = tmp_path / "t.safetensors"
        save_file(tensors, path, metadata={"format": "moe_route.trace", "version": "2",
                                           "layers": '["l"]', "group_names": '["a"]',
                                           "meta": meta})
        with pytest.raises(ValueError, match=error):
            moe_route.load_trace(path)


def test_trace_statistics_count_as_the_recorder_and_renormalise_as_the_author():
    """Statistics rebuilt from a trace equal the recorder's (tokens and counts exactly, weight
    sums to fp32 rounding), padding left out; renormalize=True is the author's
    total_actual_weight computed from the traced logits: softmax, top-k mask, renormalise, sum.
    OLMoE does not renormalise, so the two weight sums differ."""
    from moe_route.analysis import expert_importance, trace_statistics

    model = build("olmoe")
    assert not model.config.norm_topk_prob
    ids, mask = _ids(5, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with moe_route.record(model, trace=True, trace_logits=True, trace_dtype=torch.float32,
                          coact=True, meta={"run": 2}) as rec, torch.no_grad():
        with rec.group("a"):
            model(ids, attention_mask=mask)
        with rec.group("b"):
            model(ids[:2, :3])
    stats, trace = rec.stats, rec.trace
    rebuilt = trace_statistics(trace, coact=True)
    assert rebuilt.group_names == ["a", "b"] and rebuilt.meta == {"run": 2, "renormalized": False}
    rows = [stats.group_names.index(g) for g in rebuilt.group_names]
    for mine, theirs in zip(rebuilt, stats):
        assert (mine.name, mine.index, mine.top_k) == (theirs.name, theirs.index, theirs.top_k)
        assert mine.tokens.tolist() == theirs.tokens[rows].tolist() == [16, 6]
        assert torch.equal(mine.counts, theirs.counts[rows])
        assert torch.equal(mine.coact, theirs.coact)     # padding's pairs left out too
        torch.testing.assert_close(mine.weight_sum, theirs.weight_sum[rows], rtol=1e-5, atol=1e-5)
    renorm = trace_statistics(trace, renormalize=True)
    for name, layer in zip(trace, renorm):
        p = torch.softmax(trace[name]["logits"].double(), dim=-1)
        k = trace[name]["ids"].shape[1]
        top = p * (p >= p.topk(k, dim=-1).values[:, -1:])
        top = top / top.sum(-1, keepdim=True)
        want = torch.stack([top[[g == grp for g in trace[name]["group"]]].sum(0)
                            for grp in ("a", "b")])
        torch.testing.assert_close(layer.weight_sum.double(), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(layer.weight_sum, rebuilt[name].weight_sum, atol=1e-3)
    assert renorm[0].coact is None                       # only when asked for
    importance = expert_importance(renorm, kind="routed")
    torch.testing.assert_close(importance.sum(-1), torch.ones(2, 2), rtol=0, atol=1e-5)
    assert renorm.meta["renormalized"] is True


def test_trace_statistics_coactivation_in_chunks(monkeypatch):
    """The co-activation counts are every ordered pair of each row's experts, diagonal included
    (a loop by hand), the same when the rows are taken a few at a time."""
    from moe_route.analysis import metrics

    ids = torch.rand(50, 6, generator=torch.Generator().manual_seed(4)).argsort(1)[:, :3]
    want = torch.zeros(6, 6, dtype=torch.int64)
    for row in ids.tolist():
        for a in row:
            for b in row:
                want[a, b] += 1
    assert torch.equal(metrics._pairs(ids, ids, 6, 6), want)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 20)      # two rows per chunk
    assert torch.equal(metrics._pairs(ids, ids, 6, 6), want)
    assert want.diagonal().tolist() == torch.bincount(ids.flatten(), minlength=6).tolist()


def test_trace_statistics_gives_earlier_layers_the_groups_that_appear_later():
    """One pass over the layers: a group that first appears in a later layer (an
    encoder-decoder's second stack) gets zero rows in the layers counted before it."""
    from moe_route.analysis import trace_statistics

    def layer(ids, group):
        return {"ids": torch.tensor(ids, dtype=torch.int16), "weights": torch.ones(len(ids), 1),
                "group": group, "experts": 3}
    stats = trace_statistics({"model.layers.0.mlp.gate": layer([[0], [2]], ["a", None]),
                              "model.layers.1.mlp.gate": layer([[1], [1], [2]], ["b", "a", "b"])},
                             coact=True)
    assert stats.group_names == ["a", "b"]
    assert stats.stack("tokens").tolist() == [[1, 0], [1, 2]]
    assert stats.stack("counts").tolist() == [[[1, 0, 0], [0, 0, 0]], [[0, 1, 0], [0, 1, 1]]]
    assert stats.stack("weight_sum").tolist() == [[[1, 0, 0], [0, 0, 0]], [[0, 1, 0], [0, 1, 1]]]
    assert stats[0].coact.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_open_trace_lookups_are_fresh_and_refuse_a_changed_file(tmp_path, monkeypatch):
    """Each lookup gives new objects: editing one layer's group list does not change the next
    layer's. A file replaced or removed after opening is refused at the next lookup; a relative
    path is the file it named when opened; layer names in the metadata must be str."""
    import json
    import struct

    model = build("olmoe")
    path = tmp_path / "t.safetensors"
    _record_corpus(model, trace_path=path)
    monkeypatch.chdir(tmp_path)
    opened = moe_route.open_trace("t.safetensors")
    first, last = list(opened)
    want = opened[first]["group"]
    got = opened[first]["group"]
    got[0] = "edited"
    got.append("more")
    assert opened[last]["group"] == want and opened[first]["group"] == want
    monkeypatch.chdir(tmp_path.parent)
    assert opened[last]["group"] == want                     # the path was made absolute
    trace = moe_route.load_trace(path)
    moe_route.save_trace(trace, path)  # a rerun: the same layers, groups and metadata
    with pytest.raises(ValueError, match="changed since it was opened .* open it again"):
        opened[first]
    opened = moe_route.open_trace(path)
    trace[first]["group"] = ["x" if g else g for g in trace[first]["group"]]
    moe_route.save_trace(trace, path)
    with pytest.raises(ValueError, match="changed since it was opened .* open it again"):
        opened[first]
    path.unlink()
    with pytest.raises(FileNotFoundError, match="is gone"):
        opened[first]
    header = {"__metadata__": {"format": "moe_route.trace", "version": "2",
                               "layers": json.dumps([["l"]]), "group_names": "[]"}}
    blob = json.dumps(header).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(ValueError, match=r"the 'layers' metadata must list layer names \(str\)"):
        moe_route.open_trace(tmp_path / "bad.safetensors")


def test_trace_statistics_errors():
    from moe_route.analysis import trace_statistics

    layer = {"ids": torch.tensor([[0, 1]], dtype=torch.int16), "weights": torch.ones(1, 2),
             "group": ["a"], "experts": 4}
    with pytest.raises(TypeError, match="trace must be a mapping .* got list"):
        trace_statistics([layer])
    with pytest.raises(ValueError, match="the trace holds no layer"):
        trace_statistics({})
    with pytest.raises(ValueError, match=r"\['ids'\] must be \[N, k\] with k >= 1"):
        trace_statistics({"l": dict(layer, ids=layer["ids"][:, :0], weights=torch.ones(1, 0))})
    with pytest.raises(TypeError, match="renormalize=1 must be a bool, got int"):
        trace_statistics({"l": layer}, renormalize=1)
    with pytest.raises(TypeError, match="coact='yes' must be a bool, got str"):
        trace_statistics({"l": layer}, coact="yes")
    with pytest.raises(ValueError, match=r"trace\['l'\] holds no 'experts'"):
        trace_statistics({"l": {k: v for k, v in layer.items() if k != "experts"}})
    with pytest.raises(ValueError, match="no row of the trace has a group"):
        trace_statistics({"l": dict(layer, group=[None])})
    with pytest.raises(ValueError, match=r"trace_statistics: trace\['l'\]\['ids'\] must be in "
                                         r"\[0, experts=1\)"):
        trace_statistics({"l": dict(layer, experts=1)})
    zero = trace_statistics({"l": dict(layer, weights=torch.zeros(1, 2))}, renormalize=True)
    assert zero[0].weight_sum.tolist() == [[0.0] * 4] and zero[0].counts.tolist() == [[1, 1, 0, 0]]
    # NaN weights (a broken run) stay NaN when renormalised, as they do otherwise
    broken = dict(layer, weights=torch.tensor([[float("nan"), 1.0]]))
    for renormalize in (False, True):
        sums = trace_statistics({"l": broken}, renormalize=renormalize)[0].weight_sum
        assert sums[0, :2].isnan().any() and sums[0, 2:].tolist() == [0.0, 0.0]


def test_trace_file_stores_each_group_name_once(tmp_path):
    """Per-token names as metadata JSON outgrow safetensors' 100 MB header; codes do not."""
    from safetensors import safe_open

    N = 200_000
    names = [f"fra_Latn/{i // 50}" if i % 7 else None for i in range(N)]
    ids = torch.randint(0, 64, (N, 2), dtype=torch.int16)
    ids[:, 1] = (ids[:, 0] + 1) % 64
    trace = {f"model.layers.{i}.mlp.gate": {"ids": ids, "weights": torch.rand(N, 2).half(),
                                             "group": names} for i in range(3)}
    path = tmp_path / "big.safetensors"
    moe_route.save_trace(trace, path)
    with safe_open(path, framework="pt") as f:
        header = sum(len(v) for v in f.metadata().values())
    assert header < 100_000  # the 4000 distinct names, once
    back = moe_route.load_trace(path)
    assert list(back) == list(trace)
    assert all(back[n]["group"] == names for n in back)


def test_trace_agreement_of_a_steered_run(tmp_path, capsys):
    """Steering layer 1 leaves layer 0's routing exactly as it was and changes layer 1's; the
    agreement survives a save and load of both traces and is what the CLI prints."""
    from moe_route.analysis import trace_agreement
    from moe_route.cli import main

    model = build("olmoe")
    ids = _ids(7, (4, 8))
    traces = []
    for plan in (None, moe_route.SteeringPlan.force(1, [0, 1], on=True)):
        with moe_route.record(model, trace=True) as rec, torch.no_grad():
            if plan is None:
                model(ids)
            else:
                with moe_route.steer(model, plan):
                    model(ids)
        traces.append(rec.trace)
    plain, steered = traces
    names = list(plain)
    agreement = trace_agreement(plain, steered)
    assert agreement[names[0]] == (32, 1.0, 1.0, 1.0, 0.0)
    forced = agreement[names[1]]
    # experts 0 and 1 head every token's top-k of layer 1 now (forced on, ties to the lower
    # index); the rest of the top-k is the best k-2 of the other experts, which the plain top-k
    # held too. So a token shares had + k - 2 experts, had = how many of 0 and 1 it had.
    plain_ids = plain[names[1]]["ids"].long()
    k = plain_ids.shape[1]
    assert steered[names[1]]["ids"][:, :2].tolist() == [[0, 1]] * 32
    had = (plain_ids == 0).any(1).double() + (plain_ids == 1).any(1).double()
    assert forced.identical == float((had == 2).double().mean()) < 1.0
    assert forced.overlap == pytest.approx(float((had + k - 2).mean()) / k, abs=1e-12)
    assert forced.top1 == float((plain_ids[:, 0] == 0).double().mean())
    assert forced.weight_shift > 0
    moe_route.save_trace(plain, tmp_path / "plain.safetensors")
    moe_route.save_trace(steered, tmp_path / "steered.safetensors")
    again = trace_agreement(moe_route.load_trace(tmp_path / "plain.safetensors"),
                            moe_route.load_trace(tmp_path / "steered.safetensors"))
    assert again == agreement
    capsys.readouterr()
    a, b = str(tmp_path / "plain.safetensors"), str(tmp_path / "steered.safetensors")
    assert main(["compare", a, b, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == names
    assert printed[names[1]] == forced._asdict()
    assert main(["compare", a, b]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["layer", "tokens", "top-1", "overlap", "same", "set", "w", "shift"]
    assert table[1].split() == [names[0], "32", "1.000", "1.000", "1.000", "0.0000"]
    assert main(["compare", a, str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors' is not a file" in capsys.readouterr().err


@pytest.mark.parametrize("logits", ["returned", "recomputed"])
def test_exact_mode_records_the_jitter_draw_the_model_routed(logits, monkeypatch):
    """Switch jitters its router's input in training. Exact mode runs the router's own forward:
    the statistics and the trace must come from the logits of that draw (read from the router's
    output, or recomputed with the RNG set back to where the router drew), and recording must not
    move the RNG stream, so the output stays bit-identical to the unpatched model's."""
    dtype = torch.float32
    if logits == "recomputed":
        # an adapter that recomputes the logits; in bf16 Switch jitters an fp32 copy of its input,
        # so a recompute leaves the experts' input alone
        monkeypatch.setitem(adapters.REGISTRY, "SwitchTransformersTop1Router",
                            dataclasses.replace(adapters.SWITCH_TOP1, logits_at=None))
        dtype = torch.bfloat16
    model = build("switch_transformers", dtype=dtype).train()
    with torch.no_grad():
        for _, router, _ in find_routers(model):
            router.jitter_noise = 0.5
            router.classifier.weight.normal_(0, 0.5)
    kw = inputs("switch_transformers", _ids(4), model)
    routed, hooks = {}, []
    for name, router, _ in find_routers(model):  # the choice of the logits each call returned
        hooks.append(router.register_forward_hook(
            lambda m, a, out, n=name: routed.setdefault(n, []).append(
                out[2].reshape(-1, out[2].shape[-1]).float().argmax(-1))))
    with torch.no_grad():
        torch.manual_seed(123)
        ref = model(**kw).logits
        routed.clear()
        with moe_route.patch(model, exact=True), moe_route.record(model, trace=True) as rec:
            torch.manual_seed(123)
            ours = model(**kw).logits
    for h in hooks:
        h.remove()
    assert torch.equal(ours, ref)
    trace = rec.trace
    for layer in rec.stats:
        (chosen,) = routed[layer.name]
        assert torch.equal(layer.counts[0], torch.bincount(chosen, minlength=8)), layer.name
        assert torch.equal(trace[layer.name]["ids"][:, 0].long(), chosen), layer.name


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen3_moe", "gpt_oss"])
def test_exact_mode_counts_the_experts_the_model_routed_to_on_ties(family):
    """Exact mode routes with the model's own torch.topk, which does not always give an exact tie
    to the lower index as the gate does: the statistics and the trace count the model's choice
    (the gate replays its ids), and replaying the trace reproduces the run."""
    model = build(family, dtype=torch.bfloat16)
    name, router, _ = find_routers(model)[0]
    with torch.no_grad():  # experts 0 and 2 tie on every token
        router.weight[2] = router.weight[0]
        if getattr(router, "bias", None) is not None:
            router.bias[2] = router.bias[0]
    routed = []
    hook = router.register_forward_hook(lambda m, a, out: routed.append(out[2]))
    kw = inputs(family, _ids(5, (4, 32)), model)
    with torch.no_grad(), moe_route.patch(model, exact=True):
        with moe_route.record(model, trace=True) as rec:
            ref = model(**kw).logits
        with moe_route.replay(model, rec.trace):
            again = model(**kw).logits
    hook.remove()
    own = routed[0].reshape(-1, routed[0].shape[-1])
    higher = ((own == 2).any(-1) & ~(own == 0).any(-1)).sum()
    assert higher > 0, "torch.topk gave every tie to expert 0: the test shows nothing"
    assert torch.equal(rec.stats[name].counts[0], torch.bincount(own.flatten(), minlength=8))
    assert torch.equal(rec.trace[name]["ids"].long(), own)
    assert torch.equal(again, ref)


def test_positional_arguments_are_bound_to_the_forward_signature():
    """``model(ids, mask)`` passes the attention mask positionally (OlmoeForCausalLM.forward's
    second parameter): record skips its padding as it does for ``attention_mask=mask``."""
    model = build("olmoe")
    ids = _ids(3, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                      # left padding of sequence 1
    counts = []
    for call in (lambda: model(input_ids=ids, attention_mask=mask), lambda: model(ids, mask)):
        with moe_route.record(model) as rec, torch.no_grad():
            call()
        assert [int(layer.tokens.sum()) for layer in rec.stats] == [10, 10]
        counts.append(rec.stats.stack("counts"))
    assert torch.equal(counts[0], counts[1])


@pytest.mark.parametrize("family", ["switch_transformers", "nllb_moe"])
def test_encoder_decoder_routers_use_their_own_tokens(family):
    """An encoder-decoder's encoder routers see input_ids (masked by attention_mask), its decoder
    routers decoder_input_ids (masked by decoder_attention_mask); ignore_token_ids applies to
    each stack's own ids. generate() runs the encoder through get_encoder(), not the model's
    forward: its padding is still skipped, and each decoding step counts one token per row."""
    model = build(family)
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(3))
    dec = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0                      # 2 padding tokens in the encoder input
    dec_mask = torch.ones_like(dec)
    dec_mask[0, 5:] = 0                  # 1 in the decoder input
    ids[0, 1], dec[1, 2], dec[1, 3] = 7, 7, 7
    want = {"encoder": int(((mask != 0) & (ids != 7)).sum()),            # 8
            "decoder": int(((dec_mask != 0) & (dec != 7)).sum())}        # 9
    with torch.no_grad(), moe_route.record(model, ignore_token_ids=[7]) as rec:
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
              decoder_attention_mask=dec_mask)
    stacks = {layer.name: "encoder" if ".encoder." in f".{layer.name}" else "decoder"
              for layer in rec.stats}
    assert set(stacks.values()) == {"encoder", "decoder"}
    for layer in rec.stats:
        assert int(layer.tokens.sum()) == want[stacks[layer.name]], layer.name
    with torch.no_grad(), moe_route.record(model) as rec:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3,
                             do_sample=False)
    want = {"encoder": 10, "decoder": 2 * (out.shape[1] - 1)}  # the last token is not fed back
    for layer in rec.stats:
        assert int(layer.tokens.sum()) == want[stacks[layer.name]], layer.name


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("exact", [False, True])
def test_gradient_checkpointing_counts_each_token_once(reentrant, exact):
    """Activation checkpointing re-runs every decoder layer, routers included, inside backward:
    those calls must not add to the statistics or the trace (each token once), while a steered
    layer is still steered there (the gradients equal those without checkpointing)."""
    model = build("olmoe").train()
    ids = _ids(5, (2, 6))
    plan = moe_route.SteeringPlan.promote(layers=[1], experts=[3], std=1.0)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_checkpointing(model, reentrant)
        model.zero_grad()
        with moe_route.patch(model, exact=exact), moe_route.steer(model, plan), \
                moe_route.record(model, trace=True) as rec:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        assert [int(layer.tokens.sum()) for layer in rec.stats] == [12, 12]
        assert [layer["ids"].shape[0] for layer in rec.trace.values()] == [12, 12]
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_record_refuses_a_bad_meta_before_recording():
    """record() kept meta unchecked until its first flush, where RoutingStats refused it after
    the model calls, with the device buffers already zeroed: the whole run was lost."""
    model = build("olmoe")
    for meta in ({"dtype": torch.float32}, {"layers": (0, 1)}):
        with pytest.raises(ValueError, match=r"record: meta must"):
            moe_route.record(model, meta=meta)
    with moe_route.record(model, meta={"layers": [0, 1]}) as rec, torch.no_grad():
        model(_ids())
    assert rec.stats.meta == {"layers": [0, 1]}
    assert int(rec.stats[0].tokens.sum()) == _ids().numel()


def test_reentering_an_active_recorder_is_refused_and_changes_nothing():
    """The same Recorder entered again inside itself was refused, but the refused entry's
    cleanup took the active entry's buffers and hooks off the routers and dropped its patch
    handle: the rest of the block was not counted, and the outer exit released nothing, so the
    model stayed patched after the block."""
    model = build("olmoe")
    first, second = _ids(8), _ids(9)
    with torch.no_grad():
        ref = model(second).logits
    with moe_route.record(model) as plain, torch.no_grad():
        model(first)
        model(second)
    rec = moe_route.record(model)
    with rec, torch.no_grad():
        model(first)
        with pytest.raises(RuntimeError, match=r"record: this record\(\) context is already "
                                               r"active"):
            with rec:
                pass
        assert any("forward" in m.__dict__ for m in model.modules())    # still patched
        model(second)
    for got, want in zip(rec.stats, plain.stats):
        assert int(got.tokens.sum()) == first.numel() + second.numel()
        assert torch.equal(got.counts, want.counts) and torch.equal(got.tokens, want.tokens)
        torch.testing.assert_close(got.weight_sum, want.weight_sum)
    assert not any("forward" in m.__dict__ for m in model.modules())   # unpatched
    with torch.no_grad():
        assert torch.equal(model(second).logits, ref)


def test_a_recorder_entered_again_after_an_error_keeps_what_it_had():
    """An entry that ends in an error leaves its numbers unflushed (readable through ``stats``);
    entering the same Recorder again made its buffers anew and lost them: group "first" had 0
    tokens and the trace still held them."""
    model = build("olmoe")
    first, second = _ids(8), _ids(9)
    rec = moe_route.record(model, trace=True)
    with pytest.raises(KeyError), torch.no_grad():
        with rec:
            with rec.group("first"):
                model(first)
            raise KeyError("boom")
    with rec, torch.no_grad(), rec.group("second"):
        model(second)
    assert rec.stats.group_names == ["first", "second"]
    assert [int(layer.tokens[0]) for layer in rec.stats] == [first.numel()] * len(rec.stats)
    assert [int(layer.tokens[1]) for layer in rec.stats] == [second.numel()] * len(rec.stats)
    # the error with set_groups' groups current (no group() left before it)
    rec = moe_route.record(model)
    with pytest.raises(KeyError), torch.no_grad():
        with rec:
            rec.per_sequence(["a", "b", "c"])
            model(first)
            raise KeyError("boom")
    with rec, torch.no_grad():
        rec.set_groups(None)
        model(second)
    assert rec.stats.group_names == ["a", "b", "c", "all"]
    assert all(layer.tokens.tolist() == [8, 8, 8, 24] for layer in rec.stats)


def test_a_router_run_outside_the_models_forward_warns_and_never_reuses_a_calls_rows():
    """model.model(...) skips the hooks on model: its routers took the rows of the model's
    previous call (its padding mask, its groups) when the shapes matched. They now count in the
    context group, with a warning that padding cannot be told apart there."""
    model = build("olmoe")
    ids = _ids(3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with moe_route.record(model) as rec, torch.no_grad():
        model(ids, attention_mask=mask)                          # 3 padding tokens: not counted
        with pytest.warns(UserWarning, match=r"record: a router ran outside a forward of "
                                             r"OlmoeForCausalLM .* padding included"):
            model.model(input_ids=ids, attention_mask=mask)      # every token, in the group
    assert [int(layer.tokens.sum()) for layer in rec.stats] == \
        [2 * ids.numel() - 3] * len(rec.stats)
    # the context group gets a row beside set_groups' groups only if they leave one free
    B, S = ids.shape
    names = [f"s{b}" for b in range(B)]
    for max_groups, context in ((B, []), (B + 1, ["all"])):
        with moe_route.record(model, max_groups=max_groups) as rec, torch.no_grad():
            rec.per_sequence(names)
            model(ids)
            with pytest.warns(UserWarning, match=r"or, while set_groups' groups fill "
                                                 r"max_groups, not at all"):
                model.model(input_ids=ids)
        assert rec.stats.group_names == context + names
        for layer in rec.stats:
            assert layer.tokens.tolist() == [B * S] * len(context) + [S] * B


def test_flush_copies_each_device_and_dtype_at_once():
    """A flush copies the statistics of a device to the host as one tensor per dtype
    (``_flat_copy``): each part keeps its shape and values, in storage of its own, since the
    device buffers are zeroed after the flush. Host tensors pass through as they are."""
    from moe_route.recording import _flat_copy, _to_host

    tensors = [torch.arange(6.0).view(2, 3), torch.rand(4), torch.rand(2, 2, 2), torch.rand(0)]
    before = [t.clone() for t in tensors]
    got = _flat_copy(tensors)
    for t in tensors:
        t.zero_()
    for want, part in zip(before, got):
        assert part.shape == want.shape and torch.equal(part, want)
    assert all(a is b for a, b in zip(tensors, _to_host(tensors)))
