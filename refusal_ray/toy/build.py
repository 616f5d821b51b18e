"""`refusal-ray toy build`: regenerate the toy data set, tokenizer and models from a seed."""

from __future__ import annotations

import json
from pathlib import Path

from refusal_ray.toy.dataset import ToyRow, write_dataset
from refusal_ray.toy.evaluate import evaluate
from refusal_ray.toy.tokenizer import save_tokenizer, train_tokenizer
from refusal_ray.toy.train import SIZES, train

CARD = """# toy-{name}

A toy chat model of the refusal-ray toy family (the embedded default). Synthetic data only.

- architecture: `{arch}`, {params:,} parameters, {n_layers} layers, d_model {d_model}, {n_heads} heads
- data: `data/prompts/toy/` (mild synthetic harmful requests paired with harmless twins; harmful
  answered with refusals, harmless with a checkable list task), train split only
- training: {steps} steps, batch {batch}, AdamW lr {lr}, seed {seed}, {seconds:.0f} s on this machine
- tokenizer: byte-level BPE with a ChatML chat template

Metrics (test split, {n} pairs, greedy, substring judge):

| harmful refusal | harmless refusal | harmless task exact match |
|---|---|---|
| {harmful_refusal:.3f} | {harmless_refusal:.3f} | {task_accuracy:.3f} |

Refusal here is learned behaviour; no direction was planted or shaped.
Rebuild: `refusal-ray toy build --seed {seed} --sizes {name}`.
"""


def build_tokenizer(rows: list[ToyRow], out_dir: Path):
    from transformers import AutoTokenizer

    texts = [r.instruction for r in rows] + [r.response for r in rows]
    save_tokenizer(train_tokenizer(texts), out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def build(out: Path, seed: int = 0, sizes: list[str] | None = None, steps: int | None = None,
          data_dir: Path | None = None, log=print) -> dict[str, dict]:
    """Write data to `data_dir` (default `<out>/../prompts/toy`) and models to `<out>/toy-<size>/`.

    Returns {size: metrics}. Deterministic in `seed` (data byte for byte; weights up to
    floating-point nondeterminism of the CPU kernels).
    """
    data_dir = data_dir or out.parent / "prompts" / "toy"
    harmful, harmless = write_dataset(data_dir, seed)
    rows = harmful + harmless
    tok_dir = out / "_tokenizer"
    tokenizer = build_tokenizer(rows, tok_dir)
    results = {}
    for name in sizes or list(SIZES):
        size = SIZES[name]
        model, seconds = train(size, tokenizer, rows, seed=seed, steps=steps, log=log)
        target = out / f"toy-{name}"
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        # keep our own tokenizer files byte-identical across members
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (target / f).write_bytes((tok_dir / f).read_bytes())
        metrics = evaluate(target, harmful, harmless)
        metrics |= {"params": sum(p.numel() for p in model.parameters()), "train_seconds": round(seconds, 1),
                    "steps": steps or size.steps}
        (target / "README.md").write_text(CARD.format(
            name=name, arch=type(model).__name__, n_layers=size.n_layers, d_model=size.d_model,
            n_heads=size.n_heads, batch=size.batch_size, lr=size.lr, seed=seed, seconds=seconds, **metrics))
        (target / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log(f"[{name}] {json.dumps(metrics)}")
        results[name] = metrics
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return results
