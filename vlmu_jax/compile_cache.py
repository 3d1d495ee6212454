"""The persistent XLA compilation cache: compiled programs go to disk and later compiles of the same program
read them back.

At LLaVA-1.5-7B shape each train-step and scoring program takes 6-20 s to compile, and a run compiles the same
programs many times over: the retain-only twin after the finetuned model, every unlearning method, every seed
of a sweep, every rerun. JAX keys an entry by the program, its compile options, the devices and the jax/jaxlib
versions, so one folder serves every run and model of a user without mixing them up.
"""

from __future__ import annotations

import os

import jax

from vlmu_jax.logs import say

# Programs that compile faster than this are not written (reading them back would cost about as much); the
# 7B step and scoring programs are all far above it.
MIN_COMPILE_SECS = 1.0


def default_dir() -> str:
    """`$XDG_CACHE_HOME/vlmu_jax/jax` (`~/.cache/vlmu_jax/jax`): per user and machine-wide, like pip's and
    Hugging Face's caches, so runs in different workdirs (sweep seeds, reruns elsewhere) share their programs.
    A folder beside the workdir would depend on where each run happens to live, and a shared parent such as
    /tmp would mix users."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vlmu_jax", "jax")


def configure(cache_dir: str) -> None:
    """Points JAX at `cache_dir` (empty: no persistent cache) before anything compiles; one line says where."""
    jax.config.update("jax_compilation_cache_dir", cache_dir or None)
    if not cache_dir:
        say("compilation cache: off")
        return
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    say(f"compilation cache: {cache_dir}")
