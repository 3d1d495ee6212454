"""The workspace the stages share (`Workspace`: config, workdir, mesh, tokenizer, data, models) and what comes
before them: data and the demo's base model. `runner` runs data -> base model -> finetune -> unlearn -> eval ->
export -> report; the stages themselves are in `stages`.

Each stage reads what earlier stages left in the workdir and writes one folder with a `DONE` marker,
so an interrupted run picks up where it stopped and a finished stage is skipped unless
`config.force` is set. Training stages checkpoint with Orbax inside their folder and resume from it.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vlmu_jax import logs
from vlmu_jax.checkpoints.in_memory import ModelCache
from vlmu_jax.data import fiubench, mllmu, synthetic
from vlmu_jax.data.batching import TextConfig, checkpoint_text_config
from vlmu_jax.data.image_cache import ImageCache
from vlmu_jax.data.images import ImageProcessor, load_image_processor, row_images
from vlmu_jax.data.records import Benchmark
from vlmu_jax.data.templates import get_template, load_tokenizer, train_demo_tokenizer
from vlmu_jax.model_sources import given_checkpoints
from vlmu_jax.models import sharding
from vlmu_jax.models.tiny import TokenIds, tiny_checkpoint
from vlmu_jax.protocol import Protocol
from vlmu_jax.protocol import resolve as resolve_protocol

DONE = "DONE"


@dataclass
class Workspace:
    """Paths and shared objects of one run; everything a stage needs, derived from config + workdir."""

    config: ml_collections.ConfigDict
    workdir: Path

    @cached_property
    def mesh(self) -> jax.sharding.Mesh:
        m = self.config.mesh
        return sharding.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor)

    @cached_property
    def protocol(self) -> Protocol:
        return resolve_protocol(self.config)

    @property
    def data_root(self) -> Path:
        if self.config.data.synthetic_identities > 0:
            return self.workdir / "data" / self.config.benchmark
        return Path(self.config.data.root)

    @cached_property
    def bench(self) -> Benchmark:
        """The records every stage trains and scores on, formatted as the protocol says."""
        return self.read_bench(formatted=True)

    def read_bench(self, *, formatted: bool) -> Benchmark:
        """`formatted=False` gives the records as stored (the demo tokenizer learns the data, not a protocol)."""
        if self.config.benchmark == "fiubench":
            return fiubench.read_fiubench(self.data_root, limit=self.config.data.eval_limit,
                                          capitalize=formatted and self.protocol.fiubench_capitalize)
        return mllmu.read_mllmu(self.data_root)

    @property
    def base_model(self) -> Path:
        """Where training starts and every stage's tokenizer and processor come from: the demo's tiny model,
        model.path, or (when only given checkpoints are evaluated) the first of them."""
        if self.config.model.tiny:
            return self.workdir / "models" / "base"
        return Path(self.config.model.path or next(iter(given_checkpoints(self.config.eval).values())))

    def model_dir(self, name: str) -> Path:
        return self.workdir / "models" / name

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.base_model)

    @cached_property
    def hf_config(self) -> dict:
        from vlmu_jax.checkpoints.hf_import import read_hf_config

        return read_hf_config(self.base_model)

    @cached_property
    def text_config(self) -> TextConfig:
        """How training rows become ids: the protocol's training template and label rule (MLLMU's collates)."""
        p = self.protocol
        template = p.train_template(self.hf_config.get("model_type", ""), self.config.model.template)
        return self._text_config(template, self.image_processor, train_on_prompt=p.mllmu_collate,
                                 max_length=None if p.mllmu_collate else self.config.data.max_length)

    @cached_property
    def eval_text_config(self) -> TextConfig:
        """How evaluation rows become ids: the model's template, never cut (a cut answer or prompt scores garbage)."""
        return self._text_config(self.config.model.template, self.eval_image_processor, max_length=None)

    def _text_config(self, template: str, processor: ImageProcessor, **options) -> TextConfig:
        from vlmu_jax.models.registry import model_config

        return checkpoint_text_config(self.tokenizer, get_template(template), model_config(self.hf_config), processor,
                                      append_eos=self.config.data.append_eos,
                                      fiubench_original_mask=self.protocol.fiubench_preprocess_mask, **options)

    @cached_property
    def image_processor(self) -> ImageProcessor:
        """The training stages' image processor (the checkpoint's, with the protocol's and the config's overrides)."""
        return self._image_processor("train")

    @cached_property
    def eval_image_processor(self) -> ImageProcessor:
        return self._image_processor("eval")

    def _image_processor(self, stage: str) -> ImageProcessor:
        overrides = self.config.model.get("image_processor_overrides") or {}
        user = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
        return load_image_processor(self.base_model, {**self.protocol.image_processor_overrides(stage), **user})

    @cached_property
    def image_fn(self) -> ImageCache:
        """A training row's image inputs for the model (`image_fn(ref)`; a text-only row's when `ref` is None)."""
        return ImageCache(functools.partial(row_images, self.image_processor),
                          self.config.data.image_cache_mb * 10**6)

    @cached_property
    def eval_image_fn(self) -> ImageCache:
        """An evaluation row's image inputs for the model (`eval_image_fn(ref)`; None: a text-only row's)."""
        return ImageCache(functools.partial(row_images, self.eval_image_processor),
                          self.config.data.image_cache_mb * 10**6)

    @cached_property
    def models(self) -> ModelCache:
        """Models saved by this run's stages, kept in host memory for the stages that load them next."""
        return ModelCache(self.config.model.keep_in_memory)

    def load(self, name: str | Path):
        """A model folder of this run (by name), the base checkpoint ("base") or any checkpoint folder (a Path),
        loaded onto the mesh; from `models` when a stage of this process saved it there."""
        from vlmu_jax.checkpoints.hf_import import load_pretrained

        path = self._path(name)
        held = self.models.load(path, jnp.dtype(self.config.model.dtype), self.mesh, **self._load_options)
        if held is not None:
            return held
        wait_for_writes(path)
        return load_pretrained(path, dtype=jnp.dtype(self.config.model.dtype), mesh=self.mesh, **self._load_options)

    def load_shapes(self, name: str | Path):
        """What `load(name)` returns, with shapes in their placements for params (hf_import.placed_shapes): nothing
        is read but config.json (or the held model's)."""
        from vlmu_jax.checkpoints.hf_import import placed_shapes, read_hf_config

        path = self._path(name)
        held = self.models.held(path)
        if held is None:
            wait_for_writes(path)
        hf_config = held[0] if held is not None else read_hf_config(path)
        return placed_shapes(hf_config, jnp.dtype(self.config.model.dtype), self.mesh, **self._load_options)

    def _path(self, name: str | Path) -> Path:
        return name if isinstance(name, Path) else self.base_model if name == "base" else self.model_dir(name)

    @property
    def _load_options(self) -> dict[str, Any]:
        m = self.config.model
        return {"remat": m.remat, "scan_layers": m.scan_layers, "attention_impl": m.attention}


