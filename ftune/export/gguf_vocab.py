"""The tokenizer of a merged checkpoint as GGUF metadata (`tokenizer.ggml.*`), the way llama.cpp reads it.

Byte-level BPE (GPT-2 style: Llama 3, Qwen2, SmolLM, Mistral's Tekken) is stored as model `gpt2`: every id's
token string as tokenizer.json spells it, a type per token (normal, control for special added tokens,
user-defined for the other added ones, unused for the padding ids up to the model's vocab_size), the merges,
and the name of the pre-tokenizer (`tokenizer.ggml.pre`: how llama.cpp splits text before merging, picked
from the split pattern in tokenizer.json). Merges, special token ids, add-BOS/EOS flags and the chat
template come from the gguf package's own `SpecialVocab` (add-BOS/EOS checked by encoding a word), which reads the same files llama.cpp's converter
does. Other tokenizer models (WordLevel, Unigram, SentencePiece byte-fallback BPE) are refused by name.
"""

from __future__ import annotations

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
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def read_vocab(source: Path, vocab_size: int) -> dict:
    """{"model", "pre", "tokens", "types", "warning"} for the tokenizer.json in `source`, padded to `vocab_size`."""
    path = source / "tokenizer.json"
    if not path.is_file():
        raise FtuneError(f"{source}: no tokenizer.json, so the tokenizer cannot go into the GGUF file; save the "
                         f"model with its fast tokenizer (ftune merge does) and export again")
    tj = read_json_file(path, "save the tokenizer again (ftune merge writes it)")
    model = tj.get("model") if isinstance(tj, dict) else None
    kind = model.get("type") if isinstance(model, dict) else None
    if kind != "BPE" or model.get("byte_fallback") or not _byte_level(tj):
        what = "byte-fallback (SentencePiece-style) BPE" if kind == "BPE" and model.get("byte_fallback") else f"{kind or 'unknown'}"
        raise FtuneError(f"{path}: a {what} tokenizer; ftune's GGUF export writes byte-level BPE tokenizers (Llama 3, "
                         f"Qwen2, SmolLM, Mistral Tekken). Convert this one with llama.cpp's convert_hf_to_gguf.py instead")
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: NORMAL for i in tokens}
    for added in tj.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    size = max(tokens) + 1 if tokens else 0
    if size > vocab_size:
        raise FtuneError(f"{path}: the tokenizer has ids up to {size - 1}, but config.json says vocab_size {vocab_size}; "
                         f"the tokenizer belongs to another model: save the matching one beside the weights")
    pre, warning = pre_tokenizer_name(tj.get("pre_tokenizer"))
    return {"model": "gpt2", "pre": pre, "warning": warning,
            "tokens": [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)],
            "types": [types.get(i, UNUSED) for i in range(vocab_size)]}


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
    """Write the vocabulary, then merges, special ids, add-BOS/EOS and the chat template (gguf's SpecialVocab)."""
    import gguf

    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    special = gguf.SpecialVocab(source, load_merges=True, n_vocab=len(vocab["tokens"]))
    if not special.merges:
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
