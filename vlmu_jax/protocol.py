"""How a benchmark is run: the one object every stage reads to format, mask, prompt, extract, train and log.

Two protocols exist for each benchmark:

- ``original`` (the default) reproduces the benchmark's own code path, quirks included, so that our numbers
  can stand next to numbers made with the original PyTorch code on the same model and data.
- ``corrected`` applies the intended definitions (see the README's table of differences).

A stage never re-derives any of this from scattered flags: it asks ``Workspace.protocol``.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_collections

PROTOCOLS = ("original", "corrected")


@dataclass(frozen=True)
class Protocol:
    """The decisions that differ between protocols, per benchmark.

    Fields are grouped by benchmark; a field of the other benchmark keeps its ``corrected`` value.
    """

    name: str
    benchmark: str

    # FIUBench (gray311/VLM_Unlearned)
    # The metric quirks of evaluate_util.py / aggregate_eval_stat.py: the first answer token left out of the loss
    # sum, generations without a period cut to "", ROUGE's dropped last character, APE questions through
    # str.capitalize(), empty gpt / exact_match lists entering Model Utility as 0 (see vlmu_jax.eval.metrics).
    fiubench_metric_quirks: bool = False

    @property
    def original(self) -> bool:
        return self.name == "original"


def resolve(config: ml_collections.ConfigDict) -> Protocol:
    """The protocol a config asks for; an unknown name is an error that lists the known ones."""
    name = config.protocol
    if name not in PROTOCOLS:
        raise ValueError(f"config.protocol must be one of {list(PROTOCOLS)}, got {name!r}")
    original = name == "original"
    return Protocol(name=name, benchmark=config.benchmark,
                    fiubench_metric_quirks=original and config.benchmark == "fiubench")
