"""How Flax param paths map to HF tensor names: the shared vocabulary every architecture's map is built from.

A Flax path is ``(top, *modules, leaf)``; ``top`` picks an HF prefix, a ``layers`` module stands for the
stacked per-layer tensors (``{i}`` in the HF name, one HF tensor per layer), and the leaf picks the HF
tensor name and whether the kernel is stored transposed (torch Linear is [out, in]).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flax import nnx


@dataclass(frozen=True)
class HFParam:
    """Where one Flax param lives in an HF checkpoint: name (``{i}`` = layer index when stacked) and
    layout."""

    name: str
    transpose: bool
    stacked: bool
    layers: tuple[int, ...] | None = None  # the HF layer index of each stacked slice (default: its own index)

    def names(self, n: int) -> list[str]:
        """The HF tensor names of a value with `n` slices when stacked (its one name otherwise)."""
        if not self.stacked:
            return [self.name]
        return [self.name.format(i=i if self.layers is None else self.layers[i]) for i in range(n)]

    def swaps(self, ndim: int) -> bool:
        """Whether a Flax value of `ndim` axes is stored with its last two axes swapped (a per-layer tensor of
        fewer than two axes has nothing to swap)."""
        return self.transpose and ndim - self.stacked >= 2


LEAVES: dict[str, tuple[str, bool]] = {
    "kernel": ("weight", True),
    "bias": ("bias", False),
    "weight": ("weight", False),
    "embed_tokens": ("embed_tokens.weight", False),
    "patch_embedding": ("patch_embedding.weight", False),
    "class_embedding": ("class_embedding", False),
    "position_embedding": ("position_embedding.weight", False),
}


def base_params(model: nnx.Module) -> list[tuple[tuple[str, ...], nnx.Variable]]:
    """(path, variable) of every base param; LoRA adapters are not part of any checkpoint layout."""
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(str(p) for p in path)
        if not (isinstance(var, nnx.LoRAParam) or path[-1].startswith("lora_")):
            out.append((path, var))
    return out


def stacked_name_map(
    model: nnx.Module,
    prefixes: Mapping[str, str],
    stacks: Mapping[str, str],
    leaves: Mapping[str, tuple[str, bool]] = LEAVES,
    special: Mapping[tuple[str, ...], HFParam] | None = None,
) -> dict[tuple[str, ...], HFParam]:
    """Flax path -> HFParam for every base param: ``special`` first, else prefix + modules + leaf.

    ``stacks[top]`` replaces the ``layers`` module of that tower (e.g. ``"encoder.layers.{i}"``).
    """
    special = special or {}
    out = {}
    for path, _ in base_params(model):
        if path in special:
            out[path] = special[path]
            continue
        top, *mid, leaf = path
        stacked = "layers" in mid
        mid = [stacks[top] if p == "layers" else p for p in mid]
        name, transpose = leaves[leaf]
        out[path] = HFParam(".".join([prefixes[top], *mid, name]), transpose, stacked)
    return out


def rename(name: str, aliases: Sequence[tuple[re.Pattern, str]]) -> str:
    """Apply the first matching (pattern, replacement) alias: older on-disk layouts -> the canonical one."""
    for pattern, repl in aliases:
        name, n = pattern.subn(repl, name)
        if n:
            break
    return name
