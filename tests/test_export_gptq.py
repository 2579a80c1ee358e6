"""``misq export --format gptq``: GPTQ (v1 and v2) checkpoints that reproduce misq's weights bit for bit.

The reader here is written from the published layout, not from misq's writer: it turns each
int32 word into its 32 bits (least significant first), concatenates them into one stream and
cuts the stream into b-bit values, then computes W = scales[g_idx] * (q - (qzeros + 1)) for v1
(``"checkpoint_format": "gptq"``) or W = scales[g_idx] * (q - qzeros) for GPTQModel's
``"gptq_v2"``, with the per-module bits/group_size that GPTQModel's ``dynamic`` rules select
(first ``re.match``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import randomly_pruned
from safetensors.torch import load_file
from transformers import AutoTokenizer

from misq import cli
from misq.algorithms.quantizer import QuantGrid, find_grid, from_codes, quantize_with_grid, to_codes
from misq.checkpoint.gptq_export import export_gptq, quantization_config
from misq.checkpoint.gptq_format import GptqLayout, GptqUnsupported, decode_gptq, encode_gptq, pack_int32, unpack_int32
from misq.checkpoint.packed import load_packed, save_packed
from misq.checkpoint.packing import parse_pattern
from misq.demo.toy import build_model
from misq.errors import MisqError
from misq.models.layout import LINEAR_NAMES

# ----------------------------------------------------------------------------- an independent reader


def _bits_of_words(words: torch.Tensor, n_values: int, bits: int) -> torch.Tensor:
    """int32 [W, M] packed along dim 0 -> int64 [n_values, M]: the words' bits, LSB first and
    word after word, form one stream; value i is stream bits i*bits .. i*bits+bits-1."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    stream = ((u.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1).reshape(-1, u.shape[1])  # [W*32, M]
    assert stream.shape[0] == n_values * bits
    per_value = stream.reshape(n_values, bits, -1)
    return (per_value << torch.arange(bits).view(1, bits, 1)).sum(1)


def _module_config(qcfg: dict, name: str) -> tuple[int, int] | None:
    """(bits, group_size) of module ``name`` under GPTQModel's dynamic rules; None: not quantized."""
    for pattern, override in (qcfg.get("dynamic") or {}).items():
        negative = pattern.startswith("-:")
        if re.match(pattern[2:] if pattern[:2] in ("-:", "+:") else pattern, name):
            if negative:
                return None
            return override.get("bits", qcfg["bits"]), override.get("group_size", qcfg["group_size"])
    return qcfg["bits"], qcfg["group_size"]


