"""The pipeline's real stages at full LLaVA-1.5-7B shape on one device: base model, finetune, unlearn (ga, gd,
npo), eval with generation. Per stage: wall time, tokens/s, and the share of wall time spent in model compute.

The FIUBench preset (full finetune with the vision tower frozen, LoRA r128 unlearning, eval batch 16, 50 new
tokens) on the embedded synthetic benchmark at FIUBench's size (400 identities, forget10 / retain15), with the
pipeline's random-model path (`model.tiny`) sized like LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 image tokens;
its MLP is 2x wide, not 4x) and Llama-7B. The vocabulary is the demo tokenizer's (a few thousand tokens, not
32064), so the output head is smaller than the real one. Step counts are capped (`--steps`) and eval runs on
forget1 / retain5 (`--eval_forget`, `--eval_retain`) so the whole run fits a device lease; the per-step and
per-batch numbers are what a full run repeats.

Model compute: training steps from the trainer's metrics.jsonl (its per-step time includes host batching; the
first step at each bucket length compiles, and its time beyond the run's fastest step counts as compile); eval
from timing every jitted scoring / generation call's device work (`CallTimer`: the calls are not waited for, the
eval loop dispatches the next batch first; each image's features too), where a shape's first call beyond its
median is compile, plus the wall time of `batched.compile_ahead` (which compiles every program of a split side
by side, returning once scoring's are compiled) and of the waits for generation's programs, outside the timed
calls' own device work.
Everything else (building and saving models, loading checkpoints, tokenising, metrics) is the rest of the wall;
of it, the eval row names the waits for each model's load and the attaching and detaching of its layer copies.
Run from the repo root: `PYTHONPATH=. python bench/bench_pipeline.py --workdir DIR [--small]`.

`--family mllama` / `--family idefics2` run the same stages at Llama-3.2-11B-Vision's / idefics2-8b's real shape
(bench/family_shapes.py: the released config.json, with the demo tokenizer's vocabulary and special-token ids), and
`--benchmark mllmu` runs MLLMU-Bench's preset (LoRA r16 stages, its eval sets) instead of FIUBench's. A full
finetune of an 11B model does not fit one H200 with AdamW, so these families run MLLMU-Bench.
"""

from __future__ import annotations

import argparse
import json
import queue
import resource
import shutil
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np

from bench import family_shapes
from bench.bench_jax_llava import peak_gb
from vlmu_jax import compile_cache, device_memory, image_embeddings, pipeline, presets, stages
from vlmu_jax.eval import batched
from vlmu_jax.eval.frozen import abstract_calls, stands_in
from vlmu_jax.eval.tasks import fiubench, mllmu
from vlmu_jax.models import tiny

LLAVA_7B = dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, vision_hidden_size=1024,
                vision_layers=24, vision_heads=16, image_size=336, patch_size=14, vocab_size=32064)
SMALL = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, vision_hidden_size=64,
             vision_layers=2, vision_heads=4, image_size=336, patch_size=14, vocab_size=4096)


TEMPLATES = {"llava": "llava-1.5", "mllama": "llama-3.2-vision", "idefics2": "idefics2"}
# The released checkpoints' config.json and preprocessor_config.json (random weights are drawn from them).
REAL_SHAPES = {"mllama": (family_shapes.MLLAMA, family_shapes.MLLAMA_PREPROCESSOR),
               "idefics2": (family_shapes.IDEFICS2, family_shapes.IDEFICS2_PREPROCESSOR)}
TOKEN_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


def real_checkpoint(family: str):
    """`pipeline.tiny_checkpoint` for `family` at its released shape: the released config's text, vision and
    perceiver parts, with the tiny builder's token ids (the demo tokenizer's vocabulary, image and special tokens)."""
    released, preprocessor = REAL_SHAPES[family]

    def build(shape, ids):
        config, _ = tiny.tiny_checkpoint(shape, ids)
        for part in ("text_config", "vision_config", "perceiver_config"):
            if part in released:
                own = {k: config[part][k] for k in TOKEN_FIELDS if k in config.get(part, {})}
                config[part] = {**released[part], **own}
        return config, dict(preprocessor)

    return build


