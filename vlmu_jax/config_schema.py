"""The shape of a vlmu_jax config: every field, its type and its default, in one place.

Config files start from `base_config()` and override fields; the result is locked, so a typo in a
key (in a file or on the command line) is an error instead of a silently ignored setting, and
ConfigDict's type checks turn `--config.unlearn.lr=abc` into an error too.
"""

from __future__ import annotations

import os

import ml_collections

from vlmu_jax import compile_cache, model_sources
from vlmu_jax.models.layers import REMAT_POLICIES
from vlmu_jax.protocol import resolve as resolve_protocol
from vlmu_jax.unlearn.reference_pass import MODES as REFERENCE_MODES

STAGES = ("finetune", "unlearn", "eval", "export", "report")
TRAIN_STAGES = ("finetune", "retain_model", "unlearn")  # the config sections made by train_config


def train_config(**overrides) -> ml_collections.ConfigDict:
    """One training stage (finetune or unlearn): the seeds' knobs under their own names."""
    c = ml_collections.ConfigDict()
    c.objective = "finetune"  # see vlmu_jax.unlearn.objectives.OBJECTIVES
    c.num_epochs = 1
    c.num_steps = 0  # > 0: train exactly this many micro-steps instead of num_epochs
    c.batch_size = 4  # global batch per micro step
    c.grad_accum = 1
    c.lr = 1e-5
    c.lr_schedule = "cosine"  # cosine | linear | constant
    c.warmup_ratio = 0.0
    c.weight_decay = 0.01
    c.max_grad_norm = 1.0  # 0 = no clipping
    c.adam_eps = 1e-8  # torch.optim.AdamW's; transformers' AdamW (MLLMU-Bench) uses 1e-6
    c.beta = 0.1  # NPO / DPO / SimNPO temperature
    c.npo_batch_mean = False  # MLLMU-Bench's batch-level NPO instead of the per-sequence NPO paper form
    c.retain_weight = 1.0
    c.simnpo_gamma = 0.0
    # Methods from open-unlearning and MMUnlearner (defaults: their papers' / open-unlearning's configs).
    c.forget_weight = 1.0  # gamma of the GradDiff family (WGA, SatImp, RMU): weight of the forget term
    c.wga_beta = 1.0  # WGA token weight p^beta
    c.satimp_beta1 = 5.0  # SatImp token weight p^beta1 (1 - p)^beta2
    c.satimp_beta2 = 1.0
    c.undial_beta = 10.0  # UNDIAL: how far the answer token's reference logit is lowered
    c.ceu_ignore_first = 1  # CE-U: answer tokens of each sequence left out of the loss
    c.rmu_steering = 2.0  # RMU: norm c of the control vector c * u
    c.hidden_layer = 7  # RMU: decoder layer (0-based, HF model.layers[L]) whose output is steered
    c.saliency_threshold = 1.0  # MMUnlearner: gamma of the mask I_forget / I_preserve >= gamma
    c.lora_rank = 0  # 0 = train the tuned towers fully
    c.lora_alpha = 16.0
    c.lora_dropout = 0.05
    c.lora_targets = ""  # regex of the adapted modules; empty = the protocol's (vlmu_jax.protocol)
    # Rematerialisation of this stage's training step; "" = config.model.remat. A LoRA stage keeps only the matmul
    # outputs with "dots_with_no_batch_dims_saveable": at LLaVA-1.5-7B shape as fast as none and a quarter less
    # memory (bench/NOTES.md); "dots_and_dropout_saveable" also keeps the LoRA dropout masks (3.6 ms faster per 7B
    # step, 2.9 GiB more); "dots_attention_dropout_saveable" (Mllama's and Qwen2-VL's presets: presets.lora_remat)
    # also cuDNN attention's outputs; "dots_attention_inputs_dropout_saveable" (LLaVA-1.5's) also attention's
    # inputs, q and k after the rotary and v; "projections_attention_dropout_saveable"
    # keeps each projection's output (base + LoRA) once instead of the dots: ~20 % less memory for 1-2 % more time
    # per LoRA step; a full finetune at 7B wants "full".
    c.remat = ""
    # The step with the decoder's layers run one jitted program at a time (vlmu_jax.unlearn.layerwise): auto = on GPU
    # for a LoRA stage of LLaVA, Idefics2, Qwen2-VL or Mllama (-7 to -13 % per step at 7B-11B, bench/RESULTS.md
    # sessions 22-23); always (a full finetune too); never (one scanned program).
    c.layerwise = "auto"
    # NPO's and DPO's reference log-probs (vlmu_jax.unlearn.reference_pass): "once" = one forward pass over the
    # reference streams' rows before the first step, whose values every step then reads (no reference model in
    # the step); "per_step" = a reference forward inside every step, as the originals; "auto" = once where a
    # stream's steps read its rows more than once (FIUBench's 5 epochs), else per step.
    c.reference_logps = "auto"
    c.tune_vision_tower = False
    c.tune_mm_projector = True
    c.tune_language_model = True
    # Host memory in MB for every image the stage shows, made once before its first step into what the model reads
    # past its frozen part and carried by its batches in place of the pixels (vlmu_jax/image_embeddings.py): the
    # features where neither the vision tower nor the projector trains (MLLMU-Bench's stages), the tower's states
    # where the projector trains (FIUBench's); only while the vision tower is frozen and a reference model shares
    # it. Over this, or 0: the vision tower runs in every step.
    c.image_embeddings_mb = 4096
    c.save_every = 100
    c.keep_checkpoints = 2  # 0: no Orbax checkpoints (no resume; the stage's HF folder is its output)
    c.update(overrides)
    return c


