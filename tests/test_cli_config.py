"""The CLI is built from the config dataclasses' field metadata (misq.config.option): every
exposed field has a flag, its default is the field's default, its help and choices come from
the metadata, and the prototype's spellings parse to the same configs as the dashed ones.

Pure argument parsing: no model, no data, no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from misq import cli, config
from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig
from misq.errors import MisqError

# The configs each subcommand builds from its flags.
COMMAND_CONFIGS = {"compress": (ModelConfig, DataConfig, CompressConfig), "eval": (ModelConfig, DataConfig, EvalConfig)}


def _actions(command: str) -> dict[str, argparse.Action]:
    """The subcommand's argparse actions by dest (switch flags share one dest: the first wins)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out: dict[str, argparse.Action] = {}
    for action in sub.choices[command]._actions:
        out.setdefault(action.dest, action)
    return out


def _exposed(cls: type, command: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls)
            if "help" in f.metadata and command in f.metadata.get("commands", (command,))]


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def _compress(*flags: str) -> tuple[ModelConfig, DataConfig, CompressConfig]:
    args = _parse("compress", "m", *flags)
    model, data = cli._configs(args)
    return model, data, cli._compress_config(args)


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_every_exposed_field_has_a_flag_with_the_field_default(command):
    actions = _actions(command)
    for cls in COMMAND_CONFIGS[command]:
        fields = _exposed(cls, command)
        assert fields, f"{cls.__name__} exposes no field"
        for f in fields:
            assert f.name in actions, f"{cls.__name__}.{f.name} has no flag on `misq {command}`"
            action = actions[f.name]
            if f.default is dataclasses.MISSING:
                assert not action.option_strings, f"{f.name} has no default, so it must be positional"
                continue
            md = f.metadata
            if md.get("given"):  # parser default None: the field default applies (checked below)
                assert action.default is None
            elif "values" in md:  # CLI words: --c4-cut protocol
                assert md["values"][action.default] == f.default
            else:
                assert action.default == f.default, f"--{f.name}: CLI default {action.default!r} != {f.default!r}"
            if "choices" in md and "switch" not in md:
                assert tuple(action.choices) == tuple(md["choices"])


def test_no_flags_give_the_dataclass_defaults():
    model, data, cfg = _compress()
    assert model == ModelConfig("m")
    assert data == DataConfig()
    assert cfg == CompressConfig()
    args = _parse("eval", "m")
    assert cli.cfg_from_args(EvalConfig, args) == EvalConfig()
    assert cli._configs(args) == (ModelConfig("m"), DataConfig())


def test_the_choice_tuples_are_the_ones_validation_uses():
    actions = _actions("compress")
    assert tuple(actions["grouping"].choices) == config.GROUPINGS
    assert tuple(actions["budget"].choices) == config.BUDGETS
    assert tuple(actions["mi_estimator"].choices) == config.MI_ESTIMATORS
    assert tuple(actions["dtype"].choices) == config.DTYPE_NAMES
    assert tuple(_actions("eval")["device_map"].choices) == config.DEVICE_MAPS
    assert "device_map" not in actions  # eval only


@pytest.mark.parametrize("command,dest", [("compress", "target_avg_bits"), ("compress", "grouping"),
                                          ("compress", "bits"), ("eval", "datasets"), ("eval", "c4_cut")])
def test_help_comes_from_the_field_metadata(command, dest):
    cls = next(c for c in COMMAND_CONFIGS[command] if dest in {f.name for f in dataclasses.fields(c)})
    f = next(f for f in dataclasses.fields(cls) if f.name == dest)
    help_text = _actions(command)[dest].help
    assert help_text.startswith(f.metadata["help"].replace("%", "%%"))
    shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
    if "values" in f.metadata:
        shown = next(k for k, v in f.metadata["values"].items() if v == f.default)
    assert help_text.endswith(f"(default: {shown})")


