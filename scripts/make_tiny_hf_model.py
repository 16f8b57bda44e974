"""Make a tiny HuggingFace model trained on real text, for CPU examples and tests (no download needed).

    python scripts/make_tiny_hf_model.py --out outputs/tiny_hf_llama [--family llama|qwen3] [--steps 300]

The text is the Python reference manual that ships with CPython (``pydoc_data.topics``, ~465 KB of
English prose and grammar). The script

1. trains a byte-level BPE tokenizer on it (``tokenizers``; BOS ``<|begin_of_text|>``, EOS
   ``<|end_of_text|>``, like Llama 3's names),
2. builds a tiny ``LlamaForCausalLM`` (or ``Qwen3ForCausalLM``) with transformers and trains it with
   AdamW on windows of the text (``--steps``; a few seconds on 2 cores),
3. writes the model folder (config.json, model.safetensors, tokenizer.json) and two corpora made from
   the same text: ``corpus.jsonl`` (one paragraph per line, field "text") and ``sft.jsonl``
   (each paragraph split in two: "prompt" = its first half of words, "completion" = the rest).

It prints the loss before and after training (one JSON line at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def documents() -> list[str]:
    """The Python reference manual's topics (real English text shipped with CPython), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def paragraphs(docs: list[str], min_words: int = 12) -> list[str]:
    """Paragraphs of prose (blank-line separated, at least ``min_words`` words, whitespace collapsed).

    Args:
        docs: Documents.
        min_words: Shorter paragraphs (headings, grammar lines) are dropped.

    Returns:
        The paragraphs.
    """
    out = []
    for doc in docs:
        for block in re.split(r"\n\s*\n", doc):
            text = " ".join(block.split())
            if len(text.split()) >= min_words and not text.startswith(("*", "=", "-")):
                out.append(text)
    return out


def build_tokenizer(docs: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with BOS / EOS special tokens.

    Args:
        docs: Training text.
        vocab_size: Vocabulary size, special tokens included.

    Returns:
        A ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    return tokenizer


def build_config(family: str, vocab_size: int, bos: int, eos: int, tie: bool = False) -> Any:
    """A tiny transformers config: 2 layers, width 64, 4 query / 2 KV heads, context 256 (Qwen3: head_dim 32).

    Args:
        family: ``"llama"`` or ``"qwen3"``.
        vocab_size: The tokenizer's size.
        bos: BOS id.
        eos: EOS id.
        tie: Tie the output projection to the embedding.

    Returns:
        A ``LlamaConfig`` or ``Qwen3Config``.
    """
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=tie,
    )
    if family == "llama":
        return LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
    if family == "qwen3":
        return Qwen3Config(
            head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common
        )
    raise ValueError(f"--family must be llama or qwen3, got {family!r}")


def token_stream(tokenizer: Any, docs: list[str], bos: int, eos: int) -> torch.Tensor:
    """All documents as one stream, each wrapped in BOS ... EOS.

    Args:
        tokenizer: The tokenizer.
        docs: Documents.
        bos: BOS id.
        eos: EOS id.

    Returns:
        (N,) int64 ids.
    """
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(docs, add_special_tokens=False):
        ids += [bos, *encoding.ids, eos]
    return torch.tensor(ids, dtype=torch.int64)


@torch.no_grad()
def mean_loss(model: Any, stream: torch.Tensor, seq_len: int, windows: int = 32) -> float:
    """Mean next-token loss on the first windows of a stream.

    Args:
        model: A transformers causal LM.
        stream: (N,) token ids.
        seq_len: Window length.
        windows: Number of windows.

    Returns:
        The loss.
    """
    starts = torch.arange(windows) * seq_len
    batch = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])  # (W, S + 1)
    logits = model(batch[:, :-1]).logits  # (W, S, V)
    return float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))


def make_tiny_model(
    out: str | Path,
    *,
    family: str = "llama",
    steps: int = 300,
    seq_len: int = 128,
    batch: int = 8,
    vocab_size: int = 512,
    lr: float = 3e-3,
    seed: int = 0,
    tie: bool = False,
) -> dict[str, Any]:
    """Write a trained tiny HuggingFace model folder and its corpora to ``out``; returns what it measured.

    Args:
        out: Output folder.
        family: ``"llama"`` (LlamaForCausalLM) or ``"qwen3"`` (Qwen3ForCausalLM).
        steps: AdamW steps on random windows of the text.
        seq_len: Window length.
        batch: Windows per step.
        vocab_size: BPE vocabulary (special tokens included).
        lr: Peak learning rate (cosine to 10%).
        seed: Seed of the init and of the windows.
        tie: Tie the output projection to the token embedding.

    Returns:
        ``{"loss_before", "loss_after", "tokens", "params", "seconds", "path"}``.
    """
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = documents()
    tokenizer = build_tokenizer(docs, vocab_size)
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    torch.manual_seed(seed)
    config = build_config(family, tokenizer.get_vocab_size(), bos, eos, tie)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    stream = token_stream(tokenizer, docs, bos, eos)  # (N,)
    held_out = stream[-33 * seq_len :]  # the last windows are never trained on
    train = stream[: -33 * seq_len]
    before = mean_loss(model, held_out, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        starts = torch.randint(0, train.numel() - seq_len - 1, (batch,), generator=generator)
        rows = torch.stack([train[s : s + seq_len + 1] for s in starts.tolist()])  # (B, S + 1)
        loss = F.cross_entropy(model(rows[:, :-1]).logits.flatten(0, 1), rows[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    after = mean_loss(model, held_out, seq_len)
    model.save_pretrained(out)
    tokenizer.save(str(out / "tokenizer.json"))
    texts = paragraphs(docs)
    with open(out / "corpus.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    with open(out / "sft.jsonl", "w") as f:
        for text in texts:
            words = text.split()
            half = len(words) // 2
            f.write(
                json.dumps({"prompt": " ".join(words[:half]) + " ", "completion": " ".join(words[half:])})
                + "\n"
            )
    return {
        "path": str(out),
        "family": family,
        "loss_before": before,
        "loss_after": after,
        "tokens": int(stream.numel()),
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/tiny_hf_llama", help="output folder")
    parser.add_argument("--family", default="llama", choices=["llama", "qwen3"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tie", action="store_true", help="tie the output projection to the embedding")
    args = parser.parse_args()
    stats = make_tiny_model(
        args.out, family=args.family, steps=args.steps, seq_len=args.seq_len, seed=args.seed, tie=args.tie
    )
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
