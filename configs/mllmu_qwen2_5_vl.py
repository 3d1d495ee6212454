"""mllmu on Qwen2.5-VL-7B-Instruct. Variant = unlearning method, e.g. `--config configs/mllmu_qwen2_5_vl.py:npo`.

Set the local checkpoint and data folders on the command line:
    --config.model.path=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.root=/data/mllmu
"""

from vlmu_jax import presets


def get_config(arg: str | None = None):
    return presets.mllmu(arg, template="qwen2-vl", model_path="").lock()
