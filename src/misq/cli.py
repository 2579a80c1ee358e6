"""The ``misq`` command line: a thin layer over the typed configs in :mod:`misq.config`.

Every subcommand parses flags into config objects and calls one library function. Flags for
config fields are built from the fields' metadata (:func:`misq.config.option`): default, choices
and help are written once, in :mod:`misq.config`. The prototype's flag spellings (``--nsamples``,
``--target_avg_bits``, ``--use_mi_grouping`` …) are accepted next to the dashed ones. A :class:`~misq.errors.MisqError` becomes one line on stderr
and exit status 2; Ctrl-C exits 130 (a compression run keeps its state for ``--resume``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from collections.abc import Sequence
from dataclasses import MISSING
from typing import Any, TypeVar

from misq.errors import MisqError

log = logging.getLogger("misq")
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a :class:`MisqError`: one line and exit 2 like every other
    input error, instead of the usage block (``--help`` still prints it)."""

    def error(self, message: str):  # type: ignore[override]
        raise MisqError(f"{message} (see {self.prog} --help)")


def _names(name: str, aliases: Sequence[str] = ()) -> list[str]:
    """``--a-b`` plus ``--a_b`` (the prototype's spelling) plus any further aliases."""
    names = [f"--{name}"]
    if "-" in name:
        names.append(f"--{name.replace('-', '_')}")
    return names + [f"--{a}" for a in aliases if f"--{a}" not in names]


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """A flag that is no config field (``--out``, ``--resume`` …), with its ``_`` alias."""
    parser.add_argument(*_names(name), **kwargs)


