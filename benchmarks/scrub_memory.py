"""Peak resident memory of the scrub stage on a 3B model, in memory and under disk offload.

A random-initialised model with the Qwen2.5-3B config (36 layers, d_model 2048, 16 heads, 2 KV
heads, d_mlp 11008, vocab 151936, tied embeddings) is saved once in bfloat16 (safetensors, the
toy tokenizer). Each run is a fresh process that loads it through `refusal_ray.load_model` and
scrubs one hypothesis protecting 2 sites (z at layers 20 and 21) against the audit's scrubbed set
(z and resid_post at every layer: 72 sites, so 70 scrubbed) over 8 toy harmful examples, with an
8-token answer prefix. Runs:
  memory   the whole model in RAM
  offload  accelerate device_map auto with max_memory cpu = 3 GiB and a disk offload folder
Peak RSS: the kernel's VmHWM over the whole process, and over the scrub alone (VmRSS sampled
every 5 ms from a thread after loading; this kernel does not reset VmHWM through clear_refs).
RSS counts the weights' file pages too: the model's tensors map the safetensors file. The offload
run's KLs must equal the memory run's.

Run: python benchmarks/scrub_memory.py [--dir /tmp/qwen25-3b-random] [--pairs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
PROTECTED = ["blocks.{20,21}.attn.hook_z"]
SCRUBBED = ["blocks.*.attn.hook_z", "blocks.*.hook_resid_post"]


def vm(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def build(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists():
        return
    tok_dir = REPO / "data" / "models" / "toy-qwen-s"
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = AutoConfig.for_model("qwen2", **QWEN25_3B, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               bos_token_id=None, dtype="bfloat16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())


def child(model_dir: str, mode: str, pairs: int, offload_dir: str) -> dict:
    import pandas as pd
    import torch

    from refusal_ray.data import draw_pairs
    from refusal_ray.grid import Cell
    from refusal_ray.models.loading import load_model
    from refusal_ray.spec import PromptFile
    from refusal_ray.stages.scrub import run_scrub

    torch.set_num_threads(os.cpu_count())
    base = vm("VmRSS")
    t0 = time.perf_counter()
    if mode == "memory":
        lm = load_model(model_dir, dtype="bfloat16", device="cpu")
    else:
        lm = load_model(model_dir, dtype="bfloat16", device_map="auto", max_memory={"cpu": "3GiB"},
                        offload_folder=offload_dir)
    load_s = time.perf_counter() - t0
    load_peak = vm("VmHWM")
    peak = [vm("VmRSS")]

    def sample():
        while True:
            peak[0] = max(peak[0], vm("VmRSS"))
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    h = pd.read_json(REPO / "data/prompts/toy/harmful.jsonl", lines=True)
    b = pd.read_json(REPO / "data/prompts/toy/harmless.jsonl", lines=True)
    ps = draw_pairs(h, b, PromptFile(path="h", pair_column="pair_id"), PromptFile(path="b", pair_column="pair_id"),
                    pairs, 0)
    cfg = {"scrubbed": SCRUBBED, "answer_tokens": 8, "resamples": 1, "threshold": 0.5, "batch_size": 48}
    t0 = time.perf_counter()
    row = run_scrub(lm, [Cell("bench", "scrub", "m", 0, {"hypothesis": "h", "protected": PROTECTED})], ps, cfg, 0)[0]
    return {"mode": mode, "load_s": load_s, "scrub_s": time.perf_counter() - t0, "rss_before_load": base,
            "peak_load": load_peak, "peak_scrub": max(peak[0], vm("VmRSS")), "peak_process": vm("VmHWM"),
            "devices": sorted({str(v) for v in getattr(lm.model, "hf_device_map", {"": "cpu"}).values()}),
            "n_scrubbed_sites": row["n_scrubbed_sites"], "n_protected_sites": row["n_protected_sites"],
            "kl_per_example": row["kl_per_example"], "corrupted_kl": row["corrupted_kl"],
            "faithfulness": row["faithfulness"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/qwen25-3b-random")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--child", choices=["memory", "offload"])
    args = ap.parse_args()
    model_dir = Path(args.dir)
    if args.child:
        print(json.dumps(child(str(model_dir), args.child, args.pairs, str(model_dir) + "-offload")))
        return
    t0 = time.perf_counter()
    build(model_dir)
    print(f"model ready in {time.perf_counter() - t0:.0f} s: {model_dir}", flush=True)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    results = {}
    for mode in ("memory", "offload"):
        p = subprocess.run([sys.executable, __file__, "--dir", str(model_dir), "--pairs", str(args.pairs),
                            "--child", mode], capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{mode} run failed:\n{p.stderr[-4000:]}")
        results[mode] = json.loads(p.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:8s} devices {r['devices']}  load {r['load_s']:.0f} s  scrub {r['scrub_s']:.0f} s  "
              f"peak(load) {r['peak_load'] / 2**30:.2f} GiB  peak(scrub) {r['peak_scrub'] / 2**30:.2f} GiB  "
              f"= {r['peak_scrub'] / weights:.2f}x weights  peak(process) {r['peak_process'] / 2**30:.2f} GiB  "
              f"({r['n_protected_sites']} protected, "
              f"{r['n_scrubbed_sites']} scrubbed)", flush=True)
    a, b = results["memory"]["kl_per_example"], results["offload"]["kl_per_example"]
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"weights {weights / 2**30:.2f} GiB; max |KL(memory) - KL(offload)| = {diff:.3g}; "
          f"faithfulness {results['memory']['faithfulness']:.6f} vs {results['offload']['faithfulness']:.6f}")
    print(json.dumps({"weights_bytes": weights, **results, "max_kl_diff": diff}))


if __name__ == "__main__":
    main()
