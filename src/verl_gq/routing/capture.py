"""Per-example (and per-token) knob gradients from the ordinary backward pass, computed by autograd itself.

For a module with a_t = V_r^T x_t and b_t = dL/dh_t, the gradient of L with respect to the knob scale (the
effective knob, in the as-trained view training runs in) is sum_t a_t * b_t. The per-position term g_t = a_t * b_t is what flows through position t, and
an example's gradient is the sum of its positions' terms.

In stash mode each module multiplies position t by a per-example copy of the scale,
h_t = a_t * scale_rows[row(t)], where `scale_rows` is an (n_rows x r) autograd leaf holding the scale's value (detached
from the knobs) in every row: the forward is unchanged, and autograd's own backward of the gather (an index_add)
leaves sum_{t in row} a_t * b_t in `scale_rows.grad`, one row per example, in C++ with no Python per module in the
backward. A row is an example, or, per token, a stashed token position (its own row) and each example's other
positions (the example's remainder row). When every batch row of a padded micro-batch is one example whole
(`Segments.batch_rows`), the leaf is (n_examples x 1 x r) and multiplies by broadcasting: no gather, and the backward
is the same reduction vanilla's knob gradient is, per batch row. Gradient checkpointing re-runs the forward against
the same leaf, so nothing changes under it.

The knobs themselves stay out of this backward (the caller writes their routed gradients), which saves each module
autograd's total nodes. A wrapper whose backward hooks need every knob to receive a gradient (FSDP1: it restores
its parameters in post-backward hooks that fire only for flat parameters that get one) sets the adapter's
`knob_gradient_totals`: the leaf then holds zeros added to the live scale, and the knobs' `.grad` receive autograd's
totals (the effective column: dL/ds), for the caller to replace.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from verl_gq.adapter.layer import AS_TRAINED, EFFECTIVE, knob_scale
from verl_gq.adapter.model import QuarantineAdapter

CAPTURE_MODES = ("plain", "stash")


@dataclass(frozen=True)
class ModuleRows:
    """Per-module gradient rows side by side: `rows` (n, sum_m r_m), module m's r_m columns in `modules` order.

    The gate and the router work on this form, a few large kernels per micro-batch instead of a few per module."""

    rows: torch.Tensor
    modules: tuple[str, ...]
    ranks: tuple[int, ...]

    @classmethod
    def of(cls, per_module: Mapping[str, torch.Tensor], names: Optional[Sequence[str]] = None) -> "ModuleRows":
        """{module: (n, r_m)} -> side by side, in `names` order (default: the mapping's)."""
        names = tuple(per_module if names is None else names)
        tensors = [per_module[name] for name in names]
        return cls(torch.cat(tensors, dim=1), names, tuple(t.shape[1] for t in tensors))

    def per_module(self) -> dict[str, torch.Tensor]:
        """{module: (n, r_m)} column views."""
        return dict(zip(self.modules, self.rows.split(self.ranks, dim=1)))


@dataclass(frozen=True)
class Segments:
    """Which example each flattened position of a micro-batch belongs to.

    example_of_position: (n_positions,) long; values in [0, n_examples), or n_examples for a position that belongs
        to no example (padding); positions are the model input's leading dims flattened row-major.
    n_examples: number of examples (rollouts) in the micro-batch.
    token_positions: (n_tokens,) long flat positions whose per-token gradients are stashed (e.g. response tokens),
        or None for no per-token stash. Each must belong to an example.
    row_of_position: (n_positions,) the stash row each position's gradient lands in: token j of token_positions in
        row j, any other position of example i in row n_tokens + i, a position of no example in the last row
        (dropped). Derived from the above when not given.
    batch_rows: the positions are a padded (n_examples, seq) batch and every position of batch row i belongs to
        example i (no token stash): the stash broadcasts one scale row over each batch row instead of gathering.
    """

    example_of_position: torch.Tensor
    n_examples: int
    token_positions: Optional[torch.Tensor] = None
    row_of_position: Optional[torch.Tensor] = None
    batch_rows: bool = False

    def __post_init__(self) -> None:
        if self.row_of_position is None:
            rows = self.example_of_position
            if self.token_positions is not None:
                rows = rows + self.token_positions.shape[0]
                rows = rows.index_put((self.token_positions,), torch.arange(self.n_tokens, device=rows.device))
            object.__setattr__(self, "row_of_position", rows)

    @property
    def n_positions(self) -> int:
        return self.example_of_position.shape[0]

    @property
    def n_tokens(self) -> int:
        return 0 if self.token_positions is None else self.token_positions.shape[0]

    @property
    def n_rows(self) -> int:
        """Rows of each module's stash: stashed tokens, examples (their remainders, per token), and the no-example row."""
        return self.n_tokens + self.n_examples + 1

    @property
    def example_of_token(self) -> torch.Tensor:
        """(n_tokens,) the example of each stashed token."""
        if self.token_positions is None:
            raise ValueError("these segments stash no per-token gradients (token_mask was not given)")
        return self.example_of_position[self.token_positions]

    def to(self, device: torch.device) -> "Segments":
        """The same segments on `device` (built where the batch's offsets live, used where the activations are)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Segments(move(self.example_of_position), self.n_examples, move(self.token_positions),
                        move(self.row_of_position), self.batch_rows)

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
            positions are counted nowhere. Without it every position of row b counts to example b. The padding of a
            causal LM (masked out of the loss and attended by no real token) carries exactly zero gradient, so that
            changes no example's gradient, and with no token_mask either the stash needs no gather (`batch_rows`).
        token_mask (batch, seq): positions whose per-token gradients are stashed (e.g. the response mask).
        """
        masks = [m for m in (position_mask, token_mask) if m is not None]
        device = device or (masks[0].device if masks else None)
        rows = torch.arange(batch_size, device=device).repeat_interleave(seq_len)
        if not masks:
            return cls(rows, batch_size, batch_rows=True)
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
    def of_packed_responses(cls, cu_seqlens: torch.Tensor, prompt_lens: torch.Tensor, n_positions: int,
                            per_token: bool) -> "Segments":
        """Packed prompt+response sequences; with `per_token`, the positions that score response tokens are stashed.

        Response token j of sequence i is scored at the position before it (next-token logits): positions
        [cu_i + prompt_len_i - 1, cu_{i+1} - 1), as verl's no_padding_2_padding slices log-probs."""
        token_mask = None
        if per_token:
            cu = cu_seqlens.long()
            positions = torch.arange(n_positions, device=cu.device)
            sequence = torch.searchsorted(cu[1:], positions, right=True).clamp(max=cu.shape[0] - 2)
            starts = (cu[:-1] + prompt_lens.to(cu.device).long() - 1)[sequence]
            token_mask = (positions >= starts) & (positions < (cu[1:] - 1)[sequence])
        return cls.packed(cu_seqlens, n_positions, token_mask=token_mask)

    @classmethod
    def of_padded_responses(cls, seq_lens: torch.Tensor, prompt_lens: torch.Tensor, per_token: bool) -> "Segments":
        """A right-padded (batch, max seq_len) micro-batch of prompt+response rows; with `per_token`, the positions
        [prompt_len_i - 1, seq_len_i - 1) that score row i's response tokens are stashed. Without it each row's
        positions, padding included, go to its rollout: padding carries exactly zero gradient (out of the loss,
        attended by no real token), so the stash broadcasts over rows instead of gathering positions."""
        batch, width = seq_lens.shape[0], int(seq_lens.max().item())
        if not per_token:
            return cls.padded(batch, width)
        positions = torch.arange(width, device=seq_lens.device).unsqueeze(0)
        position_mask = positions < seq_lens.unsqueeze(1)
        token_mask = (positions >= (prompt_lens - 1).unsqueeze(1)) & (positions < (seq_lens - 1).unsqueeze(1))
        return cls.padded(batch, width, position_mask=position_mask, token_mask=token_mask)

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

    mode "plain": the vanilla path. Ordinary autograd; the knobs' `.grad` receive the whole gradient in the effective
        column and zeros in the quarantine columns. Nothing is stashed.
    mode "stash": after each backward, `example_rows()` holds the (n_examples, sum r) gradients dL/ds of each
        example, and with `Segments.token_positions` set, `token_rows()` the (n_tokens, sum r) per-position terms.
        Stashes are float32 at least (batch rows: each example's sum is reduced in the activations' dtype, as
        vanilla's knob gradient is) and accumulate over repeated backwards until the next `set_segments`. The
        knobs' `.grad` are left as they are, unless the adapter's `knob_gradient_totals` is set: then they receive
        autograd's own totals (effective column: dL/ds), for the caller to replace.

    Call `set_segments` before each micro-batch's forward; the segments active at a module's forward are the ones
    its backward uses (so a recomputed forward under checkpointing sees the same ones).
    """

    def __init__(self, adapter: QuarantineAdapter, mode: str = "stash") -> None:
        if mode not in CAPTURE_MODES:
            raise ValueError(f"capture mode {mode!r}: must be one of {CAPTURE_MODES}")
        self.adapter = adapter
        self.mode = mode
        self.segments: Optional[Segments] = None
        self._stash_dtype = torch.promote_types(adapter.knob_parameters()[0].dtype, torch.float32)
        self._scale_rows: dict[str, torch.Tensor] = {}  # module -> its leaf this micro-batch
        self._zero: Optional[torch.Tensor] = None  # the scalar the knob_gradient_totals leaves expand
        self._installed = False

    def set_segments(self, segments: Segments) -> None:
        """Segments of the next micro-batch; clears the stashes."""
        self.segments = segments
        self._scale_rows = {}

    def __enter__(self) -> "KnobGradientCapture":
        busy = [name for name, layer in self.adapter.layers.items() if layer.knob_application is not None]
        if busy:
            raise RuntimeError(f"another knob application is installed on {busy[:3]}; one capture at a time")
        apply = self._apply_plain if self.mode == "plain" else self._apply_stash
        for name, layer in self.adapter.layers.items():
            layer.knob_application = functools.partial(apply, name)
        self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.adapter.layers.values():
            layer.knob_application = None
        self._installed = False

    def stashed_rows(self) -> tuple[ModuleRows, Optional[ModuleRows]]:
        """(per-example rows (n_examples, sum r), per-token rows (n_tokens, sum r) or None) of the last micro-batch,
        checked complete, modules in adapter order. An example's row is the sum of its positions' terms, stashed
        tokens included."""
        stash = self._complete()
        segments = self.segments
        n_tokens, n_examples = segments.n_tokens, segments.n_examples
        names = tuple(stash)
        grads = [grad.view(-1, grad.shape[-1]) for grad in stash.values()]  # (n_rows, r); batch rows: (n, 1, r)
        ranks = tuple(grad.shape[1] for grad in grads)
        flat = torch.cat(grads, dim=1).to(self._stash_dtype)  # (n_rows, sum r): one copy, then views
        if segments.token_positions is None:
            return ModuleRows(flat[:n_examples], names, ranks), None
        tokens = flat[:n_tokens]
        # each example's remainder row plus its tokens (out of place: the token rows stay as they are)
        examples = flat[n_tokens : n_tokens + n_examples].index_add(0, segments.example_of_token, tokens)
        return ModuleRows(examples, names, ranks), ModuleRows(tokens, names, ranks)

    def per_example_gradients(self) -> dict[str, torch.Tensor]:
        """{module: (n_examples, r)} of the last micro-batch, in adapter order."""
        return self.stashed_rows()[0].per_module()

    def per_token_gradients(self) -> dict[str, torch.Tensor]:
        """{module: (n_tokens, r)} per-position gradients of the stashed tokens, in adapter order."""
        if self.segments is None or self.segments.token_positions is None:
            raise RuntimeError("no per-token stash: give Segments a token_mask")
        return self.stashed_rows()[1].per_module()

    def _complete(self) -> dict[str, torch.Tensor]:
        if self.mode != "stash":
            raise RuntimeError(f"capture mode {self.mode!r} stashes nothing; use mode='stash'")
        stash = {name: self._scale_rows[name].grad for name in self.adapter.layers if name in self._scale_rows}
        missing = [name for name in self.adapter.layers if stash.get(name) is None]
        if missing:
            raise RuntimeError(
                f"the stash lacks {len(missing)} modules (e.g. {missing[:3]}): run forward and backward of the "
                "micro-batch inside this capture after set_segments"
            )
        return stash

    def _apply_plain(self, name: str, a: torch.Tensor, knobs: torch.Tensor, view: int) -> torch.Tensor:
        # the effective column takes the whole gradient; the quarantines get exactly zero (they act only in a view)
        scale = knobs[:, EFFECTIVE]
        if view != AS_TRAINED:
            scale = scale - knobs[:, view].detach()
        return a * scale.to(a.dtype)

    def _apply_stash(self, name: str, a: torch.Tensor, knobs: torch.Tensor, view: int) -> torch.Tensor:
        scale_rows = self._scale_rows.get(name)
        if scale_rows is None:  # first forward of this module in this micro-batch (a recompute finds it)
            scale_rows = self._scale_rows[name] = self._new_scale_rows(name, a, knobs, view)
        if self.adapter.knob_gradient_totals:
            scale_rows = knob_scale(knobs, view) + scale_rows
        # in the stash dtype; in the activations' dtype like vanilla's scale. Batch rows: (n, 1, r) broadcast over
        # each row's positions; else (n_rows, r) gathered per position
        if self.segments.batch_rows:
            return a * scale_rows.to(a.dtype)  # already that dtype, unless knob_gradient_totals promoted it
        return a * scale_rows.index_select(0, self.segments.row_of_position).to(a.dtype).view(a.shape)

    def _new_scale_rows(self, name: str, a: torch.Tensor, knobs: torch.Tensor, view: int) -> torch.Tensor:
        segments = self.segments
        if segments is None:
            raise RuntimeError("stash capture needs set_segments(...) before the forward")
        if segments.example_of_position.device != a.device:
            raise ValueError(
                f"{name}: segments live on {segments.example_of_position.device}, activations on {a.device}; "
                "build Segments on the model's device"
            )
        positions = a.numel() // a.shape[-1]
        rows_fit = not segments.batch_rows or (a.dim() == 3 and a.shape[0] == segments.n_examples)
        if positions != segments.n_positions or not rows_fit:
            layout = f"{segments.n_examples} batch rows of " if segments.batch_rows else ""
            raise ValueError(
                f"{name}: the input has {positions} positions (shape {tuple(a.shape[:-1])}) but the segments "
                f"describe {layout}{segments.n_positions}; set_segments must describe this micro-batch"
            )
        # an expanded vector (scale) or scalar (zero): no memory, and autograd allocates the gradient (the stash) at
        # its full size. Batch rows hold the scale in the activations' dtype, as vanilla's product casts it: the
        # backward reduces each row in that dtype either way (stashed_rows casts up), and the forward needs no cast.
        if self.adapter.knob_gradient_totals:
            if self._zero is None or self._zero.device != a.device:
                self._zero = torch.zeros((), device=a.device, dtype=self._stash_dtype)
            value = self._zero
        else:
            dtype = a.dtype if segments.batch_rows else self._stash_dtype
            value = knob_scale(knobs.detach(), view).to(dtype)
        shape = (segments.n_examples, 1, a.shape[-1]) if segments.batch_rows else (segments.n_rows, a.shape[-1])
        return value.expand(shape).requires_grad_()


def _check_mask(what: str, mask: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, should be {tuple(shape)}")
