"""The quarantine adapter: SVD-basis knobs (the effective knob and one quarantine per router) on a model's linears.

Imports torch and safetensors only (no verl), so the method can be tested and reused outside verl.
"""

from verl_gq.adapter.config import DEFAULT_TARGET_MODULES, AdapterConfigError, QuarantineAdapterConfig
from verl_gq.adapter.layer import AS_TRAINED, EFFECTIVE, SVDQuarantineLinear, knob_scale
from verl_gq.adapter.model import (
    AdapterFile,
    AdapterFileContents,
    AdapterLoadError,
    QuarantineAdapter,
    adapter_config_of,
    inject_quarantine_adapter,
    read_adapter_file,
)

__all__ = [
    "AS_TRAINED",
    "DEFAULT_TARGET_MODULES",
    "EFFECTIVE",
    "AdapterConfigError",
    "AdapterFile",
    "AdapterFileContents",
    "AdapterLoadError",
    "QuarantineAdapter",
    "QuarantineAdapterConfig",
    "SVDQuarantineLinear",
    "adapter_config_of",
    "inject_quarantine_adapter",
    "knob_scale",
    "read_adapter_file",
]
