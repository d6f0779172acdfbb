"""The quarantine adapter: SVD-basis knobs (kept and quarantine) on the targeted linears of a model.

Imports torch and safetensors only (no verl), so the method can be tested and reused outside verl.
"""

from verl_gq.adapter.config import DEFAULT_TARGET_MODULES, AdapterConfigError, QuarantineAdapterConfig
from verl_gq.adapter.layer import KEEP, QUARANTINE, SVDQuarantineLinear
from verl_gq.adapter.model import AdapterFile, AdapterLoadError, QuarantineAdapter, inject_quarantine_adapter

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "KEEP",
    "QUARANTINE",
    "AdapterConfigError",
    "AdapterFile",
    "AdapterLoadError",
    "QuarantineAdapter",
    "QuarantineAdapterConfig",
    "SVDQuarantineLinear",
    "inject_quarantine_adapter",
]
