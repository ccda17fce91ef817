"""The classification head (`model.head: classifier`): the causal LM's final hidden state at the last prompt
token feeds `score`, a Linear(hidden, n_labels) trained in fp32 with the method's adapters, loss cross-entropy
over the label set.

    logits = W_score · h_L[last prompt token]       p(label | prompt) = softmax(logits)
One forward per example at eval, whatever the number of labels (label scoring feeds every label's tokens).

The model is transformers' *ForSequenceClassification of the base (`ftune.models.load_model`), so the head is
named `score` as there: PEFT's SEQ_CLS adapters keep it in `modules_to_save` and `ftune merge` writes a
checkpoint `AutoModelForSequenceClassification` loads. ftune picks the last prompt token from the attention
mask (right padding), never from the pad token id, which may equal a real token of the prompt; transformers'
own forward picks the last token that is not the pad id: the same token for unpadded prompts.

Tokenized examples carry the class index as the last position's label (`encode_for_head`), every other
position IGNORE, so batching, target counts (one per example) and the loop's loss normalisation stay as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch

HEAD = "score"  # transformers' name for the *ForSequenceClassification head; PEFT's modules_to_save entry
IGNORE = -100


def has_head(model) -> bool:
    return isinstance(getattr(model, HEAD, None), torch.nn.Linear) and getattr(model.config, "num_labels", 0) > 0 \
        and "ForSequenceClassification" in type(model).__name__


def last_token_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, n_labels] fp32 logits from each row's last real token (right-padded rows)."""
    decoder = getattr(model, model.base_model_prefix)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.long().sum(-1) - 1
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
    head = getattr(model, HEAD)
    with torch.autocast(device_type=pooled.device.type, enabled=False):  # the head stays fp32 under autocast
        return head(pooled.to(head.weight.dtype)).float()


def class_targets(labels: torch.Tensor) -> torch.Tensor:
    """Each row's class index: its one label that is not IGNORE."""
    return labels.max(-1).values


class HeadOutput(dict):
    """What the training step reads: `.loss` (and `.logits`)."""

    __getattr__ = dict.get


def install_training_forward(model) -> None:
    """Make `model(input_ids, attention_mask, labels, num_items_in_batch)` the head's loss: the summed
    cross-entropy over the label set divided by num_items_in_batch (examples in the accumulated batch, all
    processes), as the loop normalises token losses. Set on the instance, like the kernels' forward."""
    def forward(input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **_):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = last_token_logits(model, input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits, class_targets(labels).to(logits.device), reduction="sum")
            loss = loss / (num_items_in_batch or labels.shape[0])
        return HeadOutput(loss=loss, logits=logits)

    model.forward = forward


def train_head(model) -> None:
    """The head trains with whatever the method trains (called after the method's prepare): fp32, gradients on."""
    getattr(model, HEAD).float().requires_grad_(True)


def head_tensors(model) -> dict[str, torch.Tensor]:
    return {f"{HEAD}.{k}": v.detach().float().cpu().contiguous() for k, v in getattr(model, HEAD).state_dict().items()}


def load_head(model, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy saved head weights into the model's head; a missing or misshapen one is one FtuneError."""
    from ftune.errors import FtuneError

    head = getattr(model, HEAD)
    want = {f"{HEAD}.{k}": tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        raise FtuneError(f"{where}: the classification head's weights {got or 'are missing'} do not fit this run's "
                         f"head {want} (another run, or another label set); train the run again")
    with torch.no_grad():
        head.load_state_dict({k.removeprefix(f"{HEAD}."): v for k, v in tensors.items()})
