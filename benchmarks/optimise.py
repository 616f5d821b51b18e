"""Stage optimise's cost per model size: seconds per optimiser step and peak memory (benchmarks/README.md).

Each model runs in its own subprocess (so the peak resident set, `ru_maxrss`, is that model's alone), with
the stage's settings: dim 1 and dim 3 (kind subspace), batch_size 8 prompts per class (the toy prompts),
`--steps` steps, random init, float32. CPU figures include the process (Python, torch) and the weights;
on CUDA the stage's own `peak_memory_mb` (torch.cuda.max_memory_allocated) is printed too.

    python benchmarks/optimise.py [--steps 5] [--models toy-planted-k1 toy-qwen-xs ...] [--smollm2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ["toy-planted-k1", "toy-qwen-xs", "toy-qwen-s", "toy-qwen-m", "toy-llama-s"]

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(2)
from refusal_ray.models.loading import load_model
from refusal_ray.models.refusal_tokens import resolve
from refusal_ray.models.loading import model_type
from refusal_ray.stages.optimise.run import optimise, prompt_ids
path, steps, dim, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lm = load_model(path, device=device)
rows = lambda n: [json.loads(l)["instruction"] for l in open(f"{sys.argv[5]}/{n}.jsonl")][:8]
h, s = prompt_ids(lm.tokenizer, rows("harmful")), prompt_ids(lm.tokenizer, rows("harmless"))
tokens = resolve("family", lm.tokenizer, model_type(lm), ["I cannot"])
params = sum(p.numel() for p in lm.model.parameters())
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
res = optimise(lm, h, s, dim=dim, layer=lm.sites.n_layers // 2, alpha=1.0, token_ids=tokens, steps=steps,
               batch_size=8, seed=0, init=None)
print(json.dumps({"params": params, "n_layers": lm.sites.n_layers, "d_model": lm.sites.d_model, "dim": dim,
                  "steps": res.steps, "seconds": res.seconds, "s_per_step": res.seconds / res.steps,
                  "peak_mb_stage": res.peak_memory_mb, "rss_before_mb": rss0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "loss_initial": res.loss_initial, "loss_final": res.loss_final}))
"""


def measure(path: str, steps: int, dim: int, device: str, prompts: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(steps), str(dim), device, str(prompts)],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", nargs="*", default=TOY)
    ap.add_argument("--dims", nargs="*", type=int, default=[1, 3])
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M-Instruct (tests/real_models.py)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    paths = [(m, str(ROOT / "data" / "models" / m)) for m in args.models]
    if args.smollm2:
        sys.path.insert(0, str(ROOT / "tests"))
        from real_models import smollm2_dir

        paths.append(("SmolLM2-135M-Instruct", str(smollm2_dir())))
    print("| model | params | layers x d_model | k | s / step | peak RSS MB (process) | stage peak MB | "
          "loss initial -> final |")
    print("|---|---|---|---|---|---|---|---|")
    for name, path in paths:
        prompts = ROOT / "data" / "prompts" / ("planted/k1" if "planted" in name else "toy")
        for dim in args.dims:
            r = measure(path, args.steps, dim, args.device, prompts)
            print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['n_layers']} x {r['d_model']} | {dim} | "
                  f"{r['s_per_step']:.2f} | {r['peak_rss_mb']:.0f} | {r['peak_mb_stage']:.0f} | "
                  f"{r['loss_initial']:.3g} -> {r['loss_final']:.3g} |", flush=True)


if __name__ == "__main__":
    main()
