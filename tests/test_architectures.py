"""The LLaMA family beyond Llama itself: Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms), Gemma
(scaled embeddings, 1+w norms). Each is built tiny and random in the test, compressed at a budget,
evaluated, saved packed and reloaded to the same perplexity."""

from __future__ import annotations

import pytest
import torch

from misq import jobs
from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig

FAMILY = {
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
}


@pytest.fixture(scope="module")
def tokenizer_and_text():
    from misq.demo.toy import build_tokenizer, synthetic_corpus

    text = synthetic_corpus(2000, seed=0)
    return build_tokenizer(text), text


@pytest.mark.parametrize("model_type", list(FAMILY))
def test_family_member_compresses_and_reloads(model_type, tokenizer_and_text, tiny_corpus_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    config_name, model_name = FAMILY[model_type]
    if not hasattr(transformers, model_name):
        pytest.skip(f"this transformers has no {model_name}")
    tokenizer, _ = tokenizer_and_text
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    if model_type == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # the biases must survive packing
    folder = tmp_path / model_type
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n".join(tiny_corpus_file.read_text().splitlines()[:200]))
    data = DataConfig(seqlen=64, cache_dir=str(tmp_path / "cache"))
    evals = EvalConfig(datasets=(str(eval_file),))
    # the prototype's scheme: mixed widths per channel group, one grid per row and group
    cfg = CompressConfig(dataset=str(tiny_corpus_file), nsamples=4, sparsity=0.5, grouping="hessian", n_groups=4, target_avg_bits=3.5,
                         groupsize=0, act_order=False, mse=False)
    res = jobs.run_compress(ModelConfig(str(folder), device="cpu", dtype="float32"), data, cfg, evals,
                                str(tmp_path / "run"), save_dir=str(tmp_path / "packed"))
    assert res["model"]["architecture"] == model_name
    assert abs(res["bits"]["actual_avg_bits"] - 3.5) <= 0.01
    assert res["sparsity"]["actual"] == pytest.approx(0.5, abs=0.01)
    reloaded = jobs.run_eval(ModelConfig(str(tmp_path / "packed"), device="cpu"), data, evals, None)
    name = str(eval_file)
    assert reloaded["ppl"][name] == pytest.approx(res["ppl"][name], rel=1e-5)
