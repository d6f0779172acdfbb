"""The hack direction: from (clean, hack) completion pairs to per-module hack-ward directions in knob coordinates.

For pair p and module m, g^m_hack,p and g^m_clean,p are the knob-coordinate gradients of log p(completion | prompt)
(one stash-mode backward gives every completion's gradient). The pair difference D_p = g_hack,p - g_clean,p is
divided by its global norm over all modules, so every pair weighs the same and each module keeps its share of the
pair's difference. With one direction (k = 1), each module's is the top right singular vector of its (pairs x r)
matrix of normalised differences, oriented hack-ward (most pairs project positively), scaled by sigma / sqrt(n_pairs)
(the RMS share of the pair differences along it): the scale weighs modules in the joint cosine by how much of the
hack-vs-clean difference lives in them. With k > 1 directions, direction j is the j-th right singular vector of
all modules' differences side by side (one vector across modules), oriented and scaled the same way.

A direction is a plain dict {module_name: (k, r) tensor}: it saves with the adapter file as extra tensors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from verl_gq.adapter.model import QuarantineAdapter
from verl_gq.routing.capture import KnobGradientCapture, ModuleRows, Segments

Direction = dict[str, torch.Tensor]
TokenIds = Union[Sequence[int], torch.Tensor]
DIRECTION_PREFIX = "direction."


@dataclass(frozen=True)
class Pair:
    """One prompt with a clean and a hack completion, already tokenised (token ids; no tokenizer here)."""

    prompt_ids: TokenIds
    clean_ids: TokenIds
    hack_ids: TokenIds
    mode: str


@dataclass(frozen=True)
class PairGradients:
    """+grad log p(completion | prompt) in knob coordinates: {module: (n_pairs, r)} for hack and clean completions."""

    hack: dict[str, torch.Tensor]
    clean: dict[str, torch.Tensor]

    @property
    def n_pairs(self) -> int:
        return next(iter(self.hack.values())).shape[0]

    def subset(self, index: torch.Tensor) -> "PairGradients":
        return PairGradients(
            {m: g[index.to(g.device)] for m, g in self.hack.items()},
            {m: g[index.to(g.device)] for m, g in self.clean.items()},
        )


def completion_log_prob_gradients(
    model: nn.Module,
    adapter: QuarantineAdapter,
    sequences: Sequence[tuple[TokenIds, TokenIds]],
    micro_batch_size: int = 8,
    max_tokens: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """{module: (n_sequences, r)}: per (prompt, completion), +grad of sum_t log p(completion_t | prefix) wrt the
    knob scale, from one stash-mode backward per micro-batch.

    `model` is called Hugging Face style, `model(input_ids=, attention_mask=, use_cache=False, logits_to_keep=)`, on
    right-padded batches, and must return logits (or an object with `.logits`). The knobs' `.grad` are left as
    they are (with the adapter's `knob_gradient_totals`, FSDP1's case, they accumulate the summed gradient); the
    training step writes its routed gradients over them. The model's train/eval mode is left as is: dropout must be
    off for a reproducible direction (Qwen has none).

    Memory: sequences go into micro-batches in prompt-length order (a completion's rows stay near its pair's other
    completion), at most `micro_batch_size` sequences and, with `max_tokens`, at most that many padded tokens each
    (one longer sequence still goes alone). Only the positions from the shortest prompt on get logits
    (`logits_to_keep`), and only completion tokens are scored in float32: with a 152k vocabulary, the full
    float32 logits of 8 sequences of 3k tokens would take 15 GB.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size}: must be >= 1")
    device = adapter.knob_parameters()[0].device
    rows = [(_ids(p, "prompt"), _ids(c, "completion")) for p, c in sequences]
    if not rows:
        raise ValueError("no sequences to take gradients of")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    chunks: list[dict[str, torch.Tensor]] = []
    capture = KnobGradientCapture(adapter, mode="stash")
    with capture, torch.enable_grad():
        for batch_index in micro_batches([rows[i] for i in order], micro_batch_size, max_tokens):
            batch = [rows[order[i]] for i in batch_index]
            input_ids, attention_mask, scored = right_padded(batch)
            # logits for positions [first, length): the first predicts the shortest prompt's first completion token
            first = min(len(prompt) for prompt, _ in batch) - 1
            length = input_ids.shape[1]
            scored_rows, scored_columns = scored[:, first + 1 :].nonzero(as_tuple=True)  # host tensors: no sync
            targets = input_ids[:, first + 1 :][scored_rows, scored_columns].to(device)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            capture.set_segments(Segments.padded(*input_ids.shape, position_mask=attention_mask))
            output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           logits_to_keep=length - first)
            logits = output.logits if hasattr(output, "logits") else output
            logits = logits[:, -(length - first) : -1][scored_rows.to(device), scored_columns.to(device)]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            total_log_prob = -F.cross_entropy(logits, targets, reduction="sum")
            # the stash is the output. A full backward, not
            # autograd.grad: FSDP1 (use_orig_params) restores its parameters only in its post-backward hooks
            total_log_prob.backward()
            chunks.append(capture.per_example_gradients())
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.tensor(order)] = torch.arange(len(order))  # row of sequence i in the sorted concatenation
    return {name: torch.cat([chunk[name] for chunk in chunks])[restore.to(device)] for name in adapter.layers}


