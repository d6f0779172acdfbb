"""OmegaConf resolvers of verl-gq's recipes, and the `pkg://` path rule they share with `gq.pair_file`.

    ${gq_pkg:verl_gq/organism/checkpoint}  ->  /abs/path/to/site-packages/verl_gq/organism/checkpoint

A recipe names a file or folder shipped inside an installed package without depending on the working directory
(the organism recipes' model path). Registered by the verl plugin (verl_gq.verl.plugin, imported in every process
that imports verl: the Hydra driver, the TaskRunner that resolves the config, the workers) and by the recipe
search-path plugin, so `${gq_pkg:...}` resolves wherever verl's config is resolved.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PKG_PREFIX = "pkg://"
RESOLVER = "gq_pkg"


def package_path(spec: str) -> Path:
    """`<package>/<relative path>` (a leading pkg:// is accepted) -> the absolute path inside the installed package.
    The path is not checked for existence here: callers say what they expected to find."""
    spec = spec[len(PKG_PREFIX):] if spec.startswith(PKG_PREFIX) else spec
    package, _, name = spec.partition("/")
    if not package:
        raise ValueError(f"{spec!r}: expected <package>/<path inside the package>")
    root = Path(str(resources.files(package)))
    return root / name if name else root


def register() -> None:
    """Register `${gq_pkg:...}` with OmegaConf (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda spec: str(package_path(spec)))
