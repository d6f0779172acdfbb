"""Per-example (and per-token) knob gradients from the ordinary backward pass.

For a module with a_t = V_r^T x_t and b_t = dL/dh_t, the gradient of L with respect to the effective knob scale
(keep + c * quar) is sum_t a_t * b_t. The per-position term g_t = a_t * b_t is what flows through position t, and
an example's gradient is the sum of its positions' terms. A custom autograd Function on the knob product sees
a_t (saved in forward) and b_t (its grad-output) in the backward only, so gradient checkpointing, which re-runs
the forward, changes nothing. dL/dkeep = sum_t g_t and dL/dquar = c * dL/dkeep, so one stash serves both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from verl_gq.adapter.model import QuarantineAdapter

CAPTURE_MODES = ("plain", "stash")


@dataclass(frozen=True)
class Segments:
    """Which example each flattened position of a micro-batch belongs to.

    example_of_position: (n_positions,) long; values in [0, n_examples), or n_examples for a position that belongs
        to no example (padding); positions are the model input's leading dims flattened row-major.
    n_examples: number of examples (rollouts) in the micro-batch.
    token_positions: (n_tokens,) long flat positions whose per-token gradients are stashed (e.g. response tokens),
        or None for no per-token stash. Each must belong to an example.
    """

    example_of_position: torch.Tensor
    n_examples: int
    token_positions: Optional[torch.Tensor] = None

    @property
    def n_positions(self) -> int:
        return self.example_of_position.shape[0]

    @property
    def example_of_token(self) -> torch.Tensor:
        """(n_tokens,) the example of each stashed token."""
        if self.token_positions is None:
            raise ValueError("these segments stash no per-token gradients (token_mask was not given)")
        return self.example_of_position[self.token_positions]

    def to(self, device: torch.device) -> "Segments":
        """The same segments on `device` (built where the batch's offsets live, used where the activations are)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Segments(move(self.example_of_position), self.n_examples, move(self.token_positions))

    @classmethod
    def padded(
        cls,
        batch_size: int,
        seq_len: int,
        position_mask: Optional[torch.Tensor] = None,
        token_mask: Optional[torch.Tensor] = None,
        device: Optional[torch.device] = None,
    ) -> "Segments":
        """A padded (batch, seq) micro-batch: row b is example b.

        position_mask (batch, seq): positions that belong to their row's example (e.g. the attention mask); other
            positions are counted nowhere. Padding carries exactly zero gradient anyway, so this only matters for
            clarity and for models that let padding influence real tokens.
        token_mask (batch, seq): positions whose per-token gradients are stashed (e.g. the response mask).
        """
        masks = [m for m in (position_mask, token_mask) if m is not None]
        device = device or (masks[0].device if masks else None)
        rows = torch.arange(batch_size, device=device).repeat_interleave(seq_len)
        if position_mask is not None:
            _check_mask("position_mask", position_mask, (batch_size, seq_len))
            rows = torch.where(position_mask.reshape(-1).bool(), rows, batch_size)
        return cls._with_tokens(rows, batch_size, token_mask, (batch_size, seq_len))

    @classmethod
    def packed(cls, cu_seqlens: torch.Tensor, n_positions: int, token_mask: Optional[torch.Tensor] = None) -> "Segments":
        """Packed sequences (1, n_positions): example i spans positions [cu_seqlens[i], cu_seqlens[i+1]).

        Positions past cu_seqlens[-1] (padding to a multiple, as verl's remove-padding path may add) belong to no
        example. token_mask (n_positions,) or (1, n_positions) selects the per-token stash.
        """
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor [0, ..., total], got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
        cu = cu_seqlens.long()
        if cu[0].item() != 0 or bool((cu[1:] < cu[:-1]).any()) or cu[-1].item() > n_positions:
            raise ValueError(
                f"cu_seqlens must start at 0, be non-decreasing and end <= n_positions={n_positions}; got {cu.tolist()[:8]}..."
            )
        positions = torch.arange(n_positions, device=cu.device)
        example = torch.searchsorted(cu[1:], positions, right=True)
        if token_mask is not None and token_mask.dim() == 2 and token_mask.shape[0] == 1:
            token_mask = token_mask[0]
        return cls._with_tokens(example, cu.shape[0] - 1, token_mask, (n_positions,))

    @classmethod
    def _with_tokens(cls, example_of_position, n_examples, token_mask, shape) -> "Segments":
        if token_mask is None:
            return cls(example_of_position, n_examples, None)
        _check_mask("token_mask", token_mask, shape)
        token_positions = token_mask.reshape(-1).bool().nonzero().squeeze(1)
        if bool((example_of_position[token_positions] >= n_examples).any()):
            raise ValueError("token_mask selects positions that belong to no example (outside position_mask / cu_seqlens)")
        return cls(example_of_position, n_examples, token_positions)


class KnobGradientCapture:
    """Installs itself on every layer of an adapter for the duration of a `with` block.

    mode "plain": the vanilla path. Ordinary autograd; the keep knob's `.grad` receives the whole gradient and the
        quarantine knob none (its value still acts in the forward). Nothing is stashed.
    mode "stash": no knob `.grad` is written. After each backward, `per_example[module]` holds the (n_examples, r)
        gradients dL/dkeep of each example, and with `Segments.token_positions` set, `per_token[module]` the
        (n_tokens, r) per-position terms. Stashes are float32 at least and accumulate over repeated backwards
        until the next `set_segments`.

    Call `set_segments` before each micro-batch's forward; the segments active at a module's forward are the ones
    its backward uses (so a recomputed forward under checkpointing sees the same ones).
    """

    def __init__(self, adapter: QuarantineAdapter, mode: str = "stash") -> None:
        if mode not in CAPTURE_MODES:
            raise ValueError(f"capture mode {mode!r}: must be one of {CAPTURE_MODES}")
        self.adapter = adapter
        self.mode = mode
        self.segments: Optional[Segments] = None
        self.per_example: dict[str, torch.Tensor] = {}
        self.per_token: dict[str, torch.Tensor] = {}
        # the keep-knob tensors the forward actually multiplied by. Under FSDP2 these are the unsharded parameters,
        # distinct autograd leaves from the sharded ones, so a backward meant to reach the knob products must ask
        # for gradients with respect to these (see direction.completion_log_prob_gradients).
        self.knob_inputs: dict[int, torch.Tensor] = {}
        self._installed = False

    def set_segments(self, segments: Segments) -> None:
        """Segments of the next micro-batch; clears the stashes."""
        self.segments = segments
        self.per_example = {}
        self.per_token = {}
        self.knob_inputs = {}

    def __enter__(self) -> "KnobGradientCapture":
        busy = [name for name, layer in self.adapter.layers.items() if layer.knob_application is not None]
        if busy:
            raise RuntimeError(f"another knob application is installed on {busy[:3]}; one capture at a time")
        for name, layer in self.adapter.layers.items():
            layer.knob_application = functools.partial(self._apply, name)
        self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.adapter.layers.values():
            layer.knob_application = None
        self._installed = False

    def per_example_gradients(self) -> dict[str, torch.Tensor]:
        """The stash of the last micro-batch, checked complete: {module: (n_examples, r)} in adapter order."""
        return self._complete(self.per_example, "per_example")

    def per_token_gradients(self) -> dict[str, torch.Tensor]:
        """{module: (n_tokens, r)} per-position gradients of the stashed tokens, in adapter order."""
        if self.segments is None or self.segments.token_positions is None:
            raise RuntimeError("no per-token stash: give Segments a token_mask")
        return self._complete(self.per_token, "per_token")

    def _complete(self, stash: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        if self.mode != "stash":
            raise RuntimeError(f"capture mode {self.mode!r} stashes nothing; use mode='stash'")
        missing = [name for name in self.adapter.layers if name not in stash]
        if missing:
            raise RuntimeError(
                f"{what} stash lacks {len(missing)} modules (e.g. {missing[:3]}): run forward and backward of the "
                "micro-batch inside this capture after set_segments"
            )
        return {name: stash[name] for name in self.adapter.layers}

    def _apply(self, name: str, a: torch.Tensor, keep: torch.Tensor, quar: torch.Tensor, coefficient: float) -> torch.Tensor:
        if self.mode == "plain":
            return a * (keep + coefficient * quar.detach()).to(a.dtype)
        segments = self.segments
        if segments is None:
            raise RuntimeError("stash capture needs set_segments(...) before the forward")
        if segments.example_of_position.device != a.device:
            raise ValueError(
                f"{name}: segments live on {segments.example_of_position.device}, activations on {a.device}; "
                "build Segments on the model's device"
            )
        positions = a.numel() // a.shape[-1]
        if positions != segments.n_positions:
            raise ValueError(
                f"{name}: the input has {positions} positions (shape {tuple(a.shape[:-1])}) but the segments "
                f"describe {segments.n_positions}; set_segments must describe this micro-batch"
            )
        self.knob_inputs[id(keep)] = keep
        return _StashedKnobProduct.apply(a, keep, quar, coefficient, functools.partial(self._record, name, segments))

    def _record(self, name: str, segments: Segments, a: torch.Tensor, grad_h: torch.Tensor) -> None:
        rank = a.shape[-1]
        dtype = torch.promote_types(a.dtype, torch.float32)
        per_position = a.reshape(-1, rank).to(dtype) * grad_h.reshape(-1, rank)  # the mul promotes grad_h in-kernel
        # Row n_examples collects positions of no example and is dropped.
        sums = per_position.new_zeros(segments.n_examples + 1, rank)
        sums.index_add_(0, segments.example_of_position, per_position)
        _accumulate(self.per_example, name, sums[: segments.n_examples])
        if segments.token_positions is not None:
            _accumulate(self.per_token, name, per_position.index_select(0, segments.token_positions))


class _StashedKnobProduct(torch.autograd.Function):
    """h = a * (keep + c * quar); backward passes dL/da on and hands (a, dL/dh) to `record` instead of writing
    knob gradients. The knobs get zeros rather than None: FSDP1 (use_orig_params) runs its post-backward hook only
    for a flat parameter that receives a gradient, and without it the parameters stay in their forward state."""

    @staticmethod
    def forward(ctx, a, keep, quar, coefficient, record):
        scale = (keep + coefficient * quar).to(a.dtype)
        ctx.save_for_backward(a, scale)
        ctx.record = record
        ctx.knob_like = [(k.shape, k.dtype, k.device) for k in (keep, quar)]  # not the tensors: FSDP frees them
        return a * scale

    @staticmethod
    def backward(ctx, grad_h):
        a, scale = ctx.saved_tensors
        ctx.record(a, grad_h)
        zero_keep, zero_quar = (torch.zeros(shape, dtype=dtype, device=device) if needed else None
                                for (shape, dtype, device), needed in zip(ctx.knob_like, ctx.needs_input_grad[1:3]))
        return grad_h * scale, zero_keep, zero_quar, None, None


def _accumulate(stash: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    stash[name] = value if name not in stash else stash[name] + value


def _check_mask(what: str, mask: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, should be {tuple(shape)}")

