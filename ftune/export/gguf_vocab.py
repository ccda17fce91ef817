"""The tokenizer of a merged checkpoint as GGUF metadata (`tokenizer.ggml.*`), the way llama.cpp reads it.

Byte-level BPE (GPT-2 style: Llama 3, Qwen2, SmolLM, Mistral's Tekken) is stored as model `gpt2`: every id's
token string as tokenizer.json spells it, a type per token (normal, control for special added tokens,
user-defined for the other added ones, unused for the padding ids up to the model's vocab_size), the merges,
and the name of the pre-tokenizer (`tokenizer.ggml.pre`: how llama.cpp splits text before merging, picked
from the split pattern in tokenizer.json).

SentencePiece-style BPE (Llama 2, Mistral 7B v0.1-v0.3, TinyLlama: a tokenizer.json converted from a
tokenizer.model, BPE with `byte_fallback` and `▁` for a space) is stored as model `llama`: tokens, a score per
token, types (the 256 `<0xXX>` byte tokens BYTE, the unk token UNKNOWN), and whether a space is put before the
text. llama.cpp's tokenizer for it merges, among neighbouring pieces, the pair whose result has the highest
score, so the scores are the merge order: a token made by merge number r scores -r (its first merge when
several make it). In a converted SentencePiece BPE the merges are sorted by the merged piece's score, so this
order is the tokenizer.model's own; reading it from tokenizer.json needs no `sentencepiece` package and works
where only tokenizer.json was saved (ftune merge saves the fast tokenizer). Unigram and WordLevel are refused.

Merges (gpt2), special token ids, add-BOS/EOS flags and the chat template come from the gguf package's own
`SpecialVocab` (add-BOS/EOS checked by encoding a word), which reads the same files llama.cpp's converter does.
"""

from __future__ import annotations

import re
from pathlib import Path

from ftune.errors import FtuneError
from ftune.io import read_json_file

# Split patterns of the byte-level tokenizers ftune's architectures ship, and the name llama.cpp gives each
# (facts about those tokenizers' files). Matching the pattern, rather than hashing a test encoding as
# llama.cpp's converter does, keeps this table short and says why a tokenizer is or is not recognised.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}
UNKNOWN_PRE = "default"

# gguf.TokenType values, spelled here so this module imports without the optional package.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # ▁, SentencePiece's spelling of a space
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
PAD_SCORE = -1000.0  # the score llama.cpp's converter gives the padding ids


def read_vocab(source: Path, vocab_size: int) -> dict:
    """{"model", "pre", "tokens", "types", "warning"} (and "scores", "add_space_prefix" for model `llama`) for the
    tokenizer.json in `source`, padded to `vocab_size`."""
    path = source / "tokenizer.json"
    if not path.is_file():
        raise FtuneError(f"{source}: no tokenizer.json, so the tokenizer cannot go into the GGUF file; save the "
                         f"model with its fast tokenizer (ftune merge does) and export again")
    tj = read_json_file(path, "save the tokenizer again (ftune merge writes it)")
    model = tj.get("model") if isinstance(tj, dict) else None
    kind = model.get("type") if isinstance(model, dict) else None
    if kind == "BPE" and model.get("byte_fallback") and _metaspace(tj):
        return _sentencepiece_vocab(path, tj, vocab_size)
    if kind != "BPE" or model.get("byte_fallback") or not _byte_level(tj):
        what = "byte-fallback BPE without SentencePiece's ▁ spaces" if kind == "BPE" and model.get("byte_fallback") \
            else f"{kind or 'unknown'}"
        raise FtuneError(f"{path}: a {what} tokenizer; ftune's GGUF export writes byte-level BPE tokenizers (Llama 3, "
                         f"Qwen2, SmolLM, Mistral Tekken) and SentencePiece-style BPE ones (Llama 2, Mistral 7B, "
                         f"TinyLlama). Convert this one with llama.cpp's convert_hf_to_gguf.py instead")
    tokens, types = _tokens_and_types(path, tj, vocab_size)
    pre, warning = pre_tokenizer_name(tj.get("pre_tokenizer"))
    return {"model": "gpt2", "pre": pre, "warning": warning,
            "tokens": [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)],
            "types": [types.get(i, UNUSED) for i in range(vocab_size)]}


def _tokens_and_types(path: Path, tj: dict, vocab_size: int) -> tuple[dict[int, str], dict[int, int]]:
    """id -> token and id -> type from the model's vocab and the added tokens (special ones: control)."""
    tokens: dict[int, str] = {i: t for t, i in tj["model"]["vocab"].items()}
    types = {i: NORMAL for i in tokens}
    for added in tj.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    size = max(tokens) + 1 if tokens else 0
    if size > vocab_size:
        raise FtuneError(f"{path}: the tokenizer has ids up to {size - 1}, but config.json says vocab_size {vocab_size}; "
                         f"the tokenizer belongs to another model: save the matching one beside the weights")
    return tokens, types


