"""What an intervention does with a monitor's flags, on one rollout batch's outcome rewards (GRPO)."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
import torch

from verl_gq.monitor.config import MonitorSpec


def grpo_advantage(scores: torch.Tensor, index: Sequence, flags: Optional[np.ndarray] = None, *,
                   epsilon: float = 1e-6, norm_by_std: bool = True) -> torch.Tensor:
    """GRPO's outcome advantage of each sample (verl's compute_grpo_outcome_advantage: a group of one has mean 0 and
    std 1, the std is the unbiased one), computed over the unflagged samples only; a flagged sample gets 0 and adds
    nothing to its group's mean or std."""
    flags = np.zeros(len(scores), dtype=bool) if flags is None else np.asarray(flags, dtype=bool)
    if len(flags) != len(scores) or len(index) != len(scores):
        raise ValueError(f"{len(scores)} scores, {len(index)} group ids, {len(flags)} flags")
    groups: dict = defaultdict(list)
    for i, group in enumerate(index):
        if not flags[i]:
            groups[group].append(i)
    out = torch.zeros_like(scores)
    for members in groups.values():
        s = scores[members]
        mean, std = (s.new_tensor(0.0), s.new_tensor(1.0)) if len(members) == 1 else (s.mean(), s.std())
        out[members] = (s - mean) / (std + epsilon) if norm_by_std else s - mean
    return out


def monitored_advantage(spec: MonitorSpec, scores: torch.Tensor, index: Sequence, flags: np.ndarray, *,
                        epsilon: float = 1e-6, norm_by_std: bool = True) -> torch.Tensor:
    """penalty: GRPO on the reward minus `spec.penalty` where flagged; screening: GRPO over the unflagged samples,
    0 for the flagged ones."""
    flags = np.asarray(flags, dtype=bool)
    if spec.intervention == "penalty":
        penalised = scores - spec.penalty * torch.as_tensor(flags, dtype=scores.dtype, device=scores.device)
        return grpo_advantage(penalised, index, epsilon=epsilon, norm_by_std=norm_by_std)
    return grpo_advantage(scores, index, flags, epsilon=epsilon, norm_by_std=norm_by_std)
