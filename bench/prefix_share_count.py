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
from vlmu_jax.data.batching import Encoded, bucket_length, encode, row_buckets
from vlmu_jax.eval.batched import continuation_length, prompt_groups
from vlmu_jax.eval.tasks.fiubench import scoring_examples


def positions_now(rows: list[Encoded], batch: int) -> int:
    """Positions the scoring batches hold as the eval stage runs them: rows in order, each batch padded to its
    bucket (ExampleSource without shuffling)."""
    buckets = row_buckets(rows)
    return sum(batch * bucket_length(max(len(r.input_ids) for r in rows[i:i + batch]), buckets)
               for i in range(0, len(rows), batch))


def positions_shared(rows: list[Encoded], batch: int) -> int:
    """Positions as `score_rows(shared_prompts=True)` runs them: batches of `batch` prompts (left-padded to their
    bucket), each with its K continuations padded to the batch's continuation length."""
    groups = prompt_groups(rows)
    prompts = [len(p.input_ids) for p in groups.prompts]
    buckets = row_buckets(groups.prompts)
    total = 0
    for i in range(0, len(prompts), batch):
        members = [(j, r) for j in range(i, min(i + batch, len(prompts))) for r in groups.members[j]]
        k = max(len(groups.members[j]) for j, _ in members)
        c = continuation_length(max(len(rows[r].input_ids) - prompts[j] for j, r in members))
        total += batch * (bucket_length(max(prompts[j] for j, _ in members), buckets) + k * c)
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