def _sentencepiece_vocab(path: Path, tj: dict, vocab_size: int) -> dict:
    """Model `llama`: tokens, scores from the merge order (see the module's docstring), SentencePiece's types."""
    model = tj["model"]
    if not isinstance(model.get("vocab"), dict):
        raise FtuneError(f"{path}: model.vocab is not a token -> id table; save the tokenizer again")
    tokens, types = _tokens_and_types(path, tj, vocab_size)
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in model["vocab"]]
    if missing:  # llama.cpp spells any character its vocabulary lacks with these; without them it cannot
        raise FtuneError(f"{path}: a byte-fallback tokenizer without the byte tokens {', '.join(missing[:3])}"
                         f"{' …' if len(missing) > 3 else ''}; llama.cpp needs all 256 (<0x00> … <0xFF>)")
    merges = model.get("merges") or []
    made_by: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        made_by.setdefault(left + right, rank)
    unk = model["vocab"].get(model.get("unk_token") or _config_unk(path.parent))
    scores = {}
    for i, token in tokens.items():
        if types[i] == NORMAL and BYTE_TOKEN.fullmatch(token):
            types[i] = BYTE
        if i == unk:
            types[i] = UNKNOWN
        if types[i] != NORMAL:
            scores[i] = 0.0  # what SentencePiece gives its control, unknown and byte pieces
        else:  # single characters (made by no merge) rank below every merge, in id order
            scores[i] = -float(made_by.get(token, len(merges) + i))
    return {"model": "llama", "pre": "default", "warning": None, "add_space_prefix": _adds_space_prefix(tj),
            "tokens": [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)],
            "types": [types.get(i, UNUSED) for i in range(vocab_size)],
            "scores": [scores.get(i, PAD_SCORE) for i in range(vocab_size)]}


def _config_unk(source: Path) -> str | None:
    """The unk token tokenizer_config.json names (transformers 5 saves the BPE model without its unk_token)."""
    path = source / "tokenizer_config.json"
    try:
        unk = read_json_file(path, "").get("unk_token") if path.is_file() else None
    except (FtuneError, AttributeError):
        return None
    unk = unk.get("content") if isinstance(unk, dict) else unk
    return unk if isinstance(unk, str) else None


def _parts(step) -> list[dict]:
    """The steps of a normalizer / pre-tokenizer / decoder, a Sequence opened up."""
    if not isinstance(step, dict):
        return []
    inner = step.get("normalizers") or step.get("pretokenizers") or step.get("decoders")
    return [p for p in inner if isinstance(p, dict)] if step.get("type") == "Sequence" and inner else [step]


def _metaspace(tj: dict) -> bool:
    """SentencePiece's convention: spaces become ▁, by a Metaspace pre-tokenizer (transformers' current conversion)
    or by a normalizer replacing ' ' with ▁ (the older one), and the decoder turns ▁ back into spaces."""
    pre = any(p.get("type") == "Metaspace" and p.get("replacement", SPACE) == SPACE for p in _parts(tj.get("pre_tokenizer")))
    norm = any(p.get("type") == "Replace" and p.get("content") == SPACE for p in _parts(tj.get("normalizer")))
    return pre or norm


def _adds_space_prefix(tj: dict) -> bool:
    """Whether a ▁ goes before the text (SentencePiece's add_dummy_prefix)."""
    for p in _parts(tj.get("pre_tokenizer")):
        if p.get("type") == "Metaspace":
            if "prepend_scheme" in p:
                return p["prepend_scheme"] != "never"
            return bool(p.get("add_prefix_space", True))
    return any(p.get("type") == "Prepend" and p.get("prepend") == SPACE for p in _parts(tj.get("normalizer")))


def _byte_level(tj: dict) -> bool:
    """Byte-level BPE decodes with the ByteLevel decoder (its tokens are spelled in GPT-2's byte alphabet)."""
    decoder = tj.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if isinstance(decoder, dict) else []
    return any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in parts)


def pre_tokenizer_name(pre: dict | None) -> tuple[str, str | None]:
    """(llama.cpp's name for this pre-tokenizer, a warning when it is not one it knows)."""
    parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    kinds = [p.get("type") for p in parts if isinstance(p, dict)]
    splits = [p.get("pattern", {}).get("Regex") for p in parts if isinstance(p, dict) and p.get("type") == "Split"]
    if len(splits) == 1 and splits[0] in SPLIT_NAMES:
        return SPLIT_NAMES[splits[0]], None
    byte_level = next((p for p in parts if isinstance(p, dict) and p.get("type") == "ByteLevel"), None)
    if not splits and byte_level is not None and byte_level.get("use_regex", True):
        digits = next((p for p in parts if isinstance(p, dict) and p.get("type") == "Digits"), None)
        if digits is None and kinds == ["ByteLevel"]:
            return "gpt-2", None
        if digits is not None and digits.get("individual_digits") and kinds == ["Digits", "ByteLevel"]:
            return "smollm", None
    return UNKNOWN_PRE, ("the tokenizer's pre-tokenizer is not one llama.cpp names (known: qwen2, llama-bpe, smollm, "
                         "gpt-2); the file says 'default', so llama.cpp may split some text differently from transformers")


def add_vocab(writer, source: Path, vocab: dict) -> None:
    """Write the vocabulary, then merges (gpt2), special ids, add-BOS/EOS and the chat template (gguf's SpecialVocab)."""
    import gguf

    llama = vocab["model"] == "llama"
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    if llama:
        writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    if llama:
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    special = gguf.SpecialVocab(source, load_merges=not llama, n_vocab=len(vocab["tokens"]))
    if not llama and not special.merges:
        raise FtuneError(f"{source / 'tokenizer.json'}: a BPE tokenizer without merges; save the tokenizer again")
    # Whether BOS/EOS are added is what the tokenizer ftune trained with does, not a guess from its files:
    # llama.cpp's default for a file without the flag differs by vocabulary type.
    special.add_special_token.update(_adds_bos_eos(source))
    special.add_to_gguf(writer, quiet=True)


def _adds_bos_eos(source: Path) -> dict[str, bool]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    ids = tok("hello")["input_ids"]
    return {"bos": tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id],
            "eos": tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id]}
