"""Cost of capturing all six sites at every layer vs a plain forward pass, per family.

Each family gets a random-initialised model with the Qwen2.5-0.5B dimensions (d_model 896,
24 layers, 14 heads, 2 KV heads, d_mlp 4864, vocab 151936). Both runs use `logits_to_keep=1`
and no KV cache, so the ratio is the cost of the hooks and the copies. Best of `--repeats`,
interleaved. Run: python benchmarks/capture_overhead.py [--families qwen2,llama]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from refusal_ray.interventions import capture, forward
from refusal_ray.models.sites import FAMILIES, SiteAdapter, site_name

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                  tie_word_embeddings=True)
KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")


def config_for(family: str):
    from transformers import AutoConfig

    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=896, n_layer=24, n_head=14, n_inner=4864, vocab_size=151936,
                                    n_positions=4096, tie_word_embeddings=True)
    extra = {"head_dim": 64} if family in ("gemma2", "gemma3_text", "qwen3") else {}
    return AutoConfig.for_model(family, **QWEN25_05B, **extra)


def bench(family: str, batch: int, seq: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for(family)).eval().requires_grad_(False)
    sites = SiteAdapter.for_model(model)
    names = [site_name(k, layer) for layer in range(sites.n_layers) for k in KINDS]
    ids = torch.randint(0, 1000, (batch, seq))
    mask = torch.ones_like(ids)
    plain, captured = [], []
    with torch.inference_mode():
        forward(model, ids, mask, logits_to_keep=1)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            forward(model, ids, mask, logits_to_keep=1)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            acts = capture(model, ids, mask, names, sites)
            captured.append(time.perf_counter() - t)
    assert len(acts) == len(names)
    out = {"family": family, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6),
           "plain_s": round(min(plain), 3), "capture_s": round(min(captured), 3),
           "ratio": round(min(captured) / min(plain), 3),
           "captured_MB": round(sum(a.numel() * a.element_size() for a in acts.values()) / 2**20)}
    print(json.dumps(out), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    return [bench(f, args.batch, args.seq, args.repeats) for f in args.families.split(",")]


if __name__ == "__main__":
    main()
