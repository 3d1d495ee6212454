"""XLA's GPU memory pool from the config (vlmu_jax/device_memory.py): set before the backend starts unless the
environment already sets it."""

from __future__ import annotations

import os

import pytest

from vlmu_jax import device_memory


def test_the_config_sets_the_pool_unless_the_environment_does(monkeypatch) -> None:
    monkeypatch.delenv(device_memory.ENV, raising=False)
    device_memory.configure(0.9)
    assert os.environ[device_memory.ENV] == "0.9"
    monkeypatch.setenv(device_memory.ENV, ".5")
    device_memory.configure(0.9)
    assert os.environ[device_memory.ENV] == ".5"  # the user's setting wins


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1])
def test_a_fraction_outside_0_1_is_refused(fraction, monkeypatch) -> None:
    monkeypatch.delenv(device_memory.ENV, raising=False)
    with pytest.raises(ValueError, match=r"device_memory_fraction must be in \(0, 1\]"):
        device_memory.configure(fraction)
    assert device_memory.ENV not in os.environ
