"""vlmu_jax: machine unlearning benchmarks for vision-language models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="vlmu_jax",
    version="0.1.0",
    description="FIUBench and MLLMU-Bench unlearning benchmarks for VLMs in JAX/Flax NNX",
    packages=find_packages(include=["vlmu_jax", "vlmu_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.11",
        "transformers>=5.0",
        "tokenizers",
        "safetensors",
        "datasets",
        "pyarrow",
        "ml-collections",
        "absl-py",
        "scipy",
        "numpy",
        "pillow",
        "rouge-score",
        "matplotlib",
        "tqdm",
        "tensorboardX",
    ],
    entry_points={"console_scripts": ["vlmu-jax = vlmu_jax.main:cli"]},
    extras_require={
        # PyTorch is only needed for parity tests against transformers' reference models.
        # 2.13.0 is pinned because it is the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
        "torch": ["torch==2.13.0"],
        "test": ["torch==2.13.0", "pytest", "pytest-xdist", "ruff"],
        # On GPU hosts install jax with the CUDA plugin: pip install "jax[cuda13]".
        # On TPU VMs: pip install "jax[tpu]".
    },
)
