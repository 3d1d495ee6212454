"""config.compilation_cache_dir reaches jax.config (what is cached, and how fast, is JAX's business)."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

from vlmu_jax import compile_cache
from vlmu_jax.config_schema import base_config


@pytest.fixture
def restore_jax_cache_config():
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in before.items():
        jax.config.update(k, v)


def test_default_is_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert base_config().compilation_cache_dir == str(tmp_path / "vlmu_jax" / "jax")


@pytest.mark.usefixtures("restore_jax_cache_config")
def test_config_option_reaches_jax(tmp_path: Path) -> None:
    config = base_config()
    config.compilation_cache_dir = str(tmp_path / "xla")
    compile_cache.configure(config.compilation_cache_dir)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_SECS
    compile_cache.configure("")
    assert jax.config.jax_compilation_cache_dir is None
