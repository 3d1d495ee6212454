"""A whole split is scored and generated in a handful of compiled shapes, and results come back in row order."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs.demo import get_config
from vlmu_jax.data.batching import encode, examples_from, generation_rows
from vlmu_jax.eval.batched import generate_rows, score_rows
from vlmu_jax.pipeline import Workspace, prepare_base_model, prepare_data


class CompileCounter:
    """Counts XLA backend compilations through jax.monitoring while active."""

    def __init__(self) -> None:
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COUNTER = CompileCounter()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    config = get_config("ci")
    ws = Workspace(config, tmp_path_factory.mktemp("ws"))
    prepare_data(ws)
    prepare_base_model(ws)
    return ws


def test_split_scored_in_few_compiled_shapes(workspace: Workspace) -> None:
    ws = workspace
    model = ws.load("base")
    examples = examples_from(ws.bench.identities)
    rows = [encode(e, ws.text_config) for e in examples]
    kwargs = dict(pad_token_id=ws.tokenizer.pad_token_id, image_fn=ws.image_fn)
    lengths = {len(r.input_ids) for r in rows}
    assert len(lengths) > 3  # rows really differ in length
    COUNTER.active, COUNTER.count = True, 0
    scores = score_rows(model, rows, batch_size=16, **kwargs)
    first = COUNTER.count
    again = score_rows(model, rows[::-1], batch_size=16, **kwargs)
    second = COUNTER.count - first
    COUNTER.active = False
    assert len(scores) == len(rows) and all(s is not None for s in scores)
    assert 1 <= first <= 4, f"{first} compilations for {len(rows)} rows of {len(lengths)} lengths"
    assert second == 0
    for s, r in zip(scores, rows, strict=True):  # one score per answer token, same values in any order
        assert s.logps.shape == (int((r.labels != -100).sum()),)
    for a, b in zip(scores, again[::-1], strict=True):
        np.testing.assert_allclose(a.logps, b.logps, rtol=1e-5, atol=1e-5)


def test_generation_in_row_order(workspace: Workspace) -> None:
    ws = workspace
    model = ws.load("base")
    examples = examples_from(ws.bench.identities[:3])
    prompts = generation_rows(examples, ws.text_config)
    kwargs = dict(pad_token_id=ws.tokenizer.pad_token_id, eos_token_id=ws.tokenizer.eos_token_id,
                  max_new_tokens=6, image_fn=ws.image_fn)
    batched = generate_rows(model, prompts, batch_size=8, **kwargs)
    alone = generate_rows(model, prompts[4:5], batch_size=8, **kwargs)
    assert len(batched) == len(prompts)
    np.testing.assert_array_equal(batched[4], alone[0])
