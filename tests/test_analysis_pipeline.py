"""The analysis pipeline end to end: data loading, masked recording, A/B, report, demo, CLI."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import moe_route
from moe_route.analysis import metrics as M, pipeline
from moe_route.analysis.evaluation import EvalResult

transformers = pytest.importorskip("transformers")
from hub_repos import datasets_serving, write_repo  # noqa: E402
from tiny_models import build, word_tokenizer  # noqa: E402


def test_load_parallel_tsv_and_jsonl(tmp_path):
    tsv = tmp_path / "data.tsv"
    tsv.write_text("eng\tfra\nhello\tbonjour\ncat\tchat\n", encoding="utf-8")
    assert pipeline.load_parallel(tsv) == {"eng": ["hello", "cat"], "fra": ["bonjour", "chat"]}
    assert pipeline.load_parallel(tsv, ["fra"], limit=1) == {"fra": ["bonjour"]}
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"eng": "a", "deu": "b"}\n{"eng": "c", "deu": "d"}\n', encoding="utf-8")
    assert pipeline.load_parallel(jsonl, ["deu", "eng"]) == {"deu": ["b", "d"], "eng": ["a", "c"]}
    with pytest.raises(ValueError, match=r"languages \['ita'\] are not in the data"):
        pipeline.load_parallel(tsv, ["ita"])
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text('{"eng": "a", "deu": "b"}\n{"eng": "c"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"ragged.jsonl line 2 gives the languages \['eng'\]; "
                                         r"expected \['deu', 'eng'\]$"):
        pipeline.load_parallel(ragged)
    with pytest.raises(ValueError, match="must end in .tsv or .jsonl"):
        pipeline.load_parallel(__file__)


def test_load_parallel_tsv_keeps_quote_marks(tmp_path):
    """FLORES sentences often start with a quote mark: csv's quoting dropped it and the closing
    one, and merged the two rows of a quotation that opens in one sentence and closes in the
    next."""
    tsv = tmp_path / "quotes.tsv"
    rows = [("eng", "fra"), ('"We now have mice," he added.', '"Nous avons des souris", dit-il.'),
            ('"It was cold.', '"Il faisait froid.'), ('We left," she said.', 'Partis », dit-elle.')]
    tsv.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    assert pipeline.load_parallel(tsv) == {"eng": [r[0] for r in rows[1:]],
                                           "fra": [r[1] for r in rows[1:]]}


def test_load_parallel_refuses_rows_that_do_not_line_up(tmp_path):
    """Rows missing a language shifted the next sentences onto the wrong row (two lines each
    missing a different language gave equal counts, so nothing was said); a short .tsv row, a
    line that is not an object and a non-string sentence raised IndexError/AttributeError."""
    def write(name, text):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    shifted = write("shifted.jsonl", '{"eng": "a", "deu": "b"}\n{"eng": "c"}\n{"deu": "d"}\n')
    with pytest.raises(ValueError, match=r"line 2 gives the languages \['eng'\]"):
        pipeline.load_parallel(shifted)
    # a selection needs its languages on every line; the others may vary
    extra = write("extra.jsonl", '{"eng": "a", "deu": "b", "fra": "x"}\n{"eng": "c", "deu": "d"}\n')
    assert pipeline.load_parallel(extra, ["eng", "deu"]) == {"eng": ["a", "c"], "deu": ["b", "d"]}
    with pytest.raises(ValueError, match=r"line 2 gives the languages \['deu', 'eng'\]; "
                                         r"expected \['fra'\] \(at least\)"):
        pipeline.load_parallel(extra, ["fra"])
    cases = [
        ("short.tsv", "eng\tfra\nhello\tbonjour\ncat\n", r"short.tsv line 3 has 1 columns, the "
                                                           r"header 2"),
        ("twice.tsv", "eng\teng\na\tb\n", r"the header names a language twice"),
        ("list.jsonl", '["a", "b"]\n', r"line 1 must be a JSON object \{language: sentence\}, "
                                       r"got list"),
        ("number.jsonl", '{"eng": 1}\n', r"line 1: the 'eng' sentence must be a string, got int"),
        ("deep.jsonl", "[" * 100_000, r"line 1 is not valid JSON \(arrays or objects nest deeper"),
    ]
    for name, text, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            pipeline.load_parallel(write(name, text))
    # blank lines are skipped in both formats
    blank = write("blank.tsv", "eng\tfra\nhello\tbonjour\n\ncat\tchat\n\n")
    assert pipeline.load_parallel(blank) == {"eng": ["hello", "cat"], "fra": ["bonjour", "chat"]}


def test_load_parallel_refuses_a_bad_limit_and_empty_data(tmp_path):
    """``limit=0`` gave empty languages (the recorder then failed with "nothing was recorded"),
    ``limit=-1`` silently dropped the last sentence; a file with only its header has no data."""
    tsv = tmp_path / "data.tsv"
    tsv.write_text("eng\tfra\nhello\tbonjour\ncat\tchat\n", encoding="utf-8")
    assert pipeline.load_parallel(tsv, limit=5) == {"eng": ["hello", "cat"],
                                                    "fra": ["bonjour", "chat"]}
    for limit, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError)):
        with pytest.raises(error, match=rf"load_parallel: limit={limit!r} must be None \(all\)"):
            pipeline.load_parallel(tsv, limit=limit)
    header_only = tmp_path / "header.tsv"
    header_only.write_text("eng\tfra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"holds no sentences for \['eng', 'fra'\]"):
        pipeline.load_parallel(header_only)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no sentences"):
        pipeline.load_parallel(blank)


def test_load_parallel_from_the_hub_layouts(monkeypatch, tmp_path):
    """FLORES+ by language config and split (field ``text``, in ``id`` order); Belebele by
    language config, its passages kept once each (by link, sorted), also from the legacy
    layout; read by the real ``datasets`` from local copies of the Hub layouts."""
    flores = {lang: {split: [{"id": i, "text": f"{lang} {split} {i}"} for i in (2, 0, 1)]
                     for split in ("dev", "devtest")} for lang in ("eng_Latn", "fra_Latn")}

    def passages(lang, links):
        return {"test": [{"link": link, "flores_passage": f"{lang} {link}", "question": "q"}
                         for link in links]}

    belebele = {"eng_Latn": passages("eng_Latn", ["u/2", "u/1", "u/2", "u/3"]),
                "fra_Latn": passages("fra_Latn", ["u/3", "u/2", "u/1"])}
    legacy = {"default": {lang: rows["test"] for lang, rows in belebele.items()}}
    repos = {"openlanguagedata/flores_plus": write_repo(tmp_path / "flores", flores),
             "facebook/belebele": write_repo(tmp_path / "belebele", belebele)}
    calls = datasets_serving(monkeypatch, tmp_path, repos)
    assert pipeline.load_parallel("flores", ["eng_Latn", "fra_Latn"], limit=2) == {
        "eng_Latn": ["eng_Latn devtest 0", "eng_Latn devtest 1"],
        "fra_Latn": ["fra_Latn devtest 0", "fra_Latn devtest 1"]}
    assert pipeline.load_parallel("openlanguagedata/flores_plus", ["fra_Latn"], split="dev") == {
        "fra_Latn": ["fra_Latn dev 0", "fra_Latn dev 1", "fra_Latn dev 2"]}
    # one passage per link, sorted by it, so differently ordered languages line up
    by_link = {"eng_Latn": ["eng_Latn u/1", "eng_Latn u/2", "eng_Latn u/3"],
               "fra_Latn": ["fra_Latn u/1", "fra_Latn u/2", "fra_Latn u/3"]}
    assert pipeline.load_parallel("belebele", ["eng_Latn", "fra_Latn"]) == by_link
    assert calls[:2] == [("openlanguagedata/flores_plus", "eng_Latn", "split=devtest"),
                         ("openlanguagedata/flores_plus", "fra_Latn", "split=devtest")]
    assert calls[3] == ("facebook/belebele", "eng_Latn", "split=test")
    repos["facebook/belebele"] = write_repo(tmp_path / "legacy", legacy)
    assert pipeline.load_parallel("facebook/belebele", ["eng_Latn", "fra_Latn"]) == by_link
    # a language the repository lacks: the error of the current layout, which lists the configs
    with pytest.raises(ValueError, match="'xyz_Latn' not found"):
        pipeline.load_parallel("belebele", ["xyz_Latn"])


def test_load_parallel_hub_sources_without_datasets_or_retired(monkeypatch, tmp_path):
    """No links: one passage per text, in row order. ``facebook/flores`` (a loading script that
    ``datasets`` 4 refuses) names its replacement; no ``datasets`` package names it too."""
    rows = [{"flores_passage": p} for p in ("a", "a", "b")]
    datasets_serving(monkeypatch, tmp_path, {
        "facebook/belebele": write_repo(tmp_path / "b", {"swh_Latn": {"test": rows}})})
    assert pipeline.load_parallel("belebele", ["swh_Latn"]) == {"swh_Latn": ["a", "b"]}
    with pytest.raises(ValueError, match=r"load_parallel: source='facebook/flores' is a "
                                         r"loading-script dataset, which `datasets` 4 and later "
                                         r"no longer load; use 'flores' \(openlanguagedata"):
        pipeline.load_parallel("facebook/flores", ["eng_Latn"])
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="load_parallel: source='flores' needs the `datasets`"):
        pipeline.load_parallel("flores", ["eng_Latn"])


def test_record_sequences_counts_only_the_text_tokens():
    model = build("olmoe")
    tok = word_tokenizer()
    corpus = {"eng": ["hello world", "cat sat sat"], "xxx": ["world", "hello cat"]}
    stats = pipeline.record_parallel(model, corpus, tokenizer=tok, chat_template=True, batch_size=2)
    assert stats.group_names == ["eng/0", "eng/1", "xxx/0", "xxx/1"]
    # template tokens (<s> user : ... assistant :) and padding are not counted
    assert stats[0].tokens.tolist() == [2, 3, 1, 2]
    plain = pipeline.record_sequences(model, {"eng": ["hello world"]}, tokenizer=tok)
    assert plain[0].tokens.tolist() == [2]
    # all_tokens counts every token of the rendered prompt (the paper code's averages)
    every = pipeline.record_parallel(model, corpus, tokenizer=tok, chat_template=True,
                                     batch_size=2, all_tokens=True)
    rendered = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                        add_generation_prompt=True)
                for texts in corpus.values() for t in texts]
    lengths = [len(tok(r, add_special_tokens=False)["input_ids"]) for r in rendered]
    assert every[0].tokens.tolist() == lengths and lengths == [7, 8, 6, 7]
    # the statistics say which tokens they counted; a meta of the caller's keeps its own keys
    assert every.meta == {"chat_template": True, "max_length": 512, "all_tokens": True}
    mine = pipeline.record_sequences(model, corpus, tokenizer=tok, meta={"run": 3,
                                                                          "max_length": "mine"})
    assert mine.meta == {"chat_template": False, "max_length": "mine", "all_tokens": False,
                         "run": 3}
    with pytest.raises(TypeError, match="record_sequences: meta must be a dict or None, got list"):
        pipeline.record_sequences(model, corpus, tokenizer=tok, meta=["run"])
    ids = pipeline.record_sequences(model, {"eng": torch.tensor([[5, 6, 7]])})
    assert ids.meta == {} and ids[0].tokens.tolist() == [3]   # token ids: no text settings
    with pytest.raises(TypeError, match="record_sequences: all_tokens='yes' must be a bool"):
        pipeline.record_sequences(model, corpus, tokenizer=tok, all_tokens="yes")
    with pytest.raises(ValueError, match="pass tokenizer="):
        pipeline.record_sequences(model, {"eng": ["hello"]})
    with pytest.raises(ValueError, match="different sequence counts"):
        pipeline.record_parallel(model, {"a": ["hello"], "b": ["hello", "cat"]}, tokenizer=tok)
    # no sequence at all: an error naming the corpus, not the recorder's RuntimeError
    with pytest.raises(ValueError, match=r"corpus holds no sequences \(languages \['eng'\]"):
        pipeline.record_sequences(model, {"eng": []}, tokenizer=tok)
    with pytest.raises(ValueError, match="corpus holds no sequences"):
        pipeline.record_parallel(model, {"a": [], "b": torch.zeros(0, 4, dtype=torch.long)})


def test_record_sequences_saves_a_trace_that_agrees_with_its_statistics(tmp_path):
    """trace_path keeps every token's routing: the counted tokens carry their sequence's group,
    the template's and the padding carry none, and each sequence's expert counts from the
    trace's ids are the statistics' counts; the file holds the statistics' meta."""
    from moe_route.analysis import trace_agreement

    model = build("olmoe")
    tok = word_tokenizer()
    corpus = {"eng": ["hello world", "cat sat sat"], "xxx": ["world", "hello cat"]}
    path = tmp_path / "runs" / "trace.safetensors"
    stats = pipeline.record_parallel(model, corpus, tokenizer=tok, chat_template=True,
                                     batch_size=2, trace_path=path, meta={"run": 1})
    trace = moe_route.load_trace(path)
    assert trace.meta == stats.meta == {"chat_template": True, "max_length": 512,
                                        "all_tokens": False, "run": 1}
    assert list(trace) == [layer.name for layer in stats]
    for layer in stats:
        rows = trace[layer.name]
        groups = rows["group"]
        assert len(groups) == 2 * 8 + 2 * 7        # every row the router saw, padding too
        assert [groups.count(g) for g in stats.group_names] == [2, 3, 1, 2]
        counts = torch.zeros_like(layer.counts)
        for g, ids in zip(groups, rows["ids"].long()):
            if g is not None:
                counts[stats.group_names.index(g)] += torch.bincount(ids, minlength=rows["experts"])
        assert torch.equal(counts, layer.counts)
    assert all(r.identical == 1.0 and r.tokens == 8 for r in trace_agreement(trace, trace).values())
    # refused before any sequence is recorded: a save that fails after the corpus would lose
    # the statistics too
    with pytest.raises(TypeError, match="trace= is not an option here .* pass trace_path=PATH"):
        pipeline.record_sequences(model, corpus, tokenizer=tok, trace=True)
    with pytest.raises(TypeError, match="trace_path must be a str or os.PathLike .* got int"):
        pipeline.record_sequences(model, corpus, tokenizer=tok, trace_path=3)
    with pytest.raises(ValueError, match="trace_logits shape a trace, which only trace_path"):
        pipeline.record_sequences(model, corpus, tokenizer=tok, trace_logits=True)
    with pytest.raises(ValueError, match="trace_buffer_bytes shape a trace, which only trace_"):
        pipeline.record_sequences(model, corpus, tokenizer=tok, trace_buffer_bytes=1 << 20)
    with pytest.raises(ValueError, match="is a directory; name the .safetensors file"):
        pipeline.record_sequences(model, corpus, tokenizer=tok, trace_path=tmp_path)
    if os.geteuid() != 0:          # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="cannot write trace_path=.*locked"):
            pipeline.record_sequences(model, corpus, tokenizer=tok,
                                      trace_path=locked / "t.safetensors")


