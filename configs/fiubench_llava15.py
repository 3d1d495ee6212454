"""fiubench on llava-1.5. Variant = unlearning method, e.g. `--config configs/fiubench_llava15.py:npo`.

Set the local checkpoint and data folders on the command line:
    --config.model.path=/ckpt/llava-1.5 --config.data.root=/data/fiubench
"""

from vlmu_jax import presets


def get_config(arg: str | None = None):
    return presets.fiubench(arg, template="llava-1.5", model_path="").lock()
