"""`SVDQuarantineLinear`: a linear layer with trainable diagonal knobs in the top-r SVD basis of its own weight.

    a = x V_r                                   (r per token)
    h = a * scale                               (scale: the view's diagonal, below)
    y = x W^T + b + h U_r^T

The knobs are the columns of one (r, 1 + Q) parameter: column EFFECTIVE is the knob the model trains on (s, what
vanilla training would have), columns 1..Q are quarantine accumulators (q_j, one per router). The view picks the
diagonal: as trained, scale = s; deployed without quarantine j, scale = s - q_j. One parameter per module keeps the
optimizer, clipping and zeroing at one small tensor per module (their cost is per tensor, not per entry), and r is
its first dimension so that FSDP, which shards dim 0, keeps every column of an entry on one rank: the optimizer's
shared second moment (routing/optimizer.py) is then a local, elementwise computation.

The layer replaces the targeted `nn.Linear` at the same module path and reuses its `weight` and `bias` Parameter
objects, so the base weight keeps its Hugging Face name (`...q_proj.weight`) for checkpointing and weight sync.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

EFFECTIVE = 0  # column of SVDQuarantineLinear.knobs the model trains on; column j >= 1 is quarantine j
AS_TRAINED = 0  # the view of the effective knob alone

# (a, knobs, view) -> h. The routing capture installs one of these to see the knob gradients in the backward; None
# means the ordinary product.
KnobApplication = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def knob_scale(knobs: torch.Tensor, view: int) -> torch.Tensor:
    """The diagonal of the layer's update in the SVD basis for a view of (r, 1 + Q) knobs: the effective column as
    trained (view 0, no arithmetic: exactly what training used), or the effective column minus quarantine `view`."""
    if view == AS_TRAINED:
        return knobs[:, EFFECTIVE]
    return knobs[:, EFFECTIVE] - knobs[:, view]


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
    """An `nn.Linear` with frozen SVD bases and trainable diagonal knobs (the effective knob and Q quarantines).

    Parameters (all on this module, so FSDP shards them with the model):
      weight, bias: the base layer's own Parameter objects (not copies).
      basis_u (d_out x r), basis_v (d_in x r): top-r left/right singular vectors of the base weight at
        construction, `requires_grad=False`. Parameters rather than buffers so FSDP shards them.
      knobs (r, 1 + Q): column EFFECTIVE the effective knob, columns 1..Q the quarantines; zeros at construction,
        so the layer equals the base exactly in every view.

    State (plain attributes, set by `QuarantineAdapter`):
      view: AS_TRAINED (0), or j >= 1: deployed without quarantine j.
      adapter_enabled: False makes the forward exactly the base layer (the reference policy).
      knob_application: None, or a `KnobApplication` that replaces `a * knob_scale(knobs, view)`.

    On the meta device no SVD is done: the bases and knobs are correctly shaped empty meta tensors, to be filled by
    the state that verl broadcasts from rank 0 after sharding.
    """

    def __init__(self, base: nn.Linear, rank: int, n_quarantines: int = 1,
                 svd_device: Optional[torch.device] = None) -> None:
        nn.Module.__init__(self)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SVDQuarantineLinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(base, SVDQuarantineLinear):
            raise TypeError("this linear already carries quarantine knobs; inject once")
        d_out, d_in = base.weight.shape
        if not 0 < rank <= min(d_out, d_in):
            raise ValueError(f"rank={rank} must lie in [1, min(d_out, d_in)={min(d_out, d_in)}] for a {d_out}x{d_in} weight")
        if n_quarantines < 0:
            raise ValueError(f"n_quarantines={n_quarantines} must be >= 0")
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
        self.knobs = nn.Parameter(torch.zeros(rank, 1 + n_quarantines, device=device, dtype=knob_dtype_for(dtype)))
        self.view: int = AS_TRAINED
        self.adapter_enabled: bool = True
        self.knob_application: Optional[KnobApplication] = None
        if device.type != "meta":
            self.compute_basis(svd_device)

    @property
    def n_quarantines(self) -> int:
        return self.knobs.shape[1] - 1

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
            h = a * knob_scale(self.knobs, self.view).to(a.dtype)
        else:
            h = self.knob_application(a, self.knobs, self.view)
        return y + torch.matmul(h, self.basis_u.T)

    @torch.no_grad()
    def merged_weight(self, view: int) -> torch.Tensor:
        """W + U_r diag(knob_scale(knobs, view)) V_r^T as a new tensor in the weight's dtype (the layer is not changed).

        Under FSDP2 the parameters are DTensors: they are gathered here (a collective every rank must join in the
        same order)."""
        weight, u, v = full_tensor(self.weight), full_tensor(self.basis_u), full_tensor(self.basis_v)
        work = torch.promote_types(weight.dtype, torch.float32)
        scale = knob_scale(full_tensor(self.knobs).to(work), view)
        delta = (u.to(work) * scale) @ v.to(work).T
        return (weight.to(work) + delta).to(weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"rank={self.rank}, quarantines={self.n_quarantines}, view={self.view}, "
            f"adapter_enabled={self.adapter_enabled}"
        )


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (FSDP2 shard) is gathered, a plain tensor returned as is."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
