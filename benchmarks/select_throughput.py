"""Direction selection throughput: every candidate as batch rows vs one candidate per forward pass.

The alternative is what Arditi et al.'s code does (`select_direction.py`): for each (layer,
position) candidate, three forward passes over the val prompts (ablation on harmful prompts for
the bypass score, addition on harmless prompts for the induce score, ablation on harmless
prompts for the KL), each with that candidate's hooks and full logits. Ours
(`refusal_ray.stages.select.score_candidates`): rows of (candidate x prompt x kind) share forward
passes with per-row edit tensors, and only the last position's logits are computed. The scores
are checked equal.

Run: python benchmarks/select_throughput.py [--models toy-qwen-m,qwen2.5-0.5b] [--prompts 16]
     [--layer-step 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_throughput import REPO, get_model  # noqa: E402

from refusal_ray.data import left_pad, prompt_tokens, read_table  # noqa: E402
from refusal_ray.interventions import RowEdit, forward, row_edits  # noqa: E402
from refusal_ray.judges import DEFAULT_PHRASES  # noqa: E402
from refusal_ray.models.chat import ChatOptions, post_instruction_positions  # noqa: E402
from refusal_ray.stages.patch import RefusalScore, refusal_token_ids  # noqa: E402
from refusal_ray.stages.select import ABLATION_SITES, Candidate, score_candidates  # noqa: E402


@torch.inference_mode()
def loop_select(lm, candidates, harmful, harmless, token_ids):
    """Arditi's loop: per candidate, three passes with that candidate's hooks; full logits."""
    metric = RefusalScore(token_ids)
    hi, hm = left_pad(harmful, lm.tokenizer.pad_token_id)
    si, sm = left_pad(harmless, lm.tokenizer.pad_token_id)
    n = lm.sites.n_layers
    base = torch.log_softmax(forward(lm.model, si, sm).logits[:, -1].double(), -1)
    out = {"bypass": [], "induce": [], "kl": []}
    for c in candidates:
        v = torch.from_numpy(c.vector)
        u = v / v.norm()
        abl = {(s, layer): RowEdit(u.expand(len(harmful), -1), torch.ones(len(harmful)))
               for layer in range(n) for s in ABLATION_SITES}
        with row_edits(lm.sites, abl):
            out["bypass"].append(float(metric(forward(lm.model, hi, hm).logits[:, -1].double()).mean()))
        abl = {(s, layer): RowEdit(u.expand(len(harmless), -1), torch.ones(len(harmless)))
               for layer in range(n) for s in ABLATION_SITES}
        with row_edits(lm.sites, abl):
            lp = torch.log_softmax(forward(lm.model, si, sm).logits[:, -1].double(), -1)
        out["kl"].append(float((base.exp() * (base - lp)).sum(-1).mean()))
        with row_edits(lm.sites, {("resid_pre", c.layer): RowEdit(add=v.expand(len(harmless), -1))}):
            out["induce"].append(float(metric(forward(lm.model, si, sm).logits[:, -1].double()).mean()))
    return {k: np.array(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="toy-qwen-m,qwen2.5-0.5b")
    ap.add_argument("--prompts", type=int, default=16, help="val prompts per class")
    ap.add_argument("--layer-step", type=int, default=1, help="every k-th layer's candidates (0.5B: 4)")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(2)
    harmful_text = read_table(REPO / "data/prompts/toy/harmful.jsonl")
    harmless_text = read_table(REPO / "data/prompts/toy/harmless.jsonl")
    rows = []
    for name in args.models.split(","):
        lm = get_model(name)
        step = args.layer_step if name.startswith("qwen") else 1
        h = harmful_text[harmful_text.split == "val"].instruction.tolist()[: args.prompts]
        s = harmless_text[harmless_text.split == "val"].instruction.tolist()[: args.prompts]
        H, S = prompt_tokens(lm.tokenizer, h), prompt_tokens(lm.tokenizer, s)
        positions = post_instruction_positions(lm.tokenizer, ChatOptions(), h + s)
        rng = np.random.default_rng(0)   # random candidate directions: the cost does not depend on them
        cands = [Candidate(layer, p, (rng.standard_normal(lm.sites.d_model) * 4).astype(np.float32))
                 for layer in range(0, lm.sites.n_layers, step) for p in positions]
        token_ids = refusal_token_ids(lm.tokenizer, DEFAULT_PHRASES)
        # interleaved halves (ours, loop, ours, loop), so a change of machine load hits both alike
        t_ours = t_loop = err = 0.0
        for part in (cands[: len(cands) // 2], cands[len(cands) // 2:]):
            t0 = time.perf_counter()
            ours = score_candidates(lm, part, H, S, token_ids, args.batch_size)
            t_ours += time.perf_counter() - t0
            t0 = time.perf_counter()
            loop = loop_select(lm, part, H, S, token_ids)
            t_loop += time.perf_counter() - t0
            err = max(err, *(float(np.max(np.abs(ours[k] - loop[k]))) for k in ("bypass", "induce", "kl")))
        rows.append({"model": name, "candidates": len(cands), "prompts/class": len(H), "ours_s": round(t_ours, 2),
                     "loop_s": round(t_loop, 2), "speedup": round(t_loop / t_ours, 2), "max_abs_diff": err})
        print(rows[-1], flush=True)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
