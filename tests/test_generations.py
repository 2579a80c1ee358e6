"""Greedy generations: prompts, the results section, and the report's side-by-side table."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from test_report import BASELINE, make_run

from misq.config import DataConfig, EvalConfig, ModelConfig
from misq.errors import MisqError
from misq.protocol import generations
from misq.report.compare import build_comparison
from misq.report.html import render_html, render_markdown


def test_read_prompts(tmp_path):
    assert generations.read_prompts("default") == generations.DEFAULT_PROMPTS
    assert generations.read_prompts("none") == ()
    lines = tmp_path / "p.txt"
    lines.write_text("First prompt\n\n  Second prompt  \n")
    assert generations.read_prompts(str(lines)) == ("First prompt", "Second prompt")
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(["Line one\nline two", "x"]))
    assert generations.read_prompts(str(listed)) == ("Line one\nline two", "x")
    with pytest.raises(MisqError, match="no such file"):
        generations.read_prompts(str(tmp_path / "absent.txt"))
    listed.write_text(json.dumps({"a": 1}))
    with pytest.raises(MisqError, match="list of strings"):
        generations.read_prompts(str(listed))


def test_chat_template_is_applied_when_the_tokenizer_has_one(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    plain, chat = generations._render(tok, "The cat")
    assert not chat
    tok.chat_template = "{% for m in messages %}USER: {{ m['content'] }}\n{% endfor %}ASSISTANT:"
    templated, chat = generations._render(tok, "The cat")
    assert chat and templated.shape[1] > plain.shape[1]
    assert tok.decode(templated[0]).startswith("USER: The cat")


def test_eval_records_greedy_capped_generations(tiny_checkpoint, tmp_path):
    from misq import jobs

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sees\nA dog likes\n")
    cfg = EvalConfig(datasets="none", prompts=str(prompts), max_new_tokens=6)  # no perplexity: seconds
    model_cfg, data_cfg = ModelConfig(str(tiny_checkpoint), device="cpu"), DataConfig(seqlen=64, cache_dir=str(tmp_path))
    out = tmp_path / "r.json"
    first = jobs.run_eval(model_cfg, data_cfg, cfg, str(out))
    g = json.loads(out.read_text())["generations"]
    assert g["max_new_tokens"] == 6 and g["greedy"] is True
    assert [p["prompt"] for p in g["prompts"]] == ["The cat sees", "A dog likes"]
    assert all(1 <= p["new_tokens"] <= 6 and p["stopped"] in ("eos", "length") and not p["chat_template"] for p in g["prompts"])
    again = jobs.run_eval(model_cfg, data_cfg, cfg, None)  # greedy: the same text every time
    assert [p["output"] for p in again["generations"]["prompts"]] == [p["output"] for p in first["generations"]["prompts"]]
    from misq.runs.results import Results

    assert Results.read(out).generations == g  # the typed reader accepts the section


def test_streamed_model_records_why_it_has_no_generations(tiny_checkpoint, tmp_path):
    from misq import jobs

    cfg = EvalConfig(datasets="none", max_new_tokens=4)
    res = jobs.run_eval(ModelConfig(str(tiny_checkpoint), device="cpu", stream="on"),
                        DataConfig(seqlen=64, cache_dir=str(tmp_path)), cfg, None)
    assert res["generations"]["prompts"] == [] and "streamed" in res["generations"]["skipped"]


def gens(outputs: dict[str, str], cap: int = 48) -> dict:
    return {"max_new_tokens": cap, "greedy": True, "seconds": 1.0,
            "prompts": [{"prompt": p, "chat_template": True, "output": o, "new_tokens": 5, "stopped": "length"}
                        for p, o in outputs.items()]}


def test_compare_shows_generations_side_by_side():
    base = copy.deepcopy(BASELINE) | {"generations": gens({"Capital of France?": "Paris.", "2+2?": "4"})}
    good = make_run(generations=gens({"Capital of France?": "Paris, of course.", "2+2?": "4"}))
    bad = make_run(generations=gens({"Capital of France?": "the the the"}, cap=32), config={"n_groups": 5})
    silent = make_run(config={"n_groups": 7})
    c = build_comparison((Path("b.json"), base), [(Path("a.json"), good), (Path("b2.json"), bad), (Path("c.json"), silent)])
    g = c["generations"]
    assert [p["prompt"] for p in g["prompts"]] == ["Capital of France?", "2+2?"]
    first = g["prompts"][0]
    assert first["baseline"] == "Paris." and [r["output"] for r in first["runs"]] == ["Paris, of course.", "the the the", None]
    assert g["prompts"][1]["runs"][1]["output"] is None
    assert any("length caps differ" in n for n in g["notes"]) and any("no generations recorded" in n for n in g["notes"])
    md = render_markdown(c)
    assert "Generations" in md and "Prompt 1 (chat template): Capital of France?" in md
    assert "| baseline | Paris. |" in md and "the the the" in md and "(not recorded)" in md
    assert "Paris, of course." in render_html(c)


def test_no_generations_no_section():
    c = build_comparison((Path("b.json"), copy.deepcopy(BASELINE)), [(Path("a.json"), make_run())])
    assert c["generations"] is None and "Generations" not in render_markdown(c)