def config(small: bool, steps: int, identities: int, objectives: str, family: str = "llava",
           benchmark: str = "fiubench", layerwise: str = "auto", layers: int | None = None):
    c = getattr(presets, benchmark)("ga", template=TEMPLATES[family], model_path="")
    c.model.tiny = True
    c.model.tiny_shape.update(architecture=family, text_model="llama", **(SMALL if small else LLAVA_7B))
    if layers is not None:
        c.model.tiny_shape.num_layers = layers
    c.data.synthetic_identities = identities
    c.unlearn.objective = objectives
    for stage in (c.finetune, c.retain_model, c.unlearn):
        # No Orbax checkpoints: a 7B full finetune's (weights + AdamW moments) does not fit the device's disk.
        stage.update(num_steps=steps, progress=False, keep_checkpoints=0, layerwise=layerwise)
    return c


class CallTimer:
    """Wraps a jitted function: times each call's device work, keyed by its input shapes, without waiting for it
    (the eval loop dispatches the next batch before it collects this one). One thread waits for the calls in
    the order they were made, which is the order the device runs them in: a call's time runs from when it was
    made, or when the call before it ended if that is later, to when its outputs are ready. Calls that only
    compile (`batched.compile_ahead`'s threads) or give shapes pass through untimed: `timed_compile_ahead` times
    the former."""

    ahead: list[tuple[float, float]] = []  # (start, end) of every compile_ahead call and wait for its programs
    busy: list[tuple[float, float]] = []  # (start, end) of every timed call's device work
    _made: queue.Queue = queue.Queue()  # (timer, key, start, outputs, tokens) of every timed call, in order
    _last_end = 0.0

    def __init__(self, fn, tokens_of):
        self.fn, self.tokens_of = fn, tokens_of
        self.calls: dict[tuple, list[float]] = defaultdict(list)
        self.tokens = 0

    def __call__(self, *args, **kwargs):
        if abstract_calls():  # a compile-only or shapes-only call returns its outputs' shapes, runs nothing
            return self.fn(*args, **kwargs)
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        shapes = tuple(np.shape(a) for a in args[1:] if hasattr(a, "shape"))
        key = shapes + tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        CallTimer._made.put((self, key, t0, out, self.tokens_of(args, kwargs)))
        return out

    @classmethod
    def wait_for_calls(cls) -> None:
        """The waiting thread's loop (a daemon)."""
        while True:
            timer, key, t0, out, tokens = cls._made.get()
            jax.block_until_ready(out)
            end = time.perf_counter()
            timer.calls[key].append(end - max(t0, cls._last_end))
            cls.busy.append((max(t0, cls._last_end), end))
            timer.tokens += tokens
            cls._last_end = end
            cls._made.task_done()

    def first_calls(self) -> list[dict]:
        """Per distinct shape: its calls and its first call's time beyond the median (its compile)."""
        return [{"shapes": [list(x) for x in key if isinstance(x, tuple) and x and isinstance(x[0], int)],
                 "calls": len(t), "first_s": round(t[0], 2), "compile_s": round(_split(t)[1], 2)}
                for key, t in self.calls.items()]

    def compute_and_compile(self) -> tuple[float, float]:
        """(compute s, compile s) over every shape, once every call made so far has been timed."""
        CallTimer._made.join()
        splits = [_split(t) for t in self.calls.values()]
        return sum(c for c, _ in splits), sum(k for _, k in splits)