def test_record_sequences_warns_once_when_max_length_cuts_a_text():
    """A text longer than ``max_length`` tokens was cut silently: a script that takes many more
    tokens than English lost more of each parallel passage, which biases the divergence. One
    warning per call says how many texts of which languages were cut; a text that only loses
    the chat template's suffix, or none, is not cut."""
    model = build("olmoe")
    tok = word_tokenizer()
    corpus = {"eng": ["hello world", "cat"], "amh": ["hello world cat sat", "world cat sat"]}
    with pytest.warns(UserWarning) as caught:
        stats = pipeline.record_parallel(model, corpus, tokenizer=tok, batch_size=1, max_length=2)
    assert [str(w.message) for w in caught] == [
        "record_sequences: max_length=2 cut 2 of 4 texts (amh: 2 of 2), so only their first "
        "tokens are counted; max_length=None (or a larger value) keeps them whole"]
    assert stats[0].tokens.tolist() == [2, 1, 2, 2]
    # "<s> user : hello world assistant :": 5 tokens keep the text, only the template's suffix
    # goes (no eng text is cut); 4 cut "world"
    with pytest.warns(UserWarning, match=r"max_length=5 cut 2 of 4 texts \(amh: 2 of 2\),"):
        pipeline.record_sequences(model, corpus, tokenizer=tok, chat_template=True,
                                  max_length=5)
    with pytest.warns(UserWarning, match=r"max_length=4 cut 3 of 4 texts \(eng: 1 of 2, amh: "
                                         r"2 of 2\)"):
        pipeline.record_sequences(model, corpus, tokenizer=tok, chat_template=True,
                                  max_length=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipeline.record_sequences(model, corpus, tokenizer=tok)                  # 512
        pipeline.record_sequences(model, corpus, tokenizer=tok, max_length=None)
        pipeline.record_sequences(model, corpus, tokenizer=tok, max_length=4)
        pipeline.record_sequences(model, {"ids": torch.zeros(2, 9, dtype=torch.long)},
                                  max_length=2)                 # token ids are never cut
    for bad, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match=rf"record_sequences: max_length={bad!r} must be "
                                             rf"None \(whole texts\) or an int >= 1"):
            pipeline.record_sequences(model, corpus, tokenizer=tok, max_length=bad)


