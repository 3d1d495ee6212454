"""fiubench on Qwen2-VL-7B-Instruct. Variant = unlearning method, e.g. `--config configs/fiubench_qwen2_vl.py:npo`.

Set the local checkpoint and data folders on the command line:
    --config.model.path=/ckpt/Qwen2-VL-7B-Instruct --config.data.root=/data/fiubench
"""

from vlmu_jax import presets


def get_config(arg: str | None = None):
    return presets.fiubench(arg, template="qwen2-vl", model_path="").lock()
