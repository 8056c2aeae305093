"""The analysis layer with tokenizers built like the real ones of the studied models.

``tiny_models.word_tokenizer`` splits on whitespace, so it cannot show what real tokenizers do
around the user's text. The tokenizers here are small BPE models trained in memory with the
pipelines of the real families (no download):

* SentencePiece style (Llama 2, Mistral/Mixtral, Phi-3.5): byte fallback, BOS added by a
  template post-processor; either the legacy normalizer (``Prepend("▁")`` + ``Replace(" ",
  "▁")``, Mixtral's tokenizer.json) or the ``Metaspace(prepend_scheme="first", split=False)``
  pre-tokenizer (transformers 5's LlamaTokenizer, with its ``padding_side="left"``); Phi-3's
  template tokens ``<|user|>`` etc. strip the whitespace after them (``rstrip``);
* byte-level BPE (Llama 3, Qwen2/3, OLMoE, GPT-OSS, DeepSeek-V3, Granite): the GPT-4-style split
  regex then ``ByteLevel``; offsets untrimmed (Llama 3, Qwen) or trimmed (``ByteLevel``
  post-processor with ``trim_offsets``, its default in ``tokenizers``, as GPT-2/GPT-NeoX
  tokenizer.json files have it); BOS added (Llama 3, DeepSeek) or not, EOS appended or not.

Each goes with a minimal chat template of its family, written here: the space or newline
before the content, system prompts holding ordinary words and a date line, ``| trim``, BOS
written by the template, the generation prompt, Qwen3's ``enable_thinking``.
"""
import functools
import json
import re

import pytest
import torch

from moe_route.analysis import evaluation as ev
from moe_route.analysis import pipeline

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tiny_models import build, word_tokenizer  # noqa: E402

from tokenizers import (AddedToken, Regex, decoders, models, normalizers,  # noqa: E402
                        pre_tokenizers, processors, trainers)

# -- tokenizers --------------------------------------------------------------------------------

CORPUS = ["Hello world, the cat sat on the mat.", "hello  world   again", "Answer: A B C D",
          "A: one\nB: two\nC: three\nD: four\nAnswer: B", "Question: how many apples?\nAnswer:",
          "The answer is 42.", "1,234.50 and 12 apples", "user assistant system",
          "你好世界，中文。答案：", "مرحبا بالعالم", "emoji 😀 👍", "new\n\nline\n",
          "[INST] hello [/INST]"] * 4
# Qwen2's split regex (Llama 3's differs only in \p{N}{1,3})
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@functools.lru_cache(maxsize=None)
def _trained(kind: str):
    """Vocabulary and merges of a small BPE trained on CORPUS: SentencePiece pieces ("▁hello")
    or byte-level ones ("Ġhello"). Thai is left out, so SentencePiece falls back to bytes."""
    core = tokenizers.Tokenizer(models.BPE())
    if kind == "sentencepiece":
        core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
        alphabet = []
    else:
        core.pre_tokenizer = _byte_level_split()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                                         initial_alphabet=alphabet))
    model = json.loads(core.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = dict(model["vocab"])
    if kind == "sentencepiece":     # Llama's vocabulary merges runs of spaces first
        vocab["▁▁"] = len(vocab)
        merges.insert(0, ("▁", "▁"))
    return vocab, merges


def _byte_level_split():
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=False)])


def _template_processing(bos, eos, vocab):
    single = " ".join(([bos] if bos else []) + ["$A"] + ([eos] if eos else []))
    return processors.TemplateProcessing(single=single, special_tokens=[
        (t, vocab[t]) for t in dict.fromkeys(x for x in (bos, eos) if x)])


def _fast(core, vocab, specials, rstrip, template, **named):
    for token in specials:
        vocab.setdefault(token, len(vocab))
    core.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t in rstrip)
                             for t in specials])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, **named)
    tok.chat_template = template
    return tok


