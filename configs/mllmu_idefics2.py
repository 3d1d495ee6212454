"""mllmu on idefics2. Variant = unlearning method, e.g. `--config configs/mllmu_idefics2.py:npo`.

Set the local checkpoint and data folders on the command line:
    --config.model.path=/ckpt/idefics2 --config.data.root=/data/mllmu
"""

from vlmu_jax import presets


def get_config(arg: str | None = None):
    return presets.mllmu(arg, template="idefics2", model_path="").lock()