def base_config() -> ml_collections.ConfigDict:
    """All fields with their defaults; config files override, then `lock()`."""
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.benchmark = "fiubench"  # fiubench | mllmu
    # original: each benchmark's own code path, quirks included (numbers comparable with the original code);
    # corrected: the intended definitions. See vlmu_jax.protocol and the README's table of differences.
    c.protocol = "original"
    c.stages = "finetune,unlearn,eval,report"  # comma-separated subset of STAGES, run in STAGES order
    c.seed = 233
    c.force = False  # redo stages whose outputs already exist in the workdir
    # Persistent XLA compilation cache (vlmu_jax.compile_cache), resolved here so config.json records the folder;
    # empty = off.
    c.compilation_cache_dir = compile_cache.default_dir()
    # Share of each GPU's memory XLA's allocator takes (vlmu_jax.device_memory; JAX's own default is 0.75, under
    # which FIUBench's DPO at LLaVA-1.5-7B's shape does not fit an 80 GB card). The environment's
    # XLA_PYTHON_CLIENT_MEM_FRACTION, when set, wins.
    c.device_memory_fraction = 0.9

    c.data = ml_collections.ConfigDict()
    c.data.root = ""  # FIUBench folder (full.json, split.json, images) or the MLLMU-Bench folder
    c.data.synthetic_identities = 0  # > 0: generate the embedded synthetic benchmark into the workdir
    c.data.synthetic_seed = 0
    c.data.synthetic_image_size = 64
    c.data.forget_split = "forget10"  # FIUBench: forget1 | forget5 | forget10
    c.data.forget_ratio = 10  # MLLMU-Bench: 5 | 10 | 15
    c.data.max_length = 384
    # Training streams: every batch padded to the stream's longest bucket (the train step compiles once, not once
    # per bucket) when that adds at most this fraction of padding positions; 0 = each batch its own bucket.
    c.data.single_length_max_padding = 0.25
    c.data.append_eos = False  # the seeds add no EOS after LLaVA answers (FIUBench original: must stay False)
    c.data.eval_limit = 400  # FIUBench evaluates the first 400 records
    # Processed images kept in host memory, per image processor (training's and evaluation's: up to twice this),
    # least recently used dropped first (data/image_cache.py): 1024 MB hold ~750 of LLaVA-1.5's 336 px images, 16 of
    # idefics2's split 980 px ones.
    c.data.image_cache_mb = 1024

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # local Hugging Face checkpoint folder (config.json + safetensors + tokenizer)
    c.model.tiny = False  # build a tiny random LLaVA + demo tokenizer instead of loading `path`
    c.model.tiny_shape = ml_collections.ConfigDict()  # the tiny model's shape (used when tiny=True)
    c.model.tiny_shape.architecture = "llava"  # HF model_type of the tiny model, see vlmu_jax.models.tiny
    c.model.tiny_shape.text_model = "llama"  # llama | phi3 (llava only)
    c.model.tiny_shape.vocab_size = 1024
    c.model.tiny_shape.hidden_size = 128
    c.model.tiny_shape.intermediate_size = 256
    c.model.tiny_shape.num_layers = 2
    c.model.tiny_shape.num_heads = 4
    c.model.tiny_shape.vision_hidden_size = 64
    c.model.tiny_shape.vision_layers = 2
    c.model.tiny_shape.vision_heads = 4
    c.model.tiny_shape.image_size = 32
    c.model.tiny_shape.patch_size = 8
    c.model.tiny_shape.perceiver_latents = 8  # idefics2: image tokens per (sub-)image (idefics2-8b: 64)
    c.model.tiny_shape.max_tiles = 2  # mllama: tiles per image (Llama-3.2-Vision: 4)
    c.model.template = "llava-1.5"  # prompt template, see vlmu_jax.data.templates
    # Keys that replace the checkpoint's preprocessor_config.json values (e.g. do_image_splitting=False, as
    # MLLMU-Bench builds Idefics2's processor); presets add the keys they set.
    c.model.image_processor_overrides = ml_collections.ConfigDict()
    c.model.dtype = "bfloat16"  # compute/param dtype of the loaded model
    c.model.attention = "auto"  # auto (cudnn on GPU, xla elsewhere) | xla | cudnn
    c.model.remat = "none"  # see vlmu_jax.models.layers.REMAT_POLICIES; the stages' own `remat` overrides it
    c.model.scan_layers = True
    # Trained models (finetuned, retain_model, unlearned_*) kept on the accelerator after their HF folder is
    # written, so later stages of the same process take them from memory instead of reading the folder back: at
    # most this many, least recently used dropped first (each costs its params: 13.5 GiB for a 7B model in
    # bfloat16, sharded like the model). 2 holds the finetune stage's two outputs, which unlearn and eval load
    # next; 0 = every stage reads the folders.
    c.model.keep_in_memory = 2

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = fill with the remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.finetune = train_config(objective="finetune", lr=1e-5, num_epochs=5)
    # The retain-only twin of `finetune`: the reference model of the KS-test forget quality.
    c.retain_model = train_config(objective="finetune", lr=1e-5, num_epochs=5)
    c.unlearn = train_config(
        objective="ga", lr=1e-4, num_epochs=5, warmup_ratio=0.06, lora_rank=128, lora_alpha=256.0,
        grad_accum=16,
    )

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16
    # Padded prompt positions per eval batch, at most: batches of longer rows get fewer rows (eval.batched
    # .rows_per_batch), so a KV cache of batch_size x ~8.6k tokens (MLLMU-Bench's few-shot images at LLaVA-1.5's
    # 576 tokens each) does not run the device out of memory. 0 = batch_size rows whatever their length.
    c.eval.max_batch_tokens = 32768
    # The rows' image inputs per eval batch in MB, at most (eval.batched.BatchCap): rows of many or large images
    # (Idefics2's five 980 px crops per image with splitting, MLLMU-Bench's few-shot images) go in smaller batches,
    # so the host's arrays and the vision tower's work stay bounded. 2048 keeps FIUBench's rows of every family at
    # 16 a batch (Idefics2's five crops with splitting: 62 MB a row). 0 = no cap.
    c.eval.max_batch_image_mb = 2048
    # Host memory in MB for each image's features, computed once per evaluated model and put in every batch that
    # shows the image instead of its pixels (vlmu_jax/image_embeddings.py): FIUBench shows each identity's picture in
    # all of its questions, in every pass. LLaVA-1.5-7B: 4.7 MB an image; idefics2-8b with splitting: 2.6 MB;
    # Llama-3.2-11B-Vision's four tiles: 52 MB. Not with several processes. 0 = off, the vision tower runs in every
    # batch.
    c.eval.image_embeddings_mb = 4096
    c.eval.retain_split = "retain15"  # FIUBench eval.yaml pairs forget splits with retain5 / retain15
    c.eval.max_new_tokens = 50
    # Per-layer copies of the decoder's stacked weights in place of the stack while a model is evaluated
    # (eval/layer_copies.py), so every forward skips XLA:GPU's per-layer copy out of the stack; no more device
    # memory. auto = on GPU | always | never.
    c.eval.layer_copies = "auto"
    # Load the next model while one is evaluated (stages.eval): auto = when one process runs and the devices have
    # room for a second model | always | never.
    c.eval.load_ahead = "auto"
    # Compile every scoring and generation shape of a split at once, in threads, before running it (eval/batched.py
    # compile_ahead): a cold run pays the longest compile instead of their sum.
    c.eval.compile_ahead = True
    # Score each prompt (image + question) once and the answers that repeat it (FIUBench's ground-truth, paraphrased
    # and perturbed answers; MLLMU-Bench's options) as continuations over its KV cache (eval/batched.py score_pass):
    # 6.1x fewer scored positions on FIUBench's splits (bench/prefix_share_count.py); at 7B on one H200 the eval
    # stage at forget10 / retain15 took 185 s instead of 326 s (bench/RESULTS.md, session 9). The same values up to
    # float rounding; False scores every row whole.
    c.eval.shared_prompts = True
    # Checkpoints to evaluate instead of the run's own models (see vlmu_jax.model_sources): "NAME=PATH,..." of HF
    # folders (ours, transformers', PEFT-merged), and the retain-only reference that Forget Quality compares against.
    c.eval.models = ""
    c.eval.reference_model = ""
    # LLM judge (FIUBench GPT score, MLLMU-Bench factuality): runs when judge_base_url is set (openai) or
    # judge_backend is local.
    c.eval.judge_backend = "openai"  # openai (any OpenAI-compatible endpoint) | local (a vlmu_jax checkpoint)
    c.eval.judge_base_url = ""  # OpenAI-compatible endpoint (ends in /v1); empty = no HTTP judge
    c.eval.judge_model = ""  # model name sent to the endpoint (and the cache key; local default: its path)
    c.eval.judge_api_key_env = "OPENAI_API_KEY"
    c.eval.judge_model_path = ""  # local backend: HF-format checkpoint folder the judge runs on
    c.eval.judge_template = ""  # local backend: prompt template of the judge checkpoint; empty = model.template
    c.eval.judge_max_tokens = 0  # verdict length; 0 = the original's (FIUBench 20, MLLMU-Bench 700)
    c.eval.judge_prompt_file = ""  # text file replacing our judge prompt wording (str.format placeholders)
    c.eval.judge_system_file = ""  # text file replacing our judge system message
    # Utility benchmarks, answered by every evaluated model; empty = skip.
    c.eval.mme_root = ""  # MME_Benchmark_release_version folder (one subfolder per category)
    c.eval.pope_path = ""  # a coco_pope_<setting>.json file, or a folder of them
    c.eval.pope_image_root = ""  # folder of the COCO images POPE names; empty = next to the POPE file(s)

    c.export = ml_collections.ConfigDict()
    c.export.dtype = ""  # empty = keep the model's dtype
    # "" = the finished unlearned models; "latest" or a step number = that Orbax checkpoint of each unlearning
    # run (train/unlearned_<method>/checkpoints), e.g. of an interrupted run.
    c.export.from_checkpoint = ""

    return c