def test_record_sequences_max_length_that_leaves_no_text():
    """max_length at or below the tokens the tokenizer adds: 1 left the text whole (the tokenizer
    cannot cut BOS and EOS) and counted all of it, unwarned; 2 left no token of the text, and
    record's error said the model had not been called. Empty texts end the same way."""
    model = build("olmoe")
    tok = word_tokenizer(("<pad>", "<s>", "<unk>", "hello", "world", "cat", "sat", "</s>"),
                         eos="</s>")   # "<s> ... </s>": two tokens on every text
    corpus = {"eng": ["hello world cat sat"]}
    with pytest.raises(ValueError, match=r"record_sequences: max_length=1 is shorter than the "
                                         r"tokens the tokenizer adds to every text: it left a "
                                         r"text of 6 tokens uncut"):
        pipeline.record_sequences(model, corpus, tokenizer=tok, max_length=1)
    with pytest.raises(ValueError, match=r"record_sequences: no text has a token of its own to "
                                         r"count \(empty texts, or max_length=2 left only "
                                         r"special tokens\)"):
        pipeline.record_sequences(model, corpus, tokenizer=tok, max_length=2)
    with pytest.raises(ValueError, match=r"no text has a token of its own to count \(empty "
                                         r"texts\)"):
        pipeline.record_sequences(model, {"eng": ["", ""]}, tokenizer=tok, max_length=None)
    with pytest.warns(UserWarning, match=r"max_length=3 cut 1 of 1 texts"):
        stats = pipeline.record_sequences(model, corpus, tokenizer=tok, max_length=3)
    assert stats[0].tokens.tolist() == [1]


def test_record_sequences_refuses_a_string_for_a_language():
    """``{"en": "hello world"}`` recorded one sequence per character; it is refused before the
    model runs (``object()`` here: calling it would fail otherwise), as is text without a
    tokenizer after a language of token ids (that was found after the ids had run)."""
    tok = word_tokenizer()
    message = (r"record_sequences: language 'fra': a language's sequences must be a list of "
               r"strings or an \[N, S\] token-id tensor, got str 'bonjour'")
    with pytest.raises(TypeError, match=message):
        pipeline.record_sequences(object(), {"eng": ["hello"], "fra": "bonjour"}, tokenizer=tok)
    with pytest.raises(TypeError, match=message):      # not "different sequence counts"
        pipeline.record_parallel(object(), {"eng": ["hello"], "fra": "bonjour"}, tokenizer=tok)
    with pytest.raises(ValueError, match=r"language 'eng' holds text; pass tokenizer="):
        pipeline.record_sequences(object(), {"ids": torch.zeros(1, 2, dtype=torch.long),
                                             "eng": ["hello"]})


def test_chat_template_masks_the_text_where_the_template_put_it():
    """The text's tokens are found after the template's prefix, as written or as the template
    trimmed it (Llama 3's ``| trim``). The text was searched from the start of the rendered
    prompt: a text equal to the role name ("user") counted the template's role token instead,
    and a text the template trimmed was not found (find -1) and the template's first tokens
    "<s> user :" were counted instead of the text."""
    model = build("olmoe")
    tok = word_tokenizer()
    # "<s> user : user assistant :": the text is the second "user" (position 3), not the first
    enc, keep = pipeline._encode(["user", "cat user"], tok, True, None)
    assert keep[0].nonzero().flatten().tolist() == [3]
    assert keep[1].nonzero().flatten().tolist() == [3, 4]
    reference = pipeline.record_sequences(model, {"eng": ["hello world"]}, tokenizer=tok,
                                          chat_template=True)
    tok.chat_template = ("{% for m in messages %}<s> user : {{ m['content'] | trim }} "
                         "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")
    trimmed = pipeline.record_sequences(model, {"eng": ["hello world \n"]}, tokenizer=tok,
                                        chat_template=True)
    for a, b in zip(reference, trimmed):
        assert a.tokens.tolist() == b.tokens.tolist() == [2]
        assert torch.equal(a.counts, b.counts)
    tok.chat_template = "<s> user : {{ messages[0]['content'] | upper }} assistant : "
    with pytest.raises(ValueError, match="the chat template does not write the text 'hello'"):
        pipeline.record_sequences(model, {"eng": ["hello"]}, tokenizer=tok, chat_template=True)