def sentencepiece(template=None, *, legacy=True, bos="<s>", eos=None, specials=(), rstrip=(),
                  pad=None, padding_side="right"):
    """A Llama-2/Mistral-style tokenizer: byte fallback, ``<s>`` added before the text (and
    ``eos`` after it, if given), the legacy normalizer or the Metaspace pre-tokenizer."""
    vocab, merges = _trained("sentencepiece")
    vocab = dict(vocab)
    for token in ["<unk>", "<s>", "</s>"] + list(specials) + [f"<0x{i:02X}>" for i in range(256)]:
        vocab.setdefault(token, len(vocab))
    core = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True,
                                           fuse_unk=True))
    if legacy:
        core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                normalizers.Replace(" ", "▁")])
    else:
        core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                      decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    core.post_processor = _template_processing(bos, eos, vocab)
    return _fast(core, vocab, ["<unk>", "<s>", "</s>"] + list(specials), rstrip, template,
                 unk_token="<unk>", bos_token="<s>", eos_token=eos or "</s>", pad_token=pad,
                 padding_side=padding_side)


def byte_level(template=None, *, trim_offsets=False, bos=None, eos=None, specials=(), pad=None,
               bos_token=None, eos_token=None):
    """A Llama-3/Qwen-style byte-level BPE tokenizer; ``bos``/``eos`` added around the text
    when given (both must be among ``specials``); ``bos_token``/``eos_token`` name tokens that
    are not added (a template writes them)."""
    vocab, merges = _trained("byte_level")
    vocab = dict(vocab)
    for token in specials:
        vocab.setdefault(token, len(vocab))
    core = tokenizers.Tokenizer(models.BPE(vocab, merges))
    core.pre_tokenizer = _byte_level_split()
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=trim_offsets),
                                               _template_processing(bos, eos, vocab)])
    return _fast(core, vocab, list(specials), (), template, bos_token=bos or bos_token,
                 eos_token=eos or eos_token, pad_token=pad)


MIXTRAL = ("{{ bos_token }}{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% endfor %}")
PHI35 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
          "December 2023\nToday Date: {{ strftime_now('%d %b %Y') }}\n\n<|eot_id|>"
          "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN3 = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
         "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n'"
         " }}{% if enable_thinking is defined and enable_thinking is false %}"
         "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}")
OLMOE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + "
         "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
GPT_OSS = ("<|start|>system<|message|>You are a large language model, user.\nKnowledge cutoff: "
           "2024-06\nCurrent date: {{ strftime_now('%Y-%m-%d') }}\n\nReasoning: low<|end|>"
           "{% for m in messages %}{{ '<|start|>' + m['role'] + '<|message|>' + m['content'] + "
           "'<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant' }}"
           "{% endif %}")
DEEPSEEK_V3 = ("{{ bos_token }}{% for m in messages %}{{ '<｜User｜>' + m['content'] }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")
GRANITE = ("<|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024.\nToday's "
           "Date: {{ strftime_now('%B %d, %Y') }}.\nYou are a helpful assistant, hello world."
           "<|end_of_text|>\n{% for m in messages %}{{ '<|start_of_role|>' + m['role'] + "
           "'<|end_of_role|>' + m['content'] + '<|end_of_text|>\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|start_of_role|>assistant<|end_of_role|>' }}"
           "{% endif %}")