def is_done(folder: Path) -> bool:
    """The folder is finished (its DONE marker), after its background write if one is under way."""
    wait_for_writes(folder)
    return (folder / DONE).exists()


def mark_done(folder: Path) -> None:
    """Process 0 writes `folder`'s DONE marker; with several processes every one of them calls this and waits for
    it. Why: a process that went on first read the folder as unfinished. After the unlearn stage, process 1 left
    the unlearned model out of its eval while process 0 evaluated it, and process 0 then waited in that model's
    collectives until the job aborted (tests/test_pipeline_runs.py, session 38)."""
    if jax.process_index() == 0:
        (folder / DONE).write_text("ok\n")
    _sync(f"done {folder.name}")


def clear_done(folder: Path) -> None:
    """Before a folder is rewritten: a run that fails halfway must not leave it marked done."""
    wait_for_writes(folder)
    if jax.process_index() == 0:
        (folder / DONE).unlink(missing_ok=True)


# Folders written by a background thread while the run goes on (`write_in_background`), by resolved path.
_WRITES: dict[Path, Future] = {}
_WRITER = ThreadPoolExecutor(1, thread_name_prefix="hf-folder")  # its thread starts with the first write


def write_in_background(folder: Path, write: Callable[[], None]) -> None:
    """Runs `write` (which ends by marking `folder` done) in a thread; whatever asks whether the folder is done,
    clears it or reads it from disk waits for it first, and `wait_for_writes()` waits for all. One write at a
    time: each holds a model's host copy until it has written it."""
    wait_for_writes()
    _WRITES[folder.resolve()] = _WRITER.submit(write)


def wait_for_writes(folder: Path | None = None) -> None:
    """Waits for the background write of `folder` (all of them when None); a failed write raises here."""
    for key in [folder.resolve()] if folder is not None else list(_WRITES):
        future = _WRITES.pop(key, None)
        if future is not None:
            future.result()


def is_written_or_writing(folder: Path) -> bool:
    """The folder is done or its background write is under way (it is done once that ends, or the run fails)."""
    return folder.resolve() in _WRITES or (folder / DONE).exists()


def prepare_data(ws: Workspace) -> None:
    """Writes the embedded synthetic benchmark when the config asks for it (idempotent)."""
    c = ws.config.data
    if c.synthetic_identities <= 0 or is_done(ws.data_root):
        return
    with logs.timed(f"synthetic data ({c.synthetic_identities} identities)"):
        if jax.process_index() == 0:
            shutil.rmtree(ws.data_root, ignore_errors=True)
            synthetic.write(ws.data_root, ws.config.benchmark, c.synthetic_identities, c.synthetic_seed,
                            c.synthetic_image_size)
        mark_done(ws.data_root)


def prepare_base_model(ws: Workspace) -> None:
    """For the demo: a tokenizer trained on the benchmark text and a random tiny model in HF format."""
    if not ws.config.model.tiny or is_done(ws.base_model):
        return
    with logs.timed("tiny base model"):
        _write_tiny_base_model(ws)


def _write_tiny_base_model(ws: Workspace) -> None:
    from vlmu_jax.checkpoints.hf_export import export_hf
    from vlmu_jax.models.registry import init_model

    out = ws.base_model
    shape = ws.config.model.tiny_shape
    template = get_template(ws.config.model.template)
    if jax.process_index() == 0:
        shutil.rmtree(out, ignore_errors=True)
        corpus = synthetic.corpus(ws.read_bench(formatted=False))
        train_demo_tokenizer(corpus, out, vocab_size=shape.vocab_size, template=template)
    _sync("tokenizer")
    tok = load_tokenizer(out)
    ids = TokenIds(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids(template.image_token),
                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf_config, preprocessor = tiny_checkpoint(shape, ids)
    if jax.process_index() == 0:
        (out / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    model = init_model(hf_config, seed=ws.config.seed, dtype=jnp.dtype(ws.config.model.dtype), mesh=ws.mesh)
    export_hf(model, out)
    mark_done(out)


def _sync(what: str) -> None:
    """All hosts wait for process 0's files before reading them."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"vlmu_jax:{what}")
