"""No pickle on untrusted files, and no checkpoint code run unless the user asks for it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import misq
from misq import cli

SOURCE = Path(misq.__file__).resolve().parent


def _sources() -> list[tuple[Path, str]]:
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 10, f"misq sources not found under {SOURCE}"
    return [(f, f.read_text(encoding="utf-8")) for f in files]


def test_no_pickle_loading_in_the_package():
    """Checkpoints, resume files and token caches are safetensors / JSON / .npy: nothing is unpickled."""
    for path, text in _sources():
        for call in re.finditer(r"torch\.load\((.*?)\)", text, flags=re.DOTALL):
            assert "weights_only=True" in call.group(1), f"{path}: torch.load without weights_only=True"
        assert not re.search(r"^\s*(import pickle|from pickle |import dill|import joblib)", text, flags=re.MULTILINE), path
        assert not re.search(r"allow_pickle\s*=\s*True", text), f"{path}: allow_pickle=True"
        assert "pickle.load" not in text, path


def test_trust_remote_code_never_hard_coded_on():
    for path, text in _sources():
        assert not re.search(r"trust_remote_code\s*=\s*True", text), f"{path} turns trust_remote_code on by itself"


@pytest.fixture
def recorded(monkeypatch):
    """Every from_pretrained of transformers' Auto classes, with the trust_remote_code it got."""
    import transformers

    calls: list[tuple[str, object]] = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def wrapper(*args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code", False)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", wrapper)
    return calls


@pytest.mark.parametrize("flag", [False, True])
def test_trust_remote_code_follows_the_flag(recorded, tiny_checkpoint, tiny_corpus_file, tmp_path, capsys, flag):
    """Off by default on every load of an eval run; on only with --trust-remote-code."""
    text = tmp_path / "eval.txt"
    text.write_text(tiny_corpus_file.read_text()[:2000])
    argv = ["eval", str(tiny_checkpoint), "--datasets", str(text), "--device", "cpu", "--seqlen", "64",
            "--cache-dir", str(tmp_path / "cache")] + (["--trust-remote-code"] if flag else [])
    assert cli.main(argv) == 0, capsys.readouterr().err
    kinds = {name for name, _ in recorded}
    assert {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"} <= kinds, recorded
    assert all(trust is flag for _, trust in recorded), recorded


def test_library_default_is_off(recorded, tiny_checkpoint):
    """A library caller who never mentions it gets it off too (not only the command line)."""
    from misq.config import ModelConfig
    from misq.models import loading

    assert ModelConfig(str(tiny_checkpoint)).trust_remote_code is False
    loading.load_model(ModelConfig(str(tiny_checkpoint), device="cpu"))
    assert recorded and all(trust is False for _, trust in recorded), recorded