class HostTimer:
    """Wall seconds of the eval stage's host-side steps that fall in its "other" time: waiting for each model's
    load (`stages._loaded_ahead`, overlapped with the model before when loaded ahead) and attaching / detaching
    its per-layer weight copies (`stages.layer_copies`: joining and splitting kernels, rebuilding the stack)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def loads(self, fn):
        def loaded_ahead(*args, **kwargs):
            models = fn(*args, **kwargs)
            while True:
                t0 = time.perf_counter()
                try:
                    model = next(models)
                except StopIteration:
                    return
                self.seconds["load_wait_s"] += time.perf_counter() - t0
                yield model

        return loaded_ahead

    def copies(self, fn):
        @contextmanager
        def layer_copies(*args, **kwargs):
            t0 = time.perf_counter()
            with fn(*args, **kwargs) as attached:
                self.seconds["copies_in_s"] += time.perf_counter() - t0
                try:
                    yield attached
                finally:
                    t1 = time.perf_counter()
            self.seconds["copies_out_s"] += time.perf_counter() - t1

        return layer_copies


class CompileSpans:
    """Every jit trace, MLIR lowering and XLA compile of the process (jax.monitoring's time spans): which program,
    which thread, when, how long. Why: the eval's first pass waits for compile-ahead, whose wall (18 s at
    Llama-3.2-11B-Vision's shape, bench/RESULTS.md session 36) is several programs compiling side by side."""

    EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
              "/jax/core/compile/backend_compile_duration": "compile"}

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, float, float]] = []  # (what, program, thread, start, end)
        jax.monitoring.register_event_time_span_listener(self._on_span)

    def _on_span(self, event: str, start: float, end: float, **kwargs) -> None:
        if event in self.EVENTS:
            self.spans.append((self.EVENTS[event], str(kwargs.get("fun_name", "?")),
                               threading.current_thread().name, start, end))

    def before(self, t0: float, seconds: float, min_s: float = 0.2) -> list[dict]:
        """The spans of at least `min_s` that began within `seconds` of `t0` (time.time()), in start order."""
        return [{"what": w, "program": p, "thread": th, "start_s": round(a - t0, 2), "s": round(b - a, 2)}
                for w, p, th, a, b in sorted(self.spans, key=lambda x: x[3])
                if 0 <= a - t0 <= seconds and b - a >= min_s]


def timed_compile_ahead(fn):
    """`batched.compile_ahead` recording in CallTimer.ahead its wall interval (it returns once the scoring
    programs are compiled) and each wait of the function it returns (for generation's programs). A stand-in's
    (`stages._compile_on_stand_in`, beside the first load) is not recorded: nothing waits for it but the model's
    own compile-ahead, which is."""

    def timed(wait):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = wait(*args, **kwargs)
            CallTimer.ahead.append((t0, time.perf_counter()))
            return out

        return call

    def call(model, *args, **kwargs):
        return fn(model, *args, **kwargs) if stands_in(model) else timed(timed(fn)(model, *args, **kwargs))

    return call


def _split(times: list[float]) -> tuple[float, float]:
    """(compute s, compile s) of one shape's calls: its first call's time beyond the median of the others is
    compile."""
    med = float(np.median(times[1:])) if len(times) > 1 else times[0]
    return sum(times[1:]) + min(times[0], med), max(times[0] - med, 0.0)


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of the intervals (the wall time of calls that ran side by side)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        total += max(b - max(a, end), 0.0)
        end = max(end, b)
    return total


