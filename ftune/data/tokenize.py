"""Tokenization with loss masks, truncation counted, cached on disk so a rerun skips it.

Prompt and target are tokenized separately and concatenated, so the ids a label is scored with at eval
time are exactly the ids it was trained on. Labels are -100 where no loss is taken.

Truncation keeps the target whole. A classification or alpaca example longer than data.max_length has its
input text shortened from the end (the template around it, BOS included, stays whole) until prompt and
target fit: the label or response is what the example teaches, and cutting the end would cut it.
`fit_prompt` is that rule; eval calls it too, so a prompt is scored exactly as it was trained.

A cache entry is `cache_root/<key>/{data/, stats.json, manifest.json}`; the manifest holds the SHA-256 of
every other file, checked before the entry is used: an entry that was edited (relabelled rows train a model
on the wrong answers), damaged or half-deleted is rebuilt, never trained on. The check catches corruption
and edits that leave the manifest alone; whoever can rewrite the manifest too can still change the data.
Nothing in an entry is unpickled: `datasets.load_from_disk` reads two JSON files and Arrow IPC files.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from ftune.config.schema import DataConfig
from ftune.data.formats import Example
from ftune.errors import WriteError
from ftune.data.sources import source_fingerprint
from ftune.io import atomic_dir, file_sha256, remove_stale_temps, write_json_atomic

IGNORE = -100
CACHE_VERSION = "4"  # bump when the tokenized layout changes (2: entries carry manifest.json; 4: input text shortened)
MANIFEST = "manifest.json"
_cache_off_warned: set[str] = set()  # cache roots already reported unwritable, to warn once


@dataclass
class TokenStats:
    examples: int
    truncated: int  # examples cut to max_length: input text shortened (target whole) or, failing that, the end cut
    dropped: int  # examples left with no target token after truncation
    tokens: int
    target_tokens: int


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's ids as training and eval feed them (special tokens such as BOS added)."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else _bos(tokenizer)


def target_ids(tokenizer, target: str, cfg: DataConfig) -> list[int]:
    """A target's ids: its text, then EOS when data.add_eos."""
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    if cfg.add_eos and tokenizer.eos_token_id is not None:
        t = t + [tokenizer.eos_token_id]
    return t