def stage_list(config: ml_collections.ConfigDict) -> list[str]:
    """The configured stages in pipeline order; unknown names are an error."""
    asked = [s.strip() for s in config.stages.split(",") if s.strip()]
    unknown = sorted(set(asked) - set(STAGES))
    if unknown:
        raise ValueError(f"config.stages names unknown stage(s) {unknown}; known: {list(STAGES)}")
    return [s for s in STAGES if s in asked]


LAYER_COPIES = ("auto", "always", "never")  # the modes of eval.layer_copies, eval.load_ahead and train.layerwise


def validate(config: ml_collections.ConfigDict) -> None:
    """Fails before any work starts, with one line that says what to fix."""
    stage_list(config)
    if config.benchmark not in ("fiubench", "mllmu"):
        raise ValueError(f"config.benchmark must be 'fiubench' or 'mllmu', got {config.benchmark!r}")
    resolve_protocol(config)
    if not config.model.tiny:
        if not config.model.path and _needs_base_model(config):
            raise ValueError("config.model.path is empty: give a local Hugging Face checkpoint folder (to only "
                             "evaluate checkpoints: --config.stages=eval,report --config.eval.models=NAME=PATH,...)")
        if config.model.path and not os.path.isdir(config.model.path):
            raise FileNotFoundError(f"config.model.path {config.model.path!r} is not a folder")
    if config.data.synthetic_identities <= 0:
        if not config.data.root:
            raise ValueError(
                "config.data.root is empty: give the benchmark folder or set data.synthetic_identities"
            )
        if not os.path.isdir(config.data.root):
            raise FileNotFoundError(f"config.data.root {config.data.root!r} is not a folder")
    for where, policy in [("model.remat", config.model.remat)] + [
            (f"{name}.remat", config[name].remat or config.model.remat) for name in TRAIN_STAGES]:
        if policy not in REMAT_POLICIES:
            raise ValueError(f"config.{where} must be one of {sorted(REMAT_POLICIES)}, got {policy!r}")
    for name in TRAIN_STAGES:
        if config[name].layerwise not in LAYER_COPIES:
            raise ValueError(f"config.{name}.layerwise must be one of {LAYER_COPIES}, got {config[name].layerwise!r}")
        if config[name].reference_logps not in REFERENCE_MODES:
            raise ValueError(f"config.{name}.reference_logps must be one of {REFERENCE_MODES}, got "
                             f"{config[name].reference_logps!r}")
    if config.model.keep_in_memory < 0:
        raise ValueError(f"config.model.keep_in_memory must be >= 0 (models held), got {config.model.keep_in_memory}")
    if not 0 <= config.data.single_length_max_padding:
        raise ValueError(f"config.data.single_length_max_padding must be >= 0 (a fraction of a stream's positions), "
                         f"got {config.data.single_length_max_padding}")
    if not 0 < config.device_memory_fraction <= 1:
        raise ValueError(f"config.device_memory_fraction must be in (0, 1], got {config.device_memory_fraction}")
    _validate_eval(config.eval)
    source = config.export.from_checkpoint
    if source not in ("", "latest") and not source.isdigit():
        raise ValueError(f"config.export.from_checkpoint must be '', 'latest' or a step number, got {source!r}")


