"""The ``misq`` command line: a thin layer over the typed configs in :mod:`misq.config`.

Every subcommand parses flags into config objects and calls one library function. The
prototype's flag spellings (``--nsamples``, ``--target_avg_bits``, ``--use_mi_grouping`` …) are
accepted next to the dashed ones. A :class:`~misq.errors.MisqError` becomes one line on stderr
and exit status 2; Ctrl-C exits 130 (a compression run keeps its state for ``--resume``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from misq.errors import MisqError

log = logging.getLogger("misq")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a :class:`MisqError`: one line and exit 2 like every other
    input error, instead of the usage block (``--help`` still prints it)."""

    def error(self, message: str):  # type: ignore[override]
        raise MisqError(f"{message} (see {self.prog} --help)")


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--a-b`` with ``--a_b`` as an alias (the prototype's spelling)."""
    names = [f"--{name}"]
    if "-" in name:
        names.append(f"--{name.replace('-', '_')}")
    parser.add_argument(*names, **kwargs)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local checkpoint folder, HF hub id, or a misq packed checkpoint")
    _flag(p, "dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="weight dtype (default float16)")
    _flag(p, "device", default=None, help="cuda, cuda:1 or cpu (default: cuda if present)")
    _flag(p, "layerwise", type=int, choices=[0, 1], default=None,
          help="1: run one decoder layer at a time on the device (default: only when the model does not fit)")
    _flag(p, "trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)")
    _flag(p, "data-dir", default=None, help="folder with wikitext2/ptb/c4 files (default: $MISQ_DATA_DIR, else HF datasets)")
    _flag(p, "seqlen", type=int, default=None, help="window length (default min(2048, model max positions))")
    _flag(p, "cache-dir", default=None, help="tokenized-text cache (default $MISQ_CACHE_DIR or ~/.cache/misq)")
    _flag(p, "c4-cut", default="protocol", choices=["protocol", "none"],
          help="c4 eval: cut to 256 x seqlen tokens (protocol) or keep all 1100 documents (none)")
    stream = p.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_const", const="on", default="auto",
                        help="read decoder layers from the safetensors files one at a time, never the whole model "
                             "(default: only when the weights exceed half the free host memory)")
    stream.add_argument("--no-stream", "--no_stream", dest="stream", action="store_const", const="off",
                        help="load the whole model into host memory")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="misq", description="One-shot SparseGPT pruning + MI-grouped mixed-precision quantization of LLaMA-family models, with protocol-exact perplexity and honest reports.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("eval", help="perplexity of a model by the GPTQ/SparseGPT protocol")
    _model_args(p)
    _flag(p, "datasets", default="wikitext2,ptb,c4", help="comma-separated: wikitext2,ptb,c4 or text-file paths")
    _flag(p, "out", default=None, help="write results JSON here (e.g. baseline_results.json)")
    _flag(p, "batch-size", type=int, default=1, help="segments per forward pass")
    _flag(p, "device-map", default=None, choices=["auto", "balanced", "balanced_low_0", "sequential"],
          help="spread the model over all visible GPUs with transformers' device_map (needs accelerate)")

    p = sub.add_parser("compress", help="SparseGPT pruning + mixed-precision quantization, layer by layer")
    _model_args(p)
    p.add_argument("dataset_pos", nargs="?", metavar="DATASET", default=None, help="calibration data: c4 (default), wikitext2, ptb or a text file")
    _flag(p, "dataset", default=None, help="same as the positional DATASET")
    _flag(p, "nsamples", type=int, default=128, help="calibration windows (default 128)")
    _flag(p, "seed", type=int, default=0)
    _flag(p, "sparsity", type=float, default=0.5, help="unstructured sparsity in [0, 1) (default 0.5)")
    _flag(p, "prunen", type=int, default=0, help="N of an N:M pattern (with --prunem)")
    _flag(p, "prunem", type=int, default=0, help="M of an N:M pattern")
    _flag(p, "grouping", default=None, choices=["mi", "hessian", "uniform"], help="channel grouping (default hessian; see BENCHMARKS.md)")
    _flag(p, "use-mi-grouping", type=int, choices=[0, 1], default=None, help="prototype flag: 1 = --grouping mi, 0 = uniform --wbits")
    _flag(p, "wbits", type=int, default=4, help="uniform width when not mixing precisions (16 = no quantization)")
    _flag(p, "n-groups", type=int, default=10, help="channel groups per layer (default 10)")
    _flag(p, "target-avg-bits", type=float, default=4.0, help="average bits per weight to meet (default 4.0)")
    _flag(p, "bits", default="2,3,4,6,8", help="candidate widths (default 2,3,4,6,8)")
    _flag(p, "budget", default="layer", choices=["layer", "model"], help="meet the target per layer or over the model")
    _flag(p, "blocksize", type=int, default=128)
    _flag(p, "percdamp", type=float, default=0.01)
    _flag(p, "mse", action="store_true", help="MSE search of each grid's clipping range")
    _flag(p, "mi-estimator", default="gaussian", choices=["gaussian", "binned"])
    _flag(p, "offload-activations", action="store_true", help="keep calibration activations on the CPU")
    _flag(p, "batch-size", type=int, default=1,
          help="calibration windows per forward pass (default 1, the reference's scheme; 8 is ~7%% faster on a GPU)")
    _flag(p, "eval", default=None, help="evaluate after compressing, e.g. --eval wikitext2,ptb,c4")
    _flag(p, "out", default="misq-run", help="run folder (config, log, progress, results)")
    _flag(p, "save", default=None, help="write a packed checkpoint to this folder")
    _flag(p, "resume", action="store_true", help="continue an interrupted run in --out")

    p = sub.add_parser("compare", help="report: compressed vs baseline (JSON, Markdown, HTML with plots)")
    p.add_argument("baseline", help="baseline results JSON (misq eval --out)")
    p.add_argument("results", nargs="+", help="one or more compressed results JSON")
    _flag(p, "out", default="misq-report", help="report folder")

    p = sub.add_parser("status", help="where a compression run is (works while it runs)")
    p.add_argument("run_dir")
    _flag(p, "follow", action="store_true", help="keep printing until the run ends")
    _flag(p, "stale-after", type=float, default=300.0, help="seconds without progress before a run counts as stale")

    p = sub.add_parser("export", help="write a packed checkpoint as a plain fp16 HF checkpoint")
    p.add_argument("packed_dir")
    _flag(p, "dense", required=True, help="output folder for the dense checkpoint")
    _flag(p, "dtype", default="float16", choices=["float16", "bfloat16", "float32"])

    p = sub.add_parser("demo", help="train a tiny LLaMA locally and run the whole pipeline on it (no downloads)")
    _flag(p, "out", default="misq-demo", help="folder for everything the demo writes")
    _flag(p, "train-seconds", type=float, default=60.0, help="training budget of the tiny model")
    return parser


def _configs(args: argparse.Namespace):
    from misq.config import DataConfig, ModelConfig

    model = ModelConfig(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                        layerwise=None if args.layerwise is None else bool(args.layerwise), stream=args.stream,
                        device_map=getattr(args, "device_map", None))
    return model, DataConfig(data_dir=args.data_dir, seqlen=args.seqlen, cache_dir=args.cache_dir, c4_cut=args.c4_cut == "protocol")


def _compress_config(args: argparse.Namespace):
    from misq.config import CompressConfig

    if args.dataset and args.dataset_pos and args.dataset != args.dataset_pos:
        raise MisqError(f"two calibration datasets given ({args.dataset_pos} and --dataset {args.dataset}): give one")
    grouping = args.grouping
    if args.use_mi_grouping is not None:
        implied = "mi" if args.use_mi_grouping else "uniform"
        if grouping and grouping != implied and not (args.use_mi_grouping and grouping != "uniform"):
            raise MisqError(f"--use_mi_grouping {args.use_mi_grouping} contradicts --grouping {grouping}: give one of them")
        grouping = grouping or implied
    dataset = args.dataset or args.dataset_pos or "c4"
    from misq.protocol.data import check_dataset_name

    check_dataset_name(dataset)
    return CompressConfig(
        dataset=dataset, nsamples=args.nsamples, seed=args.seed, sparsity=args.sparsity, prunen=args.prunen,
        prunem=args.prunem, grouping=grouping or "hessian", wbits=args.wbits, n_groups=args.n_groups,
        target_avg_bits=args.target_avg_bits, bits=args.bits, budget=args.budget, blocksize=args.blocksize,
        percdamp=args.percdamp, mse=args.mse, mi_estimator=args.mi_estimator,
        offload_activations=args.offload_activations, batch_size=args.batch_size,
    )


def _summary(results: dict) -> str:
    lines = [f"{name}: PPL {ppl:.3f}" for name, ppl in results.get("ppl", {}).items()]
    bits = results.get("bits")
    if bits:
        lines.append(f"average bits {bits['actual_avg_bits']:.4f} (target {bits['target_avg_bits']})")
    st = results.get("storage")
    if st:
        lines.append(f"bits/param on disk {st['bits_per_param_disk_model']:.3f} (x{st['compression_ratio_model']:.2f} vs fp16)")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)  # set by torchrun
    if rank:  # a torchrun worker other than rank 0: no progress bars, warnings only (tagged)
        os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm reads it once, when imported (by torch)
    from misq import distributed

    if rank:
        logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    else:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if distributed.launched() and args.command != "compress":
        raise MisqError(f"only `misq compress` runs on several processes; run `misq {args.command}` without torchrun")
    from misq.config import EvalConfig
    from misq.jobs import compress as jobs

    if args.command == "eval":
        model, data = _configs(args)
        results = jobs.run_eval(model, data, EvalConfig(datasets=args.datasets, batch_size=args.batch_size), args.out)
        print(_summary(results))
        if args.out:
            print(f"results: {args.out}")
    elif args.command == "compress":
        model, data = _configs(args)
        cfg = _compress_config(args)
        eval_cfg = EvalConfig(datasets=args.eval) if args.eval else None
        results = jobs.run_compress(model, data, cfg, eval_cfg, args.out, save_dir=args.save, resume=args.resume)
        if rank == 0:  # under torchrun the other ranks have nothing to report
            print(_summary(results))
            print(f"run folder: {args.out}" + (f"\npacked checkpoint: {args.save}" if args.save else ""))
    elif args.command == "compare":
        from misq.report.compare import compare

        out = compare(args.baseline, args.results, args.out)
        print(f"report: {args.out}/report.md, {args.out}/report.html; verdict: {out.get('verdict', {}).get('status', '?') if isinstance(out.get('verdict'), dict) else out.get('verdict')}")
    elif args.command == "status":
        from misq.runs.status import follow_status, format_status, read_status

        if args.follow:
            follow_status(args.run_dir, stale_after_s=args.stale_after)
        else:
            print(format_status(read_status(args.run_dir, stale_after_s=args.stale_after)))
    elif args.command == "export":
        from misq.checkpoint.packed import export_dense

        export_dense(args.packed_dir, args.dense, dtype=args.dtype)
        print(f"dense checkpoint: {args.dense}")
    elif args.command == "demo":
        from misq.demo.run import run_demo

        print(run_demo(args.out, train_seconds=args.train_seconds))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # Layers of different shapes pass through the GPU one after another; with fixed-size
    # segments the caching allocator kept twice the peak in use (18.5 GiB reserved for a 9.4 GiB
    # peak on the 13B shape). Growable segments keep the footprint near the real peak. Must be
    # set before the first CUDA allocation; a user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if not sys.stderr.isatty():
        # Redirected to a log file, a bar redrawn ten times a second fills it with carriage-return
        # lines; redraw every 30 s instead (misq status reads progress.json for the live view).
        # tqdm reads TQDM_* once, when first imported, which has not happened yet here.
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    try:
        return run(argv)
    except MisqError as err:
        # One line whatever the message holds: scripts and log scrapers read the last line.
        print("misq: error: " + " ".join(str(err).splitlines()), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        # The resume folder is written only between layers, so what it holds is consistent.
        print("misq: interrupted; a compression run continues with the same command plus --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