@pytest.mark.parametrize("pieces", ["metaspace", "byte_level"])
def test_chat_template_counts_a_first_token_that_spans_the_space_before_the_text(pieces):
    """Mixtral's template writes ``[INST] TEXT [/INST]``. A SentencePiece tokenizer (Metaspace:
    ``▁hello``) and a byte-level one that keeps offsets untrimmed (``Ġhello``, as Llama 3 and
    Qwen) give the text's first token a span that starts at that space, before the text: it was
    left out, so every sequence lost its first token. It counts, the template's do not."""
    tokenizers = pytest.importorskip("tokenizers")
    mark = "\u2581" if pieces == "metaspace" else "\u0120"
    words = ["<pad>", "<s>", "<unk>", "[INST]", "[/INST]", "hello", "world", "cat"]
    vocab = {w if w.startswith("<") else mark + w: i for i, w in enumerate(words)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    if pieces == "metaspace":
        core.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="always")
    else:
        core.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                               bos_token="<s>", unk_token="<unk>")
    tok.chat_template = ("<s>{% for m in messages %}[INST] {{ m['content'] }} [/INST]"
                         "{% endfor %}")
    texts = ["hello world", "cat"]
    enc, keep = pipeline._encode(texts, tok, True, None)
    kept = [tok.convert_ids_to_tokens(ids[k]) for ids, k in zip(enc["input_ids"], keep)]
    assert kept == [[mark + "hello", mark + "world"], [mark + "cat"]]
    model = build("olmoe")
    stats = pipeline.record_sequences(model, {"eng": texts}, tokenizer=tok, chat_template=True)
    assert stats[0].tokens.tolist() == [2, 1]


def test_chat_template_is_wrapped_with_thinking_off():
    """The paper wraps prompts with Qwen3's ``enable_thinking=False``: the generation prompt then
    closes the think block, so an answer (or an option's log-likelihood) follows at once. A
    template with no such switch renders as before, and the counted tokens are the text's."""
    from moe_route.analysis.inputs import chat_wrap
    tok = word_tokenizer()
    plain = chat_wrap(tok, "hello", True)
    assert plain == "<s> user : hello assistant : "
    tok.chat_template = ("{% for m in messages %}<s> user : {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% if enable_thinking is "
                         "defined and enable_thinking is false %}<think> </think> {% endif %}"
                         "{% endif %}")
    assert chat_wrap(tok, "hello", True) == plain + "<think> </think> "
    assert chat_wrap(tok, "hello", False) == "hello"
    _, keep = pipeline._encode(["hello world"], tok, True, None)
    assert keep.sum().item() == 2


def test_ab_test_reports_the_difference():
    model = build("olmoe")
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))

    def share_of_expert_3():
        with moe_route.record(model) as rec, torch.no_grad():
            model(ids)
        layer = rec.stats[0]
        return {"share": float(layer.counts[0, 3]) / float(layer.tokens[0])}

    plan = moe_route.SteeringPlan.force(0, 3)
    result = pipeline.ab_test(model, plan, share_of_expert_3)
    assert result["steered"]["share"] == 1.0
    assert result["delta"]["share"] == pytest.approx(1.0 - result["baseline"]["share"])
    with pytest.raises(TypeError, match="evaluate must be callable"):
        pipeline.ab_test(model, plan, 3)