def test_help_output_shows_metadata_and_defaults():
    proc = subprocess.run([sys.executable, "-m", "misq.cli", "compress", "--help"], capture_output=True, text=True,
                          check=True)
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "average channel bits to meet (codes only; the prototype's budget) (default: 4.0)" in text
    assert "--target_avg_bits" in text and "--use_mi_grouping" in text
    assert "~7% faster" in text  # a % in the metadata survives argparse's formatting
    assert "--device-map" not in text


def test_prototype_spellings_parse_like_the_dashed_ones():
    dashed = _compress("--target-avg-bits", "3.5", "--n-groups", "4", "--mi-estimator", "binned",
                       "--offload-activations", "--batch-size", "8", "--c4-cut", "none", "--no-stream",
                       "--trust-remote-code", "--data-dir", "/d", "--cache-dir", "/c", "--grouping", "mi")
    prototype = _compress("--target_avg_bits", "3.5", "--n_groups", "4", "--mi_estimator", "binned",
                          "--offload_activations", "--batch_size", "8", "--c4_cut", "none", "--no_stream",
                          "--trust_remote_code", "--data_dir", "/d", "--cache_dir", "/c", "--use_mi_grouping", "1")
    assert dashed == prototype
    model, data, cfg = dashed
    assert (cfg.target_avg_bits, cfg.n_groups, cfg.grouping, cfg.batch_size) == (3.5, 4, "mi", 8)
    assert data.c4_cut is False and model.stream == "off" and model.trust_remote_code


def test_special_translations():
    assert _compress("--use_mi_grouping", "0", "--wbits", "3")[2].grouping == "uniform"
    assert _compress("--layerwise", "0")[0].layerwise is False
    assert _compress("--layerwise", "1")[0].layerwise is True
    assert _compress("--stream")[0].stream == "on"
    assert _compress("--bits", "8,2,4")[2].bits == (2, 4, 8)
    assert _compress("wikitext2")[2].dataset == "wikitext2"
    assert _compress("--dataset", "ptb")[2].dataset == "ptb"
    assert _compress("ptb", "--dataset", "ptb")[2].dataset == "ptb"
    args = _parse("eval", "m", "--device_map", "balanced", "--datasets", "ptb", "--batch-size", "2")
    assert cli._configs(args)[0].device_map == "balanced"
    assert cli.cfg_from_args(EvalConfig, args) == EvalConfig(datasets=("ptb",), batch_size=2)


def test_mse_grids_by_default_only_without_pruning():
    assert _compress()[2].mse is True
    assert _compress("--sparsity", "0.5")[2].mse is False
    assert _compress("--prunen", "2", "--prunem", "4")[2].mse is False
    assert _compress("--sparsity", "0.5", "--mse")[2].mse is True
    assert _compress("--no-mse")[2].mse is False


@pytest.mark.parametrize("flags,message", [
    (("--grouping", "fancy"), "argument --grouping: invalid choice: 'fancy'"),
    (("--budget", "all"), "invalid choice: 'all'"),
    (("--dtype", "float8"), "invalid choice: 'float8'"),
    (("--c4-cut", "half"), "invalid choice: 'half'"),
    (("--layerwise", "2"), "invalid choice: 2"),
    (("--nsamples", "many"), "argument --nsamples: invalid int value: 'many'"),
    (("--device-map", "auto"), "unrecognized arguments: --device-map"),
    (("--use_mi_grouping", "0", "--grouping", "mi"), "contradicts --grouping mi"),
    (("c4", "--dataset", "ptb"), "two calibration datasets given"),
    (("--nsamples", "0"), "--nsamples 0 must be at least 1"),
    (("--refine-passes", "-1"), "--refine-passes -1 must be 0 (off) or more"),
])
def test_bad_input_is_a_misq_error(flags, message):
    with pytest.raises(MisqError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _compress(*flags)


def test_bad_flag_through_main_is_one_line_and_exit_2(capsys):
    assert cli.main(["compress", "m", "--grouping", "fancy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("misq: error: ") and "misq compress --help" in err[0]
