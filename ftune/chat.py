"""`ftune chat`: talk to a trained model, one line of stdin per turn, the reply streamed to stdout as it is generated.

The conversation goes through the tokenizer's chat template and keeps its history (oldest turns dropped when it
no longer fits the model's context); `/reset` clears it, `/exit` or end of input ends the chat. A model whose
tokenizer has no chat template can still be tried when its run was trained on alpaca rows: each line is then sent
alone through the run's prompt template (no history, as that template has one turn). Anything else without a chat
template is refused with a message, as there is no prompt format to guess.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch
from rich.console import Console

from ftune.config.loader import RESOLVED_NAME
from ftune.config.schema import ModelConfig
from ftune.data.formats import ALPACA_NO_INPUT
from ftune.data.tokenize import prompt_ids
from ftune.device import default_device
from ftune.errors import FtuneError
from ftune.eval.run import load_target_model, resolve_target
from ftune.models import load_model, load_tokenizer

COMMANDS = "/reset clears the history, /exit (or end of input) ends the chat"


def load_chat_target(target: str, overrides: list[str] = ()):
    """(model, tokenizer, run config or None): a run, a merged checkpoint or a config's base as `ftune eval` loads
    them; a bare model directory (no run config beside it) needs none, as chatting reads no data settings."""
    path = Path(target)
    if path.is_dir() and (path / "config.json").is_file() and not (path / RESOLVED_NAME).is_file():
        model_cfg = ModelConfig(path=str(path))
        model = load_model(model_cfg, default_device()).eval()
        return model, load_tokenizer(model_cfg), None
    cfg, kind, run_dir, _ = resolve_target(target, None, overrides)
    return load_target_model(cfg, kind, run_dir), load_tokenizer(cfg.model), cfg


class Chat:
    """One conversation: its history, and how a turn becomes prompt ids."""

    def __init__(self, tokenizer, cfg, system: str | None, context: int | None):
        self.tokenizer, self.context = tokenizer, context
        self.system = system if system is not None else (cfg.data.system_prompt if cfg is not None else None)
        self.template = None  # the run's one-turn prompt template, when the tokenizer has no chat template
        if not getattr(tokenizer, "chat_template", None):
            if cfg is None or cfg.data.format != "alpaca":
                what = f"a {cfg.data.format} run" if cfg is not None else "this model directory"
                raise FtuneError(f"the tokenizer has no chat template (tokenizer.chat_template is unset) and {what} has no "
                                 f"one-turn prompt template to use instead; chat with an instruct/chat model or a run "
                                 f"trained with data.format: chat or alpaca, or use `ftune predict MODEL --data FILE`")
            self.template = cfg.data.prompt_template or ALPACA_NO_INPUT
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def prompt(self, text: str, reserve: int) -> tuple[list[int], int]:
        """(prompt ids for the user's `text`, turns dropped from the history to fit `reserve` new tokens)."""
        if self.template is not None:
            return prompt_ids(self.tokenizer, self.template.format(instruction=text, input="")), 0
        dropped = 0
        while True:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history + \
                [{"role": "user", "content": text}]
            ids = self._render(messages)
            if self.context is None or len(ids) + reserve <= self.context or not self.history:
                return ids, dropped
            self.history = self.history[2:]  # the oldest user turn and its answer
            dropped += 1

    def _render(self, messages: list[dict]) -> list[int]:
        from jinja2 import TemplateError

        try:
            out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        except TemplateError as e:  # e.g. a template that takes no system message
            raise FtuneError(f"the tokenizer's chat template refused the conversation: {e}"
                             + ("; leave --system out" if self.system else "")) from None
        return list(out["input_ids"] if isinstance(out, dict) else out)

    def answered(self, text: str, reply: str) -> None:
        if self.template is None:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


@torch.no_grad()
def run_chat(target: str, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
             stdin: TextIO | None = None, console: Console | None = None, overrides: list[str] = ()) -> int:
    """Chat until /exit or end of input; returns the number of replies. Replies go to stdout, notes to `console`."""
    from transformers import TextStreamer

    stdin, console = stdin or sys.stdin, console or Console(stderr=True)
    model, tokenizer, cfg = load_chat_target(target, overrides)
    context = getattr(model.config, "max_position_embeddings", None)
    chat = Chat(tokenizer, cfg, system, context)
    if cfg is not None and cfg.data.format == "classification":
        console.print("note: this run was trained to classify; `ftune predict RUN --data FILE` gives its labels and scores")
    if chat.template is not None:
        console.print("no chat template: each line is sent alone through the run's prompt template (no history)")
    console.print(f"chatting with {target}; {COMMANDS}", markup=False, highlight=False)
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    interactive, replies = stdin.isatty(), 0
    while True:
        if interactive:
            console.print("[bold]>[/] ", end="")
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D, or the end of a piped file)
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            chat.reset()
            console.print("(history cleared)")
            continue
        if text.startswith("/"):
            console.print(f"unknown command {text.split()[0]!r}: {COMMANDS}", markup=False, highlight=False)
            continue
        ids, dropped = chat.prompt(text, max_new_tokens)
        if dropped:
            console.print(f"(the {dropped} oldest turn{'s' if dropped > 1 else ''} dropped to fit the model's context)")
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        x = torch.tensor([ids], device=device)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling)
        chat.answered(text, tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
        replies += 1
    return replies
