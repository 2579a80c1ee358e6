"""--target-size, --groupsize and --act-order end to end on a tiny model: the honest size is met
as the packed file shows it, the file's bytes are the accounting's, and the reload is exact."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from misq import jobs
from misq.checkpoint.packed import load_packed
from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig


def _payload_bytes(folder) -> dict[str, int]:
    """Bytes of the packed linears' tensors in the saved safetensors files, by layer."""
    out: dict[str, int] = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                if "_proj." in name and not name.endswith(".weight") and not name.endswith(".bias"):
                    t = h.get_tensor(name)
                    layer = name.rsplit(".", 1)[0]
                    out[layer] = out.get(layer, 0) + t.numel() * t.element_size()
    return out


@pytest.mark.parametrize("case", [
    {"grouping": "hessian", "target_size": 3.8, "groupsize": 16, "act_order": True, "sparsity": 0.0, "budget": "model"},
    {"grouping": "hessian", "target_size": 3.6, "groupsize": 0, "act_order": False, "sparsity": 0.0, "budget": "model"},
    {"grouping": "mi", "target_size": 3.7, "groupsize": 0, "act_order": False, "sparsity": 0.5, "budget": "model"},
    {"grouping": "uniform", "wbits": 3, "groupsize": 32, "act_order": True, "static_groups": False, "sparsity": 0.0},
    {"grouping": "uniform", "wbits": 3, "groupsize": 32, "act_order": True, "static_groups": True, "sparsity": 0.5},
], ids=["mixed-g16-act-model", "mixed-per-row-model", "mi-sparse50-model", "uniform3-g32-act", "uniform3-g32-static-sparse50"])
def test_size_is_met_and_is_what_the_file_holds(tiny_checkpoint, tiny_corpus_file, tmp_path, case):
    cfg = CompressConfig(dataset=str(tiny_corpus_file), nsamples=8, n_groups=4, bits=(2, 3, 4, 6, 8), **case)
    run, packed = tmp_path / "run", tmp_path / "packed"
    res = jobs.run_compress(ModelConfig(str(tiny_checkpoint), device="cpu"), DataConfig(seqlen=64, cache_dir=str(tmp_path / "c")),
                            cfg, None, str(run), save_dir=str(packed))
    st = res["storage"]
    # the accounting is the file: every packed linear's tensors, to the byte
    on_disk = _payload_bytes(packed)
    kinds = {k: v for k, v in st["bytes_by_kind"].items() if k != "untouched"}
    assert sum(on_disk.values()) == sum(kinds.values()) == st["bytes_quantized"]
    if cfg.target_size is not None:
        assert st["bits_per_param_disk_quantized"] == pytest.approx(cfg.target_size, abs=0.01)
    # the packed file reloads to the model the run evaluated
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n".join(tiny_corpus_file.read_text().splitlines()[:200]))
    data = DataConfig(seqlen=64, cache_dir=str(tmp_path / "c"))
    before = jobs.run_eval(ModelConfig(str(packed), device="cpu"), data, EvalConfig(datasets=(str(eval_file),)), None)
    reloaded = load_packed(packed)
    assert reloaded.config.num_hidden_layers == 2 and before["ppl"][str(eval_file)] > 1


def test_uniform_groupwise_is_gptq_shaped(tiny_checkpoint, tiny_corpus_file, tmp_path):
    """3-bit, groups of 32, act-order: 3 + 19/32 bits a weight plus the order, one width."""
    cfg = CompressConfig(dataset=str(tiny_corpus_file), nsamples=8, grouping="uniform", wbits=3, groupsize=32,
                         act_order=True, static_groups=False, sparsity=0.0)
    res = jobs.run_compress(ModelConfig(str(tiny_checkpoint), device="cpu"), DataConfig(seqlen=64, cache_dir=str(tmp_path / "c")),
                            cfg, EvalConfig(datasets=(str(tiny_corpus_file),)), str(tmp_path / "run"))
    st = res["storage"]
    assert st["avg_channel_bits"] == 3.0
    assert st["bits_per_stored_weight"] == pytest.approx(3 + 19 / 32)
    assert 3 + 19 / 32 < st["bits_per_param_disk_quantized"] < 3 + 19 / 32 + 0.4  # + 16-bit order per column


