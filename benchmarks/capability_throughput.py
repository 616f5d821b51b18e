"""Capability CE loss: our batched pass vs the obvious loop (one `model(ids, labels=ids)` per document).

Both score the same held-out documents with the same ablation hooks active; the losses agree (printed).
Ours: left-padded batches of 32 documents, one-row edits broadcast over the batch, log-softmax per row
over the scored tokens only. Loop: one forward per document with HF's own loss. Timed in interleaved
halves (ours, loop, ours, loop) so a change of machine load hits both.

    python benchmarks/capability_throughput.py [--model data/models/toy-qwen-m] [--docs 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from refusal_ray import load_model
from refusal_ray.capability.measures import cross_entropy, load_texts, text_tokens
from refusal_ray.interventions import RowEdit, row_edits
from refusal_ray.ops.base import ABLATION_SITES


def loop(lm, seqs, edits) -> float:
    total, count = 0.0, 0
    with torch.inference_mode(), row_edits(lm.sites, edits):
        for ids, first in seqs:
            t = torch.tensor([ids])
            labels = t.clone()
            labels[:, :first] = -100
            n = len(ids) - first
            total += float(lm.model(input_ids=t, labels=labels).loss) * n
            count += n
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="data/models/toy-qwen-m")
    ap.add_argument("--docs", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    lm = load_model(args.model)
    seqs = text_tokens(lm.tokenizer, load_texts("data/prompts/toy/heldout.jsonl", "completion", "prompt", args.docs), 128)
    u = torch.nn.functional.normalize(torch.randn(1, lm.sites.d_model, generator=torch.Generator().manual_seed(0)), dim=-1)
    edits = {(kind, layer): RowEdit(u, torch.ones(1)) for layer in range(lm.sites.n_layers) for kind in ABLATION_SITES}
    ours_t, loop_t = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours, n = cross_entropy(lm, seqs, 32, edits)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = loop(lm, seqs, edits)
        loop_t.append(time.perf_counter() - t0)
    print(f"{args.model}: {len(seqs)} documents, {n} scored tokens; CE ours {ours:.6f} loop {ref:.6f} "
          f"(|diff| {abs(ours - ref):.1e})")
    print(f"best of {args.repeats}: ours {min(ours_t):.3f} s, loop {min(loop_t):.3f} s, "
          f"speedup {min(loop_t) / min(ours_t):.1f}x")


if __name__ == "__main__":
    main()
