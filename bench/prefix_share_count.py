"""How many sequence positions the eval stage scores per FIUBench split, as it runs now and if each question's
prompt (image + question) were run once and its 2 + K answers scored as continuations over its KV cache.

Why: the eval stage's scoring is most of its model time (198.9 of 295.0 s at 7B on FIUBench's forget10 /
retain15, bench/RESULTS.md session 7), and every question's ground-truth, paraphrased and K perturbed answers are
scored as full rows that repeat the same ~630-position prompt, 576 of them the image. Counted on the embedded
synthetic benchmark at FIUBench's size with the FIUBench preset's LLaVA-1.5 template, real image expansion (336 px,
576 tokens), eval batch and buckets; nothing runs on a device. A position costs about the same model FLOPs either
way (a continuation's attention over the cached prompt is ~2 % of its matmuls at 7B), so the ratio of positions
is the ratio of scoring compute.

Run from the repo root: `PYTHONPATH=. python bench/prefix_share_count.py --workdir DIR` (~30 s on a CPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.bench_pipeline import config
from vlmu_jax import pipeline
from vlmu_jax.data.batching import Encoded, ExampleSource, encode
from vlmu_jax.eval.batched import continuation_shape, prompt_groups
from vlmu_jax.eval.tasks.fiubench import scoring_examples


def _source(rows: list[Encoded], batch: int, *, left_pad: bool) -> ExampleSource:
    """Rows as the eval batches them (no shuffling, the last batch wrapping); the lengths need no images."""
    return ExampleSource(rows, global_batch_size=batch, pad_token_id=0, image_fn=lambda ref: {}, shuffle=False,
                         left_pad=left_pad)


def positions_now(rows: list[Encoded], batch: int) -> int:
    """Positions the scoring batches hold as `score_rows` runs them: each batch padded to its bucket."""
    source = _source(rows, batch, left_pad=False)
    return sum(batch * source.padded_length(i) for i in range(len(source)))


def positions_shared(rows: list[Encoded], batch: int) -> int:
    """Positions as `score_rows(shared_prompts=True)` runs them: batches of `batch` prompts (left-padded to their
    bucket), each with its K continuations of the batch's continuation length."""
    groups = prompt_groups(rows)
    source = _source(groups.prompts, batch, left_pad=True)
    total = 0
    for i in range(len(source)):
        k, c = continuation_shape(groups, rows, source.global_indices(i))
        total += batch * (source.padded_length(i) + k * c)
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--identities", type=int, default=400)
    args = parser.parse_args()
    ws = pipeline.Workspace(config(True, 1, args.identities, "ga"), Path(args.workdir))
    pipeline.prepare_data(ws)
    pipeline.prepare_base_model(ws)  # the tokenizer and image processor the template reads
    batch = ws.config.eval.batch_size
    for split in ("forget10", "retain15"):
        examples, k = scoring_examples(ws.bench.split(split))
        rows = [encode(e, ws.eval_text_config) for e in examples]
        now, shared = positions_now(rows, batch), positions_shared(rows, batch)
        print(json.dumps({"split": split, "rows": len(rows), "answers_per_question": 2 + k,
                          "mean_row_length": round(float(np.mean([len(r.input_ids) for r in rows])), 1),
                          "positions_now": now, "positions_shared_prompt": shared,
                          "ratio": round(now / shared, 2)}), flush=True)


if __name__ == "__main__":
    main()
