"""AdaLoRA's SVD-form linear layer: ΔW = P Λ Q, kept as r triplets (P_i, λ_i, Q_i) that can be masked.

Parameter names follow PEFT's (`lora_A` = Q (r×in), `lora_E` = Λ (r×1), `lora_B` = P (out×r)) and are plain
`nn.Parameter`s as in PEFT, so the saved keys are `<module>.lora_A` without a `.weight` suffix — exactly
PEFT's AdaLoRA file. The scale is lora_alpha / (ranknum + 1e-5) with ranknum = init_r, PEFT's formula
(the 1e-5 included, so an exported adapter gives PEFT's logits).
"""

from __future__ import annotations

import torch
from torch import nn

from ftune.layers.lora import AdapterLayer, adapter_input, dense_weight

TRIPLET = ("lora_A", "lora_E", "lora_B")  # Q, Λ, P in PEFT's names: the parameters of one layer
RANKNUM_EPS = 1e-5  # PEFT adds this to ranknum before dividing; kept so PEFT and ftune agree exactly


def adalora_scaling(lora_alpha: float, ranknum: int) -> float:
    """PEFT's effective scale of ΔW: lora_alpha / (ranknum + 1e-5)."""
    return lora_alpha / (ranknum + RANKNUM_EPS)


class AdaLoraLinear(AdapterLayer):
    """y = W x + b + s · P (Λ ⊙ Q) dropout(x), s = lora_alpha / init_r.

    Q and P start N(0, 0.02²) and Λ at zero (PEFT's init), so the output at init equals the base layer's.
    `rank_mask` (r booleans, not saved with the weights) says which triplets the budget keeps; the
    budget hook zeroes Λ where it is False. `r` may be smaller than `ranknum` when a pruned adapter
    is loaded: the scale stays that of the trained layer, as in PEFT.
    """

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, dropout: float = 0.0, ranknum: int | None = None):
        super().__init__()
        self.base_layer = base
        self.r, self.lora_alpha = r, lora_alpha
        self.ranknum = r if ranknum is None else ranknum
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        # fp32 adapters on any base (bf16, 4-bit): the importance scores |w·∇w| need the precision.
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=torch.float32))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, device=device, dtype=torch.float32))
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=device), persistent=False)

    @property
    def scaling(self) -> float:
        return adalora_scaling(self.lora_alpha, self.ranknum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        dropped = adapter_input(self.lora_dropout(x), self.lora_A.dtype)
        # Same association as PEFT: x (A⊙E)ᵀ Bᵀ, then · alpha / (ranknum + eps).
        lora = dropped @ (self.lora_A * self.lora_E).T @ self.lora_B.T
        return out + (lora * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s · P (Λ ⊙ Q) in fp32, shape (out, in)."""
        return self.scaling * (self.lora_B @ (self.lora_A * self.lora_E))

    def merged_weight(self) -> torch.Tensor:
        """The dense weight that makes a plain Linear equal to this layer (fp32; dequantizes a 4-bit base)."""
        return merge_adalora_weight(dense_weight(self.base_layer), self.lora_A, self.lora_E, self.lora_B, self.scaling)

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the singular values of the triplets the budget dropped."""
        self.lora_E.masked_fill_(~self.rank_mask.unsqueeze(1), 0.0)

    def kept(self) -> dict[str, torch.Tensor]:
        """The kept triplets only, in PEFT's saved layout (what `save_pretrained` writes after its resize)."""
        m = self.rank_mask
        return {"lora_A": self.lora_A[m], "lora_E": self.lora_E[m], "lora_B": self.lora_B[:, m]}


def merge_adalora_weight(weight: torch.Tensor, a: torch.Tensor, e: torch.Tensor, b: torch.Tensor,
                         scaling: float) -> torch.Tensor:
    """W + s · B (A ⊙ E), in fp32. Dropped triplets are either absent (saved file) or have E = 0."""
    return weight.float() + scaling * (b.float() @ (a.float() * e.float()))


def orthogonal_regularizer(layers) -> torch.Tensor:
    """PEFT's R(P, Q): the mean over all P and Q matrices of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F.

    PEFT (and so this) uses the plain Frobenius norm where the paper writes its square; kept as PEFT
    has it so orth_reg_weight means the same in both. Zero exactly when P has orthonormal columns and
    Q orthonormal rows. Matrices of one shape are stacked into one batched product: a 7B model has
    ~400 of them and one small matmul each is launch-bound (Qwen2.5-7B shapes, init_r 12, H100,
    forward + backward: 78 ms per call one by one, 11 ms batched).
    """
    groups: dict[tuple, list[torch.Tensor]] = {}
    for layer in layers:
        for m in (layer.lora_A, layer.lora_B.T):  # QQᵀ and (Pᵀ)(Pᵀ)ᵀ = PᵀP
            groups.setdefault((tuple(m.shape), m.device, m.dtype), []).append(m)
    if not groups:
        raise ValueError("orthogonal_regularizer: no AdaLoRA layers given")
    total, count, device = None, 0, next(iter(groups))[1]
    for (shape, _, _), mats in groups.items():
        stacked = torch.stack(mats)
        gram = stacked @ stacked.transpose(1, 2)
        eye = torch.eye(shape[0], device=gram.device, dtype=gram.dtype)
        part = torch.linalg.matrix_norm(gram - eye, ord="fro").sum().to(device)
        total = part if total is None else total + part
        count += len(mats)
    return total / count

