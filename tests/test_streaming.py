"""Streaming weights (issue 8): a streamed run gives what an in-memory run gives, one layer at a time."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from misq import cli, jobs
from misq.checkpoint.packed import load_packed
from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig
from misq.demo.toy import synthetic_corpus
from misq.errors import MisqError
from misq.models import streaming
from misq.models.streaming import StreamedModel, is_materialized
from misq.protocol import perplexity

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny GQA checkpoint (fp32 on disk) re-saved as shards with an index, as real models are."""
    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint).save_pretrained(out, max_shard_size="100KB")
    _copy_tokenizer(tiny_checkpoint, out)
    assert (out / streaming.INDEX_NAME).is_file() and len(list(out.glob("*.safetensors"))) > 1
    return out


@pytest.fixture(scope="module")
def tied(tmp_path_factory, tiny_checkpoint) -> Path:
    from misq.demo.toy import build_model

    out = tmp_path_factory.mktemp("tied")
    build_model(512, tie=True, seed=3).save_pretrained(out)
    _copy_tokenizer(tiny_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    """(calibration text, a short evaluation text)."""
    root = tmp_path_factory.mktemp("texts")
    (root / "calib.txt").write_text(synthetic_corpus(2000, seed=1))
    (root / "eval.txt").write_text(synthetic_corpus(150, seed=2))
    return root / "calib.txt", root / "eval.txt"


def _data(tmp_path: Path) -> DataConfig:
    return DataConfig(seqlen=64, cache_dir=str(tmp_path / "cache"))


def _without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "solve_s"} for r in records]


def test_streamed_compress_equals_in_memory(sharded, texts, tmp_path, monkeypatch):
    calib, held_out = texts
    cfg = CompressConfig(dataset=str(calib), nsamples=8, n_groups=4, target_avg_bits=3.5, budget="model", grouping="hessian", groupsize=0, act_order=False, mse=False)
    evals = EvalConfig(datasets=(str(held_out),), batch_size=8)
    materialized_after_load: list[int] = []
    load = StreamedModel.load

    def spy(self: StreamedModel, i: int) -> None:
        load(self, i)
        materialized_after_load.append(sum(is_materialized(layer) for layer in self.layers))

    monkeypatch.setattr(StreamedModel, "load", spy)
    runs = {}
    for mode in ("off", "on"):  # layerwise in memory too: the same evaluation arithmetic, so equality is exact
        runs[mode] = jobs.run_compress(ModelConfig(str(sharded), device="cpu", stream=mode, layerwise=True), _data(tmp_path),
                                           cfg, evals, str(tmp_path / f"run-{mode}"), save_dir=str(tmp_path / f"packed-{mode}"))
    whole, streamed = runs["off"], runs["on"]
    assert streamed["ppl"] == whole["ppl"]
    assert streamed["eval"][str(held_out)]["path"] == "streamed"
    assert streamed["storage"] == whole["storage"]
    assert streamed["bits"] == whole["bits"]
    assert _without_times(streamed["layers"]) == _without_times(whole["layers"])
    assert (streamed["memory"]["streamed"], whole["memory"]["streamed"]) == (True, False)
    assert streamed["memory"]["peak_rss_gib"] > 0
    a, b = load_packed(tmp_path / "packed-off").state_dict(), load_packed(tmp_path / "packed-on").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Two layers, each read once by: the model-budget measure, compression, size accounting,
    # evaluation and the packed save; never two at a time.
    assert materialized_after_load == [1] * 10
    assert not (tmp_path / "run-on" / "resume").exists()  # the per-layer store goes once the run is done


def test_streamed_run_resumes_from_its_layer_files(sharded, texts, tmp_path, monkeypatch):
    from misq.runs.resume import ResumeState

    cfg = CompressConfig(dataset=str(texts[0]), nsamples=8, n_groups=4, target_avg_bits=3.5, grouping="hessian", groupsize=0, act_order=False, mse=False)
    model_cfg = ModelConfig(str(sharded), device="cpu", stream="on")
    evals = EvalConfig(datasets=(str(texts[1]),), batch_size=8)
    straight = jobs.run_compress(model_cfg, _data(tmp_path), cfg, evals, str(tmp_path / "a"), save_dir=str(tmp_path / "pa"))
    layer_done = ResumeState.layer_done

    def crash_after_layer_0(self, i, layer_state, output):
        layer_done(self, i, layer_state, output)
        if i == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumeState, "layer_done", crash_after_layer_0)
    with pytest.raises(KeyboardInterrupt):
        jobs.run_compress(model_cfg, _data(tmp_path), cfg, evals, str(tmp_path / "b"), save_dir=str(tmp_path / "pb"))
    monkeypatch.setattr(ResumeState, "layer_done", layer_done)
    resumed = jobs.run_compress(model_cfg, _data(tmp_path), cfg, evals, str(tmp_path / "b"), save_dir=str(tmp_path / "pb"),
                                    resume=True)
    assert resumed["ppl"] == straight["ppl"]
    assert _without_times(resumed["layers"]) == _without_times(straight["layers"])
    a, b = load_packed(tmp_path / "pa").state_dict(), load_packed(tmp_path / "pb").state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a) and a.keys() == b.keys()


