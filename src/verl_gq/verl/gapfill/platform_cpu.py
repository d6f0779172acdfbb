"""A `cpu` platform for verl 0.9.1, selected with verl's own switch `VERL_PLATFORM=cpu`.

verl 0.9.1 has no CPU platform: detection falls back to "nvidia" (verl/plugin/platform/platform_manager.py:83-117),
so training would ask for NCCL and torch.cuda. This module supplies what is missing, each piece a workaround for a
named place in verl:

- `PlatformCPU` (registered as "cpu" by verl_gq/verl/plugin.py): device "cpu", gloo backend, a device module with the torch.cuda-like calls
  verl makes (memory_reserved at verl/utils/memory_utils.py:47, get_device_name at verl/utils/flops_counter.py:85),
  and `current_device() == "cpu"`: verl does `model.to(device=get_device_id())` (verl/utils/fsdp_utils.py:507), and
  the int 0 that CUDA platforms return means "accelerator 0" to torch.
- `register_cpu_engines()`: verl registers its FSDP engines for devices cuda and npu only
  (verl/workers/engine/fsdp/transformer_impl.py:1143 and :1594); without a "cpu" entry EngineRegistry.new raises
  "No engine registered for device='cpu'" (verl/workers/engine/base.py:427).
- `install_gloo_backend_fix()`: verl builds the process-group backend `f"cpu:gloo,{device}:{backend}"`
  (verl/utils/distributed.py:63 and :89), which on this platform reads "cpu:gloo,cpu:gloo" and torch rejects
  ("Duplicate device type cpu"). The fix rewrites exactly that string to "gloo"; it is installed only when
  VERL_PLATFORM=cpu.

Ray: verl's resource pools always ask Ray for "GPU" bundles (verl/single_controller/ray/base.py:144-149, and the
check at :228-240 reads the "GPU" key), so a CPU run declares one logical GPU to Ray
(`+ray_kwargs.ray_init.num_gpus=1`, set by recipes/smoke_cpu.yaml). That is a scheduling token, not hardware.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
import torch.distributed

from verl.plugin.platform.platform_base import PlatformBase

PLATFORM_NAME = "cpu"
_DUPLICATE_GLOO_BACKEND = "cpu:gloo,cpu:gloo"


def cpu_platform_selected() -> bool:
    """True when the user chose this platform through verl's switch (VERL_PLATFORM=cpu)."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME


def _returns(value: Any) -> Callable[..., Any]:
    return lambda *args, **kwargs: value


class CPUDeviceModule:
    """The torch.cuda-shaped module verl calls through `get_torch_device()`, answered for a CPU.

    Attributes torch.cpu has (synchronize, current_stream, Stream, ...) come from torch.cpu; the memory
    statistics verl logs are reported as 0 (verl only prints them); everything else raises AttributeError,
    so a new verl call into an unknown API fails loudly instead of returning a made-up value.
    """

    _ANSWERS: dict[str, Callable[..., Any]] = {
        "current_device": _returns("cpu"),
        "device_count": _returns(1),
        "is_available": _returns(True),
        "is_initialized": _returns(True),
        "get_device_name": _returns("CPU"),
        "mem_get_info": _returns((0, 0)),
        "memory_allocated": _returns(0),
        "memory_reserved": _returns(0),
        "max_memory_allocated": _returns(0),
        "max_memory_reserved": _returns(0),
        "memory_stats": _returns({}),
        "reset_peak_memory_stats": _returns(None),
        "reset_max_memory_allocated": _returns(None),
        "empty_cache": _returns(None),
        "set_device": _returns(None),
        "manual_seed": torch.manual_seed,
        "manual_seed_all": torch.manual_seed,
        "get_rng_state": torch.get_rng_state,
        "set_rng_state": torch.set_rng_state,
        "ipc_collect": _returns(None),
    }

    def __getattr__(self, name: str) -> Any:
        if name in self._ANSWERS:
            return self._ANSWERS[name]
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        raise AttributeError(f"verl-gq's CPU device module has no {name!r} (torch.cpu lacks it too)")


class PlatformCPU(PlatformBase):
    """verl platform for machines without an accelerator: device "cpu", gloo collectives, one logical device."""

    _device_module = CPUDeviceModule()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> Any:
        return self._device_module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: a GPU box must not silently train on CPU. Only VERL_PLATFORM=cpu selects it.
        return False

    def current_device(self) -> str:  # type: ignore[override]
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: Optional[int] = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        # verl's resource-pool check reads Ray's "GPU" key (single_controller/ray/base.py:228-240): schedule
        # workers on the logical GPU the recipe declares to ray.init.
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def register_cpu_engines() -> None:
    """Register verl's own FSDP engines (LM head and value head) for device "cpu"."""
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    from verl_gq.verl.internals import engine_table

    for model_type, engine_cls in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        registered = engine_table().get(model_type, {})
        if all(PLATFORM_NAME in registered.get(backend, {}) for backend in ("fsdp", "fsdp2")):
            continue  # already done in this process (the module is imported once, but stay idempotent)
        EngineRegistry.register(model_type=model_type, backend=["fsdp", "fsdp2"], device=PLATFORM_NAME)(engine_cls)


def install_gloo_backend_fix() -> None:
    """Make torch.distributed.init_process_group accept verl's "cpu:gloo,cpu:gloo" as plain "gloo"."""
    original = torch.distributed.init_process_group
    if getattr(original, "_verl_gq_gloo_fix", False):
        return

    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        backend = kwargs.get("backend", args[0] if args else None)
        if isinstance(backend, str) and backend.replace(" ", "") == _DUPLICATE_GLOO_BACKEND:
            if args:
                args = ("gloo",) + tuple(args[1:])
            else:
                kwargs["backend"] = "gloo"
        return original(*args, **kwargs)

    init_process_group._verl_gq_gloo_fix = True  # type: ignore[attr-defined]
    torch.distributed.init_process_group = init_process_group