def micro_batches(rows, micro_batch_size: int, max_tokens: Optional[int]) -> list[list[int]]:
    """Consecutive index groups of `rows` with <= micro_batch_size rows and <= max_tokens padded tokens."""
    groups, current, longest = [], [], 0
    for index, (prompt, completion) in enumerate(rows):
        length = len(prompt) + len(completion)
        widest = max(longest, length)
        if current and (len(current) == micro_batch_size or (max_tokens and widest * (len(current) + 1) > max_tokens)):
            groups.append(current)
            current, widest = [], length
        current.append(index)
        longest = widest
    return groups + [current]


def pair_gradients(
    model: nn.Module,
    adapter: QuarantineAdapter,
    pairs: Sequence[Pair],
    micro_batch_size: int = 8,
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    max_tokens: Optional[int] = None,
) -> PairGradients:
    """Knob-coordinate gradients of log p(hack | prompt) and log p(clean | prompt) of every pair.

    gather: distributed hook. When the engine shards pairs over ranks, each rank passes its shard and a callable
    that takes this rank's (n_local, 2, sum_r) tensor and returns all ranks' (n_pairs, 2, sum_r) in global pair
    order (e.g. an all_gather + cat). Under FSDP every rank must run the same number of micro-batches (pad shards).
    """
    if not pairs:
        raise ValueError("no pairs: the direction needs at least one (clean, hack) pair")
    sequences = []
    for pair in pairs:
        sequences += [(pair.prompt_ids, pair.hack_ids), (pair.prompt_ids, pair.clean_ids)]
    grads = completion_log_prob_gradients(model, adapter, sequences, micro_batch_size, max_tokens)
    names = list(grads)
    ranks = [grads[name].shape[1] for name in names]
    flat = torch.cat([grads[name] for name in names], dim=1).reshape(len(pairs), 2, sum(ranks))
    if gather is not None:
        flat = gather(flat)
        if flat.dim() != 3 or flat.shape[1:] != (2, sum(ranks)):
            raise ValueError(f"gather returned shape {tuple(flat.shape)}, should be (n_pairs, 2, {sum(ranks)})")
    hack = dict(zip(names, flat[:, 0].split(ranks, dim=1)))
    clean = dict(zip(names, flat[:, 1].split(ranks, dim=1)))
    return PairGradients(hack, clean)


