"""Shared fixtures: a tiny random Qwen3 model folder built once per test session (no hub, ~1 s)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF folder (config, safetensors, tokenizer with chat template) of a 2-layer hidden-64 Qwen3 (tied
    embeddings, as the small Qwen3 models have)."""
    from verl_gq.models import build_qwen_model, tiny_corpus, train_tokenizer

    out = tmp_path_factory.mktemp("tiny_qwen3")
    tokenizer = train_tokenizer(tiny_corpus(), vocab_size=512)
    build_qwen_model(tokenizer, family="qwen3", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                     seed=0, out_dir=out)
    return out


@pytest.fixture(scope="session")
def checkout_pythonpath() -> str:
    """PYTHONPATH for a subprocess running a script of tests/: this checkout first. A script's sys.path starts at its
    own folder (tests/), not the working directory, so without it `import verl_gq` finds whatever checkout is
    installed editable in the environment (another git worktree, say) and the test would run that code."""
    source = Path(__file__).resolve().parent.parent / "src"
    return os.pathsep.join([str(source), *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices run faster on one thread, and CI boxes are small; restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def run_main_ppo():
    """Runs `python -m verl.trainer.main_ppo OVERRIDES` in its own process group and returns its output; fails the
    test on a non-zero exit or a timeout (then kills the group by pid: main_ppo's Ray cluster lives in it)."""

    def run(overrides: list[str], env: dict, cwd: Path, timeout: int) -> str:
        proc = subprocess.Popen([sys.executable, "-m", "verl.trainer.main_ppo", *overrides], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"main_ppo did not finish in {timeout}s:\n{out[-5000:]}")
        assert proc.returncode == 0, f"main_ppo failed:\n{out[-8000:]}"
        assert "verl-gq: the verl plugin failed" not in out, "the plugin must load in every process"
        return out

    return run