def _field_type(cls: type, f: dataclasses.Field) -> tuple[Any, bool]:
    """The field's type without ``| None``, and whether None is allowed."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _shown(value: Any) -> str:
    """A default as the user would type it: ``2,3,4,6,8`` rather than ``(2, 3, 4, 6, 8)``."""
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def add_config_args(parser: argparse.ArgumentParser, cls: type, command: str,
                    only: Sequence[str] | None = None) -> None:
    """Add a flag for each field of the config dataclass ``cls`` declared with
    :func:`misq.config.option` (all of them, or those named in ``only``).

    The flag's dest is the field name, so :func:`cfg_from_args` finds it back. Type: int, float
    and str as annotated; ``bool`` is a switch (``--mse``); ``bool | None`` takes 0 or 1
    (``--layerwise 0``); a tuple is a comma-separated string for the config's own parser.
    """
    group: Any = parser  # a few borrowed flags (``only``) join the command's own options
    if only is None:  # a whole config: one section of --help, titled by the class docstring
        doc = (cls.__doc__ or "").strip().splitlines()
        group = parser.add_argument_group(f"{cls.__name__.replace('Config', '').lower()} options",
                                          doc[0] if doc else None)
    for f in dataclasses.fields(cls):
        md = f.metadata
        if "help" not in md or (only is not None and f.name not in only):
            continue  # not exposed (or not wanted by this command)
        if "commands" in md and command not in md["commands"]:
            continue
        help_text = md["help"].replace("%", "%%")  # argparse %-formats help strings
        if f.default is MISSING:  # no default: a positional argument, listed with the others
            parser.add_argument(f.name, help=help_text)
            continue
        if "switch" in md:
            exclusive = group.add_mutually_exclusive_group()
            for name, (const, switch_help) in md["switch"].items():
                exclusive.add_argument(*_names(name), dest=f.name, action="store_const", const=const,
                                       default=f.default, help=switch_help.replace("%", "%%"))
            continue
        base, _optional = _field_type(cls, f)
        kwargs: dict[str, Any] = {"dest": f.name, "default": None if md.get("given") else f.default}
        shown = f.default
        if "values" in md:  # CLI words for the field's values; cfg_from_args maps them back
            shown = next(word for word, value in md["values"].items() if value == f.default)
            kwargs.update(choices=tuple(md["values"]), default=None if md.get("given") else shown)
        elif base is bool and f.default is False:
            kwargs["action"] = "store_true"
            shown = None  # a switch is off by default; nothing to show
        elif base is bool:
            kwargs.update(type=int, choices=(0, 1))
        elif typing.get_origin(base) is tuple:
            kwargs["type"] = str
        else:
            kwargs["type"] = base
            if "choices" in md:
                kwargs["choices"] = md["choices"]
        if shown is not None:
            help_text += f" (default: {_shown(shown)})"
        group.add_argument(*_names(md.get("flag", f.name.replace("_", "-")), md.get("aliases", ())),
                           help=help_text, **kwargs)


def cfg_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build the config ``cls`` from the parsed flags that :func:`add_config_args` added.

    ``overrides`` replace flags where the CLI translates (``--use_mi_grouping``). A None from
    the CLI never replaces a non-None field default: it means "not given".
    """
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            value = overrides[f.name]
        elif hasattr(args, f.name) and "help" in f.metadata:
            value = getattr(args, f.name)
        else:
            continue
        if value is None and f.default is not None:
            continue
        if value is not None and "values" in f.metadata:
            value = f.metadata["values"][value]
        elif isinstance(value, int) and _field_type(cls, f)[0] is bool:
            value = bool(value)  # --layerwise 0|1
        kwargs[f.name] = value
    return cls(**kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``misq`` parser; config flags come from :mod:`misq.config`'s field metadata."""
    from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig

    parser = _Parser(prog="misq", description="One-shot SparseGPT pruning + MI-grouped mixed-precision quantization of LLaMA-family models, with protocol-exact perplexity and honest reports.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("eval", help="perplexity of a model by the GPTQ/SparseGPT protocol")
    for cls in (ModelConfig, DataConfig, EvalConfig):
        add_config_args(p, cls, "eval")
    _flag(p, "out", default=None, help="write results JSON here (e.g. baseline_results.json); an existing file "
                                       "is replaced only when it is a misq results file")
    _flag(p, "overwrite", action="store_true", help="replace --out even when it is not a misq results file")

    p = sub.add_parser("compress", help="SparseGPT pruning + mixed-precision quantization, layer by layer")
    for cls in (ModelConfig, DataConfig, CompressConfig):
        add_config_args(p, cls, "compress")
    dataset = next(f for f in dataclasses.fields(CompressConfig) if f.name == "dataset")
    p.add_argument("dataset_pos", nargs="?", metavar="DATASET", default=None,
                   help=f"{dataset.metadata['help']}; same as --dataset (default: {dataset.default})")
    _flag(p, "use-mi-grouping", type=int, choices=[0, 1], default=None, help="prototype flag: 1 = --grouping mi, 0 = uniform --wbits")
    _flag(p, "eval", default=None, help="evaluate after compressing, e.g. --eval wikitext2,ptb,c4")
    # Zero-shot tasks and generations after compressing: EvalConfig's own flags (--eval-tasks = --tasks).
    add_config_args(p, EvalConfig, "compress", only=("tasks", "num_fewshot", "task_limit", "task_dir", "task_batch_size",
                                                     "prompts", "max_new_tokens"))
    _flag(p, "out", default="misq-run", help="run folder (config, log, progress, results); must be new, empty or "
                                             "misq's own run folder, and a folder holding an earlier run is refused "
                                             "(give each run its own --out)")
    _flag(p, "save", default=None, help="write a packed checkpoint to this folder (new, empty or an earlier packed checkpoint)")
    _flag(p, "resume", action="store_true", help="continue an interrupted run in --out")
    _flag(p, "overwrite", action="store_true", help="start over in an --out that holds an earlier run, or write into "
                                                    "a folder misq did not make (the rare case; never needed otherwise)")

    p = sub.add_parser("compare", help="report: compressed vs baseline (JSON, Markdown, HTML with plots)")
    p.add_argument("baseline", help="baseline results JSON (misq eval --out)")
    p.add_argument("results", nargs="+", help="one or more compressed results JSON")
    _flag(p, "out", default="misq-report", help="report folder (new, empty or an earlier misq report)")
    _flag(p, "overwrite", action="store_true", help="write the report into a folder misq did not make")
    _flag(p, "reference", default=None, help="JSON of named (size, PPL) points, e.g. benchmarks/references/llama-9m.json: "
                                             "place each run on the PPL-against-honest-size plot beside them")

    p = sub.add_parser("status", help="where a compression run is (works while it runs)")
    p.add_argument("run_dir")
    _flag(p, "follow", action="store_true", help="keep printing until the run ends")
    _flag(p, "stale-after", type=float, default=300.0, help="seconds without progress before a run counts as stale")

    p = sub.add_parser("export", help="write a packed checkpoint as a plain fp16 HF checkpoint, or as a GPTQ one")
    p.add_argument("packed_dir", metavar="PACKED")
    p.add_argument("out_dir", nargs="?", metavar="OUT", help="output folder (new, empty or an earlier misq export)")
    _flag(p, "format", choices=("dense", "gptq"), default="dense",
          help="dense: plain HF weights, loads anywhere; gptq: qweight/qzeros/scales/g_idx for GPTQModel, vLLM, "
               "transformers, when every layer has one width of 2, 3, 4 or 8 bits (default: dense)")
    _flag(p, "gptq-checkpoint-format", choices=("gptq", "gptq_v2"), default="gptq",
          help="with --format gptq: gptq (v1, zero points minus one) for transformers, vLLM, ExLlama; gptq_v2 "
               "(zero points as they are) for GPTQModel.load, which reads per-layer widths (default: gptq)")
    _flag(p, "dense", default=None, help="output folder of a dense export (the same as OUT with --format dense)")
    add_config_args(p, ModelConfig, "export", only=("dtype",))

    p = sub.add_parser("demo", help="train a tiny LLaMA locally and run the whole pipeline on it (no downloads)")
    _flag(p, "out", default="misq-demo", help="folder for everything the demo writes")
    _flag(p, "train-seconds", type=float, default=60.0, help="training budget of the tiny model")

    from misq.config import GenerateConfig

    p = sub.add_parser("generate", help="stream a continuation of a prompt (packed runtime, or any model)")
    add_config_args(p, ModelConfig, "generate", only=("model", "dtype", "device"))
    add_config_args(p, GenerateConfig, "generate")
    return parser


def _configs(args: argparse.Namespace):
    """The model and data configs of ``eval`` and ``compress``."""
    from misq.config import DataConfig, ModelConfig

    return cfg_from_args(ModelConfig, args), cfg_from_args(DataConfig, args)


def _compress_config(args: argparse.Namespace):
    """The compression config, with the CLI's own translations: the positional DATASET next to
    ``--dataset``, and the prototype's ``--use_mi_grouping 0|1`` next to ``--grouping``."""
    from misq.config import CompressConfig

    if args.dataset and args.dataset_pos and args.dataset != args.dataset_pos:
        raise MisqError(f"two calibration datasets given ({args.dataset_pos} and --dataset {args.dataset}): give one")
    grouping = args.grouping
    if args.use_mi_grouping is not None:
        implied = "mi" if args.use_mi_grouping else "uniform"
        if grouping and grouping != implied and not (args.use_mi_grouping and grouping != "uniform"):
            raise MisqError(f"--use_mi_grouping {args.use_mi_grouping} contradicts --grouping {grouping}: give one of them")
        grouping = grouping or implied
    dataset = args.dataset or args.dataset_pos
    if dataset:
        from misq.protocol.sources import check_dataset_name  # only when a dataset is named

        check_dataset_name(dataset)
    return cfg_from_args(CompressConfig, args, dataset=dataset, grouping=grouping)


def _summary(results: dict) -> str:
    lines = [f"{name}: PPL {ppl:.3f}" for name, ppl in results.get("ppl", {}).items()]
    for task, entry in ((results.get("zeroshot") or {}).get("tasks") or {}).items():
        shown = ", ".join(f"{m} {100 * v['value']:.2f}%" for m, v in entry["metrics"].items() if v.get("value") is not None)
        lines.append(f"{task} ({entry['num_fewshot']}-shot): {shown}")
    if (results.get("zeroshot") or {}).get("skipped"):
        lines.append(f"zero-shot tasks skipped: {results['zeroshot']['skipped']}")
    bits = results.get("bits")
    if bits:
        lines.append(f"average bits {bits['actual_avg_bits']:.4f} (target {bits['target_avg_bits']})")
    st = results.get("storage")
    if st:
        lines.append(f"bits/param on disk {st['bits_per_param_disk_model']:.3f} (x{st['compression_ratio_model']:.2f} vs fp16)")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "export" and args.out_dir is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.out_dir = extra.pop()  # argparse binds OUT (optional) before it reads `--format gptq OUT`
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
    from misq import jobs
    from misq.config import EvalConfig

    if args.command == "eval":
        model, data = _configs(args)
        results = jobs.run_eval(model, data, cfg_from_args(EvalConfig, args), args.out, overwrite=args.overwrite)
        print(_summary(results))
        if args.out:
            print(f"results: {args.out}")
    elif args.command == "compress":
        model, data = _configs(args)
        cfg = _compress_config(args)
        eval_cfg = cfg_from_args(EvalConfig, args, datasets=args.eval or "none")
        eval_cfg = eval_cfg if eval_cfg.measures_anything else None
        results = jobs.run_compress(model, data, cfg, eval_cfg, args.out, save_dir=args.save, resume=args.resume,
                                    overwrite=args.overwrite)
        if rank == 0:  # under torchrun the other ranks have nothing to report
            print(_summary(results))
            print(f"run folder: {args.out}" + (f"\npacked checkpoint: {args.save}" if args.save else ""))
    elif args.command == "compare":
        from misq.report.compare import compare

        out = compare(args.baseline, args.results, args.out, overwrite=args.overwrite, reference=args.reference)
        print(f"report: {args.out}/report.md, {args.out}/report.html; verdict: {out.get('verdict', {}).get('status', '?') if isinstance(out.get('verdict'), dict) else out.get('verdict')}")
    elif args.command == "status":
        from misq.runs.status import follow_status, format_status, read_status

        if args.follow:
            follow_status(args.run_dir, stale_after_s=args.stale_after)
        else:
            print(format_status(read_status(args.run_dir, stale_after_s=args.stale_after)))
    elif args.command == "export":
        packed_dir, outs = args.packed_dir, [o for o in (args.out_dir, args.dense) if o]
        if len(outs) != 1 or (args.dense and args.format == "gptq"):
            raise MisqError(f"give one output folder: misq export {packed_dir} --format {args.format} OUT "
                            "(--dense OUT names the folder of a dense export)")
        out = outs[0]
        if args.format == "gptq":
            from misq.checkpoint.gptq_export import export_gptq

            export_gptq(packed_dir, out, checkpoint_format=args.gptq_checkpoint_format)
        else:
            from misq.checkpoint.packed import export_dense

            export_dense(packed_dir, out, dtype=args.dtype or "float16")  # --dtype may default to None ("as saved")
        print(f"{args.format} checkpoint: {out}")
    elif args.command == "demo":
        from misq.demo.run import run_demo

        print(run_demo(args.out, train_seconds=args.train_seconds))
    elif args.command == "generate":
        from misq.config import GenerateConfig
        from misq.runtime.generate import run_generate

        run_generate(args.model, cfg_from_args(GenerateConfig, args), device=args.device, dtype=args.dtype)
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
    except OSError as err:
        from misq.ownership import WRITE_ERRNOS, write_error

        if err.errno not in WRITE_ERRNOS:
            raise  # anything else is a bug: keep its traceback
        # A write that failed where no writer turned it into a MisqError: still one line, with the path.
        print("misq: error: " + " ".join(str(write_error(err)).splitlines()), file=sys.stderr)
        return MisqError.exit_code
    except KeyboardInterrupt:
        # The resume folder is written only between layers, so what it holds is consistent.
        print("misq: interrupted; a compression run continues with the same command plus --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
