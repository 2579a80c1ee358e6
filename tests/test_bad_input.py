"""Bad input to ``misq compress``: one line on stderr that says what is wrong and how to fix
it, exit status 2, no traceback, and no run folder or checkpoint folder left behind.

Each case runs the real command line (``misq.cli.main``) in this process; one case runs it as
a subprocess to check the whole of a real stderr. Ctrl-C (exit 130, state kept) is tested on a
real process in test_resume.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from misq import cli


def compress(tmp_path: Path, model: Path | str, dataset: Path | str, *extra: str) -> list[str]:
    return ["compress", str(model), str(dataset), "--device", "cpu", "--nsamples", "2", "--seqlen", "32",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--save", str(tmp_path / "packed"),
            *extra]


def refused(capsys, tmp_path: Path, argv: list[str], *expected: str) -> str:
    """Run ``argv``; check the refusal's form and that ``expected`` parts are in its line."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("misq: error: ") and "Traceback" not in err
    for part in expected:
        assert part in lines[0], lines[0]
    assert not (tmp_path / "run").exists(), "a refused run must not create its run folder"
    assert not (tmp_path / "packed").exists()
    return lines[0]


def test_model_path_that_does_not_exist(capsys, tmp_path, tiny_corpus_file):
    refused(capsys, tmp_path, compress(tmp_path, tmp_path / "no-such-model", tiny_corpus_file),
            "no-such-model", "does not exist", "give a local checkpoint folder")


def _bert_folder(root: Path) -> Path:
    from transformers import BertConfig

    BertConfig(architectures=["BertForMaskedLM"], num_hidden_layers=1).save_pretrained(root)
    return root


def _folder_without_config(root: Path) -> Path:
    root.mkdir()
    (root / "notes.txt").write_text("not a model")
    return root


@pytest.mark.parametrize("make,expected", [(_bert_folder, "BertForMaskedLM is not a causal language model"),
                                           (_folder_without_config, "cannot read a model config")])
def test_model_that_is_not_a_causal_lm(capsys, tmp_path, tiny_corpus_file, make, expected):
    model = make(tmp_path / "model")
    line = refused(capsys, tmp_path, compress(tmp_path, model, tiny_corpus_file), expected)
    assert "give a" in line  # ... decoder-only LLaMA-family checkpoint / Hugging Face causal-LM folder


def test_architecture_misq_does_not_know(capsys, tmp_path, tiny_corpus_file):
    from transformers import GPT2Config

    GPT2Config(architectures=["GPT2LMHeadModel"], n_layer=1).save_pretrained(tmp_path / "gpt2")
    refused(capsys, tmp_path, compress(tmp_path, tmp_path / "gpt2", tiny_corpus_file),
            "architecture 'gpt2' is not supported", "LLaMA-family")


def test_unknown_dataset_name(capsys, tmp_path, tiny_checkpoint):
    refused(capsys, tmp_path, compress(tmp_path, tiny_checkpoint, "wikitext3"),
            "unknown dataset 'wikitext3'", "use wikitext2, ptb, c4 or the path of a text file")


def test_data_dir_without_the_files(capsys, tmp_path, tiny_checkpoint):
    empty = tmp_path / "data"
    (empty / "wikitext2").mkdir(parents=True)
    refused(capsys, tmp_path, compress(tmp_path, tiny_checkpoint, "wikitext2", "--data-dir", str(empty)),
            f"{empty} has no wikitext2 train text", "wiki.train.raw", "put the file there")


def test_text_too_short_for_one_window(capsys, tmp_path, tiny_checkpoint):
    short = tmp_path / "short.txt"
    short.write_text("The cat sees a red ball.")
    refused(capsys, tmp_path, compress(tmp_path, tiny_checkpoint, short),
            "too short for one window of 32 tokens", "use a smaller --seqlen or more text")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_nsamples_below_one(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file, n):
    refused(capsys, tmp_path, compress(tmp_path, tiny_checkpoint, tiny_corpus_file, "--nsamples", n),
            f"--nsamples {n} must be at least 1")


