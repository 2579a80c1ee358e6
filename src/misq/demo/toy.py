"""A tiny LLaMA, its tokenizer and a synthetic corpus, all made locally with no downloads.

Used by ``misq demo`` and by the tests. The corpus is generated from a small probabilistic
grammar so that a few hundred training steps give a model with real structure (perplexity
far below uniform), which makes compression effects measurable.
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the teacher", "a small bird", "the farmer",
            "our neighbour", "the king", "a young girl", "the robot", "the captain"]
VERBS = ["sees", "likes", "finds", "carries", "paints", "follows", "helps", "builds", "watches", "remembers"]
OBJECTS = ["a red ball", "the green house", "an apple", "the river", "a long letter", "the blue boat",
           "a wooden box", "the tall tree", "a bright star", "the quiet garden", "some bread"]
PLACES = ["in the morning", "near the town", "after the rain", "at night", "by the sea", "on monday",
          "with great care", "without a word", "under the bridge", "before dinner"]
CONNECT = ["and then", "because", "but", "so", "while"]


def synthetic_corpus(n_sentences: int, seed: int = 0) -> str:
    """Sentences from a small grammar, grouped in paragraphs of 3 to 8 sentences."""
    rng = random.Random(seed)
    paragraphs, sentences = [], []
    for _ in range(n_sentences):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        if rng.random() < 0.6:
            s += f" {rng.choice(PLACES)}"
        if rng.random() < 0.3:
            s += f" {rng.choice(CONNECT)} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        num = rng.randint(1, 99) if rng.random() < 0.15 else None
        s = s[0].upper() + s[1:] + (f" {num} times" if num else "") + "."
        sentences.append(s)
        if len(sentences) >= rng.randint(3, 8):
            paragraphs.append(" ".join(sentences))
            sentences = []
    if sentences:
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def build_tokenizer(text: str, vocab_size: int = 512):
    """Byte-level BPE trained on ``text``, with LLaMA's special tokens (<unk>=0, <s>=1, </s>=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_model(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                ffn: int = 128, max_positions: int = 256, tie: bool = False, seed: int = 0):
    """A randomly initialised LlamaForCausalLM (GQA when ``kv_heads < heads``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    return LlamaForCausalLM(cfg)


def train(model, tokenizer, text: str, *, steps: int, seqlen: int = 128, batch: int = 16, lr: float = 3e-3,
          seed: int = 0, progress: bool = False) -> float:
    """Next-token training on random windows of ``text``; returns the last loss."""
    import torch
    from tqdm.auto import tqdm

    ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="train toy model", disable=not progress):
        starts = torch.randint(0, len(ids) - seqlen - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seqlen] for s in starts]).to(model.device)  # the GPU when the caller put it there
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


def write_text_dataset(root: Path, text: str, name: str = "toy") -> Path:
    """Write ``text`` as a user text file under ``root`` and return its path."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.txt"
    path.write_text(text)
    return path


def make_tiny_checkpoint(out_dir: Path, *, steps: int = 0, seed: int = 0, **model_kwargs) -> Path:
    """Build (and optionally train) a tiny LLaMA + tokenizer and save both to ``out_dir``."""
    text = synthetic_corpus(4000, seed=seed)
    tokenizer = build_tokenizer(text)
    model = build_model(len(tokenizer), seed=seed, **model_kwargs)
    if steps:
        train(model, tokenizer, text, steps=steps, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