def test_streamed_eval_equals_in_memory(sharded, texts, tmp_path):
    evals = EvalConfig(datasets=(str(texts[1]),), batch_size=8)
    ppl = {}
    for mode, layerwise in (("on", None), ("off", True), ("off", False)):
        res = jobs.run_eval(ModelConfig(str(sharded), device="cpu", stream=mode, layerwise=layerwise), _data(tmp_path), evals, None)
        ppl[(mode, layerwise)] = res["ppl"][str(texts[1])]
        assert res["memory"]["streamed"] is (mode == "on")
    assert ppl[("on", None)] == ppl[("off", True)]
    assert ppl[("on", None)] == pytest.approx(ppl[("off", False)], rel=1e-5)  # whole model: same maths, other kernels


def test_tied_embeddings(tied, texts, tmp_path):
    streamed = StreamedModel(tied, torch.float16)
    model = streamed.model
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.lm_head.weight.is_meta
    evals = EvalConfig(datasets=(str(texts[1]),), batch_size=8)
    ppl = [jobs.run_eval(ModelConfig(str(tied), device="cpu", stream=mode, layerwise=True), _data(tmp_path), evals, None)["ppl"]
           for mode in ("on", "off")]
    assert ppl[0] == ppl[1]


def test_one_layer_at_a_time_and_no_mapping_left(sharded):
    streamed = StreamedModel(sharded, torch.float16)
    assert not any(is_materialized(layer) for layer in streamed.layers)
    assert not streamed.model.model.embed_tokens.weight.is_meta and not streamed.model.model.norm.weight.is_meta
    assert not streamed.model.model.rotary_emb.inv_freq.is_meta  # computed at construction, never stored
    streamed.load(1)
    assert [is_materialized(layer) for layer in streamed.layers] == [False, True]
    assert streamed.layers[1].mlp.up_proj.weight.dtype == torch.float16
    if sys.platform.startswith("linux"):  # a mapping left open would keep every page read counted in the RSS
        maps = Path("/proc/self/maps").read_text()
        assert not any(str(p.resolve()) in maps for p in sharded.glob("*.safetensors"))
    streamed.release(1)
    assert not any(is_materialized(layer) for layer in streamed.layers)


def test_bin_only_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", folder / "config.json")
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(MisqError, match=r"no safetensors weights \(pytorch_model.bin\).*convert.*drop --stream"):
        streaming.stream_folder(ModelConfig(str(folder), stream="on"))
    assert streaming.stream_folder(ModelConfig(str(folder), stream="auto")) is None  # auto falls back to loading it


def test_auto_streams_only_what_does_not_fit(sharded, monkeypatch):
    cfg = ModelConfig(str(sharded), stream="auto")
    monkeypatch.setattr(streaming, "available_host_bytes", lambda: 10**12)
    assert streaming.stream_folder(cfg) is None
    need = streaming.SafetensorsFiles.of_folder(sharded).weight_bytes(torch.float16)
    monkeypatch.setattr(streaming, "available_host_bytes", lambda: int(need / streaming.AUTO_STREAM_FRACTION) - 1)
    assert streaming.stream_folder(cfg) == sharded
    assert streaming.stream_folder(ModelConfig(str(sharded), stream="off")) is None


def test_hub_id_from_the_cache(sharded, tmp_path):
    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(sharded, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    assert streaming.resolve_checkpoint("someone/tiny", cache_dir=tmp_path / "hub") == snapshot
    assert streaming.resolve_checkpoint("someone/absent", cache_dir=tmp_path / "hub") is None
    with pytest.raises(MisqError, match="does not exist"):
        streaming.resolve_checkpoint("./no/such/folder")


def test_packed_checkpoint_is_not_streamed(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"misq": {"format": "misq-packed"}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MisqError, match="packed checkpoint.*drop --stream"):
        streaming.stream_folder(ModelConfig(str(tmp_path), stream="on"))
    assert streaming.stream_folder(ModelConfig(str(tmp_path))) is None


def test_device_map_path_scores_like_the_whole_model(tiny_checkpoint, texts):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    tokens = torch.randint(0, 500, (1, 64 * 6), generator=torch.Generator().manual_seed(0))
    whole = perplexity.perplexity(model, tokens, 64, "cpu", layerwise=False, batch_size=4)
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "lm_head": 0}  # as if spread over two devices
    spread = perplexity.perplexity(model, tokens, 64, "cpu", batch_size=4)
    assert spread["path"] == "device-map" and whole["path"] == "whole-model"
    assert spread["ppl"] == pytest.approx(whole["ppl"], rel=1e-6)


