"""Folders written by a background thread (`pipeline.write_in_background`): whatever asks whether the folder is done
waits for the write; a failed write raises where the run waits for it; one write at a time."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from vlmu_jax.pipeline import DONE, is_done, is_written_or_writing, mark_done, wait_for_writes, write_in_background


def test_done_waits_for_the_write_and_errors_surface(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    started, release = threading.Event(), threading.Event()

    def write() -> None:
        started.set()
        assert release.wait(60)
        (folder / "model.safetensors").write_bytes(b"x")
        mark_done(folder)

    write_in_background(folder, write)
    assert started.wait(60)
    assert is_written_or_writing(folder) and not (folder / DONE).exists()  # under way: counts, not yet done
    release.set()
    assert is_done(folder)  # waited for the write
    assert (folder / "model.safetensors").read_bytes() == b"x"
    assert not is_written_or_writing(tmp_path / "other")

    def fail() -> None:
        raise OSError("disk full")

    write_in_background(tmp_path / "bad", fail)
    with pytest.raises(OSError, match="disk full"):
        wait_for_writes()
    wait_for_writes()  # reported once


def test_one_write_at_a_time(tmp_path: Path) -> None:
    order: list[str] = []
    release_first, release_second = threading.Event(), threading.Event()

    def first() -> None:
        assert release_first.wait(60)
        order.append("first")

    def second() -> None:
        assert release_second.wait(60)
        order.append("second")

    write_in_background(tmp_path / "a", first)
    release_first.set()
    write_in_background(tmp_path / "b", second)  # returns once the first write has ended
    assert order == ["first"]
    release_second.set()
    wait_for_writes()
    assert order == ["first", "second"]
