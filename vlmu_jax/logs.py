"""What a person watching a run sees: one line per stage with its duration, progress bars with rate and ETA, and
third-party loggers kept quiet.

Orbax logs dozens of INFO records per checkpoint through absl (about 1,180 of the 1,291 lines a GPU demo printed)
and XLA's C++ logging adds its own, which drowns the few lines that say where a run is. By default only their
warnings pass, while vlmu_jax's own records always do, in a short ``HH:MM:SS message`` form; absl's
``--verbosity=1`` lets everything through again with absl's full prefixes.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from absl import logging as absl_logging
from tqdm import tqdm

_PACKAGE_DIR = str(Path(__file__).resolve().parent)


class _OursOrWarnings(logging.Filter):
    """Passes vlmu_jax's records (by the file that logged them) and every other library's warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


class _ShortFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {level}{record.getMessage()}"


def configure(verbosity: int) -> None:
    """Quiets Orbax, absl, jax and XLA below warnings unless `verbosity` (absl's flag) is 1 or more.

    Call before jax is first imported: XLA's C++ logging reads TF_CPP_MIN_LOG_LEVEL once."""
    if verbosity >= 1:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA C++: errors only (jax's own default also shows warnings)
    handler = absl_logging.get_absl_handler()
    handler.addFilter(_OursOrWarnings())
    handler.setFormatter(_ShortFormatter())


def say(message: str) -> None:
    """One line for the person at the terminal (process 0 only), printed above any progress bar."""
    import jax

    if jax.process_index() == 0:
        tqdm.write(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr)


def format_duration(seconds: float) -> str:
    """`12.3 s`, `2 min 08 s`, `1 h 02 min`: what a person reads at a glance."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@contextmanager
def timed(name: str) -> Iterator[None]:
    """Says `<name>: done in <duration>` when the block finishes (nothing when it raises: the error line follows)."""
    start = time.perf_counter()
    yield
    say(f"{name}: done in {format_duration(time.perf_counter() - start)}")


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str,
             initial: int = 0, leave: bool = True, disable: bool = False) -> tqdm:
    """A progress bar with count, rate and ETA. On a terminal it redraws often; into a log file (no TTY) it adds
    an update only every 30 s, so a long run's log is not thousands of carriage-return redraws, and it is always
    left in place: a log keeps one line per loop with its duration and rate instead of a blanked one."""
    tty = sys.stderr.isatty()
    interval = 0.1 if tty else 30.0
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave or not tty,
                disable=disable, file=sys.stderr, mininterval=interval, maxinterval=max(interval, 10.0),
                dynamic_ncols=tty)


def close_bars() -> None:
    """Closes the progress bars an exception left open, so the error line that follows starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