def host_peak_gb() -> float:
    """The process's resident-set high-water mark so far (Linux reports ru_maxrss in KiB): what the host must hold
    for the stages run until now, the folders being written in the background included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train_compute(workdir: Path, names: list[str]) -> tuple[float, float, int]:
    """(compute s, compile s, tokens) of the trainer runs `names` from their metrics.jsonl."""
    compute = compile_ = 0.0
    tokens = 0
    for name in names:
        rows = [json.loads(ln) for ln in (workdir / "train" / name / "metrics.jsonl").read_text().splitlines()]
        per_step = np.array([r["step_s"] for r in rows])
        # The first step at each bucket length compiles: its time beyond the run's fastest step is compile.
        first = np.array(first_at_length(rows))
        fastest = float(per_step.min())
        compute += float(np.where(first, fastest, per_step).sum())
        compile_ += float((per_step - fastest)[first].sum())
        tokens += sum(r["tokens"] for r in rows)
    return compute, compile_, tokens


def first_at_length(rows: list[dict]) -> list[bool]:
    """Whether each metrics row is its run's first step at its length: the step that compiles that length's
    programs (the trainer times a step with its compile)."""
    seen: set[int] = set()
    first = []
    for r in rows:
        first.append(r["seq_len"] not in seen)
        seen.add(r["seq_len"])
    return first


def steady_step_times(rows: list[dict]) -> list[float]:
    """`step_s` of the metrics rows but each length's first step (`first_at_length`). Why: at 2 steps a stage's
    median was its compile step's and the next's mean (call 119: 8.08 s for a full 7B finetune step)."""
    return [r["step_s"] for r, first in zip(rows, first_at_length(rows), strict=True) if not first]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--unlearn_steps", type=int, default=None,
                        help="the unlearn stage's steps (default: --steps), e.g. many steps to time against a short "
                             "finetune")
    parser.add_argument("--cold", action="store_true",
                        help="no persistent compilation cache (config compilation_cache_dir empty): every run "
                             "compiles what it runs, so two runs' compile and wall times compare")
    parser.add_argument("--identities", type=int, default=400)
    parser.add_argument("--family", default="llava", choices=sorted(TEMPLATES),
                        help="llava: LLaVA-1.5-7B's shape; mllama / idefics2: the released 11B / 8b shapes")
    parser.add_argument("--benchmark", default="fiubench", choices=("fiubench", "mllmu"))
    parser.add_argument("--layers", type=int, default=None,
                        help="llava: the language model's layers (default 32): fewer, at the same width and sequence "
                             "shape, for a card with less memory than the full finetune of 32 needs")
    parser.add_argument("--objectives", default="ga,gd,npo")
    parser.add_argument("--layerwise", default="auto", choices=("auto", "always", "never"),
                        help="the training stages' step layer by layer (config train.layerwise; auto: on GPU)")
    parser.add_argument("--drop_base_weights", action="store_true",
                        help="delete the random base model's weight files once the finetune stage has read them "
                             "(the tokenizer and processor stay): an 8B-11B run's four folders fill the disk")
    parser.add_argument("--reference_logps", choices=("auto", "once", "per_step"), default=None,
                        help="the unlearn stage's reference log-probs (config unlearn.reference_logps; default: the "
                             "config's, auto)")
    parser.add_argument("--eval_objective", default="npo")
    parser.add_argument("--eval_forget", default="forget1",
                        help="forget split the eval stage scores (FIUBench's own: forget10; forget1 fits a lease)")
    parser.add_argument("--eval_retain", default="retain5", help="retain split the eval stage scores")
    parser.add_argument("--whole_rows", action="store_true",
                        help="score every row whole (config eval.shared_prompts=False) instead of each prompt once "
                             "and its answers over its KV cache (the default)")
    parser.add_argument("--eval_only", action="store_true",
                        help="skip training: evaluate the random base model under the three names eval reads "
                             "(finetuned, retain_model, unlearned_<eval_objective>), to time the eval stage alone")
    parser.add_argument("--train_only", action="store_true",
                        help="stop after the training stages (to time them alone, e.g. against "
                             "--image_embeddings_mb 0)")
    parser.add_argument("--image_max_mb", type=int, default=None,
                        help="config eval.max_batch_image_mb (default: the config's; 0 = no cap)")
    parser.add_argument("--image_embeddings_mb", type=int, default=None,
                        help="config eval.image_embeddings_mb and the training stages' (default: the config's; 0 = "
                             "the vision tower in every batch and step instead of each image made once into its "
                             "features or tower states)")
    parser.add_argument("--attention", choices=("auto", "xla", "cudnn"), default=None,
                        help="config model.attention (default: the config's, auto: cuDNN on GPU)")
    parser.add_argument("--load_ahead", choices=("auto", "always", "never"), default=None,
                        help="config eval.load_ahead (default: the config's; never: no model loads in a thread "
                             "beside the one evaluated)")
    parser.add_argument("--split_images", action="store_true",
                        help="Idefics2: image splitting on in every stage (five crops per image, 320 image tokens)")
    args = parser.parse_args()
    if args.layers is not None and args.family != "llava":
        parser.error("--layers: llava only (the other families take their released config's layers)")
    workdir = Path(args.workdir)
    run_config = config(args.small, args.steps, args.identities, args.objectives, args.family, args.benchmark,
                        args.layerwise, args.layers)
    device_memory.configure(run_config.device_memory_fraction)  # as the CLI: before the backend starts
    ws = pipeline.Workspace(run_config, workdir)
    if args.family in REAL_SHAPES and not args.small:
        pipeline.tiny_checkpoint = real_checkpoint(args.family)
    ws.config.eval.shared_prompts = not args.whole_rows
    if args.unlearn_steps is not None:
        ws.config.unlearn.num_steps = args.unlearn_steps
    if args.reference_logps is not None:
        ws.config.unlearn.reference_logps = args.reference_logps
    if args.cold:
        ws.config.compilation_cache_dir = ""
    if args.image_max_mb is not None:
        ws.config.eval.max_batch_image_mb = args.image_max_mb
    if args.attention is not None:
        ws.config.model.attention = args.attention
    if args.image_embeddings_mb is not None:
        for stage in ("finetune", "retain_model", "unlearn", "eval"):
            ws.config[stage].image_embeddings_mb = args.image_embeddings_mb
    if args.load_ahead is not None:
        ws.config.eval.load_ahead = args.load_ahead
    if args.split_images:
        with ws.config.unlocked():
            ws.config.model.image_processor_overrides.do_image_splitting = True
    compile_cache.configure(ws.config.compilation_cache_dir)  # as runner.run does
    results = []

    def report(stage: str, wall: float, compute: float, compile_: float, tokens: int, **extra) -> None:
        row = {"stage": stage, "wall_s": round(wall, 2), "compute_s": round(compute, 2),
               "compile_s": round(compile_, 2), "other_s": round(wall - compute - compile_, 2),
               "compute_share": round(compute / wall, 3), "tokens": tokens,
               "tokens_per_s_wall": round(tokens / wall, 1),
               "tokens_per_s_compute": round(tokens / compute, 1) if compute else None,
               "process_peak_gb": None if (peak := peak_gb()) is None else round(peak, 1),
               "host_peak_gb": round(host_peak_gb(), 1), **extra}
        results.append(row)
        print(json.dumps(row), flush=True)

    t0 = time.perf_counter()
    pipeline.prepare_data(ws)
    print(json.dumps({"stage": "data", "wall_s": round(time.perf_counter() - t0, 2)}), flush=True)
    t0 = time.perf_counter()
    pipeline.prepare_base_model(ws)
    report("base_model", time.perf_counter() - t0, 0.0, 0.0, 0)

    # One unlearn stage per objective, each model's HF folder deleted after it unless it is evaluated: six 7B
    # folders do not fit the device's disk.
    runs = [("finetune", "", ["finetuned", "retain_model"])] + [
        ("unlearn", o, [f"unlearned_{o}"]) for o in stages.objectives(ws)]
    if args.eval_only:
        runs, base = [], ws.base_model
        ws.config.eval.models = f"finetuned={base},unlearned_{args.eval_objective}={base}"
        ws.config.eval.reference_model = str(base)
    for stage, objective, names in runs:
        if objective:
            ws.config.unlearn.objective = objective
        t0 = time.perf_counter()
        getattr(stages, stage)(ws)
        wall = time.perf_counter() - t0
        report(f"{stage} {objective}".strip(), wall, *train_compute(workdir, names))
        if stage == "finetune" and args.drop_base_weights:
            for f in ws.base_model.glob("*.safetensors*"):
                f.unlink()
        if objective and objective != args.eval_objective:
            pipeline.wait_for_writes(ws.model_dir(names[0]))  # written in the background
            shutil.rmtree(ws.model_dir(names[0]))
        for name in names:  # per model: steady-state step time
            rows = [json.loads(ln) for ln in (workdir / "train" / name / "metrics.jsonl").read_text().splitlines()]
            steps = steady_step_times(rows)
            print(json.dumps({"model": name, "median_step_s": round(float(np.median(steps)), 4) if steps else None,
                              "steady_steps": len(steps), "tokens_per_step": rows[-1]["tokens"]}), flush=True)

    if args.train_only:
        finish(workdir, results)
        return
    threading.Thread(target=CallTimer.wait_for_calls, daemon=True).start()
    score = CallTimer(batched.token_logprobs, lambda a, k: int(np.size(a[1])))
    # shared prompts: the prompt positions and every continuation's positions
    shared = CallTimer(batched.continuation_logprobs, lambda a, k: int(np.size(a[1])) + int(np.size(a[4])))
    gen = CallTimer(batched.generate, lambda a, k: int(np.shape(a[1])[0]) * k["max_new_tokens"])
    batched.token_logprobs, batched.continuation_logprobs, batched.generate = score, shared, gen
    # each image's features (vision tower and projector), made once per model in the batch threads: model compute
    features = CallTimer(image_embeddings._image_inputs, lambda a, k: 0)
    image_embeddings._image_inputs = features
    spans = CompileSpans()
    fiubench.compile_ahead = timed_compile_ahead(fiubench.compile_ahead)
    mllmu.compile_ahead = timed_compile_ahead(mllmu.compile_ahead)
    host = HostTimer()
    stages._loaded_ahead, stages.layer_copies = host.loads(stages._loaded_ahead), host.copies(stages.layer_copies)
    ws.config.data.forget_split = args.eval_forget  # default forget1 / retain5: the same batches, fewer of them
    ws.config.eval.retain_split = args.eval_retain
    ws.config.unlearn.objective = args.eval_objective  # and of one unlearned model (plus finetuned, retain_model)
    ws.config.force = True  # evaluated again when the workdir has results (a second run times a warm cache)
    t0, started = time.perf_counter(), time.time()
    stages.eval(ws)
    wall = time.perf_counter() - t0
    (sc, sk), (hc, hk), (gc, gk) = score.compute_and_compile(), shared.compute_and_compile(), gen.compute_and_compile()
    fc, fk = features.compute_and_compile()
    sc, sk, scored = sc + hc, sk + hk, score.tokens + shared.tokens
    # compile-ahead's wall outside the timed calls' device work (the image features it makes, the scoring batches
    # that run while generation's programs compile): those count once, as the calls' own
    ahead = _covered(CallTimer.ahead + CallTimer.busy) - _covered(CallTimer.busy)
    report("eval", wall, sc + gc + fc, sk + gk + fk + ahead, scored + gen.tokens, compiled_ahead_s=round(ahead, 2),
           ahead_waits_s=[round(b - a, 2) for a, b in CallTimer.ahead],
           first_call_compile_s=round(sk + gk + fk, 2), features_s=round(fc, 2), score_s=round(sc, 2),
           scored_positions=scored, score_tokens_per_s=round(scored / sc, 1), generate_s=round(gc, 2),
           new_tokens_per_s=round(gen.tokens / gc, 1), shared_prompts=not args.whole_rows,
           **{k: round(v, 2) for k, v in host.seconds.items()})
    first_ahead = CallTimer.ahead[0][1] - t0 if CallTimer.ahead else wall
    print(json.dumps({"compiles_before_first_pass": spans.before(started, first_ahead)}), flush=True)
    print(json.dumps({"first_calls": {"score": score.first_calls() + shared.first_calls(),
                                      "generate": gen.first_calls(), "features": features.first_calls()}}),
          flush=True)
    finish(workdir, results)


def finish(workdir: Path, results: list[dict]) -> None:
    """As runner.run ends: wait for the trained models' folders written in the background; then the stage rows."""
    pipeline.wait_for_writes()
    (workdir / "bench_pipeline.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