def encode_prompt_target(tokenizer, prompt: str, target: str, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one prompt/target pair, before truncation."""
    p, t = prompt_ids(tokenizer, prompt), target_ids(tokenizer, target, cfg)
    labels = (p if cfg.train_on_prompt else [IGNORE] * len(p)) + t
    return p + t, labels


# The template fields that may be shortened, first cut first: the input text, never the label or response.
CUT_FIELDS = {"classification": ("text",), "alpaca": ("input", "instruction")}


def label_room(tokenizer, labels: list[str], cfg: DataConfig) -> int:
    """Tokens the longest label's target takes (prefix, label, EOS): a classification prompt gets
    max_length minus this, for every example, so eval (which scores every label after one prompt) sees the
    prompt training saw."""
    from ftune.data.labels import surface

    return max(len(target_ids(tokenizer, cfg.label_prefix + surface(lab, cfg), cfg)) for lab in labels)


def fit_prompt(tokenizer, ex: Example, cfg: DataConfig, room: int) -> tuple[str, bool] | None:
    """(prompt, shortened): the example's prompt, tokenizing to at most `room` tokens. When it is longer, its
    input fields (CUT_FIELDS) are cut from their end, at token boundaries, while the rest of the template
    stays whole. None when even empty input fields leave the prompt longer than `room`."""
    if len(prompt_ids(tokenizer, ex.prompt)) <= room:
        return ex.prompt, False
    names = [n for n in CUT_FIELDS.get(cfg.format, ()) if ex.fields.get(n)]
    if not ex.template or not names:
        return None
    fields = dict(ex.fields)

    def fits(values: dict) -> bool:
        return len(prompt_ids(tokenizer, ex.template.format(**values))) <= room

    if not fits(fields | {n: "" for n in names}):
        return None
    for name in names:  # earlier fields are emptied before a later one is cut
        if not fits(fields | {name: ""}):
            fields[name] = ""  # emptying this field is not enough: cut the next one too
            continue
        cuts = _cut_points(tokenizer, fields[name])  # cuts[k]: the value keeping its first k tokens
        lo, hi = 0, len(cuts) - 1  # the largest k whose cut fits: cuts[0] is empty and fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(fields | {name: cuts[mid]}):
                lo = mid
            else:
                hi = mid - 1
        fields[name] = cuts[lo]
        return ex.template.format(**fields), True
    return ex.template.format(**fields), True


def classification_prompts(tokenizer, examples: list[Example], cfg: DataConfig, labels: list[str]) -> tuple[list[str], list[bool]]:
    """(prompts, shortened) for scoring classification examples: each prompt fitted as training fitted it
    (max_length minus the longest label's target). A prompt that cannot be fitted (its template alone is too
    long) is returned whole; training dropped such an example."""
    room = cfg.max_length - label_room(tokenizer, labels, cfg)
    fitted = [fit_prompt(tokenizer, e, cfg, room) for e in examples]
    return [f[0] if f else e.prompt for f, e in zip(fitted, examples)], [bool(f and f[1]) for f in fitted]


def _cut_points(tokenizer, value: str) -> list[str]:
    """value cut before each of its tokens (token start offsets of a fast tokenizer), trailing space
    stripped (cuts[k] keeps k tokens; cuts[0] is empty); a slow tokenizer without offsets cuts at each character."""
    try:
        offsets = tokenizer(value, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        starts = [start for start, _ in offsets]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        starts = list(range(len(value)))
    return [""] + [value[:k].rstrip() for k in starts[1:]]


def _bos(tokenizer) -> list[int]:
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return ids if ids and ids[0] == tokenizer.bos_token_id else []


def encode_chat(tokenizer, messages: list[dict], cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; assistant turns are the targets. Each turn's span is
    found by rendering the conversation up to it (templates render prefixes as prefixes)."""
    if not getattr(tokenizer, "chat_template", None):
        from ftune.errors import FtuneError

        raise FtuneError("data.format: chat needs a tokenizer with a chat template (tokenizer.chat_template is unset)")

    def ids(msgs, gen=False):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False)
        return list(out["input_ids"] if isinstance(out, dict) else out)

    full = ids(messages)
    labels = list(full) if cfg.train_on_prompt else [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = len(ids(messages[:i], gen=True)), len(ids(messages[: i + 1]))
            labels[start:end] = full[start:end]
    return full, labels


def encode(tokenizer, ex: Example, cfg: DataConfig, target_room: int | None = None) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for one example under the format's rules. Classification and alpaca
    prompts are fitted to max_length minus `target_room` (default: this example's target length) with
    fit_prompt; when no fitting can make the target fit, or for chat and text, the end is cut."""
    if cfg.format == "chat":
        ids, labels = encode_chat(tokenizer, ex.messages, cfg)
    elif cfg.format == "text":
        ids, labels = encode_prompt_target(tokenizer, "", ex.target, cfg)
        labels = list(ids)  # plain LM: every token is a target (BOS is never predicted: shift drops it)
    else:
        room = cfg.max_length - (target_room if target_room is not None else len(target_ids(tokenizer, ex.target, cfg)))
        fitted = fit_prompt(tokenizer, ex, cfg, room)
        prompt, shortened = fitted if fitted is not None else (ex.prompt, False)
        ids, labels = encode_prompt_target(tokenizer, prompt, ex.target, cfg)
        if shortened and len(ids) <= cfg.max_length:
            return ids, labels, True
    truncated = len(ids) > cfg.max_length
    return ids[: cfg.max_length], labels[: cfg.max_length], truncated


def _definition(backend) -> dict:
    """The backend's serialised definition without its padding/truncation settings: transformers switches
    those on and off per call (a padded eval batch leaves them set until the next plain call), so keeping
    them made the same split hash to a different key depending on what ran before."""
    definition = json.loads(backend.to_str())
    definition.pop("padding", None)
    definition.pop("truncation", None)
    return definition


def _fingerprint(tokenizer, cfg: DataConfig, path, examples_sig: str) -> str:
    h = hashlib.sha256(source_fingerprint(path).encode())
    # A fast tokenizer's whole definition: a vocabulary sample would miss a changed normalizer, merges or
    # BOS rule (post-processor), and a rerun would silently train on ids the new tokenizer never makes.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = _definition(backend) if backend is not None else sorted(tokenizer.get_vocab().items())
    tok_sig = json.dumps([type(tokenizer).__name__, definition, getattr(tokenizer, "chat_template", None),
                          tokenizer.bos_token_id, tokenizer.eos_token_id], default=str)
    h.update(tok_sig.encode())
    h.update(cfg.model_dump_json(exclude={"train", "eval", "test", "num_proc", "cache_dir"}).encode())
    h.update(examples_sig.encode())
    h.update(CACHE_VERSION.encode())
    return h.hexdigest()[:24]


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("FTUNE_CACHE") or Path.home() / ".cache" / "ftune") / "tokenized"


def tokenize_split(tokenizer, examples: list[Example], cfg: DataConfig, path: str, labels: list[str] | None = None,
                   head: bool = False):
    """A `datasets.Dataset` with input_ids/labels (examples with no target dropped), and its stats.
    Classification prompts are fitted for the longest of `labels` (the label set), as eval scores them.
    `head` (model.head: classifier): the prompt alone, its last position labelled with the class index.
    Cached under cache_root by file content + tokenizer + data settings; written atomically, checked on use."""
    import datasets

    datasets.disable_progress_bars()
    label_set = list(labels) if cfg.format == "classification" and labels else None
    head = bool(head and label_set)
    labels_sig = json.dumps([sorted({e.label for e in examples if e.label is not None}), label_set] + (["head"] if head else []))
    root = cache_root(cfg)
    target = root / _fingerprint(tokenizer, cfg, path, labels_sig)
    cached = _load_entry(target)
    if cached is not None:
        return cached
    ds, stats = _tokenize(tokenizer, examples, cfg, label_set, head)
    return _store_entry(root, target, ds, stats), stats


def encode_for_head(tokenizer, ex: Example, cfg: DataConfig, room: int, class_index: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for the classification head: the prompt fitted as label scoring fits it
    (max_length minus `room`, so eval sees the same prompt), its last position labelled with the class index."""
    fitted = fit_prompt(tokenizer, ex, cfg, cfg.max_length - room)
    prompt, shortened = fitted if fitted is not None else (ex.prompt, False)
    ids = prompt_ids(tokenizer, prompt)
    cut = shortened or len(ids) > cfg.max_length
    ids = ids[: cfg.max_length]
    return ids, [IGNORE] * (len(ids) - 1) + [class_index], cut


def _tokenize(tokenizer, examples: list[Example], cfg: DataConfig, labels: list[str] | None = None, head: bool = False):
    """(in-memory dataset, stats) of the examples: encoded, and those with no target token left dropped."""
    import datasets

    room = label_room(tokenizer, labels, cfg) if labels else None
    index = {lab: i for i, lab in enumerate(labels or [])}
    rows = [{"row": e.row, "prompt": e.prompt, "target": e.target, "messages": json.dumps(e.messages),
             "template": e.template, "fields": json.dumps(e.fields), "label": index.get(e.label, -1)} for e in examples]

    def batch_encode(batch):
        out = {"input_ids": [], "labels": [], "truncated": [], "row": batch["row"]}
        for prompt, tgt, msgs, template, fields, row, cls in zip(batch["prompt"], batch["target"], batch["messages"],
                                                                  batch["template"], batch["fields"], batch["row"], batch["label"]):
            ex = Example(row=row, prompt=prompt, target=tgt, messages=json.loads(msgs), template=template,
                         fields=json.loads(fields))
            ids, labels, cut = encode_for_head(tokenizer, ex, cfg, room, cls) if head else encode(tokenizer, ex, cfg, room)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["truncated"].append(cut)
        return out

    ds = datasets.Dataset.from_list(rows).map(batch_encode, batched=True, num_proc=cfg.num_proc if len(rows) > 256 else None,
                                              remove_columns=["prompt", "target", "messages", "template", "fields", "label"])
    n_before = len(ds)
    # Position 0 is never predicted (the causal shift), so a target there alone teaches nothing and would
    # make a micro-batch's loss 0/0: such examples count as having no target.
    ds = ds.filter(lambda b: [any(x != IGNORE for x in lab[1:]) for lab in b["labels"]], batched=True)
    stats = TokenStats(examples=len(ds), truncated=int(sum(ds["truncated"])), dropped=n_before - len(ds),
                       tokens=int(sum(len(x) for x in ds["input_ids"])),
                       target_tokens=int(sum(sum(1 for t in lab if t != IGNORE) for lab in ds["labels"])))
    return ds, stats


def _manifest(entry: Path) -> dict:
    files = sorted(p for p in entry.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"version": CACHE_VERSION, "sha256": {p.relative_to(entry).as_posix(): file_sha256(p) for p in files}}


def _check_entry(entry: Path) -> str | None:
    """Why the entry cannot be trusted, or None when every file the manifest lists has its hash."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        listed = manifest["sha256"]
        # Exactly the entry's own regular files: a listed path outside it (/dev/zero, a FIFO) is never read.
        present = {p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_symlink() or p.is_file()} - {MANIFEST}
        if not isinstance(listed, dict) or not {"stats.json", "data/state.json"} <= set(listed):
            return f"{MANIFEST} does not list the entry's files"
        missing = sorted(set(listed) - present)  # also every path that is not a file inside the entry
        if missing:
            return f"{Path(missing[0]).name} is missing"
        for name, digest in listed.items():
            if (entry / name).is_symlink() or file_sha256(entry / name) != digest:
                return f"{name} does not match its hash in {MANIFEST}"
        if present - set(listed):
            return f"{sorted(present - set(listed))[0]} is not listed in {MANIFEST}"
    except FileNotFoundError as e:
        return f"{Path(e.filename).name if e.filename else 'a file'} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable: {e}"
    return None


def _load_entry(target: Path):
    """(dataset, stats) from a verified cache entry; None when there is none or it fails its check (warned)."""
    import datasets

    try:
        if not target.exists():
            return None
    except OSError:
        return None  # an unreadable cache root: tokenize (writing will report it)
    reason = _check_entry(target)
    if reason is None:
        try:
            stats = TokenStats(**json.loads((target / "stats.json").read_text()))
            ds = datasets.load_from_disk(str(target / "data"))
            if not {"input_ids", "labels"} <= set(ds.column_names) or len(ds) != stats.examples:
                raise ValueError("its rows do not match stats.json")
            return ds, stats
        except Exception as e:  # noqa: BLE001 — any failure to load means: rebuild
            reason = f"cannot be loaded: {type(e).__name__}: {e}"
    warnings.warn(f"tokenization cache entry {target} failed its check ({reason}); rebuilding", stacklevel=3)
    return None


def _store_entry(root: Path, target: Path, ds, stats: TokenStats):
    """Write the entry atomically (replacing a bad one) and return it memory-mapped from disk. A cache
    directory that cannot be written is not fatal: warn once and train on the in-memory dataset."""
    import datasets

    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temps(root):
            warnings.warn(f"removed stale temporary folder {stale} (left by an interrupted run)", stacklevel=3)
        with atomic_dir(target) as tmp:
            ds.save_to_disk(str(tmp / "data"))
            write_json_atomic(tmp / "stats.json", stats.__dict__)
            write_json_atomic(tmp / MANIFEST, _manifest(tmp))
        return datasets.load_from_disk(str(target / "data"))
    except (OSError, WriteError) as e:  # WriteError: the atomic writer's name for a refused write
        if str(root) not in _cache_off_warned:
            _cache_off_warned.add(str(root))
            warnings.warn(f"tokenization cache is off: cannot write to {root} ({e.strerror or e}); tokenizing in memory. "
                          f"Point data.cache_dir (or FTUNE_CACHE) at a writable directory to cache it", stacklevel=3)
        return ds
