"""fiubench on llava-phi. Variant = unlearning method, e.g. `--config configs/fiubench_llava_phi3.py:npo`.

Set the local checkpoint and data folders on the command line:
    --config.model.path=/ckpt/llava-phi --config.data.root=/data/fiubench
"""

from vlmu_jax import presets


def get_config(arg: str | None = None):
    return presets.fiubench(arg, template="llava-phi", model_path="").lock()
