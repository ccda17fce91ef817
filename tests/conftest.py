"""Shared builders for the CPU test suite: a tiny Llama with a tiny word-level tokenizer, built offline
in process, a few rows of data in every format, and helpers to write configs and run the CLI.

Nothing is downloaded: the hub is forced offline and every cache points into a temp directory, so the
suite never writes to ~/.cache.
"""

from __future__ import annotations

import atexit
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub / datasets / matplotlib: they read these once, at import.
_SCRATCH = Path(tempfile.mkdtemp(prefix="ftune-tests-"))
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_SCRATCH / "hf")  # an empty hub cache: hub ids are never found locally
os.environ["HF_DATASETS_CACHE"] = str(_SCRATCH / "hf-datasets")  # csv/tsv are read through `datasets`
os.environ["MPLCONFIGDIR"] = str(_SCRATCH / "matplotlib")
os.environ["FTUNE_CACHE"] = str(_SCRATCH / "ftune")  # module-scoped fixtures; tests get their own below
os.environ["COLUMNS"] = "200"  # rich reads the width once, when ftune.cli creates its consoles
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Triton fixes at import whether its jit functions (the kernels' and its own: tl.rand4x, tl.zeros …) run in its
# interpreter. Without CUDA the dropout kernel tests run there, and a CPU training test may import triton first
# (ftune.kernels.dropout checks that it imports), so the choice is made here, before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402

import ftune.methods  # noqa: E402,F401  (registers the methods; tests call ftune.config.load_config directly)

# ---------------------------------------------------------------- the tiny tokenizer and model

# Fixed ids for the specials, then the words in sorted order: tests compare token *strings*, so they
# read as text and do not depend on these numbers.
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = sorted(set("""
    ### Instruction Input Response Text Label : ,
    positive negative other
    great good fine ok bad boring awful movie film plot acting music story
    say hello to bob alice write a short poem about the sea rain
    hi how are you thanks be nice what is this it
    one two three four five six seven eight nine ten
""".split()))
# Role markers are single tokens; the generation prompt renders as a prefix of the next assistant turn,
# which is what ftune's chat masking relies on.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer(add_bos: bool = True):
    """A word-level PreTrainedTokenizerFast over WORDS (BOS prepended by its post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIALS[4:], chat_template=CHAT_TEMPLATE)


def build_model_dir(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32, GQA 4/2 heads) with random weights, saved with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    """The tokenizer exactly as ftune loads it (pad set, right padding)."""
    from ftune.config.schema import ModelConfig
    from ftune.models import load_tokenizer

    return load_tokenizer(ModelConfig(path=str(tiny_model_dir)))


# ---------------------------------------------------------------- data files

CLS_TRAIN = [
    {"text": "great movie", "label": "positive"},
    {"text": "bad film", "label": "negative"},
    {"text": "ok plot", "label": "other"},
    {"text": "good acting", "label": "positive"},
    {"text": "boring story", "label": "negative"},
    {"text": "fine music", "label": "other"},
    {"text": "great acting", "label": "positive"},
    {"text": "awful plot", "label": "negative"},
]
CLS_TEST = [
    {"text": "good movie", "label": "positive"},
    {"text": "awful film", "label": "negative"},
    {"text": "ok music", "label": "other"},
    {"text": "great story", "label": "positive"},
    {"text": "bad acting", "label": "negative"},
]
ALPACA = [
    {"instruction": "say hello", "input": "to bob", "output": "hello bob"},
    {"instruction": "write a short poem", "input": "", "output": "the sea the rain"},
    {"instruction": "say hello", "output": "hello alice"},
]
CHAT = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine thanks"}]},
    {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "what is this"},
                  {"role": "assistant", "content": "a poem"}]},
]
# Eight texts of 1..8 words: micro-batches of them carry very different numbers of target tokens,
# which is what the gradient-accumulation test needs.
NUMBERS = "one two three four five six seven eight".split()
TEXT = [{"text": " ".join(NUMBERS[: n + 1])} for n in range(8)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_table(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """cls_train/cls_test .jsonl (+ cls_train .csv/.tsv), alpaca, chat and text .jsonl, labels.txt."""
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "cls_train.jsonl", CLS_TRAIN)
    write_jsonl(d / "cls_test.jsonl", CLS_TEST)
    write_table(d / "cls_train.csv", CLS_TRAIN)
    write_table(d / "cls_train.tsv", CLS_TRAIN, delimiter="\t")
    write_jsonl(d / "alpaca.jsonl", ALPACA)
    write_jsonl(d / "chat.jsonl", CHAT)
    write_jsonl(d / "text.jsonl", TEXT)
    (d / "labels.txt").write_text("positive\nnegative\nother\n", encoding="utf-8")
    return d


# ---------------------------------------------------------------- the device, accelerate's singletons

_CUDA_USERS_LOADED = False


def _load_cuda_users() -> None:
    """Import what decides at import time whether CUDA exists (bitsandbytes picks its native library,
    transformers caches `is_torch_cuda_available`) while the GPU is still visible: a CPU-pinned test that
    imported them first would leave the later `gpu` tests in this process without CUDA."""
    global _CUDA_USERS_LOADED
    if _CUDA_USERS_LOADED:
        return
    _CUDA_USERS_LOADED = True
    from transformers.utils.import_utils import is_torch_cuda_available

    is_torch_cuda_available()
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # not installed, or no native library for this machine: the quantized tests say so
        pass


def pin_cpu(monkeypatch) -> None:
    """Hide the GPU from one test: torch.cuda.is_available() is False (ftune, accelerate and transformers
    all ask it), and accelerate is told to use the CPU. Hiding through CUDA_VISIBLE_DEVICES would not
    work: CUDA reads it once per process, and the `gpu` tests of the same process need the device."""
    import torch

    if torch.cuda.is_available():
        _load_cuda_users()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess of a CPU test: a new process reads CUDA_VISIBLE_DEVICES, so hiding the
    GPU there is exact (the launcher, accelerate and ftune all see no CUDA)."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    return {**env, "CUDA_VISIBLE_DEVICES": "", **extra}


@pytest.fixture(scope="module", autouse=True)
def module_fixtures_on_cpu(request):
    """Module-scoped fixtures (a trained tiny run shared by a module's tests) are built before the per-test
    pin below: in a module without `gpu` tests, pin the CPU for the whole module too."""
    gpu_here = any(item.get_closest_marker("gpu") is not None for item in request.session.items
                   if item.module is request.module)
    if gpu_here:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        pin_cpu(mp)
        yield


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state (PartialState, AcceleratorState, GradientState): every
    `ftune train` builds an Accelerator, and one built with another mixed_precision or device in the same
    process raises "AcceleratorState has already been initialized" (pytest -n reuses worker processes)."""
    import sys

    if "accelerate.state" not in sys.modules:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def device_and_accelerate(request, monkeypatch):
    """Tests not marked `gpu` check CPU semantics (fp32 weights, no autocast, exact tolerances such as
    1e-5 on scores and weights) and run on the CPU even where a GPU is present; `gpu` tests see the
    device. accelerate's singletons are cleared before and after every test."""
    if request.node.get_closest_marker("gpu") is None:
        pin_cpu(monkeypatch)
    reset_accelerate()
    yield
    reset_accelerate()


# ---------------------------------------------------------------- configs, caches, the CLI

@pytest.fixture(autouse=True)
def ftune_cache(tmp_path, monkeypatch) -> Path:
    """Each test tokenizes into its own cache directory (never ~/.cache/ftune)."""
    cache = tmp_path / "ftune-cache"
    monkeypatch.setenv("FTUNE_CACHE", str(cache))
    return cache


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def base_config(model_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    """A LoRA classification run on the tiny model: two fast CPU steps, no dropout (fp32 on CPU by default)."""
    return {
        "recipe": "lora",
        "name": "tiny",
        "output_dir": str(out_dir),
        "model": {"path": str(model_dir)},
        "data": {"train": str(data_dir / "cls_train.jsonl"), "test": str(data_dir / "cls_test.jsonl"),
                 "format": "classification", "max_length": 32},
        "method": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {"micro_batch_size": 4, "max_steps": 2, "lr": 1.0e-2, "log_every": 1, "warmup_ratio": 0.0},
        "eval": {"batch_size": 4},
    }


@pytest.fixture
def make_config(tiny_model_dir, data_dir, tmp_path):
    """make_config(overrides, name=, out_dir=, replace=) -> path of a YAML config: base_config deep-merged
    with `overrides`, then the sections in `replace` swapped in whole (e.g. method={"name": "full"})."""
    def make(overrides: dict | None = None, name: str = "config.yaml", out_dir: Path | None = None,
             replace: dict | None = None) -> Path:
        raw = deep_merge(base_config(tiny_model_dir, data_dir, out_dir or tmp_path / "run"), overrides or {})
        raw.update(replace or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        return path
    return make


def invoke(*args: str):
    """Run `ftune ARGS…` in process; returns click's Result (output = stdout and stderr together)."""
    from typer.testing import CliRunner

    from ftune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