def extract_direction(pair_grads: PairGradients, k: int = 1) -> Direction:
    """The hack direction(s) {module: (k, r)} of the normalised pair differences (see module docstring).

    k = 1: per module, the top right singular vector of that module's differences, scaled by its sigma / sqrt(n).
    k > 1: direction j is ONE vector across all modules, the j-th right singular vector of the differences of all
    modules side by side (a joint SVD), scaled by its sigma_j / sqrt(n) and cut back into modules: direction j
    then means the same thing in every module (separate per-module SVDs would pair each module's j-th vector with
    the others' arbitrarily). Every direction is oriented hack-ward: most pairs project positively on it (ties: the
    sign of their sum)."""
    diffs = {m: pair_grads.hack[m] - pair_grads.clean[m] for m in pair_grads.hack}
    _check_finite(diffs, "pair gradients")
    norms = torch.stack([d.pow(2).sum(1) for d in diffs.values()]).sum(0).sqrt()
    zero = (norms == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"pairs {zero} have identical hack and clean gradients (identical completions?)")
    dtype = torch.promote_types(next(iter(diffs.values())).dtype, torch.float32)
    normalised = {m: d.double() / norms.double()[:, None] for m, d in diffs.items()}
    if k == 1:
        return {m: _hackward_singular_rows(d, 1, m).to(dtype) for m, d in normalised.items()}
    joint = ModuleRows.of(normalised)
    rows = _hackward_singular_rows(joint.rows, k, "all modules jointly")
    return {m: part.to(dtype) for m, part in zip(joint.modules, rows.split(joint.ranks, dim=1))}


def _hackward_singular_rows(normalised: torch.Tensor, k: int, what: str) -> torch.Tensor:
    """The top-k right singular vectors (k, columns) of a (pairs x columns) matrix, each oriented so that most rows
    project positively on it, scaled by sigma_j / sqrt(pairs)."""
    n, columns = normalised.shape
    if not 1 <= k <= min(n, columns):
        raise ValueError(f"k={k} directions need 1 <= k <= min(n_pairs={n}, rank={columns}) ({what})")
    _, singular, vh = torch.linalg.svd(normalised, full_matrices=False)
    rows = vh[:k]
    projections = normalised @ rows.T
    positive = (projections > 0).sum(0)
    negative = (projections < 0).sum(0)
    hackward = (positive > negative) | ((positive == negative) & (projections.sum(0) >= 0))
    sign = torch.where(hackward, 1.0, -1.0).to(rows.dtype)
    return rows * (sign * singular[:k] / n**0.5)[:, None]


