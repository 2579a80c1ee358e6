"""Where the GPU waits on the host: idle gaps of a torch.profiler chrome trace, by Python line.

A traced span's kernel times add up to less than its wall time when the GPU runs dry: after a
host sync (``.item()``, a pageable copy, a check) the queue is empty until Python launches the
next kernel. This reads the trace that ``torch.profiler.profile(with_stack=True)`` exports and
charges every gap between GPU activity (kernels, copies, memsets on any stream) longer than
``min_us`` to the innermost frames of misq's code active on the host at the gap's start (what
drained the queue) and at its end (the launch that refilled it).

    python3 benchmarks/gpu_gaps.py trace.json [--min-us 20] [--top 30]
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def _frame(name: str) -> str | None:
    """'…/misq/compress/driver.py(81): add' -> 'compress/driver.py:81 add'; None for frames outside misq."""
    if "misq/" not in name or "(" not in name:
        return None
    path, _, rest = name.partition("(")
    line, _, fn = rest.partition("): ")
    return f"{path.split('misq/', 1)[1]}:{line} {fn}"


class _Stacks:
    """The misq Python frames active on the main host thread at a given time."""

    def __init__(self, events: list[dict]):
        frames = [e for e in events if e.get("cat") == "python_function" and _frame(e.get("name", ""))]
        self.frames = sorted(frames, key=lambda e: e["ts"])
        self.starts = [e["ts"] for e in self.frames]

    def at(self, ts: float, depth: int = 2) -> str:
        i = bisect.bisect_right(self.starts, ts)
        active = [e for e in self.frames[max(0, i - 4000):i] if e["ts"] + e.get("dur", 0) >= ts]
        active.sort(key=lambda e: e.get("dur", 0))  # innermost (shortest) first
        names = [_frame(e["name"]) for e in active[:depth]]
        return " < ".join(n for n in names if n) or "(outside misq)"


def gaps(trace: dict, min_us: float = 20.0) -> dict:
    """Busy and idle time of the GPU over the traced span, and the idle time by host context."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") in GPU_CATS and "ts" in e)
    if not gpu:
        return {"error": "no GPU events in the trace"}
    stacks = _Stacks(events)
    busy, idle = 0.0, 0.0
    by_ctx: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    start, end = gpu[0]
    for s, e in gpu[1:]:
        if s > end:
            busy += end - start
            gap = s - end
            idle += gap
            if gap >= min_us:
                key = f"{stacks.at(end)}  ->  {stacks.at(s)}"
                by_ctx[key][0] += gap
                by_ctx[key][1] += 1
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    span = gpu[-1][1] - gpu[0][0]
    top = sorted(by_ctx.items(), key=lambda kv: -kv[1][0])
    return {"span_ms": span / 1e3, "gpu_busy_ms": busy / 1e3, "gpu_idle_ms": idle / 1e3,
            "gaps": [{"idle_ms": round(v[0] / 1e3, 3), "count": v[1], "host (gap start -> gap end)": k} for k, v in top]}


def format_gaps(result: dict, top: int = 30) -> str:
    if "error" in result:
        return result["error"]
    lines = [f"span {result['span_ms']:.1f} ms: GPU busy {result['gpu_busy_ms']:.1f} ms, idle {result['gpu_idle_ms']:.1f} ms",
             "idle ms  gaps  host at gap start  ->  host at gap end (innermost misq frames)"]
    lines += [f"{g['idle_ms']:7.2f} {g['count']:5d}  {g['host (gap start -> gap end)']}" for g in result["gaps"][:top]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--min-us", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    print(format_gaps(gaps(json.loads(args.trace.read_text()), args.min_us), args.top))


if __name__ == "__main__":
    main()
