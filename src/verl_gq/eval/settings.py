"""The deploy evaluation's settings (no torch: `verl-gq deploy-eval --help` reads its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeploySettings:
    n_prompts: int = 64  # spread evenly over the modes of the evaluation file
    group: int = 16  # samples per prompt
    temperature: float = 0.7
    max_new_tokens: int = 1536
    randomise_names: bool = False  # draw the exploit names per prompt, as the original benchmark does
    seed: int = 0
    batch_size: int = 32
    device: str = "cpu"
