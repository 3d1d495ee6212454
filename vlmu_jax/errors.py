"""The one exception for input a user can fix, and the one line it becomes.

A benchmark run reads many files written by other tools: the benchmark's JSON / parquet, images, checkpoints
saved by transformers or PEFT, tokenizer and processor files, the workdir itself. When one of them is wrong the
useful answer is which file, which record, which field and what is wrong with it, not a traceback from deep
inside numpy. The reading edges raise `InputError` with those parts; `main.py` catches it, prints
``vlmu_jax: error: <file>: <record>: <field>: <what>`` and exits with code 2, as it does for a bad config.
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input (data, checkpoint, tokenizer/processor files, workdir); every part but `what` is optional."""

    def __init__(self, what: str, *, file: str | Path | None = None, record: str | None = None,
                 field: str | None = None):
        self.file, self.record, self.field, self.what = file, record, field, what
        super().__init__(": ".join(str(p) for p in (file, record, field, what) if p not in (None, "")))