def _needs_base_model(config: ml_collections.ConfigDict) -> bool:
    """Training and export start from the base checkpoint; evaluating given checkpoints takes the tokenizer and
    processor from the first of them, and the report reads only results."""
    stages = set(stage_list(config))
    if stages <= {"eval", "report"} and model_sources.given_checkpoints(config.eval):
        return False
    return stages != {"report"}


def _validate_eval(e: ml_collections.ConfigDict) -> None:
    model_sources.validate(e)
    if e.layer_copies not in LAYER_COPIES:
        raise ValueError(f"config.eval.layer_copies must be one of {LAYER_COPIES}, got {e.layer_copies!r}")
    if e.load_ahead not in LAYER_COPIES:
        raise ValueError(f"config.eval.load_ahead must be one of {LAYER_COPIES}, got {e.load_ahead!r}")
    for key in ("max_batch_tokens", "max_batch_image_mb", "image_embeddings_mb"):
        if e[key] < 0:
            raise ValueError(f"config.eval.{key} must be >= 0 (0 = none), got {e[key]}")
    if e.judge_backend not in ("openai", "local"):
        raise ValueError(f"config.eval.judge_backend must be 'openai' or 'local', got {e.judge_backend!r}")
    if e.judge_backend == "local":
        if not e.judge_model_path:
            raise ValueError("config.eval.judge_backend='local' needs config.eval.judge_model_path (a local "
                             "Hugging Face checkpoint folder)")
        if not os.path.isdir(e.judge_model_path):
            raise FileNotFoundError(f"config.eval.judge_model_path {e.judge_model_path!r} is not a folder")
    for key in ("judge_prompt_file", "judge_system_file"):
        if e[key] and not os.path.isfile(e[key]):
            raise FileNotFoundError(f"config.eval.{key} {e[key]!r} is not a file")
    if e.mme_root and not os.path.isdir(e.mme_root):
        raise FileNotFoundError(f"config.eval.mme_root {e.mme_root!r} is not a folder (MME_Benchmark_release_version)")
    if e.pope_path and not os.path.exists(e.pope_path):
        raise FileNotFoundError(f"config.eval.pope_path {e.pope_path!r} does not exist (a coco_pope_<setting>.json "
                                "file or a folder of them)")
    if e.pope_image_root and not os.path.isdir(e.pope_image_root):
        raise FileNotFoundError(f"config.eval.pope_image_root {e.pope_image_root!r} is not a folder")
