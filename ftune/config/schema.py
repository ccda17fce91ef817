"""The typed run config. Every section forbids unknown keys; every field's description is its help text.

The method section is typed per method: `METHOD_SCHEMAS[name].config_cls` validates it (see loader.py),
so a LoRA key under a `full` run is an unknown key like any other. `ftune.methods.register` fills
METHOD_SCHEMAS: the config floor knows what each method accepts without importing the methods.
"""

from __future__ import annotations

import re
from pathlib import Path
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    """Base for all config sections: strict keys, values re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class MethodConfig(Section):
    """Fields shared by every method; each method extends this with its own keys."""

    name: str = Field(description="Fine-tuning method: a name from `ftune recipes` (full, lora, …).")


@dataclass(frozen=True)
class MethodSchema:
    """What validating a config needs to know of a method: its `method:` section and where it may run."""

    config_cls: type[MethodConfig]
    quantized_base: bool  # may train on a 4-bit base
    requires_quantized: bool  # only on a 4-bit base
    multi_process: bool = True  # may train on several processes (DDP, FSDP2)
    head_reason: str = ""  # why model.head: classifier cannot train with it ("": it can)


METHOD_SCHEMAS: dict[str, MethodSchema] = {}  # name -> schema, filled by ftune.methods.register


class ModelConfig(Section):
    path: str = Field(description="Base model: a local HF directory, a hub id (from the local cache when offline), or a .gguf file.")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` when `path` is a directory or hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `path` is a hub id.")
    tokenizer: str | None = Field(None, description="Tokenizer location if it differs from `path`.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="Weight dtype; auto = bf16 on a GPU that supports it, else fp32.")
    quantization: Literal["none", "nf4", "fp4"] = Field("none", description="Load the base in 4-bit with bitsandbytes (QLoRA); none = full precision.")
    double_quant: bool = Field(True, description="4-bit only: also quantize the quantization scales (bnb_4bit_use_double_quant).")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention backend; auto = flash_attention_2 when installed on CUDA, else PyTorch SDPA.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    checkpoint_fraction: float = Field(
        1.0, gt=0, le=1, description="With gradient_checkpointing: share of decoder layers (the first ones) that recompute; the rest keep their activations (faster, more memory).")
    offload_activations: bool = Field(
        False, description="With gradient_checkpointing on the fast path (CUDA): keep the checkpointed layers' saved inputs in pinned CPU memory, copied on a side stream.")
    layer_plan: str | None = Field(
        None,
        description="Per-layer memory plan, first layer first, overriding gradient_checkpointing, checkpoint_fraction and offload_activations: runs of <count><letter> covering every decoder layer, e.g. 14a8c6K. K keeps all activations, A recomputes the attention block, M recomputes the MLP's gate/up, C both (A and M need the fast path); lower case also sends what the layer saves to pinned CPU memory (CUDA fast path). Checked by `ftune validate` and before training loads the model. docs/BENCHMARKS.md shows how to pick one. auto = ftune chooses at set-up from the model, tokens per micro-batch, the GPU's free memory (or memory_budget_gib) and the host link, and prints its choice.")
    memory_budget_gib: float | None = Field(
        None, gt=0, description="With layer_plan: auto: the GPU memory (GiB) the chosen plan may fill; default: the GPU's free memory plus what this process holds, × 0.9.")
    kernels: Literal["auto", "liger", "torch", "none"] = Field(
        "auto", description="Training forward: auto = ftune's fused path with liger-kernel's Triton kernels on CUDA (its PyTorch kernels without liger), transformers' own forward on CPU; none = transformers' forward.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repo to run. Off unless you trust it.")
    head: Literal["lm", "classifier"] = Field(
        "lm", description="Output layer: lm = the causal LM's vocabulary (classification scores each label's text); "
                          "classifier = a linear layer over the label set (transformers' `score`) fed by the last prompt "
                          "token's final hidden state, trained in fp32 with the method's adapters (data.format: "
                          "classification; one forward per example at eval, whatever the number of labels).")


class Columns(Section):
    text: str = Field("text", description="Column with the input text (classification, text).")
    label: str = Field("label", description="Column with the class label (classification).")
    instruction: str = Field("instruction", description="Column with the instruction (alpaca).")
    input: str = Field("input", description="Column with the optional input (alpaca).")
    output: str = Field("output", description="Column with the response (alpaca).")
    messages: str = Field("messages", description="Column with the list of {role, content} messages (chat).")


class DataSource(Section):
    """A dataset given as `datasets.load_dataset` takes it, for data.train/eval/test."""

    path: str = Field(description="A builder (json, csv, parquet, text, arrow) with data_files, a local dataset folder (data files inside, or a `save_to_disk` folder) or a hub dataset id (read from the local Hugging Face cache when offline).")
    name: str | None = Field(None, description="The dataset's configuration (subset) name, when it has several.")
    split: str = Field("train", description="Which split to read.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="Data files (globs allowed), relative to `path` when it is a folder: one, a list, or a mapping split -> files.")


DATA_SOURCE = ("a data file (.jsonl, .json, .csv, .tsv, .parquet), a `datasets.save_to_disk` folder, a hub dataset id "
               "from the local cache, or a mapping {path, name, split, data_files} as `datasets.load_dataset` takes")



# How a data source is spelled decides how it is read (ftune/data/sources.py): a file, or a dataset folder / hub id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def is_file_source(spec) -> bool:
    """A single data file (or what should be one): read by ftune.data.formats line by line."""
    if isinstance(spec, DataSource):
        return False
    path = Path(spec)
    return not path.is_dir() and (path.exists() or path.suffix in FILE_SUFFIXES or not looks_like_hub_id(str(spec)))


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


class DataConfig(Section):
    train: str | DataSource = Field(description=f"Training data: {DATA_SOURCE}.")
    eval: str | DataSource | None = Field(None, description="Evaluation data used during training (eval_every) and by default in `ftune eval`; the same forms as data.train.")
    test: str | DataSource | None = Field(None, description="Test data; `ftune eval` uses it when --data is not given; the same forms as data.train.")
    format: Literal["alpaca", "chat", "classification", "text"] = Field("alpaca", description="How rows become prompt and target.")
    columns: Columns = Field(default_factory=Columns, description="Column names in the data files.")
    prompt_template: str | None = Field(
        None, description="Python format string for the prompt, with {text} (classification) or {instruction}/{input} (alpaca); a format default when unset.")
    label_prefix: str = Field(" ", description="Classification: text put before the label in the target (a space after the prompt's colon).")
    labels: list[str] | str | None = Field(None, description="Classification label set: a list, or a file with one label per line; read from the train data when unset.")
    label_aliases: dict[str, str] = Field(
        default_factory=dict, description="Classification: label -> the text trained and scored in its place (a verbaliser), "
                                          "for labels whose own tokens collide or share their first tokens; predictions and "
                                          "reports keep the label. Labels not listed are their own text.")
    system_prompt: str | None = Field(None, description="Chat: system message prepended to conversations that have none.")

    @field_validator("labels")
    @classmethod
    def _usable_labels(cls, v):
        problems = label_set_problems(v) if isinstance(v, list) else []
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @field_validator("label_aliases")
    @classmethod
    def _usable_aliases(cls, v):
        blank = [k for k, text in v.items() if not text.strip()]
        if blank:
            raise ValueError(f"the text for {blank[0]!r} is blank; give each label a non-empty text")
        return v
    packing: Literal["auto"] | bool = Field(
        "auto", description="true: put a micro-batch's examples of different lengths end to end in one row, no padding (attention stays within each example); false: pad; auto = true with a CUDA GPU.")
    max_length: int = Field(1024, ge=8, description="Maximum tokens per example; longer examples are truncated and counted.")
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens (default: response tokens only).")
    add_eos: bool = Field(True, description="Append the tokenizer's EOS token to every target.")
    num_proc: int = Field(1, ge=1, description="Processes for tokenization.")
    cache_dir: str | None = Field(None, description="Where tokenized data is cached; default ~/.cache/ftune (or $FTUNE_CACHE).")


def label_set_problems(labels: list) -> list[str]:
    """What makes a label set unusable: empty, blank or repeated labels (two entries for one class tie in
    every score, and the metrics cannot tell them apart)."""
    if not labels:
        return ["the label set is empty; list the class labels, or leave data.labels unset to read them from the train file"]
    problems = []
    blank = [i for i, lab in enumerate(labels) if not str(lab).strip()]
    if blank:
        problems.append(f"label {blank[0] + 1} is blank")
    seen, dups = set(), []
    for lab in (str(x).strip() for x in labels):
        if lab in seen and lab not in dups:
            dups.append(lab)
        seen.add(lab)
    if dups:
        problems.append(f"labels listed more than once: {', '.join(repr(d) for d in dups)}; list each class once")
    return problems


class BudgetConfig(Section):
    max_minutes: float | None = Field(None, gt=0, description="Wall-clock budget: when spent the run saves, evaluates and ends cleanly.")
    max_tokens: int | None = Field(None, gt=0, description="Token budget (non-padding input tokens trained on): ends the run cleanly when reached.")


class QualityGate(Section):
    metric: str = Field(description="An eval metric as logged: eval_macro_f1, eval_accuracy, eval_reject_f1, eval_loss, …")
    min: float | None = Field(None, description="The run fails when the final value is below this.")
    max: float | None = Field(None, description="The run fails when the final value is above this.")


# name in train.report_to -> (modules that provide it, pip package, ftune extra or None)
TRACKERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard", "tensorboard"),
    "wandb": (("wandb",), "wandb", "wandb"),
    "mlflow": (("mlflow",), "mlflow", "mlflow"),
    "comet_ml": (("comet_ml",), "comet_ml", None),
    "aim": (("aim",), "'aim<4'", None),
    "clearml": (("clearml",), "clearml", None),
    "dvclive": (("dvclive",), "dvclive", None),
    "swanlab": (("swanlab",), "swanlab", None),
    "trackio": (("trackio",), "trackio", None),
}


class TrainConfig(Section):
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for weights of new layers, data order and dropout.")
    micro_batch_size: int = Field(4, ge=1, description="Examples per forward pass on each device.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides epochs.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases, norms or gates).")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"] = Field(
        "adamw", description="adamw (torch, fused on CUDA); 8-bit and paged variants from bitsandbytes.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (takes precedence over warmup_ratio).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a fraction of total steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null to disable.")
    distributed: Literal["auto", "ddp", "fsdp2"] = Field(
        "auto", description="How several processes (--gpus N) share the model: ddp = a whole copy on every GPU; fsdp2 = the "
                            "base sharded across GPUs (per decoder layer), adapters replicated; auto = ddp when the memory "
                            "estimate fits one GPU, else fsdp2. One process ignores it.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description="Autocast precision; auto = bf16 on a capable GPU, no on CPU.")
    log_every: int = Field(10, ge=1, description="Log loss, lr and throughput every N steps.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate on data.eval every N steps (and always at the end if data.eval is set).")
    save_every: int | None = Field(None, ge=1, description="Write a resumable checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted after a new one is complete.")
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="A non-finite loss or gradient norm: stop = end the run at once as failed (exit 1, last good "
                            "checkpoint kept, no artifact); skip = skip that step's update (a GPU sync per step), failing after 5 in a row.")
    gc_every: int | None = Field(
        50, ge=1, description="Python's garbage collection during training: automatic collection is off, objects alive "
                              "when training starts are frozen (never scanned again), young objects are collected after "
                              "each optimizer step and all every N steps, so no step waits on a collection at a random "
                              "point; null = Python's automatic collection.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="Budgets that end the run cleanly.")
    report_to: list[str] = Field(
        default_factory=list, description="Experiment trackers to log to through accelerate: tensorboard (RUN_DIR/tensorboard), wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio; each needs its package (checked before the model loads: pip install 'ftune[tensorboard]', 'ftune[wandb]', 'ftune[mlflow]').")
    tensorboard: bool = Field(False, description="Same as adding tensorboard to report_to (kept for older configs).")

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, v):
        unknown = [n for n in v if n not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown tracker{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(TRACKERS)}")
        return list(dict.fromkeys(v))
    quality_gates: list[QualityGate] = Field(
        default_factory=list, description="Bounds on the final evaluation; a run that misses one is marked failed "
                                          "(run.json status, exit code 1) with its artifact still saved.")


class EvalConfig(Section):
    mode: Literal["score", "generate"] = Field("score", description="Classification: score each label's log-likelihood, or generate greedily and map to a label.")
    batch_size: int = Field(16, ge=1, description="Examples per forward pass in evaluation.")
    length_normalize: bool = Field(False, description="Score: divide each label's log-likelihood by its token count.")
    reject_label: str | None = Field(None, description="Out-of-scope label (e.g. other): adds in-scope and rejection metrics.")
    threshold: float | Literal["auto"] | None = Field(
        None, description="Predictions with probability below this become reject_label. auto = chosen on data.eval at the end "
                          "of training by threshold_objective, stored in RUN_DIR/calibration.json and applied by `ftune eval "
                          "RUN` (needs data.eval and reject_label); a number overrides it; null = no threshold.")
    threshold_objective: Literal["macro_f1", "in_scope_recall"] = Field(
        "macro_f1", description="What threshold: auto maximises on data.eval: macro_f1 (over all labels), or in_scope_recall "
                                "(share of in-scope examples given their label) with a false-accept rate of at most max_false_accept.")
    max_false_accept: float = Field(
        0.1, ge=0, le=1, description="threshold_objective: in_scope_recall: the largest share of out-of-scope (reject_label) "
                                     "examples that may be given an in-scope label.")
    temperature: float | Literal["auto"] | None = Field(
        None, description="Score mode: divide the label scores by T before the softmax over the label set (confidence, "
                          "threshold). auto = one T fitted on data.eval at the end of training (minimum NLL of the gold "
                          "labels; kept only if it does not raise ECE there), stored in RUN_DIR/calibration.json and applied by `ftune eval RUN`; null = T 1.")
    unknown_labels: Literal["error", "reject"] = Field(
        "error", description="`ftune eval` on rows whose gold label is outside the label set: error = stop, one message per unknown "
                             "label (its row count and first rows); reject = score them as reject_label (which it needs), "
                             "reporting how many rows of each unknown label were mapped.")
    max_new_tokens: int = Field(16, ge=1, description="Generate mode: tokens to generate per example.")
    max_examples: int | None = Field(None, ge=1, description="Evaluate only the first N examples (quick checks).")


    @field_validator("threshold")
    @classmethod
    def _probability(cls, v):
        if isinstance(v, float) and not 0 <= v <= 1:
            raise PydanticCustomError("probability", "input should be a probability between 0 and 1, auto or null")
        return v

    @field_validator("temperature")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, float) and not v > 0:
            raise PydanticCustomError("positive", "input should be greater than 0, auto or null")
        return v


class RunConfig(Section):
    recipe: str | None = Field(None, description="Method preset: a name in recipes/ (lora, full, …) or a path to a YAML file.")
    name: str = Field("run", description="Run name (letters, digits and _ . + = @ -); the output directory defaults to runs/<name>.")
    output_dir: str | None = Field(None, description="Where the run writes its files (default runs/<name>).")
    model: ModelConfig
    data: DataConfig
    method: SerializeAsAny[MethodConfig]
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # runs/<name> must stay inside runs/: no separators, no "..", nothing hidden
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]*", v) or ".." in v:
            raise ValueError("a run name is one plain folder name (letters, digits and _ . + = @ -, not starting with "
                             "'.', no '/' or '..'); to write somewhere else set output_dir")
        return v

    @property
    def run_dir(self) -> str:
        return self.output_dir or f"runs/{self.name}"
