"""Pack everything a GPU box without internet lacks to run verl-gq into one small folder (default .bundle/).

    python scripts/offline_bundle.py [--out .bundle] [--python-version 3.12]

The folder holds `site.tar.xz` (an unpacked site-packages tree: verl 0.9.1, ray without its Java jars, dashboard
web build and unused libraries, transformers 5.10.4, hydra, TransferQueue, ..., and verl-gq itself) and
`install.sh`. On the target machine (Python of the same minor version, torch already installed):

    bash .bundle/install.sh /tmp/site && export PYTHONPATH=/tmp/site:$PYTHONPATH

The package list is the one docs/running.md gives: what verl-gq needs besides the packages the target is expected
to have in versions verl 0.9.1 accepts (torch, numpy, pandas, pyarrow, safetensors, requests, aiohttp, ...). Wheels
come from PyPI for cp<version> manylinux x86_64; pure-Python sdists are built here.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from verl_gq.eval.artifacts.run_dir import SOURCE_COMMIT_FILE, source_commit  # noqa: E402

PACKAGES = [
    "verl==0.9.1", "ray==2.60.0", "transformers==5.10.4", "tokenizers==0.22.2", "tensordict==0.10.0",
    "pyvers==0.1.0", "TransferQueue==0.1.11", "pyzmq==27.3.0", "msgspec==0.22.0", "orjson==3.13.0",
    "hydra-core==1.3.8", "omegaconf==2.3.1", "antlr4-python3-runtime==4.9.3",
    "datasets==5.2.0", "multiprocess==0.70.19", "dill==0.4.1", "torchdata==0.11.0", "codetiming==1.4.0",
    "pylatexenc==2.11", "cachetools==8.0.2", "fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.54.0",
    "pydantic==2.14.4", "pydantic-core==2.50.5", "typing-inspection==0.4.5", "annotated-types==0.8.0",
    "typing-extensions==4.16.0", "opentelemetry-api==1.45.2", "importlib-metadata==10.2.0", "zipp==4.1.2",
    "jsonschema==4.26.0", "referencing==0.37.0", "rpds-py==2026.9.1", "jsonschema-specifications==2025.9.1",
]
# Parts of installed packages that training never imports; dropping them keeps the bundle small (about 41 MiB).
# ray/jars: Java workers; dashboard/client/build: the web UI;
# rllib/tune/train/serve/llm/data: Ray libraries verl does not use (verl imports ray.util, ray.actor only).
PRUNE = [
    "ray/jars", "ray/dashboard/client/build", "ray/rllib", "ray/tune", "ray/train", "ray/llm", "ray/serve",
    "ray/data", "bin",
]
MANYLINUX = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64", "linux_x86_64"]

INSTALL_SH = """#!/usr/bin/env bash
# Unpack the bundled site-packages into TARGET (default /tmp/site); then: export PYTHONPATH=TARGET:$PYTHONPATH
set -euo pipefail
TARGET=${1:-/tmp/site}
mkdir -p "$TARGET"
tar -xJf "$(dirname "$0")/site.tar.xz" -C "$TARGET"
echo "verl-gq bundle unpacked into $TARGET"
"""


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def platform_args(python_version: str) -> list[str]:
    args = ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:"]
    for tag in MANYLINUX:
        args += ["--platform", tag]
    return args


def download_wheels(wheels: Path, python_version: str) -> None:
    for spec in PACKAGES:
        try:
            pip("download", "-q", "--no-deps", "-d", str(wheels), *platform_args(python_version), spec)
        except subprocess.CalledProcessError:  # sdist-only on PyPI: build it here (pure Python only)
            pip("wheel", "-q", "--no-deps", "-w", str(wheels), spec)
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO))


def build(out: Path, python_version: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        download_wheels(wheels, python_version)
        pip("install", "-q", "--no-deps", "--no-compile", "--target", str(site), *platform_args(python_version),
            *map(str, sorted(wheels.glob("*.whl"))))
        for relative in PRUNE:
            shutil.rmtree(site / relative, ignore_errors=True)
        for cache in list(site.rglob("__pycache__")):
            shutil.rmtree(cache, ignore_errors=True)
        # no .git travels with the bundle: the artifacts' git_commit comes from this stamp (run_dir.source_commit)
        (site / "verl_gq" / SOURCE_COMMIT_FILE).write_text(source_commit(REPO / "src" / "verl_gq") or "")
        archive = out / "site.tar.xz"
        with tarfile.open(archive, "w:xz", preset=9) as tar:
            for entry in sorted(site.iterdir()):
                tar.add(entry, arcname=entry.name)
    (out / "install.sh").write_text(INSTALL_SH)
    (out / "install.sh").chmod(0o755)
    return archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".bundle")
    parser.add_argument("--python-version", default="3.12", help="the target's Python (x.y)")
    args = parser.parse_args()
    archive = build(args.out, args.python_version)
    print(f"{archive}: {archive.stat().st_size / 2**20:.1f} MiB; install with bash {args.out}/install.sh TARGET")


if __name__ == "__main__":
    main()
