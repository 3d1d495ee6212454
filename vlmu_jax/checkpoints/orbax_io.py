"""Training-state checkpoints: a thin wrapper over Orbax's CheckpointManager.

What is saved is one pytree (trainable params, optimizer state, RNG state, step); the data position is
not saved because every `BatchSource` derives it from the step. The tree is flattened to a dict keyed by
its paths so any pytree (NNX `State`, optax named tuples) round-trips without Orbax knowing its types,
and typed PRNG keys are stored as their raw key data. Saves are asynchronous; every process calls
`save` and Orbax lets the primary host write metadata. Restore reads each array straight into the
sharding of the matching leaf of `like` (the current run's state), so a checkpoint written on one mesh
restores onto another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from vlmu_jax.errors import InputError


def _flat(tree: Any) -> tuple[dict[str, Any], Any]:
    """Path-keyed flat dict of leaves plus the treedef to rebuild the tree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {}
    for path, leaf in leaves:
        key = ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        flat[key or "root"] = leaf
    return flat, treedef


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _savable(x: Any) -> Any:
    return jax.random.key_data(x) if _is_key(x) else x


def _abstract(x: Any) -> Any:
    """Restore target for one leaf: shape, dtype and the current sharding (key data for PRNG keys)."""
    if _is_key(x):
        x = jax.random.key_data(x)
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _restored_leaf(saved: Any, like: Any) -> Any:
    """Zero-size leaves (e.g. rank-0 adapters) are not stored (Orbax refuses them): rebuild them empty."""
    if not like.size:
        return jnp.zeros(like.shape, like.dtype, device=getattr(like, "sharding", None))
    return jax.random.wrap_key_data(saved, impl=jax.random.key_impl(like)) if _is_key(like) else saved


class Checkpointer:
    """Save every `save_every` steps (and on demand at the end), keep the newest `keep`.

    `keep=0` saves nothing (and resumes nothing): a 7B full finetune's checkpoint (weights and both AdamW
    moments, ~4x the model) can outgrow the disk, and a stage's HF folder is its output anyway."""

    def __init__(self, directory: str | Path, *, save_every: int, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._mgr = None
        if keep > 0:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=max(int(save_every), 1),
                enable_async_checkpointing=async_save,
                create=True,
            )
            self._mgr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step() if self._mgr else None

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps()) if self._mgr else []

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Start an async save if `step` is on the interval (or `force`); returns whether one started."""
        if self._mgr is None:
            return False
        flat, _ = _flat(state)
        flat = {k: _savable(v) for k, v in flat.items() if v.size}
        return self._mgr.save(step, args=ocp.args.StandardSave(flat), force=force)

    def restore(self, step: int, like: Any) -> Any:
        """Restore checkpoint `step` into the structure, dtypes and shardings of `like`."""
        flat_like, treedef = _flat(like)
        target = {k: _abstract(v) for k, v in flat_like.items() if v.size}
        try:
            restored = self._mgr.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as err:  # noqa: BLE001 - whatever Orbax or TensorStore raise, the user needs one line
            raise unreadable(self.directory, step, err) from err
        leaves = [_restored_leaf(restored.get(k), v) for k, v in flat_like.items()]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def wait(self) -> None:
        """Block until pending async saves are committed (before exiting or raising)."""
        if self._mgr:
            self._mgr.wait_until_finished()

    def close(self) -> None:
        if self._mgr:
            self._mgr.wait_until_finished()
            self._mgr.close()


def unreadable(directory: Path, step: int, err: Exception) -> InputError:
    """The one-line error for a checkpoint Orbax cannot read (a copy cut short, a file deleted by hand), saying
    how to go on: the earlier checkpoints are intact."""
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return InputError(f"checkpoint step {step} cannot be read ({type(err).__name__}: {first}); delete this folder to "
                      "resume from the checkpoint before it, or the whole checkpoints folder to start over",
                      file=Path(directory) / str(step))


def checkpoint_steps(directory: str | Path) -> list[int]:
    """Steps of the committed checkpoints in `directory` (oldest first); [] when there are none."""
    if not Path(directory).is_dir():
        return []
    mgr = ocp.CheckpointManager(Path(directory).absolute(), options=ocp.CheckpointManagerOptions(create=False))
    try:
        return sorted(mgr.all_steps())
    finally:
        mgr.close()


def restore_part(directory: str | Path, step: int, like: Any, index: int) -> Any:
    """Element `index` of the tuple a `Checkpointer` saved at `step` (e.g. the trained params of the trainer's
    `(params, opt_state, rng)`), into the structure, dtypes and shardings of `like`; the other elements are
    not read."""
    flat_like, treedef = _flat(like)
    target = {f"{index}.{k}": _abstract(v) for k, v in flat_like.items() if v.size}
    mgr = ocp.CheckpointManager(Path(directory).absolute(), options=ocp.CheckpointManagerOptions(create=False))
    try:
        restored = mgr.restore(step, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    except Exception as err:  # noqa: BLE001 - as in Checkpointer.restore
        raise unreadable(Path(directory), step, err) from err
    finally:
        mgr.close()
    leaves = [_restored_leaf(restored.get(f"{index}.{k}"), v) for k, v in flat_like.items()]
    return jax.tree_util.tree_unflatten(treedef, leaves)
