"""A decoder's layers taken out of a traced program: the decoder calls of one trace recorded, their outputs given
to another.

Why: the trainer's per-layer step (unlearn/layerwise.py) runs each decoder layer as its own small jitted program
over per-layer weights, dispatched from Python, where one scanned program copies every layer's weights out of its
stack in the forward and again in the backward and compiles for 20-90 s (bench/NOTES.md, session 21). What runs
before the decoder (embeddings, the vision tower, the projector) and after it (the head, the objective) stays one
program each: a *collect* trace of the loss returns each decoder call's inputs, and a *replay* trace takes each
call's output as an argument, so the loss and the cotangents of those outputs come out of one value_and_grad.

Only a cache-less call (training, scoring without a cache) goes on the tape; every decoder call of a model's
forward must take inputs that do not depend on an earlier decoder call's output (true of every family here: one
decoder call per forward). A decoder with cross-attention layers (Mllama's) records their inputs too: the
cross-attention mask and each cross layer's K/V, which its model computes before the decoder call.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax

POLICY, REFERENCE = "policy", "reference"


@dataclass(frozen=True)
class DecoderCall:
    """What one decoder call ran with, besides its arrays: whose weights (POLICY or REFERENCE), the attention
    kernel, whether it is plain causal, the remat policy, and how many layers (None: all, then the final norm)."""

    role: str
    impl: str
    causal: bool
    remat: str
    limit: int | None


class DecoderInputs(NamedTuple):
    """One decoder call's arrays: embeddings, positions, self-attention mask, each layer's key (None: no
    dropout) and, for a decoder with cross-attention layers (mllama.MllamaTextModel), the cross-attention state and
    every cross layer's K/V (None: no image in the batch, the cross layers are skipped; and for other decoders)."""

    h: jax.Array
    positions: jax.Array
    mask: Any
    keys: tuple[jax.Array, ...] | None
    cross: Any = None
    cross_kv: tuple | None = None


@dataclass
class Tape:
    """The decoder calls of one trace. `roles`: id of each decoder module merged in the trace -> its role.
    `outputs` None: collect (each call's inputs kept, its input returned as a stand-in output, whatever follows
    it is dead code to the caller); else replay (call k returns outputs[k], final-normed unless the call stops
    early)."""

    roles: dict[int, str]
    outputs: Sequence[jax.Array] | None = None
    calls: list[DecoderCall] = field(default_factory=list)
    inputs: list[DecoderInputs] = field(default_factory=list)

    def record(self, lm: Any, h: jax.Array, positions: jax.Array, mask: Any,
               layer_rngs: jax.Array | Sequence[jax.Array] | None, *, impl: str, causal: bool, remat: str,
               limit: int | None, cross: Any = None, cross_kv: tuple | None = None) -> jax.Array:
        """The decoder `lm`'s call on embeddings `h` (its mask and per-layer keys already made; `cross` /
        `cross_kv`: a cross-attention decoder's inputs besides, see DecoderInputs)."""
        if id(lm) not in self.roles:
            raise ValueError("a decoder call outside the trainer's policy and reference models reached the tape")
        self.calls.append(DecoderCall(self.roles[id(lm)], impl, causal, remat, limit))
        if self.outputs is None:
            n = lm.config.num_layers if limit is None else limit
            keys = None if layer_rngs is None else tuple(layer_rngs[i] for i in range(n))
            self.inputs.append(DecoderInputs(h, positions, mask, keys, cross, cross_kv))
            return h
        out = self.outputs[len(self.calls) - 1]
        return lm.norm(out) if limit is None else out


_ACTIVE: contextvars.ContextVar[Tape | None] = contextvars.ContextVar("decoder_tape", default=None)


def active() -> Tape | None:
    """The tape decoder calls go on now (None: they run their layers)."""
    return _ACTIVE.get()


@contextmanager
def recording(tape: Tape) -> Iterator[Tape]:
    """Decoder calls in the body (while tracing) go on `tape` instead of running their layers."""
    token = _ACTIVE.set(tape)
    try:
        yield tape
    finally:
        _ACTIVE.reset(token)