def haar_direction(like: Mapping[str, torch.Tensor], seed: int) -> Direction:
    """Random control: per module, k Haar-random orthonormal rows in R^r with the same row norms as `like`.

    Reproducible from `seed` and the module names alone (a CPU generator per module, seeded from both), so the
    order of `like` does not matter."""
    direction: Direction = {}
    for name, rows in like.items():
        k, rank = rows.shape
        digest = hashlib.sha256(f"verl_gq.haar.{seed}.{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        gaussian = torch.randn(rank, k, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r))  # the sign fix makes QR of a Gaussian exactly Haar-distributed
        norms = rows.detach().double().cpu().norm(dim=1)
        direction[name] = (q.T * norms[:, None]).to(device=rows.device, dtype=rows.dtype)
    return direction


def direction_scores(grads: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(n,) joint cosine over all modules between each row of `grads` and the direction.

    cos_j(u) = sum_m <u^m, v^m_j> / (||u|| ||v_j||) with norms over all modules together; with k > 1 the score is
    max_j cos_j (aligned with any of the hack-ward directions; equal to cos_1 for k = 1). A zero gradient scores 0.
    """
    check_module_grads(grads, direction)
    names = list(direction)
    return flat_direction_scores(ModuleRows.of(grads, names).rows, ModuleRows.of(direction, names).rows)


def flat_direction_scores(grads: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """`direction_scores` on module-flattened rows: grads (n, R), direction (k, R) with the same column order."""
    dtype = torch.promote_types(grads.dtype, torch.float32)
    grads = grads.to(dtype)
    direction = direction.to(device=grads.device, dtype=dtype)
    dots = grads @ direction.T
    # vector_norm: no (n x R) temporary of squares (per token at r = full that is GBs)
    denominator = torch.linalg.vector_norm(grads, dim=1)[:, None] * torch.linalg.vector_norm(direction, dim=1)[None, :]
    cosines = torch.where(denominator > 0, dots / denominator.clamp_min(torch.finfo(dtype).tiny), 0.0)
    return cosines.max(dim=1).values


def check_module_grads(grads: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor]) -> None:
    """Gradients must be exactly {module: (n, r)} for the direction's modules (any order): no missing, no extra keys."""
    if set(grads) != set(direction):
        missing = [m for m in direction if m not in grads]
        extra = [m for m in grads if m not in direction]
        raise ValueError(
            f"gradients must have exactly the direction's modules (missing {missing[:3]}, extra {extra[:3]})"
        )
    n = None
    for name, grad in grads.items():
        rank = direction[name].shape[-1]
        if grad.dim() != 2 or grad.shape[1] != rank:
            raise ValueError(f"{name}: gradients have shape {tuple(grad.shape)}, should be (n, {rank})")
        if n is not None and grad.shape[0] != n:
            raise ValueError(f"{name}: {grad.shape[0]} rows, other modules have {n}")
        n = grad.shape[0]


def direction_state(direction: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors to save with the adapter file (`QuarantineAdapter.save(extra_tensors=...)`)."""
    return {DIRECTION_PREFIX + name: rows for name, rows in direction.items()}


def direction_from_state(
    tensors: Mapping[str, torch.Tensor], module_names: Optional[Sequence[str]] = None
) -> Direction:
    """The direction saved by `direction_state`. Files do not keep key order: pass the adapter's `module_names` to
    get adapter order back (and a check that every module is covered); without them the order is the file's."""
    direction = {key[len(DIRECTION_PREFIX) :]: v for key, v in tensors.items() if key.startswith(DIRECTION_PREFIX)}
    if not direction:
        raise ValueError(f"no '{DIRECTION_PREFIX}*' tensors in the state")
    if module_names is None:
        return direction
    if sorted(direction) != sorted(module_names):
        missing = sorted(set(module_names) - set(direction))
        extra = sorted(set(direction) - set(module_names))
        raise ValueError(f"saved direction does not cover the adapter's modules (missing {missing[:3]}, extra {extra[:3]})")
    return {name: direction[name] for name in module_names}


def _check_finite(grads: Mapping[str, torch.Tensor], what: str) -> None:
    bad = [name for name, g in grads.items() if not bool(torch.isfinite(g).all())]
    if bad:
        raise ValueError(f"{what} contain NaN/inf in modules {bad[:3]}: gradients should be finite")


def _ids(ids: TokenIds, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(ids)
    if tensor.dim() != 1 or tensor.numel() == 0 or tensor.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what} ids must be a non-empty 1-D sequence of ints, got {tuple(tensor.shape)} {tensor.dtype}")
    return tensor.long()


def right_padded(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """Host tensors: input_ids and attention_mask (B, L), and `scored` (B, L) bool: completion token positions."""
    length = max(len(p) + len(c) for p, c in batch)
    input_ids = torch.zeros(len(batch), length, dtype=torch.long)
    attention_mask = torch.zeros(len(batch), length, dtype=torch.long)
    scored = torch.zeros(len(batch), length, dtype=torch.bool)
    for row, (prompt, completion) in enumerate(batch):
        end = len(prompt) + len(completion)
        input_ids[row, :end] = torch.cat([prompt, completion])
        attention_mask[row, :end] = 1
        scored[row, len(prompt) : end] = True
    return input_ids, attention_mask, scored