def read_gptq(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(quantization_config, {linear: float32 weight [R, C]}, all tensors) of a GPTQ folder."""
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = load_file(folder / "model.safetensors")
    weights = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key.removesuffix(".qweight")
        bits, group_size = _module_config(qcfg, name)
        qweight, qzeros, scales, g_idx = (tensors[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx"))
        C, R = g_idx.numel(), scales.shape[1]
        K = 1 if group_size == -1 else math.ceil(C / group_size)
        assert qweight.dtype == qzeros.dtype == g_idx.dtype == torch.int32 and scales.dtype == torch.float16
        assert qweight.shape == (C * bits // 32, R) and qzeros.shape == (K, R * bits // 32) and scales.shape == (K, R)
        q = _bits_of_words(qweight, C, bits)  # [C, R]
        z = _bits_of_words(qzeros.t().contiguous(), R, bits).t()  # [K, R]
        z = z + {"gptq": 1, "gptq_v2": 0}[qcfg["checkpoint_format"]]  # v1 stores zero - 1, v2 the zero itself
        assert qcfg["format"] == qcfg["checkpoint_format"]
        g = g_idx.long()
        if not qcfg["desc_act"]:  # a reader that ignores g_idx assumes this
            assert torch.equal(g, torch.arange(C) // (C if group_size == -1 else group_size))
        weights[name] = (scales.float()[g] * (q - z[g]).float()).t()
    return qcfg, weights, tensors


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def _compressed(tokenizer, widths, pattern: str, seed: int = 0, layers: int = 1, nonneg_rows: int = 0):
    """A LLaMA of ``layers`` decoder layers (hidden 128, ffn 256) whose linears are pruned to ``pattern`` and rounded
    on misq grids; ``widths(name) -> (bits, groupsize, act_order)`` (groupsize 0: per row).
    Act-order layers get a random column order whose runs of G are the scale groups, as the
    solver makes them. The first ``nonneg_rows`` rows of every linear are made >= 0, so that their
    scale groups have zero point 0."""
    gen = torch.Generator().manual_seed(seed)
    model = build_model(len(tokenizer), hidden=128, ffn=256, layers=layers, heads=4, kv_heads=2, seed=seed).half()
    pat = parse_pattern(pattern)
    grids = {}
    for i, layer in enumerate(model.model.layers):
        for short in LINEAR_NAMES:
            name = f"model.layers.{i}.{short}"
            lin = layer.get_submodule(short)
            W = lin.weight.data.float()
            W = randomly_pruned(W, pat, gen)
            W[:nonneg_rows] = W[:nonneg_rows].abs()
            bits, G, act_order = widths(name)
            C = W.shape[1]
            order = torch.randperm(C, generator=gen) if act_order else torch.arange(C)
            groups = torch.empty(C, dtype=torch.long)
            groups[order] = torch.arange(C) // (G or C)
            grid = find_grid(W, groups, torch.full((int(groups.max()) + 1,), bits))
            grid.order = order if act_order else None
            lin.weight.data.copy_(quantize_with_grid(W, grid).half())
            grids[name] = grid
    return model, grids


def _packed(tmp_path: Path, tokenizer, widths, pattern: str, **kw) -> Path:
    model, grids = _compressed(tokenizer, widths, pattern, **kw)
    out = tmp_path / "packed"
    save_packed(model, grids, out, tokenizer=tokenizer, compress_config={}, pattern=pattern)
    return out


def _check_bit_exact(packed: Path, gptq: Path) -> dict:
    """The GPTQ folder's weights equal misq's dense reload of the packed checkpoint, bit for bit,
    and every other tensor is copied unchanged."""
    qcfg, weights, tensors = read_gptq(gptq)
    reference = load_packed(packed, dtype=torch.float32)  # misq's own decode: scale * (q - zero), float32
    state = reference.state_dict()
    linears = {n.removesuffix(".weight") for n in state if n.startswith("model.layers.") and n.endswith("_proj.weight")}
    assert set(weights) == linears
    for name, W in weights.items():
        assert torch.equal(W, state[f"{name}.weight"]), name
    stored = load_file(packed / "model.safetensors")
    untouched = [n for n in stored if not any(n.startswith(f"{lin}.") for lin in linears)]
    assert "lm_head.weight" in untouched and "model.embed_tokens.weight" in untouched
    for name in untouched:  # embeddings, norms, lm_head: copied as they are
        assert torch.equal(tensors[name], stored[name]), name
    return qcfg


# ----------------------------------------------------------------------------- bit-exact layouts


CASES = [  # bits, groupsize (0: per row), act-order, sparsity pattern
    (2, 128, True, "unstructured"),
    (2, 0, False, "dense"),
    (3, 128, True, "2:4"),
    (3, 0, False, "unstructured"),
    (4, 128, False, "dense"),
    (4, 0, True, "2:4"),
    (8, 128, True, "dense"),
    (8, 0, False, "2:4"),
]


@pytest.mark.parametrize(("bits", "groupsize", "act_order", "pattern"), CASES)
def test_gptq_export_is_bit_exact(tmp_path, tokenizer, bits, groupsize, act_order, pattern) -> None:
    packed = _packed(tmp_path, tokenizer, lambda _: (bits, groupsize, act_order), pattern)
    result = export_gptq(packed, tmp_path / "gptq")
    qcfg = _check_bit_exact(packed, tmp_path / "gptq")
    assert qcfg == result["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["checkpoint_format"] == "gptq" and qcfg["sym"] is False
    assert qcfg["bits"] == bits and qcfg["group_size"] == (groupsize or -1) and "dynamic" not in qcfg
    assert qcfg["desc_act"] is (act_order and groupsize > 0)  # one group per row: act-order moves nothing between groups
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert "misq" not in config and config["model_type"] == "llama"
    assert (tmp_path / "gptq" / "tokenizer.json").is_file() and (tmp_path / "gptq" / "misq_export.json").is_file()
    if pattern != "dense":  # pruned weights cost full codes here: the GPTQ file is the larger one
        assert result["gptq_bytes"] > result["packed_bytes"]


def test_real_compression_exports(tmp_path, tiny_checkpoint: Path, tokenizer) -> None:
    """Grids from misq's own solver (3-bit, act-order, 50%) on the 64-wide tiny LLaMA, through the CLI."""
    from transformers import AutoModelForCausalLM

    from misq.compress.driver import compress_model
    from misq.config import CompressConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float16)
    # MSE grids: 20 s here; groups along the act-order, so that g_idx must carry the order (desc_act)
    cfg = CompressConfig(grouping="uniform", wbits=3, groupsize=32, sparsity=0.5, nsamples=2, mse=False, static_groups=False)
    calib = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    grids = compress_model(model, calib, cfg, "cpu").grids
    save_packed(model, grids, tmp_path / "packed", tokenizer=tokenizer, compress_config=cfg, pattern=cfg.pattern)
    assert cli.main(["export", str(tmp_path / "packed"), "--format", "gptq", str(tmp_path / "gptq")]) == 0
    qcfg = _check_bit_exact(tmp_path / "packed", tmp_path / "gptq")
    assert qcfg["bits"] == 3 and qcfg["desc_act"] is True
    # an earlier export is replaced; the default format is still dense
    assert cli.main(["export", str(tmp_path / "packed"), "--format", "gptq", str(tmp_path / "gptq")]) == 0
    assert cli.main(["export", str(tmp_path / "packed"), str(tmp_path / "dense")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not misq's")
    with pytest.raises(MisqError, match="not a misq output"):  # a folder misq did not make is never replaced
        export_gptq(tmp_path / "packed", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not misq's"


def test_per_layer_widths_write_dynamic(tmp_path, tokenizer) -> None:
    def widths(name: str) -> tuple[int, int, bool]:
        if name == "model.layers.1.mlp.down_proj":
            return 8, 128, True
        if name.startswith("model.layers.0.self_attn.") and not name.endswith("o_proj"):
            return 3, 128, False  # all of q/k/v: one rule that also names vLLM's fused qkv_proj
        if name == "model.layers.0.mlp.up_proj":
            return 2, 128, False  # up alone, not gate: a rule for up_proj only
        return 4, 128, name.endswith("down_proj")

    packed = _packed(tmp_path, tokenizer, widths, "unstructured", layers=2)
    export_gptq(packed, tmp_path / "gptq")
    qcfg = _check_bit_exact(packed, tmp_path / "gptq")
    assert (qcfg["bits"], qcfg["group_size"], qcfg["desc_act"]) == (4, 128, True)
    assert qcfg["dynamic"] == {
        r"+:^model\.layers\.0\.self_attn\.(?:q_proj|k_proj|v_proj|qkv_proj)$": {"bits": 3, "group_size": 128},
        r"+:^model\.layers\.0\.mlp\.up_proj$": {"bits": 2, "group_size": 128},
        r"+:^model\.layers\.1\.mlp\.down_proj$": {"bits": 8, "group_size": 128},
    }
    assert _module_config(qcfg, "model.layers.0.self_attn.qkv_proj") == (3, 128)  # vLLM's fused name
    assert _module_config(qcfg, "model.layers.1.self_attn.q_proj") == (4, 128)


def _dynamic_widths(name: str) -> tuple[int, int, bool]:
    """3-, 4- and 8-bit layers, act-order in some: a folder only ``dynamic`` describes."""
    if name.endswith("mlp.down_proj"):
        return 8, 128, True
    if name.startswith("model.layers.0.self_attn.") and not name.endswith("o_proj"):
        return 3, 128, False
    return 4, 128, name.endswith("o_proj")


def test_gptq_v2_stores_zero_points_as_they_are(tmp_path, tokenizer) -> None:
    """v2 through the CLI: zero points unshifted (0 included: v1 mirrors those cells), nothing
    mirrored, the same weights bit for bit."""
    packed = _packed(tmp_path, tokenizer, _dynamic_widths, "unstructured", layers=2, nonneg_rows=3)
    assert cli.main(["export", str(packed), "--format", "gptq", "--gptq-checkpoint-format", "gptq_v2",
                     str(tmp_path / "v2")]) == 0
    qcfg = _check_bit_exact(packed, tmp_path / "v2")
    assert (qcfg["checkpoint_format"], qcfg["format"], qcfg["sym"]) == ("gptq_v2", "gptq_v2", False)
    assert (qcfg["bits"], qcfg["group_size"], qcfg["desc_act"]) == (4, 128, True) and len(qcfg["dynamic"]) == 3
    v1 = export_gptq(packed, tmp_path / "v1")  # the default is still v1
    assert v1["quantization_config"]["checkpoint_format"] == "gptq" and v1["mirrored"] > 0
    a, b = load_file(tmp_path / "v1" / "model.safetensors"), load_file(tmp_path / "v2" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if not key.endswith((".qzeros", ".qweight", ".scales")):
            assert torch.equal(a[key], b[key]), key
    assert all(bool((b[k] > 0).all()) for k in b if k.endswith(".scales"))  # no negated scale in v2
    with pytest.raises(MisqError, match="gptq_v2"):
        export_gptq(packed, tmp_path / "v3", checkpoint_format="gptq_v3")


def test_quantization_config_base_and_overrides() -> None:
    """The most common (bits, group_size) is the base; a one-group layer of C columns fits
    group_size C; a per-row layer among groups of 128 overrides group_size; skipped linears are -:."""
    lay = {f"model.layers.{i}.{n}": GptqLayout(4, 128, 512) for i in range(2) for n in LINEAR_NAMES}
    lay["model.layers.0.self_attn.o_proj"] = GptqLayout(4, -1, 128)  # one group of 128: fits G=128
    lay["model.layers.1.self_attn.o_proj"] = GptqLayout(4, -1, 512)  # one group of 512: needs -1
    lay["model.layers.1.mlp.gate_proj"] = GptqLayout(8, 128, 512)  # gate differs from up: no fused rule
    qcfg = quantization_config(lay, ["model.layers.0.mlp.down_proj"], desc_act=True)
    assert (qcfg["bits"], qcfg["group_size"], qcfg["desc_act"], qcfg["sym"]) == (4, 128, True, False)
    assert qcfg["dynamic"] == {
        r"-:^model\.layers\.0\.mlp\.down_proj$": {},
        r"+:^model\.layers\.1\.self_attn\.o_proj$": {"bits": 4, "group_size": -1},
        r"+:^model\.layers\.1\.mlp\.gate_proj$": {"bits": 8, "group_size": 128},
    }
    assert _module_config(qcfg, "model.layers.0.mlp.down_proj") is None
    assert "dynamic" not in quantization_config({"a": GptqLayout(3, -1, 128), "b": GptqLayout(3, 128, 256)})
    small = quantization_config({"a": GptqLayout(3, -1, 64), "b": GptqLayout(3, 128, 256), "c": GptqLayout(3, 128, 512)})
    assert small["dynamic"] == {r"+:^a$": {"bits": 3, "group_size": -1}}  # vLLM wants C % G == 0: 64 % 128 is not


# ----------------------------------------------------------------------------- refusals


def _mixed(tokenizer, kind: str):
    """A model with one layer GPTQ cannot hold: ``kind`` says how."""
    model, grids = _compressed(tokenizer, lambda _: (4, 128, False), "dense")
    name = "model.layers.0.mlp.down_proj"
    lin = model.get_submodule(name)
    W = lin.weight.data.float()
    C = W.shape[1]
    groups, bits = {
        "mixed": (torch.arange(C) // 128, torch.tensor([2, 4])),
        "fp16": (torch.arange(C) // 128, torch.tensor([4, 16])),
        "six": (torch.arange(C) // 128, torch.tensor([6, 6])),
        "unequal": ((torch.arange(C) >= 100).long(), torch.tensor([4, 4])),
    }[kind]
    grid = find_grid(W, groups, bits)
    lin.weight.data.copy_(quantize_with_grid(W, grid).half())
    grids[name] = grid
    return model, grids


@pytest.mark.parametrize(("kind", "why"), [("mixed", "mixes widths 2, 4"), ("fp16", "unquantized (16-bit)"),
                                           ("six", "6-bit codes"), ("unequal", "unequal sizes")])
def test_unsupported_runs_are_refused_up_front(tmp_path, tokenizer, kind, why) -> None:
    model, grids = _mixed(tokenizer, kind)
    save_packed(model, grids, tmp_path / "packed", compress_config={}, pattern="dense")
    with pytest.raises(MisqError, match=re.escape(why)) as err:
        export_gptq(tmp_path / "packed", tmp_path / "gptq")
    assert "model.layers.0.mlp.down_proj" in str(err.value) and "--format dense" in str(err.value)
    assert not (tmp_path / "gptq").exists()


def test_cli_refusal_is_one_line_and_leaves_nothing(tmp_path, tokenizer, capsys) -> None:
    model, grids = _mixed(tokenizer, "mixed")
    save_packed(model, grids, tmp_path / "packed", compress_config={}, pattern="dense")
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = cli.main(["export", str(tmp_path / "packed"), "--format", "gptq", str(tmp_path / "gptq")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("misq: error: "), err
    assert "--format dense" in lines[0] and 'runtime="packed"' in lines[0] and "mixes widths" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder, no staging left behind
    rc = cli.main(["export", str(tmp_path / "packed"), "--format", "gptq", "--dense", str(tmp_path / "d")])
    assert rc == 2 and "give one output folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the layer format itself


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_and_independent_bit_order(bits: int) -> None:
    values = torch.randint(0, 1 << bits, (96, 40), generator=torch.Generator().manual_seed(bits))
    packed = pack_int32(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_int32(packed, bits), values.int())
    assert torch.equal(_bits_of_words(packed, 96, bits), values)


def test_three_bit_values_straddle_words_as_autogptq_packs_them() -> None:
    """AutoGPTQ's 3-bit pattern: value 10 puts its low 2 bits at bits 30-31 of word 0 and its
    high bit at bit 0 of word 1; value 21 its low bit at bit 31 of word 1, the rest in word 2."""
    v = torch.zeros(32, 1, dtype=torch.long)
    v[10], v[21], v[11], v[31] = 0b101, 0b110, 0b111, 0b011
    words = pack_int32(v, 3)[:, 0].long() & 0xFFFFFFFF
    assert words.tolist() == [0b01 << 30, 0b1 | (0b111 << 1), (0b110 >> 1) | (0b011 << 29)]


def test_zero_point_zero_is_mirrored_exactly() -> None:
    """A (row, group) whose weights are all >= 0 has zero point 0, which v1 (zero - 1) cannot
    hold: it is written with scale -s and zero maxq, and still reads back bit for bit, with no
    stored zero equal to maxq (GPTQModel's whole-word +1 per field would carry out of it)."""
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(64, 256, generator=gen)
    W[:5, :128] = W[:5, :128].abs()  # rows 0-4 of group 0 are non-negative
    grid = find_grid(W, torch.arange(256) // 128, torch.tensor([4, 4]))
    assert int((grid.zero == 0).sum()) == 5
    codes = to_codes(quantize_with_grid(W, grid), grid)
    layer = encode_gptq(codes, grid)
    assert layer.mirrored == 5 and bool((layer.scales[0, :5] < 0).all())
    back = decode_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4)
    assert torch.equal(back, from_codes(codes, grid))
    stored = _bits_of_words(layer.qzeros.t().contiguous(), 64, 4)
    assert int(stored.max()) < 15
    v2 = (layer.qzeros.long() + 0x11111111) & 0xFFFFFFFF  # GPTQModel's v1 -> v2 conversion, 4 bits
    assert torch.equal(_bits_of_words(v2.t().contiguous(), 64, 4), stored + 1)
    # v2 stores the zero point itself: 0 fits, so nothing is mirrored and the codes are misq's own
    layer2 = encode_gptq(codes, grid, "gptq_v2")
    assert layer2.mirrored == 0 and bool((layer2.scales > 0).all())
    assert torch.equal(_bits_of_words(layer2.qzeros.t().contiguous(), 64, 4).t(), grid.zero.t().long())
    assert torch.equal(_bits_of_words(layer2.qweight, 256, 4).t(), codes.long())
    assert torch.equal(decode_gptq(layer2.qweight, layer2.qzeros, layer2.scales, layer2.g_idx, 4, "gptq_v2"),
                       from_codes(codes, grid))


def test_encode_refuses_what_gptq_cannot_place() -> None:
    W = torch.randn(40, 64)
    g = find_grid(W, torch.zeros(64, dtype=torch.long), torch.tensor([4]))
    with pytest.raises(GptqUnsupported, match="multiples of 32"):
        encode_gptq(to_codes(quantize_with_grid(W, g), g), g)
    grid = QuantGrid(scale=torch.ones(64, 1), zero=torch.zeros(64, 1), groups=torch.zeros(64, dtype=torch.long),
                     bits=torch.tensor([16]))
    with pytest.raises(GptqUnsupported, match="16-bit"):
        encode_gptq(torch.zeros(64, 64, dtype=torch.int32), grid)


# ----------------------------------------------------------------------------- a real GPTQ reader


def test_gptqmodel_loads_it_through_transformers(tmp_path, tokenizer) -> None:
    """transformers + optimum + gptqmodel on the CPU (skipped when they are not installed)."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM, GPTQConfig

    packed = _packed(tmp_path, tokenizer, lambda _: (4, 128, True), "unstructured")
    export_gptq(packed, tmp_path / "gptq")
    # backend torch: GPTQModel's CPU default (torch_fused) takes only some group sizes
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq", dtype=torch.float16, device_map="cpu",
                                                 quantization_config=GPTQConfig(bits=4, backend="torch")).eval()
    reference = load_packed(packed)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert torch.equal(q_proj.dequantize_weight().t(), reference.model.layers[0].self_attn.q_proj.weight)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), reference(ids).logits.float(), atol=5e-3, rtol=0)


def test_gptqmodel_load_reads_gptq_v2_with_dynamic_widths(tmp_path, tokenizer) -> None:
    """GPTQModel's own loader on a gptq_v2 export whose layers are 3, 4 and 8 bits (only
    ``dynamic`` says which), some grids with zero point 0: its dequantized weights are misq's,
    bit for bit (skipped when gptqmodel is not installed)."""
    pytest.importorskip("gptqmodel")
    from gptqmodel import BACKEND, GPTQModel

    packed = _packed(tmp_path, tokenizer, _dynamic_widths, "unstructured", layers=2, nonneg_rows=3)
    export_gptq(packed, tmp_path / "v2", checkpoint_format="gptq_v2")
    model = GPTQModel.load(str(tmp_path / "v2"), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    reference = load_packed(packed)
    state = reference.state_dict()
    widths = {}
    for name, module in model.model.named_modules():
        if hasattr(module, "dequantize_weight") and name.startswith("model.layers."):
            widths[name] = module.bits
            assert torch.equal(module.dequantize_weight().t(), state[f"{name}.weight"]), name
    assert len(widths) == 14 and sorted(set(widths.values())) == [3, 4, 8]
    assert widths["model.layers.0.self_attn.k_proj"] == 3 and widths["model.layers.1.mlp.down_proj"] == 8
    ids = torch.randint(0, reference.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.model(ids).logits.float(), reference(ids).logits.float(), atol=5e-3, rtol=0)