def test_cli_demo_recovers_the_planted_answer(tmp_path):
    """``moe-route demo`` end to end (the README's main job): report written, planted answer
    recovered, steering plan and A/B in the report."""
    report = tmp_path / "report"
    out = subprocess.run([sys.executable, "-m", "moe_route.cli", "demo", "--out", str(report)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for check in ("u_shape (< 1/3): True", "task_experts_exact: True", "steering_helps: True",
                  "steering_gain_significant (p < 0.01): True",
                  "steering_moves_steered_layers: True", "steering_leaves_earlier_layers: True"):
        assert check in out.stdout
    for name in ("summary.txt", "summary.json", "divergence.csv", "divergence.json",
                 "experts.json", "plan.json", "ab.json", "correlation.json", "agreement.json",
                 "divergence_by_layer.png", "expert_usage.png", "delta.png"):
        assert (report / name).exists(), name
    plan = moe_route.SteeringPlan.from_json((report / "plan.json").read_text())
    assert set(plan.layers) == {2, 3, 4, 5}
    div = json.loads((report / "divergence.json").read_text())["divergence"]
    assert set(div) == {"lang1", "lang2", "lang3", "lang4"}
    summary = json.loads((report / "summary.json").read_text())
    assert summary["middle_mean"] < summary["edge_mean"] / 3
    # the A/B is paired per question: the reference language is already right everywhere
    paired = summary["ab"]["paired"]
    assert paired["eng"]["gained"] == paired["eng"]["lost"] == 0 and paired["all"]["lost"] == 0
    assert "McNemar" in (report / "summary.txt").read_text()
    # soft steering of the middle layers moves weight there and leaves the first layers alone
    moved = {int(i): r["weight_shift"] for i, r in summary["agreement"].items()}
    assert moved[0] == moved[1] == 0.0 and min(moved[i] for i in (2, 3, 4, 5)) > 0


def test_cli_analyze_and_experts_on_a_saved_model(tmp_path):
    """``moe-route analyze`` and ``experts`` end to end on a local model directory (a tiny OLMoE
    and a word-level tokenizer saved with save_pretrained: what a user passes as MODEL)."""
    model_dir = tmp_path / "model"
    build("olmoe").save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "parallel.tsv"
    rows = ["eng\tdeu\tfra\tita", "hello world\tworld hello\tcat sat\tsat sat",
            "cat sat\tsat cat\thello world\tcat cat", "hello cat\tcat hello\tsat world\tworld"]
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    # per-language accuracy as `moe-route evaluate` writes it
    accuracy = EvalResult({"deu": torch.tensor([True, False]), "fra": torch.tensor([True, True]),
                           "ita": torch.tensor([False, False])}, {"deu": [0, 1], "fra": [0, 0],
                                                                  "ita": [1, 1]})
    accuracy.save(tmp_path / "baseline.json")
    run = lambda *args: subprocess.run([sys.executable, "-m", "moe_route.cli", *args],  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    out = run("analyze", str(model_dir), "--data", str(data), "--reference", "eng", "--dtype",
              "fp32", "--accuracy", str(tmp_path / "baseline.json"), "--chat-template",
              "--all-tokens", "--trace", "--out",
              str(tmp_path / "report"))
    assert out.returncode == 0, out.stdout + out.stderr
    stats = moe_route.RoutingStats.load(tmp_path / "report" / "stats")
    assert len(stats.group_names) == 12 and stats.group_names[0] == "eng/0"
    assert stats.meta == {"chat_template": True, "max_length": 512, "all_tokens": True,
                          "model": str(model_dir), "data": str(data)}
    # --trace: every token's routing, with the same meta, for moe-route compare
    trace_path = tmp_path / "report" / "trace.safetensors"
    assert f"trace: {trace_path}" in out.stdout
    trace = moe_route.load_trace(trace_path)
    assert trace.meta == stats.meta and list(trace) == [layer.name for layer in stats]
    same = run("compare", str(trace_path), str(trace_path))
    assert same.returncode == 0 and f"(model {model_dir})" in same.stdout
    # every token counts, the chat template's too ("<s> user : hello world assistant :")
    assert stats[0].tokens[0].item() == 7
    div = json.loads((tmp_path / "report" / "divergence.json").read_text())["divergence"]
    assert set(div) == {"deu", "fra", "ita"} and len(div["deu"]) == 2
    corr = json.loads((tmp_path / "report" / "correlation.json").read_text())
    # two layers: both are "middle" (the middle third rounds to all); Pearson by hand
    x = [sum(div[lang]) / 2 for lang in ("deu", "fra", "ita")]
    y = [0.5, 1.0, 0.0]
    mx, my = sum(x) / 3, sum(y) / 3
    r = (sum((a - mx) * (b - my) for a, b in zip(x, y))
         / (sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y)) ** 0.5)
    assert corr["pearson"] == pytest.approx(r, abs=1e-5)
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["importance"] == "dense"
    # the author's later importance: routed weights renormalised per token, from the trace
    out = run("analyze", str(model_dir), "--data", str(data), "--reference", "eng", "--dtype",
              "fp32", "--importance", "renormalized", "--out", str(tmp_path / "renorm"))
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((tmp_path / "renorm" / "summary.json").read_text())
    assert summary["importance"] == "routed, renormalised per token"
    assert "JS of the routed, renormalised per token expert importance" in \
        (tmp_path / "renorm" / "summary.txt").read_text()
    renormalized = M.trace_statistics(moe_route.load_trace(tmp_path / "renorm" /
                                                           "trace.safetensors"), renormalize=True)
    want = M.routing_divergence(renormalized, "eng", kind="routed")
    got = json.loads((tmp_path / "renorm" / "divergence.json").read_text())["divergence"]
    assert got == {lang: d.tolist() for lang, d in want.items()}
    dense = M.routing_divergence(moe_route.RoutingStats.load(tmp_path / "renorm" / "stats"), "eng")
    assert not torch.allclose(torch.tensor(got["deu"]), dense["deu"], atol=1e-3)
    task, base = tmp_path / "task.txt", tmp_path / "base.txt"
    task.write_text("cat cat cat\ncat sat cat\n", encoding="utf-8")
    base.write_text("hello world\nworld hello\n", encoding="utf-8")
    out = run("experts", str(model_dir), "--task", str(task), "--baseline", str(base),
              "--tau", "0.3", "--dtype", "fp32", "--std-unbiased", "--out",
              str(tmp_path / "plan.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    plan = moe_route.SteeringPlan.load(tmp_path / "plan.json")
    assert plan.layers and all(layer in (0, 1) for layer in plan.layers)
    assert {entry for layer in plan.values() for entry in layer.values()} == {
        moe_route.SteerEntry(std=0.5, std_unbiased=True)}
    with moe_route.steer(build("olmoe"), plan):  # the plan fits the model it came from
        pass


def test_write_report_agreement_by_layer_index(tmp_path):
    """``agreement`` keyed by layer name lands under the layers' indices in agreement.json and
    the summary; a name the statistics lack is refused."""
    from moe_route.analysis import RoutingAgreement, write_report
    from test_analysis_metrics import random_stats

    stats = random_stats(L=3)
    agreement = {f"model.layers.{i}.mlp.gate": RoutingAgreement(10, 1.0, 1.0, 1.0, 0.1 * i)
                 for i in range(3)}
    summary = write_report(tmp_path, stats, "en", agreement=agreement)
    saved = json.loads((tmp_path / "agreement.json").read_text())
    assert saved == summary["agreement"]
    assert list(saved) == ["0", "1", "2"] and saved["2"]["weight_shift"] == pytest.approx(0.2)
    assert "layer   1: overlap 1.000  top-1 1.000  weight moved 0.1000" in \
        (tmp_path / "summary.txt").read_text()
    with pytest.raises(ValueError, match=r"agreement names layers the statistics lack: "
                                         r"\['model.layers.9.mlp.gate'\]"):
        write_report(tmp_path / "refused", stats, "en",
                     agreement={"model.layers.9.mlp.gate": agreement["model.layers.0.mlp.gate"]})
    assert not (tmp_path / "refused").exists()  # checked before anything is written


def test_write_report_labels_an_encoders_and_a_decoders_layer_apart(tmp_path):
    """Switch's encoder and decoder both have layers 0 and 1: labelled by index alone, two of
    the four agreement entries, csv columns and heatmaps overwrote the other two; each is now
    labelled by its layer's path."""
    import dataclasses

    from moe_route.analysis import RoutingAgreement, write_report
    from test_analysis_metrics import random_stats

    stats = random_stats(L=4)
    names = [f"{stack}.block.{i}.layer.{1 if stack == 'encoder' else 2}.mlp.router"
             for stack in ("encoder", "decoder") for i in range(2)]
    stats = moe_route.RoutingStats([dataclasses.replace(layer, name=name, index=i % 2)
                          for i, (layer, name) in enumerate(zip(stats, names))],
                                   stats.group_names)
    agreement = {name: RoutingAgreement(10, 1.0, 1.0, 1.0, 0.1 * i)
                 for i, name in enumerate(names)}
    summary = write_report(tmp_path, stats, "en", agreement=agreement,
                           heatmap_layers=list(names))
    labels = ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    assert summary["layers"] == labels
    saved = json.loads((tmp_path / "agreement.json").read_text())
    assert list(saved) == labels and saved["decoder.block.1"]["weight_shift"] == \
        pytest.approx(0.3)
    header = (tmp_path / "divergence.csv").read_text().splitlines()[0]
    assert header == "language," + ",".join(f"layer_{label}" for label in labels)
    if "plots_skipped" not in summary:
        assert sorted(p.name for p in tmp_path.glob("language_divergence_L*.png")) == sorted(
            f"language_divergence_L{label}.png" for label in labels)


def test_write_report_writes_strict_json_and_pairwise_heatmaps(tmp_path):
    """A language with no sentence to compare has NaN divergence: the JSON files hold null
    (a bare NaN is not JSON), and the heatmaps are language_divergence's per-pair means."""
    from moe_route.analysis import write_report
    from test_analysis_metrics import divergence_stats

    stats = divergence_stats().group(["eng/0", "eng/1", "fra/0", "fra/1", "fra/2", "deu/1"])
    summary = write_report(tmp_path, stats, "eng", middle_layers=[1])

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))

    saved = strict((tmp_path / "divergence.json").read_text())
    assert saved["divergence"]["deu"] == [None, None]
    assert saved["divergence"]["fra"][0] == pytest.approx(summary["mean_divergence_by_layer"][0])
    strict((tmp_path / "summary.json").read_text())
    if "plots_skipped" not in summary:
        assert sorted(p.name for p in tmp_path.glob("language_divergence_L*.png")) == [
            "language_divergence_L0.png", "language_divergence_L1.png"]


def test_write_report_layers_are_decoder_layer_indices(tmp_path):
    """With MoE layers 3 and 4 (dense layers before them), middle_layers=[4] is layer 4, as the
    report's labels say; it was position 4 (refused here; on a deeper model another layer)."""
    from moe_route.analysis import write_report
    from test_analysis_metrics import shifted_divergence_stats

    stats = shifted_divergence_stats()
    summary = write_report(tmp_path, stats, "eng", middle_layers=[4], heatmap_layers=[3])
    assert summary["layers"] == [3, 4] and summary["middle_layers"] == [4]
    assert summary["middle_mean"] == summary["mean_divergence_by_layer"][1]
    if "plots_skipped" not in summary:
        assert [p.name for p in tmp_path.glob("language_divergence_L*.png")] == [
            "language_divergence_L3.png"]
    with pytest.raises(ValueError, match=r"write_report: middle_layers holds 1, which is not a "
                                         r"layer here; the layers are decoder layers \[3, 4\]"):
        write_report(tmp_path / "refused", stats, "eng", middle_layers=[1])
    assert not (tmp_path / "refused").exists()


def test_write_report_into_an_earlier_reports_folder_leaves_none_of_its_files(tmp_path):
    """A second run into the same folder left the first one's plan.json (or correlation.json...)
    and heatmaps of other layers beside its own summary.json; it removes the files the first
    report wrote (its summary.json lists them) that it did not, and nothing else: not the ab.json
    that `moe-route evaluate --out` wrote there (removed before, a result lost)."""
    from moe_route.analysis import write_report
    from test_analysis_metrics import divergence_stats

    stats = divergence_stats()
    (tmp_path / "notes.txt").write_text("mine")
    first = write_report(tmp_path, stats, "eng", middle_layers=[1], heatmap_layers=np.arange(2),
                         plan=moe_route.SteeringPlan.promote([1], [3]))
    assert (tmp_path / "plan.json").exists() and "plan.json" in first["files"]
    (tmp_path / "ab.json").write_text('{"from": "evaluate"}')
    second = write_report(tmp_path, stats, "eng", middle_layers=[1], heatmap_layers=[1])
    names = {p.name for p in tmp_path.iterdir()}
    assert "plan.json" not in names
    assert {"notes.txt", "summary.json", "divergence.json", "divergence.csv"} <= names
    assert (tmp_path / "ab.json").read_text() == '{"from": "evaluate"}'
    assert set(second["files"]) == names - {"notes.txt", "ab.json"}
    if "plots_skipped" not in first:
        assert sorted(n for n in names if n.startswith("language_divergence_L")) == [
            "language_divergence_L1.png"]
        assert set(second["plots"]) <= names
    # a report from before summary.json listed its files: the report files there are its own
    summary = json.loads((tmp_path / "summary.json").read_text())
    del summary["files"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "plan.json").write_text("{}")
    write_report(tmp_path, stats, "eng", middle_layers=[1], heatmap_layers=[1])
    assert not (tmp_path / "plan.json").exists() and not (tmp_path / "ab.json").exists()


def test_write_report_refuses_bad_arguments_before_writing_anything(tmp_path):
    """A reference absent from the data, no middle layer, or accuracies that cannot be
    correlated are refused before the directory is made. The reference and the correlation
    were checked only after the directory (and, for the correlation, divergence.json, the plots
    and experts.json: a report mixing new files with an older summary) had been written; an
    empty middle_layers crashed in the divergence plot with IndexError."""
    from moe_route.analysis import write_report
    from test_analysis_metrics import random_stats

    stats = random_stats(L=3, langs=("en", "de", "sw", "fr"))
    with pytest.raises(ValueError, match=r"language 'xx' is not among the languages"):
        write_report(tmp_path / "r1", stats, "xx")
    with pytest.raises(ValueError, match=r"middle_layers must name at least one layer"):
        write_report(tmp_path / "r2", stats, "en", middle_layers=[])
    with pytest.raises(ValueError, match="needs at least 3 languages"):
        write_report(tmp_path / "r3", stats, "en", accuracy={"de": 0.5, "sw": 0.4})
    assert not any((tmp_path / name).exists() for name in ("r1", "r2", "r3"))
    summary = write_report(tmp_path / "ok", stats, "en", middle_layers=[1],
                           accuracy={"de": 0.5, "sw": 0.4, "fr": 0.9, "xx": 0.1})
    assert summary["middle_layers"] == [1] and "correlation" in summary


@pytest.mark.parametrize("command, extra, message", [
    ("analyze", ["--reference", "xxx"],
     "--reference 'xxx' is not among the languages ['eng', 'deu']"),
    ("analyze", ["--limit", "0"], "limit=0 must be None (all) or an int >= 1"),
    ("analyze", ["--middle", "5-2"], "--middle '5-2' must be A-B or A with 0 <= A <= B"),
    ("analyze", ["--middle", "x"], "--middle 'x' must be A-B"),
    ("analyze", ["--accuracy", "MISSING"], "No such file or directory"),
    ("analyze", ["--accuracy", "LIST"], "must hold a JSON object {language: accuracy}, got list"),
    ("analyze", ["--accuracy", "DEEP"],
     "is not valid JSON (arrays or objects nest deeper than Python's recursion limit)"),
    ("analyze", ["--accuracy", "NO_LANGUAGES"], "'languages' must be an object"),
    ("analyze", ["--batch-size", "0"], "--batch-size: batch_size=0 must be an int >= 1"),
    ("analyze", ["--out", "FILE"], "exists and is not a directory"),
    ("analyze", ["--max-length", "0"], "--max-length 0 must be an int >= 1 (tokens per text)"),
    ("analyze", ["--accuracy", "TEXT_ACCURACY"],
     "accuracies must be finite numbers, got {'fra': '0.7', 'ita': None}"),
    ("analyze", ["--accuracy", "ONE_LANGUAGE"],
     "the correlation needs at least 3 languages of the data besides the reference 'eng' with an "
     "accuracy, got ['deu']; the data has ['eng', 'deu'], the accuracy file ['deu']"),
    ("experts", ["--task", "EMPTY"], "holds no texts"),
    ("experts", ["--layers", "1-0"], "--layers '1-0' must be A-B or A with 0 <= A <= B"),
    ("experts", ["--tau", "nan"], "tau=nan must be a finite number"),
    ("experts", ["--max-per-layer", "0"],
     "max_per_layer=0 must be None (no limit) or an int >= 1"),
    ("experts", ["--mode", "hard", "--std-unbiased"], "std_unbiased=True applies to mode='soft'"),
    ("experts", ["--out", "DIR"], "is a directory, expected a file name"),
    ("experts", ["--max-length", "-3"], "--max-length -3 must be an int >= 1"),
    ("evaluate", ["--out", "FILE"], "exists and is not a directory"),
    ("evaluate", ["--plan", "FLOAT_FORCE"], "force=1.0 must be an int in {-1, 0, 1}"),
    ("evaluate", ["--task", "NUMBER"],
     "the first line must be a JSON object (a question), got int"),
    ("demo", ["--out", "FILE"], "exists and is not a directory"),
])
def test_cli_refuses_bad_arguments_before_loading_the_model(tmp_path, capsys, command, extra,
                                                            message):
    """Bad data, options or output paths end in one line on stderr and exit status 2 before the
    model is loaded (here MODEL does not exist: reaching the loader fails differently). They
    were tracebacks, most after the model had been loaded and the whole corpus recorded
    (reference, --middle, --accuracy, the output directory), and ``--layers 1-0`` wrote an
    empty plan with status 0. A deeply nested JSON file, a result file without its languages,
    a plan entry of the wrong type and a task line that is not an object were tracebacks
    (RecursionError, KeyError, TypeError) until the JSON readers were shared."""
    from moe_route import cli

    data = tmp_path / "parallel.tsv"
    data.write_text("eng\tdeu\nhello world\tworld hello\n", encoding="utf-8")
    texts = tmp_path / "texts.txt"
    texts.write_text("hello world\n", encoding="utf-8")
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"language": "eng", "prompt": "hello", "answer": 1}) + "\n")
    paths = {name: tmp_path / f"{name.lower()}.json" for name in
             ("MISSING", "LIST", "DEEP", "NO_LANGUAGES", "FLOAT_FORCE", "NUMBER",
              "ONE_LANGUAGE", "TEXT_ACCURACY")}
    paths.update(EMPTY=tmp_path / "empty.txt", FILE=tmp_path / "a_file", DIR=tmp_path)
    paths["NUMBER"] = tmp_path / "number.jsonl"
    paths["LIST"].write_text("[0.5, 0.6]")
    paths["DEEP"].write_text("[" * 100_000)
    paths["NO_LANGUAGES"].write_text('{"format": "moe_route.eval", "version": 1}')
    paths["FLOAT_FORCE"].write_text('{"format": "moe_route.SteeringPlan", "version": 1, '
                                    '"layers": {"0": {"1": {"force": 1.0}}}}')
    paths["NUMBER"].write_text("5\n")
    paths["ONE_LANGUAGE"].write_text('{"deu": 0.5}')
    paths["TEXT_ACCURACY"].write_text('{"deu": 0.5, "fra": "0.7", "ita": null}')
    paths["EMPTY"].write_text("\n")
    paths["FILE"].write_text("")
    extra = [str(paths.get(x, x)) for x in extra]
    model = str(tmp_path / "no_model_here")
    base = {"analyze": [model, "--data", str(data), "--reference", "eng",
                        "--out", str(tmp_path / "report")],
            "experts": [model, "--task", str(texts), "--baseline", str(texts),
                        "--out", str(tmp_path / "plan.json")],
            "evaluate": [model, "--task", str(questions), "--out", str(tmp_path / "eval")],
            "demo": []}[command]
    assert cli.main([command, *base, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moe-route {command}: ") and message in err, err
    assert not (tmp_path / "report").exists() and not (tmp_path / "plan.json").exists()


def _four_languages(tmp_path, extra=()):
    """A parallel file of eng, deu, fra, ita (and ``extra``), three rows."""
    data = tmp_path / "parallel.tsv"
    langs = ["eng", "deu", "fra", "ita", *extra]
    words = ["hello world", "cat sat", "sat cat hello"]
    data.write_text("\t".join(langs) + "\n" + "".join(
        "\t".join([w] * len(langs)) + "\n" for w in words), encoding="utf-8")
    return data


def test_cli_analyze_checks_the_accuracy_languages_before_loading(tmp_path, capsys):
    """Accuracy keyed de/fr/it (as evaluate writes Global-MMLU/MGSM) for data in deu/fra/ita
    ran the whole corpus, then ended in divergence_accuracy_correlation's traceback ("needs at
    least 3 languages"). It ends in one line that lists both sets of languages, before the
    model is loaded (MODEL does not exist here)."""
    from moe_route import cli

    accuracy = EvalResult({lang: torch.tensor([True, False]) for lang in ("de", "fr", "it")},
                          {lang: [0, 1] for lang in ("de", "fr", "it")})
    accuracy.save(tmp_path / "baseline.json")
    assert cli.main(["analyze", str(tmp_path / "no_model_here"), "--data",
                     str(_four_languages(tmp_path)), "--reference", "eng", "--accuracy",
                     str(tmp_path / "baseline.json"), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err == (f"moe-route analyze: --accuracy {tmp_path / 'baseline.json'}: the correlation "
                   f"needs at least 3 languages of the data besides the reference 'eng' with an "
                   f"accuracy, got []; the data has ['eng', 'deu', 'fra', 'ita'], the accuracy "
                   f"file ['de', 'fr', 'it']\n")
    assert not (tmp_path / "report").exists()


def test_cli_analyze_notes_the_languages_left_out_of_the_correlation(tmp_path, capsys,
                                                                     monkeypatch):
    """Languages of the data without an accuracy, and accuracies of languages not in the data,
    were dropped silently: one line on stderr names them, and the report is written."""
    from moe_route import cli

    monkeypatch.setattr(cli, "_load_model", lambda args: (build("olmoe"), word_tokenizer()))
    (tmp_path / "accuracy.json").write_text(json.dumps(
        {"eng": 0.9, "deu": 0.5, "fra": 0.7, "ita": 0.2, "xxx": 0.4}))
    assert cli.main(["analyze", "tiny", "--data", str(_four_languages(tmp_path, ["spa"])),
                     "--reference", "eng", "--accuracy", str(tmp_path / "accuracy.json"),
                     "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert ("moe-route analyze: note: the accuracy correlation leaves out ['spa'] (no accuracy) "
            "and ['xxx'] (not in the data); it uses ['deu', 'fra', 'ita']\n") in err
    assert (tmp_path / "report" / "correlation.json").exists()


def test_cli_max_length_reaches_the_recording(tmp_path, monkeypatch):
    """``--max-length N`` is record_sequences' max_length in analyze and experts (the texts
    were always cut at 512 tokens, which the CLI could not change)."""
    from moe_route import cli

    monkeypatch.setattr(cli, "_load_model", lambda args: (build("olmoe"), word_tokenizer()))
    with pytest.warns(UserWarning, match=r"max_length=2 cut 4 of 12 texts \(eng: 1 of 3, "):
        assert cli.main(["analyze", "tiny", "--data", str(_four_languages(tmp_path)),
                         "--reference", "eng", "--max-length", "2", "--dtype", "fp32",
                         "--out", str(tmp_path / "report")]) == 0
    stats = moe_route.RoutingStats.load(tmp_path / "report" / "stats")
    assert stats[0].tokens.tolist() == [2, 2, 2] * 4
    task, base = tmp_path / "task.txt", tmp_path / "base.txt"
    task.write_text("cat cat cat\ncat\n", encoding="utf-8")
    base.write_text("hello world\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"max_length=1 cut") as caught:
        assert cli.main(["experts", "tiny", "--task", str(task), "--baseline", str(base),
                         "--max-length", "1", "--out", str(tmp_path / "plan.json")]) == 0
    assert ["(task: 1 of 2)" in str(w.message) for w in caught] == [True, False]
    assert ["(baseline: 1 of 1)" in str(w.message) for w in caught] == [False, True]


def test_cli_a_model_that_cannot_be_loaded_ends_in_one_line(tmp_path, capsys):
    """It was transformers' traceback (OSError), status 1."""
    from moe_route import cli

    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"language": "eng", "prompt": "hello", "answer": 1}) + "\n")
    model = tmp_path / "no_model_here"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["evaluate", str(model), "--task", str(questions), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moe-route evaluate: cannot load {str(model)!r} on cpu: "), err
    assert len(err.splitlines()) == 1


def _load(cli, model_dir, device):
    import argparse

    args = argparse.Namespace(model=str(model_dir), dtype="fp32", device=device, command="analyze")
    return args, cli._load_model(args)


@pytest.fixture
def saved_olmoe(tmp_path):
    model_dir = tmp_path / "model"
    build("olmoe").save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    return model_dir


def _routing(model, ids):
    with moe_route.record(model, trace=True) as rec, torch.no_grad():
        model(ids.to(next(model.parameters()).device))
    return [layer["ids"].cpu() for layer in rec.trace.values()]


@pytest.mark.parametrize("accelerate", ["installed", "absent"])
def test_cli_loads_the_model_where_device_says(saved_olmoe, capsys, monkeypatch, accelerate):
    """--device cpu loads without accelerate; ``auto`` (accelerate's device map) places the model
    over the devices there are (here, the CPU) with the same routing, and without accelerate
    ends in one line saying what to do; a device that is not there ends in one line."""
    from moe_route import cli

    if accelerate == "installed":
        pytest.importorskip("accelerate")
    else:
        monkeypatch.setitem(sys.modules, "accelerate", None)  # find_spec: None, import fails
    ids = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(0))
    args, (model, tok) = _load(cli, saved_olmoe, "cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"} and not model.training
    assert tok.pad_token == "<pad>"
    routing = _routing(model, ids)
    if accelerate == "installed":
        args, (model, _) = _load(cli, saved_olmoe, "auto")
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        assert all(torch.equal(a, b) for a, b in zip(routing, _routing(model, ids)))
        capsys.readouterr()     # the loads' progress bars
    else:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            _load(cli, saved_olmoe, "auto")
        assert exit_.value.code == 2
        assert capsys.readouterr().err == (
            f"moe-route analyze: cannot load {str(saved_olmoe)!r} on auto: --device auto places "
            "the model with accelerate's device map: pip install accelerate, or name a device "
            "(cpu, cuda, cuda:N)\n")
    args.device = "cuda:7" if not torch.cuda.is_available() else "cuda:999"
    with pytest.raises(SystemExit) as exit_:
        cli._load_model(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"moe-route analyze: cannot load {str(saved_olmoe)!r} on {args.device}: this "
                   f"machine has {torch.cuda.device_count()} CUDA device"
                   f"{'s' * (torch.cuda.device_count() != 1)}\n")


def test_cli_chat_template_needs_a_tokenizer_that_has_one(saved_olmoe, capsys):
    """--chat-template with a tokenizer without a template was transformers' traceback (exit 1)
    after the model had loaded: one line and exit 2."""
    import argparse
    from moe_route import cli

    for path in saved_olmoe.glob("*chat_template*"):  # the saved tokenizer's template
        path.unlink()
    args = argparse.Namespace(model=str(saved_olmoe), dtype="fp32", device="cpu",
                              command="analyze", chat_template=True)
    with pytest.raises(SystemExit) as exit_:
        cli._load_model(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"moe-route analyze: --chat-template: the tokenizer of {str(saved_olmoe)!r} has no chat "
        f"template\n")


@pytest.mark.cuda
@pytest.mark.parametrize("accelerate", ["installed", "absent"])
def test_cli_loads_the_model_onto_a_gpu(saved_olmoe, monkeypatch, accelerate):
    """--device cuda: with accelerate the weights go there as they are read, without it they are
    read into host memory and moved; either way the routing is the CPU model's."""
    from moe_route import cli

    if accelerate == "installed":
        pytest.importorskip("accelerate")
    else:
        monkeypatch.setitem(sys.modules, "accelerate", None)
    ids = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(0))
    _, (model, _) = _load(cli, saved_olmoe, "cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"} and not model.training
    _, (on_cpu, _) = _load(cli, saved_olmoe, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(_routing(on_cpu, ids), _routing(model, ids)))


@pytest.mark.parametrize("argv, message", [
    (["bench", "--threads", "-1"], "argument --threads: expected an integer > 0, got '-1'"),
    (["bench", "--threads", "0"], "argument --threads: expected an integer > 0, got '0'"),
    (["bench", "--min-time", "-1"], "argument --min-time: expected a number > 0, got '-1'"),
    (["bench", "--budget", "nan"], "argument --budget: expected a number > 0, got 'nan'"),
    (["evaluate", "m", "--task", "t.jsonl", "--out", "o", "--max-new-tokens", "0"],
     "argument --max-new-tokens: expected an integer > 0, got '0'"),
])
def test_cli_numeric_options_must_be_positive(capsys, argv, message):
    """``--threads -1`` was torch's RuntimeError traceback; a negative or NaN ``--min-time`` or
    ``--budget`` ran the whole benchmark; ``--max-new-tokens 0`` failed after loading the model."""
    from moe_route import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cli_analyze_checks_middle_against_the_models_layers_before_recording(tmp_path, capsys,
                                                                             monkeypatch):
    """A --middle range past the model's MoE layers ended the run only after the whole corpus
    was recorded; it ends once the model is loaded, naming the layers, and nothing is recorded."""
    from moe_route import cli

    model = build("olmoe")
    monkeypatch.setattr(cli, "_load_model", lambda args: (model, word_tokenizer()))
    monkeypatch.setattr(pipeline, "record_parallel", lambda *a, **k: pytest.fail("recorded"))
    layers = list(range(model.config.num_hidden_layers))
    assert cli.main(["analyze", "tiny", "--data", str(_four_languages(tmp_path)), "--reference",
                     "eng", "--middle", "50-60", "--out", str(tmp_path / "report")]) == 2
    assert capsys.readouterr().err == (f"moe-route analyze: --middle 50-60 holds none of the MoE "
                                       f"layers {layers}\n")
