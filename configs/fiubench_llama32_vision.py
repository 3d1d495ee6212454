"""fiubench on llama-3.2-vision (Mllama). Variant = unlearning method, e.g. `:npo`.

Set the local checkpoint and data folders on the command line:
    --config.model.path=/ckpt/llama-3.2-vision --config.data.root=/data/fiubench
"""

from vlmu_jax import presets


def get_config(arg: str | None = None):
    return presets.fiubench(arg, template="llama-3.2-vision", model_path="").lock()
