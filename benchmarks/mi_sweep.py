"""Budget sweep on a real checkpoint: does MI grouping beat uniform quantization at the same bits?

For each target (average bits) and each strategy (mi / hessian grouping, K groups, layer or
model budget) this compresses the model at 50% sparsity with c4 calibration, evaluates
wikitext2/ptb/c4, and prints one table with the uniform SparseGPT rows beside it, all measured
in the same process. Usage (GPU recommended; ~10 s per configuration for llama-9m on an H200):

    python benchmarks/mi_sweep.py MODEL --data-dir DATA --targets 4,3 --groups 5,10,16 --out sweep.json
"""

from __future__ import annotations

import argparse
import logging
import time

from misq import jobs
from misq.atomic import atomic_write_json
from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--targets", default="4,3")
    ap.add_argument("--groups", default="5,10,16")
    ap.add_argument("--groupings", default="mi,hessian")
    ap.add_argument("--budgets", default="layer,model")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--device", default=None)
    ap.add_argument("--uniform", type=int, default=1, help="also run uniform SparseGPT at each target width")
    ap.add_argument("--out", default="sweep.json")
    ap.add_argument("--work", default="/tmp/misq-sweep")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model_cfg = ModelConfig(args.model, device=args.device)
    data_cfg = DataConfig(data_dir=args.data_dir, cache_dir=f"{args.work}/cache")
    eval_cfg = EvalConfig()
    configs: list[CompressConfig] = []
    for t in [float(x) for x in args.targets.split(",")]:
        if args.uniform and t == int(t):
            configs.append(CompressConfig(groupsize=0, act_order=False, mse=False, sparsity=args.sparsity, nsamples=args.nsamples, grouping="uniform", wbits=int(t), batch_size=32))
        for grouping in args.groupings.split(","):
            for k in [int(x) for x in args.groups.split(",")]:
                for budget in args.budgets.split(","):
                    configs.append(CompressConfig(groupsize=0, act_order=False, mse=False, sparsity=args.sparsity, nsamples=args.nsamples, grouping=grouping, n_groups=k,
                                                  target_avg_bits=t, budget=budget, batch_size=32))
    rows = []
    for i, cfg in enumerate(configs):
        t0 = time.perf_counter()
        res = jobs.run_compress(model_cfg, data_cfg, cfg, eval_cfg, f"{args.work}/run{i}")
        label = (f"uniform {cfg.wbits}b" if cfg.grouping == "uniform"
                 else f"{cfg.grouping} K={cfg.n_groups} {cfg.budget} {cfg.target_avg_bits}b")
        row = {"label": label, "config": cfg.to_dict(), "ppl": res["ppl"], "avg_bits": res["bits"]["actual_avg_bits"],
               "bits_per_stored_weight": res["storage"]["bits_per_stored_weight"],
               "bits_per_param_disk": res["storage"]["bits_per_param_disk_quantized"],
               "histogram": {b: h["weight_share"] for b, h in res["bits"]["histogram"].items()},
               "compress_s": res["timing"]["compress_s"], "wall_s": time.perf_counter() - t0}
        rows.append(row)
        print(f"{label:32s} bits {row['avg_bits']:.4f}  " + "  ".join(f"{d} {p:8.2f}" for d, p in res["ppl"].items()), flush=True)
        atomic_write_json(args.out, rows)
    print("\n| config | avg bits | stored bits/w | disk bits/param | wikitext2 | ptb | c4 |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['label']} | {r['avg_bits']:.3f} | {r['bits_per_stored_weight']:.3f} | {r['bits_per_param_disk']:.3f} | "
              + " | ".join(f"{r['ppl'][d]:.2f}" for d in ("wikitext2", "ptb", "c4")) + " |")


if __name__ == "__main__":
    main()
