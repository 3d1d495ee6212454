"""Per-kernel device time from jax.profiler traces (the trace.json.gz each trace directory holds).

For each trace_* directory under the given folder: device busy time, the share by kernel class (matmul,
attention, RNG, copies, other fusions) and the kernels that cost most, summed over the traced calls; then the
device's idle stretches between kernels.
Usage: `python bench/read_trace.py OUT_DIR [TOP] [MODULE_REGEX]`: with a regex, also every kernel of the programs
(XLA modules) it matches, summed per program, e.g. `_forward|_backward` for the per-layer step's layer programs.
HOST=1: also the busiest host thread's events (`host_summary`).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys

CLASSES = (
    ("attention", re.compile(r"cudnn|flash|fmha|sdpa|attention", re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|matmul|nvjet|sm90_xmma|dot", re.I)),
    ("rng", re.compile(r"threefry|philox|rng|random", re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|dynamic.update.slice|dynamic.slice|transpose", re.I)),
)


def kernel_class(name: str) -> str:
    for label, pattern in CLASSES:
        if pattern.search(name):
            return label
    return "other"


def _events(path: str) -> tuple[list[dict], set]:
    """The trace's complete events and the ids of its GPU processes."""
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    return [e for e in events if e.get("ph") == "X"], {pid for pid, name in names.items() if "gpu" in name.lower()}


def device_events(path: str) -> list[dict]:
    events, gpu = _events(path)
    return [e for e in events if e["pid"] in gpu]


def host_summary(path: str, top: int) -> None:
    """The busiest host thread's events by summed duration (nested events each count their own span): where the
    host's time goes when it, not the device, sets the pace (a program's launch, a command buffer's update)."""
    events, gpu = _events(path)
    threads: collections.Counter = collections.Counter()
    for e in events:
        if e["pid"] not in gpu:
            threads[(e["pid"], e["tid"])] += 1
    if not threads:
        return
    (pid, tid), _ = threads.most_common(1)[0]
    own = [e for e in events if (e["pid"], e["tid"]) == (pid, tid)]
    span = max(e["ts"] + e["dur"] for e in own) - min(e["ts"] for e in own)
    by_name: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for e in own:
        key = re.sub(r"\d+", "#", e["name"])[:100]
        by_name[key] += e["dur"]
        counts[key] += 1
    print(f"   host thread {pid}/{tid}: {len(own)} events over {span / 1e3:.1f} ms")
    for key, dur in by_name.most_common(top):
        print(f"   {dur / 1e3:8.2f} ms {counts[key]:6d}x {key}")


def gaps(events: list[dict], top: int = 8) -> None:
    """Device idle time between kernels (any stream busy counts as busy) and the largest idle stretches, named by
    the kernels on either side: where the host, not the device, set the pace."""
    ordered = sorted(events, key=lambda e: e["ts"])
    end, before, idle = ordered[0]["ts"] + ordered[0]["dur"], ordered[0]["name"], []
    for e in ordered[1:]:
        if e["ts"] > end:
            idle.append((e["ts"] - end, before, e["name"]))
        if e["ts"] + e["dur"] >= end:
            end, before = e["ts"] + e["dur"], e["name"]
    total = sum(d for d, _, _ in idle)
    print(f"   idle {total / 1e3:.1f} ms in {len(idle)} gaps, {sum(d for d, _, _ in idle if d > 50) / 1e3:.1f} ms of "
          f"them over 50 us; largest:")
    for d, a, b in sorted(idle, reverse=True)[:top]:
        print(f"   {d / 1e3:8.2f} ms after {a[:60]} before {b[:60]}")


def kernel_key(event: dict) -> str:
    """A kernel event's name for the tables: its HLO op and kernel name (inside a CUDA graph hlo_op names the
    command buffer, so the kernel's own name, the fusion's, alone), a copy's direction added."""
    args = event.get("args", {})
    op = args.get("hlo_op", "")
    key = event["name"] if not op or op.startswith("command_buffer") else f"{op} ({event['name']})"
    if "memcpy_details" in args:
        key += " " + args["memcpy_details"].split(" dest")[0]
    return key


def by_module(events: list[dict], pattern: str) -> None:
    """Each matching program's kernels, in their order of first appearance, with their summed time and count."""
    regex = re.compile(pattern)
    modules: dict[str, collections.OrderedDict] = {}
    for e in sorted(events, key=lambda e: e["ts"]):
        module = e.get("args", {}).get("hlo_module", "?")
        if not regex.search(module):
            continue
        kernels = modules.setdefault(module, collections.OrderedDict())
        key = kernel_key(e)[:110]
        dur, count = kernels.get(key, (0.0, 0))
        kernels[key] = (dur + e["dur"], count + 1)
    for module, kernels in modules.items():
        total = sum(d for d, _ in kernels.values())
        print(f"   -- program {module}: {total / 1e3:.2f} ms in {sum(c for _, c in kernels.values())} kernels")
        for key, (dur, count) in kernels.items():
            print(f"      {dur:10.1f} us {count:5d}x {kernel_class(key):9s} {key}")


def summarize(trace_dir: str, top: int, modules: str | None = None) -> None:
    files = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    if not files:
        print(f"{trace_dir}: no trace.json.gz")
        return
    events = device_events(files[0])
    if not events:
        print(f"{trace_dir}: no device events")
        return
    by_name: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    by_class: collections.Counter = collections.Counter()
    for e in events:
        key = kernel_key(e)
        label = kernel_class(key)
        by_name[(label, key[:110])] += e["dur"]
        counts[(label, key[:110])] += 1
        by_class[label] += e["dur"]
    busy = sum(by_class.values())
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    print(f"\n== {os.path.basename(trace_dir)}: {len(events)} kernels, busy {busy / 1e3:.1f} ms of a "
          f"{span / 1e3:.1f} ms span (2 calls)")
    print("   " + ", ".join(f"{k} {v / busy:.0%}" for k, v in by_class.most_common()))
    for (label, key), dur in by_name.most_common(top):
        print(f"   {dur / 1e3:8.2f} ms {counts[(label, key)]:6d}x {label:9s} {key}")
    gaps(events)
    if modules:
        by_module(events, modules)
    if os.environ.get("HOST", "0") == "1":
        host_summary(files[0], top)
    sample = events[len(events) // 2]
    print(f"   sample event: {sample['name'][:80]} args={json.dumps(sample.get('args', {}))[:300]}")


if __name__ == "__main__":
    out, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 18
    for d in sorted(glob.glob(os.path.join(out, "trace_*"))):
        summarize(d, top, sys.argv[3] if len(sys.argv) > 3 else None)