def test_flags_and_their_conflicts():
    parser = cli.build_parser()
    for flags, mode in (([], "auto"), (["--stream"], "on"), (["--no-stream"], "off")):
        assert parser.parse_args(["compress", "m", *flags]).stream == mode
    with pytest.raises((SystemExit, MisqError), match="not allowed|2"):
        parser.parse_args(["compress", "m", "--stream", "--no-stream"])
    assert parser.parse_args(["eval", "m", "--device-map", "auto"]).device_map == "auto"
    with pytest.raises(MisqError, match="--layerwise 0"):
        ModelConfig("m", stream="on", layerwise=False)
    with pytest.raises(MisqError, match="exclude each other"):
        ModelConfig("m", stream="on", device_map="auto")


# ----------------------------------------------------------------------------- reading ahead (issue 17)


def _compress_streamed(streamed: StreamedModel, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    from misq.compress import driver

    states: dict[str, torch.Tensor] = {}
    cfg = CompressConfig(grouping="uniform", wbits=4, sparsity=0.5, nsamples=calib.shape[0], groupsize=0, act_order=False, mse=False)
    driver.compress_model(streamed.model, calib, cfg, "cpu", layer_source=streamed,
                          on_layer_done=lambda _i, state, _out: states.update({k: v.clone() for k, v in state.items()}))
    return states


def test_the_next_layer_is_read_while_this_one_is_compressed(sharded, monkeypatch):
    """Layer 1's tensors are read in the reader thread, starting before layer 0 is released (so
    while it is compressed), and the result is the in-memory run's, bit for bit."""
    import threading
    import time

    from misq.compress import driver

    events: list[tuple[str, int, str]] = []
    read, release = StreamedModel._read_layer, StreamedModel.release

    def slow_read(self, names, files):
        i = int(names[0].split(".")[2])
        events.append(("read", i, threading.current_thread().name))
        time.sleep(0.2)  # a slow disk: without reading ahead, load(1) would wait for it
        return read(self, names, files)

    def spy_release(self, i):
        events.append(("release", i, threading.current_thread().name))
        release(self, i)

    monkeypatch.setattr(StreamedModel, "_read_layer", slow_read)
    monkeypatch.setattr(StreamedModel, "release", spy_release)
    calib = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    streamed = _compress_streamed(StreamedModel(sharded, torch.float32), calib)
    assert [e[:2] for e in events] == [("read", 0), ("read", 1), ("release", 0), ("release", 1)]
    assert events[0][2] == events[2][2] == threading.main_thread().name and events[1][2].startswith("misq-layer-reader")

    model = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()
    cfg = CompressConfig(grouping="uniform", wbits=4, sparsity=0.5, nsamples=4, groupsize=0, act_order=False, mse=False)
    driver.compress_model(model, calib, cfg, "cpu")
    whole = model.state_dict()
    assert streamed.keys() <= whole.keys() and len(streamed) == sum(".layers." in k for k in whole)
    for name, t in streamed.items():
        assert torch.equal(t, whole[name]), name


def test_a_read_ahead_error_surfaces_as_a_direct_read_would(sharded, tmp_path):
    """A NaN in layer 1, met by the reader thread while layer 0 is compressed, is raised in the
    main thread when layer 1's turn comes, with the message of a direct read."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    name = "model.layers.1.mlp.up_proj.weight"
    index = json.loads((broken / streaming.INDEX_NAME).read_text())
    shard = broken / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(MisqError) as direct:
        StreamedModel(broken, torch.float32).load(1)
    streamed = StreamedModel(broken, torch.float32)
    calib = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(MisqError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds 1 NaN") as ahead:
        _compress_streamed(streamed, calib)
    assert str(ahead.value) == str(direct.value)
    assert not any(is_materialized(layer) for layer in streamed.layers)


def test_a_layer_pointed_at_a_new_file_is_not_taken_from_a_stale_read(sharded, tmp_path):
    from safetensors.torch import save_file

    streamed = StreamedModel(sharded, torch.float32)
    streamed.prefetch(1)
    zeros = {f"model.layers.1.{n}": torch.zeros(p.shape) for n, p in streamed.layers[1].named_parameters()}
    save_file(zeros, tmp_path / "layer_001.safetensors")
    streamed.use_file(1, tmp_path / "layer_001.safetensors")
    streamed.load(1)
    assert all(bool((p == 0).all()) for p in streamed.layers[1].parameters())
    streamed.release(1)
