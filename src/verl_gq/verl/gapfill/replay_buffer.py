"""A replay buffer for verl's V1 sync trainer that notices finished rollouts within 0.1 s instead of 2 s.

verl 0.9.1's `ReplayBuffer.sample` sleeps `poll_interval` (2.0 s, not configurable:
verl/trainer/ppo/v1/replay_buffer.py:144 and :409) between checks for finished trajectories, so every
step's `timing_s/gen` is rounded up to a multiple of 2 s. That hides the rollout's real cost on small models.
Select it with

    trainer.v1.sampler.custom_sampler.path=pkg://verl_gq.verl.gapfill.replay_buffer
    trainer.v1.sampler.custom_sampler.name=FastPollReplayBuffer

Custom samplers receive only the base constructor arguments (verl/trainer/ppo/v1/trainer_base.py:155-163), so
DAPO group filtering (`algorithm.filter_groups`) is off with it; vanilla GRPO does not use it.
"""

from __future__ import annotations

from typing import Any

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

FAST_POLL_INTERVAL_S = 0.1


class FastPollReplayBuffer(ReplayBuffer):
    """verl's sync `ReplayBuffer` with a 0.1 s poll interval."""

    def __init__(self, *args: Any, poll_interval: float = FAST_POLL_INTERVAL_S, **kwargs: Any):
        super().__init__(*args, poll_interval=poll_interval, **kwargs)
