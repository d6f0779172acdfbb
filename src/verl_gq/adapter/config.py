"""Options of the quarantine adapter: which linears get SVD knobs, at what rank, and which quarantines they carry."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field
from typing import Union

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A quarantine is named like a Python identifier (it becomes a metric key, a file key and a folder name).
QUARANTINE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class AdapterConfigError(ValueError):
    """A QuarantineAdapterConfig value that cannot work; the message names the field and what should hold."""


@dataclass
class QuarantineAdapterConfig:
    """Which `nn.Linear` modules get knobs, how many SVD directions each keeps, and the quarantines they carry.

    rank: r, the number of top singular triplets kept per module, a positive int or "full" (= min(d_out, d_in)).
        An int larger than a targeted module's min(d_out, d_in) is an error at injection, not silently clipped.
    target_modules: patterns over full module names (`model.layers.3.self_attn.q_proj`). A pattern without
        wildcard or regex characters matches a name's last component (`q_proj`), like peft; a pattern with `*`,
        `?` or `[` is an fnmatch pattern over the full name; a pattern starting with `re:` is a regex that must
        match the full name. Default: every attention and MLP projection of a decoder layer.
    freeze_base: make every parameter that is not a knob non-trainable at injection (route2b trains knobs only).
    quarantines: names of the quarantine knobs beside the effective knob, one per router (none for vanilla). The
        deployed view of quarantine `name` is the effective knob minus that quarantine.
    """

    rank: Union[int, str] = 64
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    freeze_base: bool = True
    quarantines: list[str] = field(default_factory=lambda: ["quarantine"])

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not (self.rank == "full" or (isinstance(self.rank, int) and self.rank > 0)):
            raise AdapterConfigError(f'rank={self.rank!r}: must be a positive int or "full"')
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise AdapterConfigError(
                f"target_modules={self.target_modules!r}: must be a non-empty list of module-name patterns"
            )
        self.target_modules = list(self.target_modules)
        for pattern in self.target_modules:
            if not isinstance(pattern, str) or not pattern:
                raise AdapterConfigError(f"target_modules entry {pattern!r}: must be a non-empty string")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise AdapterConfigError(f"target_modules entry {pattern!r}: bad regex ({err})") from err
        if isinstance(self.quarantines, str):
            raise AdapterConfigError(f"quarantines={self.quarantines!r}: must be a list of names")
        self.quarantines = list(self.quarantines)
        for name in self.quarantines:
            if not isinstance(name, str) or not QUARANTINE_NAME.fullmatch(name):
                raise AdapterConfigError(f"quarantines entry {name!r}: a name of letters, digits and _ (not first a digit)")
        if len(set(self.quarantines)) != len(self.quarantines):
            raise AdapterConfigError(f"quarantines={self.quarantines}: a name appears twice")

    def matches(self, module_name: str) -> bool:
        """True if `module_name` (a full dotted name) is targeted by any pattern."""
        return any(pattern_matches(pattern, module_name) for pattern in self.target_modules)

    def rank_for(self, module_name: str, d_out: int, d_in: int) -> int:
        """The rank this module gets; an int rank above min(d_out, d_in) is an error naming the module."""
        limit = min(d_out, d_in)
        if self.rank == "full":
            return limit
        if self.rank > limit:
            raise AdapterConfigError(
                f"rank={self.rank} exceeds min(d_out, d_in)={limit} of {module_name} ({d_out}x{d_in}); "
                f'use rank <= {limit} or "full"'
            )
        return int(self.rank)

    def to_dict(self) -> dict:
        return asdict(self)


def pattern_matches(pattern: str, module_name: str) -> bool:
    """True if one target pattern (see QuarantineAdapterConfig.target_modules) matches a full module name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], module_name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(module_name, pattern)
    return module_name == pattern or module_name.endswith("." + pattern)
