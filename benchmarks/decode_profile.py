"""Where one decode step's GPU time goes: each kernel of a 13B-shaped model's step, replayed as
the CUDA graph that decode_speed.py times, read from a torch.profiler (CUPTI) trace.

decode_speed.py gives tokens/s; this gives, per token, each kernel's time summed by name (misq's
x gather and decode kernels, inductor's fused norms, attention, lm_head...), the GPU's busy time
(the union of kernel intervals) and the step's span (first kernel start to last kernel end), so
that the time between kernels (launch gaps, the ramp and tail of each grid) shows apart from the
kernels' own. fp16 and each packed format in one process, same loop:

    PYTHONPATH=src python3 benchmarks/decode_profile.py --layers 4 --formats 50pct_4bit_g128 --out prof.json

CUPTI's tracing can itself stretch the gaps a little; the tokens/s come from the untraced loop.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import torch
from decode_layers import FLIPPABLE, FORMATS, flipped
from decode_model import _compiled, _model_13b, decode_tps, mergeable_format, pack_model


def _short(name: str) -> str:
    """A kernel's name without template arguments and launch suffixes, so that its launches sum."""
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"_\d+d\d+(de)?$", "", name)  # Triton's specialization suffixes
    return name[:90]


def profile_steps(run, steps: int) -> dict:
    """Run the decode step ``steps`` times under the profiler, each synchronized (so steps do not
    overlap); per step: kernel µs by name, busy µs (the union of kernel intervals), span µs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
            torch.cuda.synchronize()
    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])
    # split into steps at the longest gaps (the host's synchronize between replays)
    gaps = sorted(range(1, len(kernels)), key=lambda i: kernels[i][0] - kernels[i - 1][1], reverse=True)
    cuts = sorted(gaps[:steps - 1])
    bounds = list(zip([0] + cuts, cuts + [len(kernels)]))
    by_name, busy, span, count = defaultdict(float), 0.0, 0.0, 0
    for a, b in bounds:
        ks = kernels[a:b]
        span += ks[-1][1] - ks[0][0]
        end = ks[0][0]
        for s, e, name in ks:
            by_name[_short(name)] += e - s
            busy += max(0.0, e - max(s, end))
            end = max(end, e)
        count += len(ks)
    n = len(bounds)
    return {"steps": n, "kernels_per_step": count / n, "span_us": span / n, "busy_us": busy / n,
            "idle_us": (span - busy) / n,
            "by_kernel_us": {k: v / n for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--formats", default="50pct_4bit_g128", help="packed formats (" + ", ".join(FORMATS) + ")")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps per model")
    ap.add_argument("--no-compile", action="store_true", help="profile the eager step (default: torch.compile first)")
    ap.add_argument("--no-graph", action="store_true",
                    help="trace the step launched kernel by kernel (the tokens/s then include the host's launches)")
    ap.add_argument("--flip", default="", metavar="NAMES",
                    help="each packed format also with each named launch_plan switch at its other setting ("
                         + ", ".join(FLIPPABLE) + ")")
    ap.add_argument("--out", default="decode_profile.json")
    args = ap.parse_args()
    # CUPTI started for the first time after a CUDA graph's capture can break the graph's replays
    torch.profiler._utils._init_for_cuda_graphs()
    model = _model_13b(args.layers)
    results = []

    def run(label: str) -> None:
        prof = {}
        tps, how = decode_tps(_compiled(model, not args.no_compile), graph=not args.no_graph,
                              then=lambda run: prof.update(profile_steps(run, args.steps)), then_steps=args.steps)
        r = {"model": label, "layers": args.layers, "tokens_per_s": tps, "loop": how} | prof
        results.append(r)
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["by_kernel_us"].items())[:8])
        print(f"{label}: {r['tokens_per_s']:.0f} tok/s, span {r['span_us']:.0f} us, busy {r['busy_us']:.0f}, "
              f"idle {r['idle_us']:.0f}, {r['kernels_per_step']:.0f} kernels; {top}", flush=True)
        with open(args.out, "w") as f:  # after each model: what ran is kept if a later one fails
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "profiles": results}, f,
                      indent=2)

    run("fp16")
    for fmt in args.formats.split(","):
        for merge in (True,) if mergeable_format(fmt) else (False,):
            pack_model(model, fmt, merge)
            label = f"packed {fmt}" + (", merged" if merge else "")
            run(label)
            for name in filter(None, args.flip.split(",")):
                with flipped(name) as now:
                    run(f"{label}, launch_plan.{name} = {now}")


if __name__ == "__main__":
    main()