def test_seqlen_beyond_the_model(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file):
    refused(capsys, tmp_path, compress(tmp_path, tiny_checkpoint, tiny_corpus_file, "--seqlen", "512"),
            "--seqlen 512 is larger than the model supports (256 positions)", "use --seqlen 256 or less")


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5", "nan"])
def test_sparsity_outside_unit_interval(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file, value):
    line = refused(capsys, tmp_path, compress(tmp_path, tiny_checkpoint, tiny_corpus_file, "--sparsity", value),
                   "is outside [0, 1)", "use e.g. 0.5")
    assert f"--sparsity {float(value)} " in line


@pytest.mark.parametrize("n,m", [("4", "4"), ("5", "4"), ("0", "4")])
def test_nm_pattern_with_n_not_below_m(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file, n, m):
    refused(capsys, tmp_path, compress(tmp_path, tiny_checkpoint, tiny_corpus_file, "--prunen", n, "--prunem", m),
            f"N:M pattern {n}:{m} is invalid", "--prunen 2 --prunem 4")


def test_nm_pattern_whose_m_does_not_divide_the_channels(capsys, tmp_path, tiny_corpus_file):
    """Checked against the model's own channel counts, read from its config: this folder has no
    weights at all, so the refusal cannot have come after loading them."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=100, intermediate_size=300, num_attention_heads=2, num_key_value_heads=1,
                num_hidden_layers=2, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "odd")
    refused(capsys, tmp_path, compress(tmp_path, tmp_path / "odd", tiny_corpus_file, "--prunen", "4", "--prunem", "8"),
            "N:M pattern 4:8 does not fit this model", "100, 300 input channels, not a multiple of M=8",
            "choose an M that divides them")


@pytest.mark.parametrize("wbits", ["1", "17", "0"])
def test_wbits_outside_2_to_16(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file, wbits):
    refused(capsys, tmp_path, compress(tmp_path, tiny_checkpoint, tiny_corpus_file, "--use_mi_grouping", "0", "--wbits", wbits),
            f"--wbits {wbits} is outside 2..16", "use e.g. --wbits 4")


@pytest.mark.parametrize("bits,bad", [("1,4", "[1]"), ("4,32", "[32]"), ("2,3,x", None)])
def test_bit_list_outside_2_to_16(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file, bits, bad):
    line = refused(capsys, tmp_path, compress(tmp_path, tiny_checkpoint, tiny_corpus_file, "--bits", bits), "--bits")
    assert (f"width(s) {bad} outside 2..16" in line) if bad else ("malformed" in line and "e.g. 2,3,4,6,8" in line)


def _unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot create files in. Root ignores permission bits, so for root
    take sysfs, where nobody can create a file."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (locked / "probe").touch()
    except PermissionError:
        return locked
    (locked / "probe").unlink()
    sysfs = Path("/sys")
    try:
        (sysfs / "misq-probe").touch()
    except OSError:
        return sysfs
    pytest.skip("no folder here refuses writes to this user")


def test_output_folder_not_writable(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file):
    target = _unwritable_dir(tmp_path) / "run"
    argv = compress(tmp_path, tiny_checkpoint, tiny_corpus_file)
    argv[argv.index("--out") + 1] = str(target)
    refused(capsys, tmp_path, argv, f"output folder '{target}' is not writable", "choose a folder you can write to")
    assert not target.exists()


def test_malformed_flag_is_one_line_too(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file):
    refused(capsys, tmp_path, compress(tmp_path, tiny_checkpoint, tiny_corpus_file, "--nsamples", "many"),
            "argument --nsamples: invalid int value: 'many'", "see misq compress --help")


def test_real_process_prints_exactly_one_line(tmp_path, tiny_corpus_file):
    """The whole stderr of a real ``misq`` process, not only what the CLI function prints."""
    proc = subprocess.run([sys.executable, "-m", "misq.cli", *compress(tmp_path, tmp_path / "missing", tiny_corpus_file)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("misq: error: model path")
    assert proc.stdout == "" and not (tmp_path / "run").exists()
