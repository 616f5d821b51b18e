"""Exact activation patching throughput (patches x pairs per second) vs one forward pass per patch.

The alternative is what TransformerLens' patching helpers do (`generic_activation_patch`): cache
the clean run, then for each patch one forward pass over all corrupted prompts with that one patch
hooked in. Ours: many patches per pass as batch rows, the clean run riding along in the same pass,
and the tokens before the patched position run once per pair group (a shared key/value cache).
A third column switches the shared prefix off, to show what the batching alone gives.
Targets: every site kind (resid_pre/mid/post, attn_out, mlp_out, and z head by head) at the layers
listed, patched at the last position, on toy harmful/harmless pairs. Results are checked equal.

Run: python benchmarks/patch_throughput.py [--models toy-qwen-m,qwen2.5-0.5b] [--pairs 16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from refusal_ray.data import encode
from refusal_ray.interventions import Patch, capture, forward, hooks
from refusal_ray.judges import DEFAULT_PHRASES
from refusal_ray.models.loading import LoadedModel, load_model
from refusal_ray.models.sites import SiteAdapter
from refusal_ray.stages.patch import RefusalScore, exact_patching, refusal_token_ids, targets_for

REPO = Path(__file__).resolve().parent.parent
KINDS = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z"]
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)


def get_model(name: str) -> LoadedModel:
    if name.startswith("toy-"):
        return load_model(str(REPO / "data" / "models" / name))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "data" / "models" / "toy-qwen-s")
    tok.padding_side = "left"
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2", **QWEN25_05B, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    return LoadedModel(model, tok, SiteAdapter.for_model(model))


def loop_patching(lm, ids, mask, targets, metric):
    """One forward pass per patch over all corrupted prompts (the TransformerLens way)."""
    n = ids.shape[0] // 2
    pos = torch.tensor([-1])
    out = torch.empty(len(targets), n, dtype=torch.float64)
    cache = capture(lm.model, ids[:n], mask[:n], sorted({t.site for t in targets}), lm.sites)
    with torch.inference_mode():
        for i, t in enumerate(targets):
            patch = Patch(cache[t.site][:, pos], pos, None if t.head is None else torch.tensor([t.head]))
            with hooks(lm.sites, {t.site: patch}):
                out[i] = metric(forward(lm.model, ids[n:], mask[n:], logits_to_keep=1).logits[:, -1]).double()
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="toy-qwen-m,qwen2.5-0.5b")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4, help="layers patched (evenly spaced)")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    h = pd.read_json(REPO / "data/prompts/toy/harmful.jsonl", lines=True).query("split == 'test'").head(args.pairs)
    b = pd.read_json(REPO / "data/prompts/toy/harmless.jsonl", lines=True).set_index("pair_id").loc[h["pair_id"]]
    rows = []
    for name in args.models.split(","):
        lm = get_model(name)
        n_layers = lm.sites.n_layers
        layers = sorted({round(i * (n_layers - 1) / max(1, args.layers - 1)) for i in range(args.layers)})
        targets = targets_for(lm.sites, KINDS, layers)
        ids, mask = encode(lm.tokenizer, h["instruction"].tolist() + b["instruction"].tolist())
        metric = RefusalScore(refusal_token_ids(lm.tokenizer, DEFAULT_PHRASES))
        run = lambda share: exact_patching(lm.model, lm.sites, ids, mask, targets, [-1], metric,  # noqa: E731
                                           args.batch_size, share_prefix=share)[0]
        run(True)  # warm-up
        ours, t_ours = timed(lambda: run(True))
        no_prefix, t_rows = timed(lambda: run(False))
        ref, t_loop = timed(lambda: loop_patching(lm, ids, mask, targets, metric))
        work = len(targets) * args.pairs
        rows.append({"model": name, "targets": len(targets), "pairs": args.pairs, "seq": ids.shape[1],
                     "loop/s": work / t_loop, "rows only/s": work / t_rows, "ours/s": work / t_ours,
                     "speedup": t_loop / t_ours, "rows-only speedup": t_loop / t_rows,
                     "max |diff|": float(max((ours - ref).abs().max(), (no_prefix - ref).abs().max()))})
        print(rows[-1], flush=True)
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3g}"))


if __name__ == "__main__":
    main()
