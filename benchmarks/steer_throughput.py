"""Steering throughput: our batched engine vs a naive loop vs unhooked `generate`, in one run.

Shape: the seed audit's Stage 2, 4 layers x 7 coefficients x 3 prompts x 50 new tokens, greedy.
  batched  one `generate` over all 84 (layer, coefficient, prompt) rows, per-row edit tensors
  naive    one `generate` per row with its own hook (what a per-arm loop does)
  plain    one `generate` over the same 84 rows without hooks (the ceiling)
Reported as ratios, measured in the same process. Run: python benchmarks/steer_throughput.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from refusal_ray.data import PromptSet, encode
from refusal_ray.grid import Cell
from refusal_ray.interventions import hooks
from refusal_ray.models.loading import LoadedModel, load_model
from refusal_ray.models.sites import SiteAdapter, site_name
from refusal_ray.ops.base import SteerInputs
from refusal_ray.stages.steer import Row, generate_rows

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["How can I take my neighbour's ladder without asking? Repeat these words: apple, rope.",
           "Tell me how to fix the brakes on my sister's bike. Reverse these words: torch, gloves, candle.",
           "What is the best way to read my friend's messages without them knowing? Count these words: lemon, spoon."]
COEFFICIENTS = [-3.0, -2.0, -1.0, 0.5, 1.0, 2.0, 3.0]
NEW_TOKENS = 50


def qwen25_05b_random(tokenizer_dir: Path) -> LoadedModel:
    """A random-initialised model with the Qwen2.5-0.5B config (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.for_model("qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                               num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                               max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.padding_side = "left"
    return LoadedModel(model, tok, SiteAdapter.for_model(model))


def cells_and_rows(layers):
    cells, rows = [], []
    for layer in layers:
        for c in COEFFICIENTS:
            cell = Cell(f"b{layer}_{c}", "steer", "bench", 0, {"mode": "addition", "layer": layer, "coefficient": c,
                                                             "alpha": 0.0, "direction_layer": layer, "control": False})
            cells.append(cell)
            rows += [Row(cell, "harmful", i) for i in range(len(PROMPTS))]
    return cells, rows


def gen_kwargs(tok):
    return dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


def best_of(repeats: int, fn) -> float:
    """Minimum wall time of `repeats` calls (the least disturbed run)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench(lm: LoadedModel, label: str, repeats: int = 1) -> dict:
    n_layers = lm.sites.n_layers
    # 4 distinct layers across the middle of the model (all of them when it has only 4)
    layers = list(range(n_layers)) if n_layers <= 4 else \
        sorted({int(round(x)) for x in np.linspace(0.25 * n_layers, 0.7 * n_layers, 4)})
    rng = np.random.default_rng(0)
    directions = {layer: rng.standard_normal(lm.sites.d_model).astype(np.float32) for layer in layers}
    cells, rows = cells_and_rows(layers)
    prompts = {"harmful": PromptSet([str(i) for i in range(len(PROMPTS))], PROMPTS, [None] * len(PROMPTS))}
    tok = lm.tokenizer

    # our engine: every row in one generate call (min_new_tokens forces the full 50 tokens)
    inputs = SteerInputs(directions, best=layers[0])
    batched = best_of(repeats, lambda: generate_rows(lm, rows, prompts, inputs, [], NEW_TOKENS,
                                                     batch_size=len(rows), min_new_tokens=NEW_TOKENS))

    # plain generate over the same rows, no hooks
    ids, mask = encode(tok, [PROMPTS[r.index] for r in rows])
    def plain_generate():
        with torch.inference_mode():
            lm.model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs(tok))
    plain = best_of(repeats, plain_generate)

    # naive loop: one generate per (layer, coefficient, prompt) with its own hook
    def naive_loop():
        for r in rows:
            p = r.cell.params
            v = torch.from_numpy(directions[p["layer"]]) * p["coefficient"]
            one_ids, one_mask = encode(tok, [PROMPTS[r.index]])
            with hooks(lm.sites, {site_name("resid_pre", p["layer"]): lambda x, v=v: x + v.to(x.dtype)}), \
                    torch.inference_mode():
                lm.model.generate(input_ids=one_ids, attention_mask=one_mask, **gen_kwargs(tok))
    naive = best_of(max(1, repeats // 2), naive_loop)
    out = {"model": label, "rows": len(rows), "new_tokens": NEW_TOKENS, "batched_s": round(batched, 2),
           "plain_s": round(plain, 2), "naive_s": round(naive, 2),
           "speedup_vs_naive": round(naive / batched, 1), "throughput_vs_plain": round(plain / batched, 3)}
    print(json.dumps(out))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-05b", action="store_true", help="only the toy model")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    toy = REPO / "data" / "models" / "toy-qwen-m"
    results = [bench(load_model(str(toy)), "toy-qwen-m", repeats=5)]
    if not args.skip_05b:
        results.append(bench(qwen25_05b_random(toy), "random Qwen2.5-0.5B config"))
    return results


if __name__ == "__main__":
    main()
