"""Trainer for the toy chat models: plain next-token loss on the assistant turn only.

Refusal is learned from data (harmful requests answered with refusals), never planted: no
direction, no auxiliary loss, nothing that shapes the residual stream.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from refusal_ray.toy.dataset import ToyRow


@dataclass(frozen=True)
class ToySize:
    """One member of the toy family: architecture and training budget."""

    name: str
    model_type: str  # "qwen2" or "llama"
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    steps: int
    lr: float = 3e-3
    batch_size: int = 64


SIZES: dict[str, ToySize] = {
    s.name: s
    for s in [
        ToySize("qwen-xs", "qwen2", d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=128, steps=500),
        ToySize("qwen-s", "qwen2", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=384, steps=1800),
        ToySize("qwen-m", "qwen2", d_model=160, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=448, steps=1300),
        ToySize("llama-s", "llama", d_model=96, n_layers=4, n_heads=4, n_kv_heads=4, d_mlp=256, steps=700),
    ]
}


def train_step(model, opt, sched, input_ids, mask, labels) -> torch.Tensor:
    """One AdamW step on the next-token loss (gradients clipped to norm 1). Returns the loss."""
    loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss


def make_config(size: ToySize, tokenizer: PreTrainedTokenizerBase):
    """A transformers config for `size` (float32, tied embeddings, eager-free defaults)."""
    return AutoConfig.for_model(
        size.model_type,
        vocab_size=len(tokenizer),
        hidden_size=size.d_model,
        intermediate_size=size.d_mlp,
        num_hidden_layers=size.n_layers,
        num_attention_heads=size.n_heads,
        num_key_value_heads=size.n_kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        rope_theta=10000.0,
        dtype="float32",
    )


def encode_example(tokenizer: PreTrainedTokenizerBase, instruction: str, response: str) -> tuple[list[int], int]:
    """Token ids of one conversation and the length of its prompt part.

    The prompt part is exactly `apply_chat_template([user], add_generation_prompt=True)`, the ids
    a model sees at evaluation; the rest is the assistant turn up to and including `<|im_end|>`.
    Returns (ids, prompt_len).
    """
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template([{"role": "user", "content": instruction},
                                          {"role": "assistant", "content": response}],
                                         tokenize=True, return_dict=False)
    if full[: len(prompt)] != prompt:
        raise ValueError(f"chat template is not prefix-stable for {instruction!r}")
    end = full.index(tokenizer.eos_token_id, len(prompt)) + 1  # drop the trailing newline
    return full[:end], len(prompt)


def pad_batch(examples: list[tuple[list[int], int]], pad_id: int):
    """(input_ids, attention_mask, labels), each [batch, pos], right padded (positions stay arange);
    labels are -100 except on each example's answer (the ids after its prompt_len)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [batch, pos]
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, prompt_len: len(ids)] = torch.tensor(ids[prompt_len:])
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


def _batches(examples: list[tuple[list[int], int]], batch_size: int, pad_id: int, rng: random.Random):
    while True:
        yield pad_batch(rng.sample(examples, batch_size), pad_id)


def train(size: ToySize, tokenizer: PreTrainedTokenizerBase, rows: list[ToyRow], seed: int = 0,
          steps: int | None = None, log_every: int = 100, log=print):
    """Train a fresh model of `size` on `rows` (train split); returns (model, seconds)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoModelForCausalLM.from_config(make_config(size, tokenizer), attn_implementation="sdpa")
    examples = [encode_example(tokenizer, r.instruction, r.response) for r in rows if r.split == "train"]
    steps = size.steps if steps is None else steps
    opt = torch.optim.AdamW(model.parameters(), lr=size.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    start = time.perf_counter()
    batches = _batches(examples, size.batch_size, tokenizer.pad_token_id, rng)
    for step in range(steps):
        loss = train_step(model, opt, sched, *next(batches))
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"[{size.name}] step {step:4d}/{steps} loss {loss.item():.4f}")
    model.eval()
    return model, time.perf_counter() - start
