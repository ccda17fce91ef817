"""`ftune export --format gguf` of SentencePiece-style tokenizers (Llama 2, Mistral 7B, TinyLlama): a tiny one built
here the way transformers converts a tokenizer.model (BPE with byte fallback, `▁` for a space, merges sorted by the
merged piece's score), tiny Llama and Mistral models with it, exported, read back with gguf's reader and loaded by
transformers' GGUF loader, whose token ids and logits must match the source's."""

from __future__ import annotations

import json
import shutil
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from conftest import CHAT_TEMPLATE, WORDS, invoke
from test_gguf import TOLERANCE, build_model, gguf_ids, modern_gguf_loader, read_back

from ftune.export.gguf_vocab import read_vocab
from ftune.export.to_gguf import export_gguf

TEXT = "say hello to bob, the movie was great! 123 four five"
# Spaces (runs of them, a trailing one), a tab and a newline (byte tokens), digits, accents and CJK that the
# vocabulary lacks (byte fallback), words run together that a wrong score order cuts differently (found by
# tokenizing with equal and with reversed scores), the chat markers (whole tokens).
STRINGS = [TEXT, "two  spaces\tand\nnewline ", "café naïve 日本 4096", "Instructionsay ###### about negative moviegreat",
           "<|user|> hello<|assistant|> bob</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
SPECIALS = ["<unk>", "<s>", "</s>"]
ADDED = ["<|user|>", "<|assistant|>", "<|system|>"]


def build_sentencepiece_tokenizer():
    """A LlamaTokenizerFast as transformers makes one from a tokenizer.model: <unk> <s> </s>, the 256 byte pieces,
    then BPE pieces by score (here: learned by the tokenizers trainer on the test words, in merge order), then
    single characters; merges are every split of a piece into two pieces, sorted by the piece's score."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    corpus = [" ".join(WORDS[i:i + 6]) for i in range(len(WORDS))] + [TEXT] * 3
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    pieces = list(dict.fromkeys("".join(m) for m in learned["merges"]))
    normal = pieces + sorted(t for t in learned["vocab"] if len(t) == 1)
    vocab = {t: i for i, t in enumerate(SPECIALS + BYTES + normal)}
    merges = generate_merges(vocab, {t: -float(i) for i, t in enumerate(normal)}, skip_tokens=SPECIALS)
    return LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_prefix_space=True, add_bos_token=True,
                          additional_special_tokens=ADDED, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-spm")
    tok = build_sentencepiece_tokenizer()
    return {"llama": build_model(root / "tiny-llama2", "llama", tokenizer=tok),
            "mistral": build_model(root / "tiny-mistral", "mistral", tokenizer=tok)}


def spm_tokenize(text: str, tokens: list[str], scores: list[float], types: list[int]) -> list[int]:
    """llama.cpp's tokenizer for vocabulary `llama`, written out for this test: ▁ before the text and for every
    space, then, from single characters, repeatedly join the neighbouring pair whose joined text is a token with
    the highest score (the leftmost on a tie); a piece left that is no token becomes its UTF-8 byte tokens."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (1, 6)}
    pieces = list("▁" + text.replace(" ", "▁"))
    while True:
        best = max(((scores[ids[a + b]], -i) for i, (a, b) in enumerate(pairwise(pieces)) if a + b in ids),
                   default=None)
        if best is None:
            break
        i = -best[1]
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return [ids[p] if p in ids else ids[f"<0x{b:02X}>"] for p in pieces for b in ([0] if p in ids else p.encode())]


def test_sentencepiece_vocab_metadata(models, tmp_path):
    from transformers import AutoTokenizer

    fields, _ = read_back(export_gguf(models["llama"], tmp_path / "m.gguf", "f16"))
    tok = AutoTokenizer.from_pretrained(str(models["llama"]))
    vocab = tok.get_vocab()
    tokens, types, scores = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in fields  # llama.cpp joins pieces by score, not by a merge list
    assert len(tokens) == len(types) == len(scores) == len(vocab) + 8
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[3:259] == BYTES and types[3:259] == [6] * 256 and scores[3:259] == [0.0] * 256
    assert [types[vocab[t]] for t in SPECIALS + ADDED] == [2, 3, 3, 3, 3, 3]  # unknown, then control
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-8:] == [5] * 8 and scores[-8:] == [-1000.0] * 8
    normal = [i for i, k in enumerate(types) if k == 1]
    assert normal == list(range(259, len(vocab) - len(ADDED)))
    # Pieces score by merge order (the ids are in that order here), and every single character below them all.
    assert all(scores[a] > scores[b] for a, b in pairwise(normal))
    assert max(scores[i] for i in normal if len(tokens[i]) == 1) < min(scores[i] for i in normal if len(tokens[i]) > 1)
    first_merge = {}
    for rank, merge in enumerate(json.loads((models["llama"] / "tokenizer.json").read_text())["model"]["merges"]):
        first_merge.setdefault("".join(merge.split(" ") if isinstance(merge, str) else merge), rank)
    assert all(scores[vocab[t]] == -rank for t, rank in first_merge.items()) and len(first_merge) > 150
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_the_scores_make_llama_cpps_tokenizer_cut_text_as_the_source_does(models, tmp_path):
    """What llama.cpp does with the file's tokens, scores and types gives the ids transformers gives the source
    (without BOS, and on text without the added tokens, which llama.cpp matches whole before this step). Text that
    starts with a space is left out: there llama.cpp, like the sentencepiece library, still puts a ▁ before it,
    and transformers' Metaspace does not (a difference of the two tokenizers, not of the file)."""
    from transformers import AutoTokenizer

    fields, _ = read_back(export_gguf(models["llama"], tmp_path / "m.gguf", "f16"))
    tok = AutoTokenizer.from_pretrained(str(models["llama"]))
    for text in STRINGS[:4] + ["hello", "123 4096 9", "über", "great!!  ..."]:
        want = tok(text, add_special_tokens=False)["input_ids"]
        got = spm_tokenize(text, *(fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type")))
        assert got == want, (text, tok.convert_ids_to_tokens(got), tok.convert_ids_to_tokens(want))
    assert tok.convert_ids_to_tokens(tok("é", add_special_tokens=False)["input_ids"]) == ["▁", "<0xC3>", "<0xA9>"]


@pytest.mark.parametrize("arch,qtype", [("llama", "f32"), ("llama", "q8_0"), ("mistral", "f16")])
def test_transformers_loads_the_file_with_the_same_tokens_and_logits(models, tmp_path, arch, qtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_gguf(models[arch], tmp_path / "m.gguf", qtype)
    tok, gguf_tok = AutoTokenizer.from_pretrained(str(models[arch])), AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in STRINGS:
        if "<|" in text and not modern_gguf_loader():  # that loader's own split (modern_gguf_loader's docstring)
            continue
        ids = tok(text)["input_ids"]
        assert gguf_ids(gguf_tok, text, out) == ids, (text, tok.convert_ids_to_tokens(ids))
        assert gguf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert gguf_tok.decode(tok(STRINGS[2])["input_ids"], skip_special_tokens=True) == STRINGS[2]
    source = AutoModelForCausalLM.from_pretrained(str(models[arch]), dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    ids = tok(STRINGS[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got = source(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert want.abs().max() > 0.05
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE[qtype])


def _edited(models, tmp_path, edit) -> Path:
    """A copy of the tiny Llama whose tokenizer.json `edit` changed."""
    copy = shutil.copytree(models["llama"], tmp_path / "edited")
    tj = json.loads((copy / "tokenizer.json").read_text())
    edit(tj)
    (copy / "tokenizer.json").write_text(json.dumps(tj))
    return copy


@pytest.mark.parametrize("normalizer, pre, prefix", [
    # transformers' older conversion: the normalizer writes the ▁s, no pre-tokenizer
    ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                          {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}, None, True),
    ({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}, None, False),
    (None, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": False}, False),
    (None, {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}, True),
])
def test_both_spellings_of_the_space_convention_and_the_prefix_flag(models, tmp_path, normalizer, pre, prefix):
    copy = _edited(models, tmp_path, lambda tj: tj.update(normalizer=normalizer, pre_tokenizer=pre))
    vocab = read_vocab(copy, 600)
    assert vocab["model"] == "llama" and vocab["add_space_prefix"] is prefix and vocab["types"][0] == 2


def _drop_byte(tj):
    del tj["model"]["vocab"]["<0x41>"]


@pytest.mark.parametrize("edit, message", [
    (lambda tj: tj.update(pre_tokenizer={"type": "ByteLevel"}, decoder={"type": "ByteLevel"}),
     "a byte-fallback BPE without SentencePiece's ▁ spaces tokenizer"),
    (lambda tj: tj.update(model={"type": "Unigram", "vocab": [["<unk>", 0.0]], "unk_id": 0}), "a Unigram tokenizer"),
    (_drop_byte, "a byte-fallback tokenizer without the byte tokens <0x41>; llama.cpp needs all 256"),
])
def test_what_gguf_export_cannot_write_is_refused_by_name(models, tmp_path, edit, message):
    copy = _edited(models, tmp_path, edit)
    result = invoke("export", copy, "--out", tmp_path / "m.gguf")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "m.gguf").exists()
