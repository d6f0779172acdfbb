"""`SVDQuarantineLinear`: a linear layer with two diagonal knobs in the top-r SVD basis of its own weight.

    a = x V_r                                   (r per token)
    h = a * (keep + c * quarantine)             (c: quarantine coefficient, 1 in training, 0 deployed)
    y = x W^T + b + h U_r^T

The two knobs are the rows of one (2, r) parameter, `knobs[KEEP]` and `knobs[QUARANTINE]`: the optimizer, gradient
clipping and zeroing then see one small tensor per module instead of two (their cost is per tensor, not per entry).

The layer replaces the targeted `nn.Linear` at the same module path and reuses its `weight` and `bias` Parameter
objects, so the base weight keeps its Hugging Face name (`...q_proj.weight`) for checkpointing and weight sync.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

KEEP, QUARANTINE = 0, 1  # rows of SVDQuarantineLinear.knobs

# (a, knobs, quarantine_coefficient) -> h. The routing capture installs one of these to see the knob gradients in the
# backward; None means the ordinary product.
KnobApplication = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def knob_scale(knobs: torch.Tensor, quarantine_coefficient: float) -> torch.Tensor:
    """keep + c * quarantine of (2, r) knobs: the diagonal of the layer's update in the SVD basis."""
    keep, quarantine = knobs.unbind(0)
    return torch.add(keep, quarantine, alpha=quarantine_coefficient)


def knob_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """Knobs are stored in at least float32.

    Why: the knobs start at 0 and receive small additive optimizer updates; in bfloat16 (spacing 2^-7 near 1) most
    of those updates would round away. FSDP2 only requires the *trainable* parameters of a group to share a dtype,
    and with a frozen base those are exactly the knobs. Under a mixed-precision policy they are cast to the compute
    dtype like every other parameter; outside one, the forward casts the knob scale to the activation dtype.
    """
    return torch.promote_types(weight_dtype, torch.float32)


def svd_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """The SVD runs in float64 for float64 weights, else float32: the bases are stored in the weight's dtype, so
    precision beyond float32 would be rounded away for bf16/fp32 weights (and float64 SVD is slow on big ones)."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


class SVDQuarantineLinear(nn.Linear):
    """An `nn.Linear` with frozen SVD bases and two trainable diagonal knobs (kept and quarantine).

    Parameters (all on this module, so FSDP shards them with the model):
      weight, bias: the base layer's own Parameter objects (not copies).
      basis_u (d_out x r), basis_v (d_in x r): top-r left/right singular vectors of the base weight at
        construction, `requires_grad=False`. Parameters rather than buffers so FSDP shards them.
      knobs (2, r): row KEEP the kept knob, row QUARANTINE the quarantine knob; zeros at construction, so the layer
        equals the base exactly.

    State (plain attributes, set by `QuarantineAdapter`):
      quarantine_coefficient: c in the forward.
      adapter_enabled: False makes the forward exactly the base layer (the reference policy).
      knob_application: None, or a `KnobApplication` that replaces `a * (keep + c * quar)`.

    On the meta device no SVD is done: the bases and knobs are correctly shaped empty meta tensors, to be filled by
    the state that verl broadcasts from rank 0 after sharding.
    """

    def __init__(self, base: nn.Linear, rank: int, svd_device: Optional[torch.device] = None) -> None:
        nn.Module.__init__(self)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SVDQuarantineLinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(base, SVDQuarantineLinear):
            raise TypeError("this linear already carries quarantine knobs; inject once")
        d_out, d_in = base.weight.shape
        if not 0 < rank <= min(d_out, d_in):
            raise ValueError(f"rank={rank} must lie in [1, min(d_out, d_in)={min(d_out, d_in)}] for a {d_out}x{d_in} weight")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        if base.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = base.bias
        self.rank = rank
        device, dtype = base.weight.device, base.weight.dtype
        self.basis_u = nn.Parameter(torch.empty(d_out, rank, device=device, dtype=dtype), requires_grad=False)
        self.basis_v = nn.Parameter(torch.empty(d_in, rank, device=device, dtype=dtype), requires_grad=False)
        knob_dtype = knob_dtype_for(dtype)
        self.knobs = nn.Parameter(torch.zeros(2, rank, device=device, dtype=knob_dtype))
        self.quarantine_coefficient: float = 1.0
        self.adapter_enabled: bool = True
        self.knob_application: Optional[KnobApplication] = None
        if device.type != "meta":
            self.compute_basis(svd_device)

    @torch.no_grad()
    def compute_basis(self, svd_device: Optional[torch.device] = None) -> None:
        """Set basis_u, basis_v to the top-r singular vectors of the current base weight."""
        weight = self.weight.detach()
        if weight.device.type == "meta":
            raise RuntimeError("cannot take the SVD of a meta weight; materialise the weight first")
        work = weight.to(device=svd_device or weight.device, dtype=svd_dtype_for(weight.dtype))
        u, _, vh = torch.linalg.svd(work, full_matrices=False)
        self.basis_u.copy_(u[:, : self.rank].to(self.basis_u.device))
        self.basis_v.copy_(vh[: self.rank].T.to(self.basis_v.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return y
        a = torch.matmul(x, self.basis_v)
        if self.knob_application is None:
            h = a * knob_scale(self.knobs, self.quarantine_coefficient).to(a.dtype)
        else:
            h = self.knob_application(a, self.knobs, self.quarantine_coefficient)
        return y + torch.matmul(h, self.basis_u.T)

    @torch.no_grad()
    def merged_weight(self, quarantine_coefficient: float) -> torch.Tensor:
        """W + U_r diag(keep + c * quar) V_r^T as a new tensor in the weight's dtype (the layer is not changed).

        Under FSDP2 the parameters are DTensors: they are gathered here (a collective every rank must join in the
        same order)."""
        weight, u, v = full_tensor(self.weight), full_tensor(self.basis_u), full_tensor(self.basis_v)
        scale = knob_scale(full_tensor(self.knobs), quarantine_coefficient)
        work = torch.promote_types(weight.dtype, torch.float32)
        delta = (u.to(work) * scale.to(work)) @ v.to(work).T
        return (weight.to(work) + delta).to(weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"rank={self.rank}, quarantine_coefficient={self.quarantine_coefficient}, "
            f"adapter_enabled={self.adapter_enabled}"
        )


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (FSDP2 shard) is gathered, a plain tensor returned as is."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
