"""Packed checkpoints: save -> load bit for bit, export to plain HF, bad files, atomic saves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import randomly_pruned
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import misq
from misq.algorithms.quantizer import find_grid, quantize_with_grid
from misq.checkpoint import folder_writing
from misq.checkpoint.accounting import storage_accounting
from misq.checkpoint.packed import (
    export_dense,
    is_packed_checkpoint,
    load_packed,
    load_packed_with_tokenizer,
    save_packed,
)
from misq.checkpoint.packing import parse_pattern
from misq.config import CompressConfig
from misq.errors import MisqError
from misq.models.layout import LINEAR_NAMES


def _load_fp16(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).eval()


def _compress(model, cfg: CompressConfig) -> dict:
    """The real pipeline on random calibration ids [8, 64] (direct grids while it is being edited)."""
    try:
        from misq.compress.driver import compress_model
    except ImportError:
        return _direct(model, [cfg.wbits], cfg.pattern)

    calib = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    return compress_model(model, calib, cfg, "cpu").grids


def _direct(model, widths: list[int], pattern: str, seed: int = 0) -> dict:
    """Prune (random half, or N:M by magnitude) and round every linear to random channel groups."""
    gen = torch.Generator().manual_seed(seed)
    pat = parse_pattern(pattern)
    grids = {}
    for i, layer in enumerate(model.model.layers):
        for name in LINEAR_NAMES:
            lin = layer.get_submodule(name)
            W = lin.weight.data.float()
            W = randomly_pruned(W, pat, gen)
            grid = find_grid(W, torch.randint(0, len(widths), (W.shape[1],), generator=gen), torch.tensor(widths))
            lin.weight.data.copy_(quantize_with_grid(W, grid).to(lin.weight.dtype))
            grids[f"model.layers.{i}.{name}"] = grid
    return grids


def _assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def packed(tiny_checkpoint: Path, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """The tiny model really compressed (uniform 4 bits, 50% unstructured) and saved packed."""
    from transformers import AutoTokenizer

    model = _load_fp16(tiny_checkpoint)
    cfg = CompressConfig(grouping="uniform", wbits=4, sparsity=0.5, nsamples=8)
    grids = _compress(model, cfg)
    out = tmp_path_factory.mktemp("packed") / "ckpt"
    sizes = save_packed(model, grids, out, tokenizer=AutoTokenizer.from_pretrained(tiny_checkpoint),
                        compress_config=cfg, pattern=cfg.pattern, extra={"note": "test"})
    assert sizes["payload_bytes"] == storage_accounting(model, grids, "unstructured")["bytes_by_kind"]
    return out, model


def test_save_load_bit_exact(packed) -> None:
    out, model = packed
    assert is_packed_checkpoint(out)
    _assert_same_weights(model, load_packed(out))
    _assert_same_weights(model, misq.load(str(out)))
    loaded, tok = load_packed_with_tokenizer(out)
    assert tok is not None and len(tok) == model.config.vocab_size and not loaded.training
    section = json.loads((out / "config.json").read_text())["misq"]
    assert section["format_version"] == 2 and section["pattern"] == "unstructured"
    assert section["compress_config"]["wbits"] == 4 and section["extra"] == {"note": "test"}
    assert not hasattr(loaded.config, "misq")  # re-saving the loaded model must not look packed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_mixed_widths_with_16bit_group(tiny_checkpoint: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=dtype)
    grids = _direct(model, [2, 3, 4, 6, 8, 16], "unstructured")
    save_packed(model, grids, tmp_path / "p", compress_config={}, pattern="unstructured")
    _assert_same_weights(model, load_packed(tmp_path / "p"))


def test_nm_2_4_real_compression(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = _load_fp16(tiny_checkpoint)
    cfg = CompressConfig(grouping="uniform", wbits=3, prunen=2, prunem=4, nsamples=8)
    grids = _compress(model, cfg)
    sizes = save_packed(model, grids, tmp_path / "p", compress_config=cfg, pattern="2:4")
    _assert_same_weights(model, load_packed(tmp_path / "p"))
    q_params = sum(model.get_submodule(n).weight.numel() for n in grids)
    assert sizes["payload_bytes"]["mask"] * 8 == 0.75 * q_params  # 3 bits per 4 weights


def test_dense_pattern_and_shards_and_tied_embeddings(tmp_path: Path) -> None:
    from misq.demo.toy import build_model

    build_model(512, tie=True).save_pretrained(tmp_path / "src")
    model = _load_fp16(tmp_path / "src")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    grids = _direct(model, [3, 16], "dense")
    sizes = save_packed(model, grids, tmp_path / "p", compress_config={}, pattern="dense", max_shard_bytes=20_000)
    shards = sorted(f for f in sizes["files"] if f.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert (tmp_path / "p" / "model.safetensors.index.json").is_file()
    loaded = load_packed(tmp_path / "p")
    _assert_same_weights(model, loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_nm_rejects_a_model_that_is_not_nm(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = _load_fp16(tiny_checkpoint)
    grids = _direct(model, [4], "unstructured")
    with pytest.raises(MisqError, match="not 2:4 sparse"):
        save_packed(model, grids, tmp_path / "p", compress_config={}, pattern="2:4")
    assert not (tmp_path / "p").exists()


def test_export_dense_loads_without_misq(packed, tmp_path: Path) -> None:
    out, _ = packed
    dense = export_dense(out, tmp_path / "dense")
    config = json.loads((dense / "config.json").read_text())
    assert "misq" not in config
    assert not any(f.name.endswith(".bin") for f in dense.iterdir())  # safetensors only
    plain = AutoModelForCausalLM.from_pretrained(dense).eval()
    assert plain.dtype == torch.float16
    ids = torch.randint(0, plain.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, load_packed(out)(ids).logits)
    _, tok = load_packed_with_tokenizer(dense)  # the plain-folder path of misq.load
    assert tok is not None
    export_dense(out, tmp_path / "dense")  # replaces its own earlier export
    with pytest.raises(MisqError, match="not a misq packed checkpoint"):
        export_dense(dense, tmp_path / "again")


# ----------------------------------------------------------------------------- bad files


@pytest.fixture
def broken(packed, tmp_path: Path) -> Path:
    path = tmp_path / "broken"
    shutil.copytree(packed[0], path)
    return path


def _edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_truncated_safetensors(broken: Path) -> None:
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(MisqError, match="truncated or corrupt"):
        load_packed(broken)


def test_missing_tensor(broken: Path) -> None:
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.scales"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(MisqError, match="down_proj.scales is missing"):
        load_packed(broken)


def test_format_1_is_refused_with_what_to_do(broken: Path) -> None:
    _edit_config(broken, lambda c: c["misq"].update(format_version=1))
    with pytest.raises(MisqError, match="format 1.*misq 0.1, or compress the model again"):
        load_packed(broken)


def test_future_format_version(broken: Path) -> None:
    _edit_config(broken, lambda c: c["misq"].update(format_version=3))
    with pytest.raises(MisqError, match="newer misq.*upgrade misq"):
        load_packed(broken)


def test_config_does_not_match_tensors(broken: Path) -> None:
    _edit_config(broken, lambda c: c["misq"]["layers"]["model.layers.0.self_attn.q_proj"].update(rows=32))
    with pytest.raises(MisqError, match="config.json and the weights do not match"):
        load_packed(broken)


def test_config_survivors_do_not_match_tensors(broken: Path) -> None:
    _edit_config(broken, lambda c: c["misq"]["layers"]["model.layers.0.mlp.up_proj"]["survivors"].update({"4": 7}))
    with pytest.raises(MisqError, match="do not match"):
        load_packed(broken)


def test_refuses_to_overwrite_a_foreign_folder(packed, tiny_checkpoint: Path, tmp_path: Path) -> None:
    _, model = packed
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(MisqError, match="not a misq output"):
        save_packed(model, {}, foreign, compress_config={}, pattern="dense")
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(MisqError, match="not a misq packed checkpoint"):
        export_dense(tiny_checkpoint, tmp_path / "x")


# ----------------------------------------------------------------------------- atomic saves


def test_interrupted_save_leaves_nothing_complete(packed, tmp_path: Path, monkeypatch) -> None:
    _, model = packed
    real_save = folder_writing.save_file

    def crash(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        assert not is_packed_checkpoint(Path(path).parent)  # config.json comes last
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(folder_writing, "save_file", crash)
    target = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        save_packed(model, {}, target, compress_config={}, pattern="dense")
    assert list(tmp_path.iterdir()) == []  # no target, no leftover staging folder

    # Replacing an existing checkpoint: a failed save keeps the old one whole.
    monkeypatch.setattr(folder_writing, "save_file", real_save)
    save_packed(model, {}, target, compress_config={"v": 1}, pattern="dense")
    monkeypatch.setattr(folder_writing, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_packed(model, {}, target, compress_config={"v": 2}, pattern="dense")
    assert [p.name for p in tmp_path.iterdir()] == ["new"]
    assert json.loads((target / "config.json").read_text())["misq"]["compress_config"] == {"v": 1}
    monkeypatch.setattr(folder_writing, "save_file", real_save)
    save_packed(model, {}, target, compress_config={"v": 3}, pattern="dense")  # replaces a misq checkpoint
    assert json.loads((target / "config.json").read_text())["misq"]["compress_config"] == {"v": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["new"]