PHI_TOKENS = ("<|user|>", "<|end|>", "<|assistant|>", "<|endoftext|>")
FAMILIES = {
    # Mixtral-8x7B-Instruct: legacy normalizer, no pad token, the template writes <s>
    "mixtral": lambda: sentencepiece(MIXTRAL),
    # Phi-3.5-MoE: Metaspace, left padding, role tokens that strip the whitespace after them
    "phi35": lambda: sentencepiece(PHI35, legacy=False, bos=None, specials=PHI_TOKENS,
                                   rstrip=PHI_TOKENS[:3], pad="<|endoftext|>",
                                   padding_side="left"),
    # Llama 3: BOS added, no pad token, the template trims the content
    "llama3": lambda: byte_level(LLAMA3, bos="<|begin_of_text|>", specials=(
        "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eot_id|>"), eos_token="<|eot_id|>"),
    "qwen3": lambda: byte_level(QWEN3, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                                pad="<|endoftext|>", eos_token="<|im_end|>"),
    # GPT-NeoX-style offsets (trimmed); nothing added, the template writes BOS (= EOS)
    "olmoe": lambda: byte_level(OLMOE, trim_offsets=True, specials=(
        "<|endoftext|>", "<|padding|>", "<|user|>", "<|assistant|>"), pad="<|padding|>",
        bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
    "gpt_oss": lambda: byte_level(GPT_OSS, specials=(
        "<|endoftext|>", "<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|channel|>"),
        pad="<|endoftext|>", eos_token="<|return|>"),
    "deepseek_v3": lambda: byte_level(DEEPSEEK_V3, bos="<｜begin▁of▁sentence｜>", specials=(
        "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"),
        eos_token="<｜end▁of▁sentence｜>"),
    "granite": lambda: byte_level(GRANITE, specials=(
        "<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"), pad="<|end_of_text|>",
        eos_token="<|end_of_text|>"),
}

TEXTS = ["Hello world, the cat sat on the mat.", " hello", "  hello", " 42", "hello ",
         "hello  world   again", "new\n\nline", "\nhello\n", "你好世界，中文。", "สวัสดีครับ",
         "مرحبا بالعالم", "emoji 😀 👍", "user", "assistant", "hello world", "", "  "]


def _byte_values():
    """GPT-2's map from the byte-level alphabet back to bytes."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    out, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            out[chr(256 + extra)] = b
            extra += 1
    return out


BYTE_VALUES = _byte_values()


def spelled(tok, ids) -> str:
    """The characters the tokens ``ids`` stand for, read from the pieces themselves (not from
    offsets): "▁" is a space, "<0xNN>" a byte, a byte-level piece its bytes."""
    out = bytearray()
    byte_level, added = "Ġ" in tok.get_vocab(), tok.get_added_vocab()
    for piece in tok.convert_ids_to_tokens(list(ids)):
        if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            out.append(int(piece[3:5], 16))
        elif byte_level and piece not in added:
            out.extend(BYTE_VALUES[c] for c in piece)
        else:
            out.extend(piece.replace("▁", " ").encode("utf-8"))
    return out.decode("utf-8")


def kept(tok, texts, chat_template, max_length=None):
    """``_encode``'s model inputs and, per text, the ids of the tokens it counts."""
    enc, keep = pipeline._encode(texts, tok, chat_template, max_length)
    return enc, [ids[k].tolist() for ids, k in zip(enc["input_ids"], keep)]


def spellings(full: str, start: int, end: int, swallowed: int, phantom: bool) -> set:
    """What the tokens of the text ``full[start:end]`` may spell: the text, grown by the
    template's whitespace on either side (a first token "▁Hello" that starts at the space of
    "[INST] "), less up to ``swallowed`` leading characters (taken by a template token that strips
    the whitespace after it), with a "▁" SentencePiece writes before a segment (``phantom``)."""
    if start == end:
        return {""}
    lo, hi = start, end
    while lo > 0 and full[lo - 1].isspace():
        lo -= 1
    while hi < len(full) and full[hi].isspace():
        hi += 1
    out = {full[a:z] for a in range(lo, start + swallowed + 1) for z in range(end, hi + 1)}
    return out | {" " + x for x in out} if phantom else out


# -- which tokens are the text's ---------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_counted_tokens_spell_the_text(family):
    """Over every family's tokenizer and template, with and without the template, the tokens
    counted for a text spell that text, read from the pieces: with its spaces, newlines,
    non-Latin scripts (byte fallback included) and emoji, nothing of the template's (a role word,
    a system prompt, a special token), nothing for an empty text (``spellings`` says what may
    surround it). The model reads the whole tokenisation, padded after it. Before, a tokenizer
    without a pad token (Mixtral, Llama 3) could not pad, a template token that strips the
    whitespace after it (Phi-3.5) was counted, trimmed offsets (OLMoE here) lost the text's
    spaces, and a text of spaces counted nothing."""
    tok = FAMILIES[family]()
    phantom = "Ġ" not in tok.get_vocab()
    for chat in (False, True):
        enc, got = kept(tok, TEXTS, chat)
        for b, (text, ids) in enumerate(zip(TEXTS, got)):
            full = ev.chat_wrap(tok, text, chat)
            written = text.strip() if family == "llama3" and chat else text     # | trim
            start = full.find(written, pipeline._text_offset(tok) if chat else 0)
            swallowed = len(written) - len(written.lstrip()) if family == "phi35" and chat else 0
            allowed = spellings(full, start, start + len(written), swallowed, phantom)
            where = f"{family}, chat_template={chat}, text {text!r}"
            assert spelled(tok, ids) in allowed, f"{where}: counted {spelled(tok, ids)!r}"
            whole = tok(full, add_special_tokens=not chat)["input_ids"]
            pad = enc["input_ids"].shape[1] - len(whole)
            assert enc["input_ids"][b, :len(whole)].tolist() == whole, where
            assert enc["attention_mask"][b].tolist() == [1] * len(whole) + [0] * pad, where


def test_an_unknown_word_and_a_word_made_pad_token_are_the_texts():
    """Special tokens never count, but the unknown token stands for the text's own word, and a
    vocabulary word made the pad token (``tok.pad_token = ...``) is still a word of the text."""
    tok = word_tokenizer()
    _, (got,) = kept(tok, ["hello zebra world"], True)
    assert tok.convert_ids_to_tokens(got) == ["hello", "<unk>", "world"]
    tok = FAMILIES["llama3"]()
    tok.pad_token = "hello"
    _, got = kept(tok, ["hello world", "hello cat sat on the mat"], False)
    assert [spelled(tok, ids) for ids in got] == ["hello world", "hello cat sat on the mat"]


def grown(model):
    """``model`` with a vocabulary of 1024, to hold every test tokenizer's ids; the new
    embeddings ~ N(0, 1) like the others (the default init's tiny values run into denormal
    floats, slow on CPU)."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(1024, mean_resizing=False)
    with torch.no_grad():
        new_rows = model.get_input_embeddings().weight[old:]
        new_rows.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    return model


@pytest.fixture(scope="module")
def olmoe():
    return grown(build("olmoe"))


@pytest.mark.parametrize("family", ["mixtral", "llama3"])
def test_a_tokenizer_without_a_pad_token_records(family, olmoe):
    """Mixtral's and Llama 3's tokenizers have no pad token: asking them to pad raised
    "Asking to pad but the tokenizer does not have a padding token" on every batch. The rows are
    padded by the pipeline (with EOS), and only the texts' tokens are counted."""
    tok = FAMILIES[family]()
    assert tok.pad_token is None
    texts = ["hello world", "the cat sat on the mat"]
    for chat in (False, True):
        enc, got = kept(tok, texts, chat)
        assert [spelled(tok, ids).strip() for ids in got] == texts
        assert enc["input_ids"][0, -1] == tok.eos_token_id
        stats = pipeline.record_parallel(olmoe, {"eng": texts}, tokenizer=tok, chat_template=chat)
        assert stats[0].tokens.tolist() == [len(ids) for ids in got]


def test_rows_are_padded_after_the_text_whatever_the_padding_side():
    """transformers 5's LlamaTokenizer pads on the left (Phi-3.5's tokenizer_config asks for it
    too), and record_sequences passes no position ids, so a short text's positions were shifted
    by the length of the longest text of its batch: with rotary embeddings that changes the
    rounding, and a text's routing changed with its batch (in bf16, its router probability
    sums moved by up to 5e-4 on the tiny OLMoE). Padded after the text, a causal model's text
    tokens never see the padding: the text sits at positions 0..n-1, as when it is alone."""
    tok = FAMILIES["phi35"]()
    assert tok.padding_side == "left"
    short, long = "hello world", "the cat sat on the mat, hello world again and again"
    for chat in (False, True):
        enc, _ = kept(tok, [short, long], chat)
        ids = tok(ev.chat_wrap(tok, short, chat), add_special_tokens=not chat)["input_ids"]
        pad = enc["input_ids"].shape[1] - len(ids)
        assert enc["input_ids"][0].tolist() == ids + [tok.pad_token_id] * pad
        assert enc["attention_mask"][0].tolist() == [1] * len(ids) + [0] * pad


def test_a_template_token_that_strips_the_whitespace_after_it_is_not_counted():
    """Phi-3's "<|user|>" is an added token with rstrip: it takes the template's newline and any
    whitespace that starts the text into its own span, so it overlapped the text and was counted
    as the text's first token (and as the only token of a text of spaces)."""
    tok = FAMILIES["phi35"]()
    user = tok.convert_tokens_to_ids("<|user|>")
    enc, got = kept(tok, [" hello", "\nhello world", "  ", "hello"], True)
    assert [user in ids for ids in got] == [False, False, False, False]
    assert [spelled(tok, ids) for ids in got] == ["hello", "hello world", "", "hello"]
    assert user in enc["input_ids"][0].tolist()


def test_trimmed_offsets_keep_the_texts_spaces():
    """A ByteLevel post-processor with trim_offsets (the default of `tokenizers`, and GPT-2's /
    GPT-NeoX's tokenizer.json) gives a token of spaces only an empty span; those tokens were
    dropped, so a text's leading, double and trailing spaces, or the space before an emoji that
    the split regex leaves alone, were never counted. Trimming changes the offsets, not the
    tokens: both tokenizers count the same ones."""
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    trimmed = byte_level(QWEN3, trim_offsets=True, specials=specials, pad="<|endoftext|>")
    untrimmed = byte_level(QWEN3, trim_offsets=False, specials=specials, pad="<|endoftext|>")
    texts = [" hello", "  hello", " 42", "hello ", "hello  world   again", "emoji 😀 👍", "  ",
             "a b"]
    for chat in (False, True):
        _, got = kept(trimmed, texts, chat)
        _, want = kept(untrimmed, texts, chat)
        assert got == want
        assert [spelled(trimmed, ids) for ids in got] == texts


def test_an_empty_text_counts_nothing_and_spaces_count_where_written():
    """Mixtral's "[INST] " + "" + " [/INST]" reads "▁▁" across the empty text: a token that
    spanned the (empty) place of the text was counted. A text of spaces was never counted,
    though it has tokens of its own without a template; a template that trims it away leaves
    none."""
    tok = FAMILIES["mixtral"]()
    tok.pad_token = tok.eos_token       # as users did to get past the missing pad token
    _, got = kept(tok, ["", "  ", "hello"], True)
    # "[INST]" + " " + "  " + " [/INST]" reads "▁▁", "▁▁": both hold spaces of the text
    assert [spelled(tok, ids) for ids in got] == ["", "    ", " hello"]
    _, got = kept(tok, ["", "  "], False)
    assert [spelled(tok, ids) for ids in got] == ["", "   "]              # with the "▁" prepended
    llama3 = FAMILIES["llama3"]()
    _, got = kept(llama3, ["  ", " hi "], True)
    assert [spelled(llama3, ids) for ids in got] == ["", "hi"]


def test_truncation_keeps_the_first_tokens_of_the_text():
    """With max_length the tokenizer cuts the rendered prompt on the right: the counted tokens
    are the first ones of the text (the template's prefix and BOS stay, its suffix goes)."""
    for family in ("phi35", "qwen3", "olmoe"):
        tok = FAMILIES[family]()
        text = "the cat sat on the mat, hello world again"
        for chat in (False, True):
            enc, (full,) = kept(tok, [text], chat)
            prefix = enc["input_ids"][0].tolist().index(full[0])     # the tokens before the text
            for limit in (prefix + 3, prefix + 5):
                enc, (cut,) = kept(tok, [text], chat, max_length=limit)
                assert enc["input_ids"].shape[1] == limit
                assert cut == full[:len(cut)] and 0 < len(cut) < len(full), (family, chat, limit)


# -- multiple choice ---------------------------------------------------------------------------

BELEBELE_LIKE = "P: the cat sat on the mat.\nQ: who sat?\nA: cat\nB: dog\nC: one\nD: two\nAnswer:"


@pytest.mark.parametrize("family", ["mixtral", "phi35", "llama3", "qwen3", "olmoe", "gpt_oss",
                                    "deepseek_v3", "granite"])
def test_choice_scores_the_option_tokens_of_prompt_plus_option(family):
    """" A".." D" after "Answer:": the prompt is the tokenisation of the (wrapped) prompt, with
    the BOS the tokenizer or the template writes and no EOS, each option one token that spells
    its letter, and prompt + option is exactly how the model reads prompt + option: the letter
    with its space after a plain prompt, without it after a chat template's assistant header."""
    tok = FAMILIES[family]()
    letters = [" A", " B", " C", " D"]
    for chat in (False, True):
        item = ev.ChoiceItem(BELEBELE_LIKE, letters, 1)
        prompt, options = ev._encode_choice(item, tok, chat, "q")
        text = ev.chat_wrap(tok, BELEBELE_LIKE, chat)
        for letter, option in zip(letters, options):
            whole = tok(text + (letter.lstrip() if chat else letter),
                        add_special_tokens=not chat)["input_ids"]
            assert prompt + option == whole, (family, chat, letter)
            assert len(option) == 1 and spelled(tok, option).strip() == letter.strip()
        bos = tok.bos_token_id
        adds_bos = tok("x")["input_ids"][0] == bos if bos is not None else False
        if adds_bos or (chat and "bos_token" in tok.chat_template):
            assert prompt[0] == bos and prompt.count(bos) == 1
        if chat and family == "qwen3":     # thinking off: the think block is closed
            assert spelled(tok, prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_choice_prompt_keeps_bos_and_drops_an_appended_eos():
    """Tokenizers that append EOS: the prompt keeps BOS and loses EOS, the options hold no EOS,
    also when BOS and EOS are the same token (GPT-NeoX's "<|endoftext|>")."""
    sp = sentencepiece(eos="</s>")
    same = byte_level(bos="<|endoftext|>", eos="<|endoftext|>", specials=("<|endoftext|>",))
    for tok in (sp, same):
        bos, eos = tok.bos_token_id, tok.eos_token_id
        assert tok("Answer:")["input_ids"][-1] == eos
        prompt, options = ev._encode_choice(ev.ChoiceItem("Answer:", [" A", " B"], 0), tok,
                                            False, "q")
        assert prompt[0] == bos and prompt[-1] != eos and prompt[1:] == tok(
            "Answer:", add_special_tokens=False)["input_ids"]
        assert [spelled(tok, o) for o in options] == [" A", " B"]


@pytest.mark.parametrize("family", ["mixtral", "phi35", "qwen3"])
def test_choice_after_a_prompt_ending_in_a_space(family):
    """"Answer: " + "A" reads "Answer", ":", " A": the prompt's last token (a space) merges with
    the option. The option used to be tokenised alone: SentencePiece made it "▁A", so the model
    read "Answer:  A" (two spaces); byte-level BPE made it "A" after a lone "Ġ", a split the
    model never sees. The options now start where prompt + option part from the prompt."""
    tok = FAMILIES[family]()
    prompt, options = ev._encode_choice(ev.ChoiceItem("Answer: ", ["A", "B"], 0), tok, False, "q")
    for letter, option in zip("AB", options):
        assert prompt + option == tok("Answer: " + letter)["input_ids"]
        assert spelled(tok, option) == " " + letter
    # few-shot prompts ending in a space, with a template around them, stay consistent too
    item = ev.ChoiceItem("Q: cat?\nAnswer: ", ["A", "B"], 0)
    prompt, options = ev._encode_choice(item, tok, True, "q")
    text = ev.chat_wrap(tok, item.prompt, True)
    for letter, option in zip("AB", options):
        assert prompt + option == tok(text + letter, add_special_tokens=False)["input_ids"]


def test_choice_accuracy_runs_on_real_tokenizers(olmoe):
    """End to end, one forward per question (one-token options), the pad id from EOS when the
    tokenizer has no pad token; the predictions equal the best option of a direct scoring."""
    for family in ("mixtral", "olmoe"):
        tok = FAMILIES[family]()
        items = {"eng": [ev.ChoiceItem(BELEBELE_LIKE, [" A", " B", " C", " D"], 1),
                         ev.ChoiceItem("Answer: ", ["A", "B"], 0)]}
        got = ev.choice_accuracy(olmoe, items, tokenizer=tok, batch_size=2)
        expected = []
        for item in items["eng"]:
            scores = []
            for option in item.options:
                ids = tok(item.prompt, add_special_tokens=True)["input_ids"]
                whole = tok(item.prompt + option)["input_ids"]
                if ids[-1] != whole[len(ids) - 1]:       # the merge: score from the shared part
                    ids = ids[:-1]
                with torch.no_grad():
                    lp = torch.log_softmax(olmoe(torch.tensor([whole])).logits[0].float(), -1)
                scores.append(sum(float(lp[p - 1, whole[p]]) for p in range(len(ids), len(whole))))
            expected.append(max(range(len(scores)), key=lambda j: (scores[j], -j)))
        assert got.predictions["eng"] == expected


# -- generation --------------------------------------------------------------------------------

class _Scripted(torch.nn.Module):
    """Stands in for a causal LM: ``generate`` appends given token ids to each row (by row) and
    keeps what it was called with."""

    def __init__(self, continuations):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations, self.calls = continuations, []

    def generate(self, input_ids, attention_mask, **options):
        self.calls.append((input_ids.clone(), attention_mask.clone(), options))
        width = max(len(c) for c in self.continuations)
        new = torch.full((len(input_ids), width), options["pad_token_id"])
        for b, c in enumerate(self.continuations[:len(input_ids)]):
            new[b, :len(c)] = torch.tensor(c)
        return torch.cat([input_ids, new], 1)


@pytest.mark.parametrize("family", ["mixtral", "phi35", "qwen3", "olmoe"])
def test_generation_reads_the_answer_from_real_decoding(family):
    """Prompts are left-padded (with EOS where there is no pad token), keep the BOS the tokenizer
    adds and end with the prompt's own last token; the continuation is decoded by the tokenizer
    (SentencePiece's leading "▁", byte fallback, byte-level pieces), cut at the stop strings and
    read for its last number, in any script."""
    tok = FAMILIES[family]()
    end = [tok.eos_token_id] if tok.eos_token_id is not None else []

    def said(text):
        return tok(text, add_special_tokens=False)["input_ids"] + end

    model = _Scripted([said(" The answer is 1,234.50\n\nQuestion: 7"),
                       said(" ๔๒ apples.\nQuestion: 9"),
                       said(" no idea")])
    items = {"eng": [ev.GenerationItem("Question: how many?\nAnswer:", "1234.5"),
                     ev.GenerationItem("Q: 2?\nA:", "42")],
             "zho": [ev.GenerationItem("你好？答案：", "3")]}
    for chat in (False, True):
        model.calls.clear()
        got = ev.generation_accuracy(model, items, tokenizer=tok, max_new_tokens=20,
                                     chat_template=chat)
        assert got.predictions == {"eng": ["1234.5", "42"], "zho": [None]}
        assert got.correct["eng"].tolist() == [True, True]
        ids, mask, options = model.calls[0]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        assert options["pad_token_id"] == pad
        rows = [tok(ev.chat_wrap(tok, i.prompt, chat), add_special_tokens=not chat)["input_ids"]
                for i in items["eng"] + items["zho"]]
        for b, row in enumerate(rows):
            n = len(row)
            assert mask[b].tolist() == [0] * (ids.shape[1] - n) + [1] * n      # left-padded
            assert ids[b, ids.shape[1] - n:].tolist() == row
            assert (ids[b, :ids.shape[1] - n] == pad).all()


@pytest.mark.parametrize("family", ["qwen3", "mixtral"])
def test_generation_reads_a_worked_answer_over_paragraphs(family):
    """A chat model's worked answer runs over paragraphs: the default stop ("Question:", the
    next few-shot question) keeps them all, so its last number is the result, not the first
    paragraph's."""
    tok = FAMILIES[family]()
    worked = "3 + 4 = 7 apples.\n\nThen 7 * 6 = 42.\n\nThe answer is 42.\n\nQuestion: and 9?"
    model = _Scripted([tok(worked, add_special_tokens=False)["input_ids"]])
    items = {"eng": [ev.GenerationItem("Question: apples?\nAnswer:", "42")]}
    got = ev.generation_accuracy(model, items, tokenizer=tok, max_new_tokens=64)
    assert got.predictions == {"eng": ["42"]} and got.correct["eng"].tolist() == [True]


def test_generation_reads_gpt_oss_final_channel():
    """GPT-OSS answers in the harmony format: an analysis channel (whose numbers and blank
    lines are its reasoning), then the final channel. Its answer is the final channel's text,
    and a generation cut off before that channel has none; a model without channels reads as
    before."""
    tok = FAMILIES["gpt_oss"]()

    def said(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    model = _Scripted([
        said("<|channel|>analysis<|message|>2 apples, then 6 more: 2 + 6 = 7?\n\nCheck: 9"
             "<|end|><|start|>assistant<|channel|>final<|message|>The answer is 8.<|return|>"),
        said("<|channel|>analysis<|message|>Let me count: 1, 2, 3"),       # out of tokens
        said(" 5"),
        said("<|channel|>final<|message|>It is 4<|end|> 7")])   # "<|end|>" ends the channel
    items = {"eng": [ev.GenerationItem("Q: apples?\nA:", "8"),
                     ev.GenerationItem("Q: count?\nA:", "3"),
                     ev.GenerationItem("Q: five?\nA:", "5"),
                     ev.GenerationItem("Q: four?\nA:", "4")]}
    got = ev.generation_accuracy(model, items, tokenizer=tok, max_new_tokens=64,
                                 chat_template=True)
    assert got.predictions == {"eng": ["8", None, "5", "4"]}
    assert got.correct["eng"].tolist() == [True, False, True, True]
