"""What produced a result: resolved config, code version, devices and seeds, written next to it.

A number in an unlearning paper is only comparable when the exact config and software behind it
are known, so every stage writes this before it writes anything else.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

import vlmu_jax
from vlmu_jax import device_memory

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy", "scipy")


def git_commit(repo_dir: Path) -> str | None:
    """The commit of the source tree, with a '+dirty' suffix when it has local edits."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo_dir), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo_dir), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Software and hardware facts that can change a result."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    return {
        "vlmu_jax": vlmu_jax.__version__,
        "git_commit": git_commit(Path(vlmu_jax.__file__).resolve().parent.parent),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind if devices else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_python_client_mem_fraction": os.environ.get(device_memory.ENV),
    }


def write(out_dir: Path, config_json: str) -> None:
    """Writes config.json and environment.json into `out_dir` (process 0 only)."""
    if jax.process_index() != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(config_json)
    (out_dir / "environment.json").write_text(json.dumps(environment(), indent=2))
