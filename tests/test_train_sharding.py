"""The same run on 1 device and on the 8 fake CPU devices (data=2, fsdp=2, tensor=2) gives the same losses.

Params are sharded over fsdp/tensor and the global batch over (data, fsdp), so the step's reductions
run as cross-device collectives; only float summation order may differ: tolerance 1e-5.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tests.toy_lm import FixedSource, ToyLM, kl_fn, logps_fn, sequences
from vlmu_jax.unlearn.trainer import TrainConfig, train

SPECS = {"embed": P(None, "tensor"), "mix": P("fsdp", "tensor"), "head": P("tensor", None)}


def shard_model(model: ToyLM, mesh: Mesh) -> None:
    """Place each kernel by its module's spec (biases, LoRA and RNG replicated), like sharding.py."""
    def place(path, x):
        names = [str(k.key) for k in path if hasattr(k, "key")]
        spec = SPECS.get(names[0], P()) if x.ndim == 2 and names[-1] in ("embedding", "kernel") else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    nnx.update(model, jax.tree_util.tree_map_with_path(place, nnx.state(model)))


@pytest.mark.parametrize(
    "objective,trainable,extra",
    [("kl", nnx.LoRAParam, {}), ("gd", nnx.Param, {"grad_accum": 2, "weight_decay": 0.01})],
)
def test_sharded_losses_match_single_device(tmp_path, objective, trainable, extra) -> None:
    assert jax.device_count() == 8
    cfg = TrainConfig(objective=objective, lr=1e-2, num_steps=4, warmup_ratio=0.25, progress=False, **extra)
    sources = {"forget": FixedSource(sequences(8, 1), 4), "retain": FixedSource(sequences(8, 2), 4)}
    results = []
    for name, mesh in [("one", None), ("mesh", Mesh(np.array(jax.devices()).reshape(2, 2, 2),
                                                     ("data", "fsdp", "tensor")))]:
        model = ToyLM(lora_rank=4, dropout=0.1)
        if mesh is not None:
            shard_model(model, mesh)
        res = train(model, cfg, sources=sources, logps_fn=logps_fn, kl_fn=kl_fn, trainable=trainable,
                    mesh=mesh, workdir=tmp_path / name)
        results.append(res.losses)
        if mesh is not None:  # the trained state keeps its shardings (no silent gather to one device)
            assert model.mix.kernel.sharding.spec == P("fsdp", "tensor")
            assert len(model.head.kernel.sharding.device_set) == 8
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=1e-5)
    assert len(results[0]) == 4


def test_step_traces_once_per_run(tmp_path) -> None:
    """On a mesh the train step is traced (and compiled) once per run: the optimizer's step counters and the RNG
    count enter the first step placed as the step returns them (trainer.on_mesh); before, the second step saw new
    input shardings and compiled the whole step again (seen at 7B on an H200)."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    traces = []

    def counting_logps(model, batch):
        traces.append(1)  # runs once per trace of the step, never per executed step
        return logps_fn(model, batch)

    per_run = []
    for steps in (1, 3):
        traces.clear()
        model = ToyLM(lora_rank=4, dropout=0.1)
        shard_model(model, mesh)
        cfg = TrainConfig(objective="ga", lr=1e-2, num_steps=steps, progress=False)
        train(model, cfg, sources={"forget": FixedSource(sequences(8, 1), 4)}, logps_fn=counting_logps,
              mesh=mesh, workdir=tmp_path / str(steps))
        per_run.append(len(traces))
    assert per_run[0] > 0 and per_run[1] == per_run[0], per_run
