"""route2b inside verl's actor update: pairs -> direction and band; stashed gradients -> gate -> routed gradients.

The engine owns the model and verl's micro-batch loop; this controller owns route2b's state (pair token ids, the
hack direction, the band, the optimizer-step counter) and the per-mini-batch bookkeeping. From a micro-batch it
reads only what the capture stashed, the knob gradients of the policy loss: never rewards, labels or the batch's
extra fields (no-cheat invariant; tests/test_engine_route2b.py permutes them and checks nothing moves).

Schedule: the direction (and, for band_mode=calibrated, the band) is extracted before the first optimizer step and
again every `gq.refresh` optimizer steps on the same pair texts with the current weights (refresh=0: frozen).
Every rank extracts from all pairs with identical weights, so every rank holds the same direction and band.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from verl_gq.adapter.model import QuarantineAdapter
from verl_gq.resolvers import PKG_PREFIX, package_path
from verl_gq.routing import (
    Band,
    GradientRouter,
    KnobGradientCapture,
    Pair,
    direction_from_state,
    direction_state,
    frout_matched_band,
    gate,
)
from verl_gq.routing.band import fit_direction_and_band
from verl_gq.routing.gate import LiveBand
from verl_gq.verl.config import GQConfig

logger = logging.getLogger(__name__)
PAIR_MICRO_BATCH = 8
# padded tokens per pair micro-batch: bounds the refresh's activations (no gradient checkpointing assumed)
PAIR_MICRO_BATCH_TOKENS = 8192


def resolve_pair_file(path: str) -> Path:
    """A pair file path, or `pkg://<package>/<file>` for a file shipped inside an installed package."""
    if path.startswith(PKG_PREFIX):
        resolved = package_path(path)
    else:
        resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"gq.pair_file={path!r}: no such file ({resolved})")
    return resolved


def load_pairs(path: str, modes: list[str]) -> list:
    """The pairs of a pair file (reward.pairs jsonl) whose mode is in `modes` (all when empty)."""
    from reward.pairs import read_pairs

    pairs = [p for p in read_pairs(resolve_pair_file(path)) if not modes or p.mode in modes]
    if len(pairs) < 4:
        raise ValueError(
            f"gq.pair_file={path!r} has {len(pairs)} pairs for modes {modes or 'all'}; route2b needs at least 4 "
            "(two calibration folds of two)"
        )
    return pairs


def tokenize_pairs(pairs: list, tokenizer, max_tokens: int) -> list[Pair]:
    """Token ids as verl builds them: the chat template with the generation prompt, then the completion and EOS."""
    eos = tokenizer.eos_token_id
    out = []
    for pair in pairs:
        prompt = tokenizer.apply_chat_template(list(pair.prompt), add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        clean = tokenizer(pair.clean, add_special_tokens=False)["input_ids"] + [eos]
        hack = tokenizer(pair.hack, add_special_tokens=False)["input_ids"] + [eos]
        longest = len(prompt_ids) + max(len(clean), len(hack))
        if longest > max_tokens:
            raise ValueError(
                f"pair {pair.pair_id}: {longest} tokens exceed gq.max_pair_tokens={max_tokens}; raise the limit or drop "
                "the pair (pairs are never cut silently)"
            )
        out.append(Pair(prompt_ids=prompt_ids, clean_ids=clean, hack_ids=hack, mode=pair.mode))
    return out


class Route2bController:
    """route2b's state and per-mini-batch steps, driven by the gq engine.

    run_model: calls the (FSDP) model HF-style, `run_model(input_ids=, attention_mask=, use_cache=False)`, under
        the engine's autocast; used for the pair gradients.
    all_reduce: SUM over data-parallel ranks of one flat tensor (in place or returned).
    dp_size: the routed gradients are divided by it, as FSDP averages gradients over ranks.
    """

    def __init__(self, gq: GQConfig, adapter: QuarantineAdapter, run_model: Callable, tokenizer,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor], dp_size: int) -> None:
        self.gq = gq
        self.adapter = adapter
        self.run_model = run_model
        self.all_reduce = all_reduce
        self.dp_size = dp_size
        self.pairs = tokenize_pairs(load_pairs(gq.pair_file, list(gq.direction_modes)), tokenizer, gq.max_pair_tokens)
        self.router = GradientRouter(adapter.module_names)
        self.direction: Optional[dict[str, torch.Tensor]] = None
        self.band: Optional[Band] = None
        self.optimizer_steps = 0
        self._stashed = False
        self._refresh_metrics: dict[str, float] = {}

    # --- direction and band ------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-extract the direction (and calibrate the band) from the pairs with the current weights."""
        started = time.perf_counter()
        self.direction, calibration = fit_direction_and_band(
            self.run_model, self.adapter, self.pairs, n_folds=self.gq.calibration_folds, seed=self.gq.seed,
            k=self.gq.direction_rank, clean_quantile=self.gq.clean_quantile, hack_quantile=self.gq.hack_quantile,
            haar_seed=self.gq.seed if self.gq.direction_source == "haar" else None, micro_batch_size=PAIR_MICRO_BATCH,
            max_tokens=PAIR_MICRO_BATCH_TOKENS,
        )
        self.band = calibration.band
        self._refresh_metrics = {
            "refresh": 1.0,
            "refresh_seconds": time.perf_counter() - started,
            "calibrated_band_lower": self.band.lower,
            "calibrated_band_upper": self.band.upper,
            "calibrated_band_width": self.band.width,
            "pair_hack_score_mean": float(calibration.hack_scores.mean()),
            "pair_clean_score_mean": float(calibration.clean_scores.mean()),
        }
        logger.info("gq: direction refreshed at optimizer step %d, band [%.4f, %.4f]",
                    self.optimizer_steps, self.band.lower, self.band.upper)

    def _refresh_due(self) -> bool:
        if self.direction is None:
            return True
        return self.gq.refresh > 0 and self.optimizer_steps % self.gq.refresh == 0

    # --- one optimizer step (a verl mini-batch) ----------------------------------------------------------------

    def begin_mini_batch(self) -> None:
        self._refresh_metrics = {}
        if self._refresh_due():
            self.refresh()
        self._stashed = False

    def mark_stashed(self) -> None:
        self._stashed = True

    def route_stashed(self, capture: KnobGradientCapture) -> None:
        """Gate the micro-batch whose backward just filled `capture` and add it to the router."""
        if not self._stashed:
            return
        example_rows, token_rows = capture.stashed_rows()
        rollout_gate = gate(example_rows, self.direction, self._band())
        if self.gq.granularity == "token":
            token_gate = gate(token_rows, self.direction, self._band())
            self.router.add_tokens(rollout_gate, token_gate, capture.segments.example_of_token)
        else:
            self.router.add(rollout_gate)
        self._stashed = False

    def _band(self) -> Union[Band, LiveBand]:
        if self.gq.band_mode != "frout_match":
            return self.band
        target = self.gq.frout_target

        def live_band(scores: torch.Tensor, masses: torch.Tensor) -> Band:
            # placed so this batch routes frout_target of its gradient mass; width = the spread of the live scores
            # (a random direction has no calibrated width to borrow)
            width = float(scores.double().std()) if scores.numel() > 1 else 0.0
            if not math.isfinite(width):
                raise ValueError("policy-loss gradients contain NaN/inf (frout_match scores): the loss should be finite")
            return frout_matched_band(scores, masses, target, max(width, 1e-6))

        return live_band

    def end_mini_batch(self, capture: KnobGradientCapture, write_grads: Callable) -> dict[str, float]:
        """Route the last micro-batch, all-reduce, write the knobs' gradients (`write_grads(knobs, full_grads)`, all
        of them in one call); return `gq/` metrics."""
        self.route_stashed(capture)
        routed = self.router.finish(reduce=self.all_reduce, grad_scale=1.0 / self.dp_size)
        write_grads(self.adapter.knob_parameters(), list(routed.knob_grads.values()))
        self.optimizer_steps += 1
        metrics = {**routed.metrics, **self._refresh_metrics, "optimizer_steps": float(self.optimizer_steps)}
        return {f"gq/{k}": float(v) for k, v in metrics.items()}

    # --- state -------------------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"optimizer_steps": torch.tensor([self.optimizer_steps], dtype=torch.int64)}
        if self.direction is not None:
            tensors.update(direction_state(self.direction))
            tensors.update(self.band.state())
        return tensors

    def save_state(self, path: str) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}, path)

    def load_state(self, path: str) -> None:
        tensors = load_file(path)
        self.optimizer_steps = int(tensors["optimizer_steps"].item())
        if "band" in tensors:
            device = self.adapter.knob_parameters()[0].device
            restored = direction_from_state(tensors, self.adapter.module_names)  # files sort keys: adapter order
            self.direction = {m: v.to(device) for m, v in restored.items()}
            self.band = Band.from_state(tensors)
        logger.info("gq: restored optimizer step %d, band %s from %s", self.optimizer_steps, self.band, path)
