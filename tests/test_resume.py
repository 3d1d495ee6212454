"""Kill -9 a training process after a checkpoint, resume it, and get the uninterrupted run's losses back.

The run uses LoRA with dropout (RNG state matters), grad accumulation (MultiSteps state matters),
warmup + cosine (the step matters) and two streams (the data position matters).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
SCRIPT = f"""
import os, sys, time
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {str(ROOT)!r})
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from flax import nnx
from tests.toy_lm import FixedSource, ToyLM, logps_fn, sequences
from vlmu_jax.unlearn.trainer import TrainConfig, train

delay = float(sys.argv[2])

class Slow(FixedSource):
    def get(self, index):
        time.sleep(delay)
        return super().get(index)

cfg = TrainConfig(objective="gd", lr=1e-2, num_steps={STEPS}, grad_accum=2, warmup_ratio=0.25,
                  weight_decay=0.01, save_every=2, keep_checkpoints=2, progress=False)
sources = {{"forget": Slow(sequences(4, 1), 2), "retain": Slow(sequences(6, 2), 2)}}
train(ToyLM(lora_rank=4, dropout=0.2), cfg, sources=sources, logps_fn=logps_fn,
      trainable=nnx.LoRAParam, workdir=sys.argv[1])
"""


def launch(script: Path, workdir: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen([sys.executable, str(script), str(workdir), str(delay)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def records(workdir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(workdir)}


def finished_checkpoints(workdir: Path) -> list[int]:
    ckpts = workdir / "checkpoints"
    return [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []


def test_sigkill_and_resume_reproduces_trajectory(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    ref = launch(script, straight, 0.0)
    victim = launch(script, killed, 0.15)
    deadline = time.time() + 120
    while max(finished_checkpoints(killed), default=0) < 6:
        assert victim.poll() is None and time.time() < deadline, victim.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert len(losses(killed)) < STEPS, "the victim finished before it was killed"

    resumed = launch(script, killed, 0.0)
    for proc in (ref, resumed):
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    expected, got = losses(straight), losses(killed)
    assert sorted(got) == list(range(STEPS)) == sorted(expected)
    np.testing.assert_allclose([got[s] for s in range(STEPS)], [expected[s] for s in range(STEPS)],
                               rtol=0, atol=1e-6)
    assert max(finished_checkpoints(killed)) == STEPS
    resumed_at = [r["resumed_from"] for r in records(killed) if "resumed_from" in r]
    assert len(resumed_at) == 1 and resumed_at[0] >= 6, resumed_at


def test_keep_zero_checkpoints_writes_nothing(tmp_path) -> None:
    """keep_checkpoints=0: the trainer's Checkpointer saves and resumes nothing (a 7B full finetune's checkpoint
    can outgrow the disk)."""
    import jax.numpy as jnp

    from vlmu_jax.checkpoints.orbax_io import Checkpointer

    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=0)
    assert ckpt.save(1, {"w": jnp.ones(3)}, force=True) is False
    ckpt.close()
    assert ckpt.latest_step() is None and ckpt.all_steps() == [] and not (tmp_path / "ckpt").exists()


def test_unreadable_checkpoint_is_one_line(tmp_path) -> None:
    """A checkpoint whose array files were cut short (an interrupted copy) stops with one line naming the step's
    folder and how to go on, not Orbax's traceback; the checkpoint before it still restores."""
    import jax.numpy as jnp
    import pytest

    from vlmu_jax.checkpoints.orbax_io import Checkpointer
    from vlmu_jax.errors import InputError

    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=2, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full(64, float(step))}, force=True)
    ckpt.close()
    for f in (tmp_path / "ckpt" / "2").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=2, async_save=False)
    with pytest.raises(InputError) as info:
        ckpt.restore(2, {"w": jnp.zeros(64)})
    message = str(info.value)
    assert str(tmp_path / "ckpt" / "2") in message and "cannot be read" in message and "\n" not in message
    assert float(ckpt.restore(1, {"w": jnp.zeros(64)})["w"][0]) == 1.0
    ckpt.close()