def test_static_groups_store_no_column_order(tiny_checkpoint, tiny_corpus_file, tmp_path):
    """--static-groups with act-order: GPTQ's 3 + 19/32 bits a weight and nothing for the order,
    and the reload gives back the weights the run evaluated, bit for bit."""
    import torch

    cfg = CompressConfig(dataset=str(tiny_corpus_file), nsamples=8, grouping="uniform", wbits=3, groupsize=32,
                         act_order=True, static_groups=True, sparsity=0.0)
    packed = tmp_path / "packed"
    res = jobs.run_compress(ModelConfig(str(tiny_checkpoint), device="cpu"), DataConfig(seqlen=64, cache_dir=str(tmp_path / "c")),
                            cfg, None, str(tmp_path / "run"), save_dir=str(packed))
    st = res["storage"]
    assert st["bits_per_param_disk_quantized"] == pytest.approx(3 + 19 / 32, abs=1e-9)
    names = [n for f in packed.glob("*.safetensors") for n in safe_open(str(f), "pt").keys()]  # noqa: SIM118
    assert not [n for n in names if n.endswith(".perm")]
    reloaded = load_packed(packed, dtype=torch.float32)
    q = reloaded.model.layers[0].self_attn.q_proj.weight
    assert len(torch.unique(q[0, :32])) <= 8  # one 3-bit grid per 32 consecutive original columns


def test_per_row_grids_with_act_order_store_no_column_order(tiny_checkpoint, tiny_corpus_file, tmp_path):
    """One grid per row (--groupsize 0) fixes every grid before the solve, so act-order only
    changes the solve order: the file stores none, and the reload is the evaluated model."""
    import torch

    cfg = CompressConfig(dataset=str(tiny_corpus_file), nsamples=8, grouping="uniform", wbits=3, groupsize=0,
                         act_order=True, sparsity=0.5)
    packed = tmp_path / "packed"
    model_cfg = ModelConfig(str(tiny_checkpoint), device="cpu", dtype="float32")
    res = jobs.run_compress(model_cfg, DataConfig(seqlen=64, cache_dir=str(tmp_path / "c")), cfg,
                            EvalConfig(datasets=(str(tiny_corpus_file),)), str(tmp_path / "run"), save_dir=str(packed))
    names = [n for f in packed.glob("*.safetensors") for n in safe_open(str(f), "pt").keys()]  # noqa: SIM118
    assert not [n for n in names if n.endswith(".perm")]
    assert res["storage"]["bits_per_stored_weight"] < 3 + 19 / 64 + 1e-9  # codes, one scale and zero per row of >= 64
    again = jobs.run_eval(ModelConfig(str(packed), device="cpu"), DataConfig(seqlen=64, cache_dir=str(tmp_path / "c")),
                          EvalConfig(datasets=(str(tiny_corpus_file),)), None)
    assert again["ppl"][str(tiny_corpus_file)] == pytest.approx(res["ppl"][str(tiny_corpus_file)], rel=1e-6)
    q = load_packed(packed, dtype=torch.float32).model.layers[0].self_attn.q_proj.weight
    assert all(len(torch.unique(row)) <= 8 for row in q)  # one 3-bit grid per row


def test_a_size_out_of_reach_gets_the_nearest_and_says_so(tiny_checkpoint, tiny_corpus_file, tmp_path, caplog):
    # groups of 16 columns cost (16 + b) / 16 bits a weight in scales and zeros alone: 2.5 is out of reach
    cfg = CompressConfig(dataset=str(tiny_corpus_file), nsamples=8, n_groups=4, grouping="hessian", budget="model",
                         target_size=2.5, groupsize=16, sparsity=0.0)
    res = jobs.run_compress(ModelConfig(str(tiny_checkpoint), device="cpu"), DataConfig(seqlen=64, cache_dir=str(tmp_path / "c")),
                            cfg, None, str(tmp_path / "run"))
    assert "not reachable" in caplog.text and "nearest reachable size" in caplog.text
    assert res["storage"]["avg_channel_bits"] == 2.0  # the cheapest plan there is
    assert res["storage"]["bits_per_param_disk_quantized"] > 2.5
