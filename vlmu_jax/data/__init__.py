"""Records, benchmark readers/writers, templates, image preprocessing and batching.

Import the submodules directly (`vlmu_jax.data.batching`, ...): this package imports nothing so that the
synthetic-data CLI stays free of jax/transformers start-up cost.
"""
