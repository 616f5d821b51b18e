"""Stage `optimise`, the run side: gradient-optimised refusal directions and sets (RDO / RCO-style;
Wollschlaeger et al., ICML 2025, arXiv 2502.17420, official code github.com/wollschlager/geometry-of-refusal
`rdo.py`; the declaration and block: `refusal_ray.stages.optimise`, the read side: `.read`).

What is learned: an orthonormal set Q = [q_1..q_k] ([d_model, k], float32) parameterised by the QR
factor of a free matrix W ([d_model, k], column signs fixed by diag(R) > 0), re-orthonormalised after
every step (W <- Q, as the paper's Gram-Schmidt + renormalisation after each step). The model's weights
are frozen (requires_grad False, never changed); gradients reach W only, through differentiable
forward hooks (this module's `_Ablate` / `_Add`, not `refusal_ray.interventions`' inference-mode paths).

Interventions (as `rdo.py`, Sec. 4 of the implementation note):
- directional / subspace ablation at every layer and every position: the block input (resid_pre), the
  attention output and the MLP output, x <- x - (x U^T) U with U [rows, r, d_model] orthonormal rows;
- activation addition at the block input of `layer` (the DIM layer), every position: x <- x + alpha q,
  alpha = the L2 norm of the raw difference-of-means vector at (layer, position) (`rdo.py:195-196`).

Loss per step (weights `ablation`, `addition`, `retain`; the paper's 1.0 / 0.2 / 1.0):
  L = w_abl * mean_harmful s(x | ablate) - w_add * mean_harmless s(x | + alpha q) + w_ret * KL_ret
with s the first-token refusal score log p - log(1 - p) of the refusal tokens at the last prompt position
(`refusal_ray.stages.patch.RefusalScore`, with `refusal_score_epsilon`: log(p + eps) - log(1 - p + eps)),
and KL_ret = KL(P_ablated || P_clean) on the harmless prompts, summed over the last `retain_positions`
real prompt positions and the vocabulary, divided by the batch (the paper's `kl_div_fn` direction and
reduction).

Where we differ from the paper (stated in the report too):
- the ablation and addition objectives are the first-token refusal score, not the paper's cross-entropy on
  30-token targets generated once with the DIM direction ablated (harmful) / added (harmless). Reason: the
  stage must recover k >= 2 planted directions, where ablating the single DIM direction leaves the model
  refusing, so DIM-ablated targets would teach refusal; and the refusal score needs no generation.
  The retain KL is taken on the harmless prompts' own last positions (no clean 29-token continuation).
- `kind: subspace` (ours) ablates the whole set jointly (the planted oracle needs all k directions
  removed together) and adds each basis vector separately; `kind: cone` is the paper's RCO: each step
  ablates / adds each basis vector (losses / k) and `cone_samples` unit directions drawn uniformly on
  the set's positive orthant, c = |N(0, I_k)| / ||.||, v = Q c (losses / n), each ablated alone.
- one batch of `batch_size` harmful and harmless train prompts per step (the paper: micro-batch 1 with
  16-step accumulation); no lr reduction on plateau, no prompt filtering by refusal score; the output is
  the set at the step of lowest training loss (as the paper's argmin); orthogonality by QR (the paper's
  representational independence, RepInd, is not implemented).
- AdamW(lr, betas (0.9, 0.98), weight_decay 0, amsgrad) and gradient-norm clipping at 10, as the paper;
  init random Gaussian (seeded by the cell), as the paper.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from refusal_ray.interventions import hooks, position_ids
from refusal_ray.models.chat import ChatOptions, render

ABLATED_KINDS = ("resid_pre", "attn_out", "mlp_out")
CLIP = 10.0
BETAS = (0.9, 0.98)


# -- differentiable hooks ----------------------------------------------------------------------------
class _Ablate:
    """x <- x - (x U^T) U per row: U [rows, r, d_model] orthonormal rows (zero rows project nothing).
    Differentiable in U (and x). x: [rows, pos, d_model]."""

    def __init__(self, basis: Tensor):
        self.basis = basis

    def __call__(self, x: Tensor) -> Tensor:
        u = self.basis.to(x.dtype)
        coef = torch.einsum("bpd,brd->bpr", x, u)
        return x - torch.einsum("bpr,brd->bpd", coef, u)


class _Add:
    """x <- x + v[row] at every position: v [rows, d_model]. Differentiable in v."""

    def __init__(self, vectors: Tensor):
        self.vectors = vectors

    def __call__(self, x: Tensor) -> Tensor:
        return x + self.vectors.to(x.dtype)[:, None, :]


def ablation_hooks(n_layers: int, basis: Tensor) -> dict:
    """{site name: _Ablate} at every layer's resid_pre, attn_out and mlp_out (`rdo.py` RefusalCone.__call__)."""
    edit = _Ablate(basis)
    return {f"blocks.{layer}.hook_{kind}": edit for layer in range(n_layers) for kind in ABLATED_KINDS}


# -- the parameterisation ----------------------------------------------------------------------------
def orthonormal(w: Tensor) -> Tensor:
    """Q of w = QR ([d_model, k] -> [d_model, k], orthonormal columns), column signs such that diag(R) > 0
    (so q_i keeps the orientation of w_i: addition is signed). Differentiable."""
    q, r = torch.linalg.qr(w)
    sign = torch.sign(torch.diagonal(r))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign[None, :]


def cone_samples(gen: torch.Generator, n: int, k: int) -> Tensor:
    """[n, k] coefficients uniform on the positive orthant of the unit sphere: |N(0, I_k)| / ||.||
    (`rdo.py` sample_hypersphere_gaussian)."""
    c = torch.randn(n, k, generator=gen).abs()
    return c / c.norm(dim=1, keepdim=True).clamp(min=1e-12)


# -- memory ------------------------------------------------------------------------------------------
def rss_mb() -> float:
    """The process's resident memory now, MiB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return 0.0


class Memory:
    """Peak memory of the optimisation, MiB. CUDA: torch.cuda.max_memory_allocated on the model's device
    (reset at start: the stage's own peak, weights included). CPU: the largest resident set size sampled
    after every forward and backward pass (weights and the process included)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.peak = 0.0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> float:
        now = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else rss_mb()
        self.peak = max(self.peak, now)
        return now


# -- losses ------------------------------------------------------------------------------------------
def refusal_score(logits: Tensor, token_ids: list[int], epsilon: float | None) -> Tensor:
    """[rows, vocab] -> [rows]: log p - log(1 - p) (with epsilon: log(p + eps) - log(1 - p + eps)), p the
    probability of the refusal tokens; differentiable (`refusal_ray.stages.patch.RefusalScore`)."""
    from refusal_ray.stages.patch.run import RefusalScore

    return RefusalScore(token_ids, epsilon or None)(logits.float())


def retain_kl(logits_edit: Tensor, logits_clean: Tensor, mask: Tensor) -> Tensor:
    """KL(P_edit || P_clean) summed over the positions where `mask` [rows, pos] is 1 and the vocabulary,
    divided by the rows (the paper's kl_div_fn: F.kl_div(log_softmax(clean), softmax(edit), 'batchmean')).
    logits_* [rows, pos, vocab]."""
    lp_e = torch.log_softmax(logits_edit.float(), -1)
    lp_c = torch.log_softmax(logits_clean.float(), -1)
    kl = (lp_e.exp() * (lp_e - lp_c)).sum(-1)                   # [rows, pos]
    return (kl * mask).sum() / logits_edit.shape[0]


@dataclass
class Batch:
    """Left-padded prompts on the model's device: ids, mask [rows, pos] and the retain mask (1 at the last
    `retain_positions` real positions)."""

    ids: Tensor
    mask: Tensor
    retain: Tensor


def make_batch(seqs: list[list[int]], pad_id: int, device, retain_positions: int) -> Batch:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    n = min(retain_positions, width)
    retain = mask[:, width - n:].clone().float()
    return Batch(ids.to(device), mask.to(device), retain.to(device))


def _logits(model, b: Batch, keep: int) -> Tensor:
    return model(input_ids=b.ids, attention_mask=b.mask, position_ids=position_ids(b.mask), use_cache=False,
                 logits_to_keep=keep).logits


def _repeat(b: Batch, n: int) -> Batch:
    return Batch(b.ids.repeat(n, 1), b.mask.repeat(n, 1), b.retain.repeat(n, 1))


def _cat(a: Batch, b: Batch, pad_id: int) -> Batch:
    """Rows of a then b, left-padded to one width."""
    w = max(a.ids.shape[1], b.ids.shape[1])

    def pad(t: Tensor, value) -> Tensor:
        return torch.nn.functional.pad(t, (w - t.shape[1], 0), value=value)

    return Batch(torch.cat([pad(a.ids, pad_id), pad(b.ids, pad_id)]), torch.cat([pad(a.mask, 0), pad(b.mask, 0)]),
                 torch.cat([pad(a.retain, 0.0), pad(b.retain, 0.0)]))


@dataclass
class Objective:
    """The loss of one set Q on one batch (module docstring). `kind` subspace | cone."""

    lm: object
    token_ids: list[int]
    alpha: float
    layer: int
    weights: dict
    kind: str = "subspace"
    epsilon: float | None = None
    retain_positions: int = 8
    n_cone: int = 8

    def __call__(self, q: Tensor, harmful: Batch, harmless: Batch, clean: Tensor,
                 gen: torch.Generator | None = None, memory: Memory | None = None) -> tuple[Tensor, dict]:
        """q [d_model, k] (differentiable); clean: the harmless batch's clean logits [rows, keep, vocab].
        Returns (loss, {"ablation", "addition", "retain"} floats)."""
        model, sites = self.lm.model, self.lm.sites
        d, k = q.shape
        keep = clean.shape[1]
        dev = harmful.ids.device
        qt = q.T.to(dev)                                                          # [k, d]
        if self.kind == "subspace" or k == 1:
            dirs = [qt]                                                           # one joint ablation of span Q
            scale = [1.0]
        else:                                                                     # cone: each basis vector + samples
            g = gen if gen is not None else torch.Generator().manual_seed(0)
            c = cone_samples(g, self.n_cone, k).to(dev, qt.dtype)
            samples = c @ qt                                                      # [n, d]
            samples = samples / samples.norm(dim=1, keepdim=True)
            dirs = [qt[i: i + 1] for i in range(k)] + [samples[j: j + 1] for j in range(self.n_cone)]
            scale = [0.5 / k] * k + [0.5 / self.n_cone] * self.n_cone
        nh, ns = harmful.ids.shape[0], harmless.ids.shape[0]
        # pass 1: ablation on harmful (refusal score) and harmless (retain KL), every direction group as rows
        both = _cat(harmful, harmless, self.lm.tokenizer.pad_token_id)
        rows = _repeat(both, len(dirs))
        r = max(u.shape[0] for u in dirs)
        basis = torch.stack([torch.cat([u, torch.zeros(r - u.shape[0], d, device=dev, dtype=qt.dtype)])
                             for u in dirs])                                      # [groups, r, d]
        per_row = basis.repeat_interleave(nh + ns, dim=0)                         # [rows, r, d]
        with hooks(sites, ablation_hooks(sites.n_layers, per_row)):
            logits = _logits(model, rows, keep)                                   # [rows, keep, vocab]
        if memory is not None:
            memory.sample()
        w = torch.tensor(scale, device=dev)
        score = refusal_score(logits[:, -1], self.token_ids, self.epsilon).view(len(dirs), nh + ns)
        l_abl = (torch.nn.functional.softplus(score[:, :nh]).mean(1) * w).sum()      # -log(1 - p)
        lg = logits.view(len(dirs), nh + ns, keep, -1)[:, nh:]
        kls = torch.stack([retain_kl(lg[i], clean, harmless.retain[:, -keep:]) for i in range(len(dirs))])
        l_ret = (kls * w).sum()
        # pass 2: addition of alpha * (each basis vector, and for a cone each sample) on harmless prompts
        adds = torch.cat(dirs) if self.kind == "cone" and k > 1 else qt          # [groups_add, d]
        wa = w if self.kind == "cone" and k > 1 else torch.full((k,), 1.0 / k, device=dev)
        vec = (self.alpha * adds).repeat_interleave(ns, dim=0)                    # [rows, d]
        with hooks(sites, {f"blocks.{self.layer}.hook_resid_pre": _Add(vec)}):
            add_logits = _logits(model, _repeat(harmless, adds.shape[0]), 1)[:, -1]
        if memory is not None:
            memory.sample()
        s_add = torch.nn.functional.softplus(-refusal_score(add_logits, self.token_ids, self.epsilon)).view(
            adds.shape[0], ns).mean(1)                                                        # -log p
        l_add = (s_add * wa).sum()
        wt = self.weights
        loss = wt["ablation"] * l_abl + wt["addition"] * l_add + wt["retain"] * l_ret
        return loss, {"ablation": float(l_abl.detach()), "addition": float(l_add.detach()),
                      "retain": float(l_ret.detach())}


@dataclass
class Result:
    """The learned set ([k, d_model] float32 rows, orthonormal), its losses and its cost."""

    vectors: np.ndarray
    losses: list[float]
    loss_initial: float
    loss_final: float
    steps: int
    seconds: float
    peak_memory_mb: float
    stopped: str
    terms: dict = field(default_factory=dict)      # initial / final loss terms on the fixed evaluation batch


def optimise(lm, harmful: list[list[int]], harmless: list[list[int]], *, dim: int, layer: int, alpha: float,
             token_ids: list[int], kind: str = "subspace", steps: int = 200, lr: float = 0.01,
             batch_size: int = 16, weights: dict | None = None, seed: int = 0, epsilon: float | None = None,
             retain_positions: int = 8, cone_samples_n: int = 8, max_seconds: float | None = None,
             max_memory_gb: float | None = None, init: np.ndarray | None = None) -> Result:
    """Learn an orthonormal set of `dim` directions (module docstring: losses, parameterisation, sources).

    Args:
        harmful, harmless: token ids of the rendered train prompts (unpadded), at least one each.
        layer: the addition layer (resid_pre); alpha: the addition scale (the DIM vector's norm).
        token_ids: the refusal first tokens; epsilon: the refusal score's epsilon (None: exact).
        steps: optimiser steps; one batch of `batch_size` prompts per class per step (seeded draws).
        max_seconds / max_memory_gb: stop after the step that passes either (`stopped` "time" | "memory").
        init: optional [dim, d_model] start (rows); default random Gaussian (seeded).
    Returns:
        Result: vectors [dim, d_model] of the lowest-training-loss step; losses per step (before each
        update); loss_initial / loss_final: the full loss of the initial / returned set on a fixed
        evaluation batch (the first `batch_size` prompts of each class, no sampling noise).
    Raises ValueError for dim < 1 or > d_model, steps < 1, empty prompt lists.
    """
    model, sites = lm.model, lm.sites
    d = sites.d_model
    if not 1 <= dim <= d:
        raise ValueError(f"dim {dim} out of range: the model's d_model is {d} (1..{d})")
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if not harmful or not harmless:
        raise ValueError("optimise needs at least one harmful and one harmless prompt")
    weights = weights or {"ablation": 1.0, "addition": 0.2, "retain": 1.0}
    for p in model.parameters():
        p.requires_grad_(False)
    dev = lm.device
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    gen = torch.Generator().manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    w0 = (torch.randn(d, dim, generator=gen) if init is None
          else torch.as_tensor(np.asarray(init, np.float32)).T.clone())
    w = torch.nn.Parameter(orthonormal(w0.float()).detach().clone())
    opt = torch.optim.AdamW([w], lr=lr, betas=BETAS, weight_decay=0.0, amsgrad=True)
    obj = Objective(lm, list(token_ids), float(alpha), int(layer), weights, kind, epsilon, retain_positions,
                    cone_samples_n)
    memory = Memory(dev)
    keep = max(1, min(retain_positions, min(len(s) for s in harmful + harmless)))
    obj.retain_positions = keep

    def clean_logits(b: Batch) -> Tensor:
        with torch.no_grad():
            return _logits(model, b, keep).detach()

    def draw(seqs, n):
        idx = rng.choice(len(seqs), size=min(n, len(seqs)), replace=False)
        return [seqs[i] for i in sorted(idx)]

    eval_h = make_batch(harmful[:batch_size], pad, dev, keep)
    eval_s = make_batch(harmless[:batch_size], pad, dev, keep)
    eval_clean = clean_logits(eval_s)

    def evaluate(q: Tensor) -> tuple[float, dict]:
        with torch.no_grad():
            loss, terms = obj(q, eval_h, eval_s, eval_clean, torch.Generator().manual_seed(int(seed) + 1))
        return float(loss), terms

    start = time.perf_counter()
    q0 = orthonormal(w.detach())
    loss_initial, terms_initial = evaluate(q0)
    losses, best, best_q, stopped = [], math.inf, q0.clone(), "steps"
    n_done = 0
    for step in range(steps):
        hb = make_batch(draw(harmful, batch_size), pad, dev, keep)
        sb = make_batch(draw(harmless, batch_size), pad, dev, keep)
        q = orthonormal(w)
        loss, _ = obj(q, hb, sb, clean_logits(sb), gen, memory)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        memory.sample()
        value = float(loss.detach())
        losses.append(value)
        if value < best:
            best, best_q = value, q.detach().clone()
        torch.nn.utils.clip_grad_norm_([w], CLIP)
        opt.step()
        with torch.no_grad():
            w.copy_(orthonormal(w))                    # re-orthonormalise after the step (the paper's Gram-Schmidt)
        n_done = step + 1
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            stopped = "time"
            break
        if max_memory_gb is not None and memory.peak > max_memory_gb * 1024:
            stopped = "memory"
            break
    loss_final, terms_final = evaluate(best_q)
    seconds = time.perf_counter() - start
    return Result(best_q.T.contiguous().cpu().numpy().astype(np.float32), losses, loss_initial, loss_final, n_done,
                  seconds, memory.peak, stopped, {"initial": terms_initial, "final": terms_final})


def prompt_ids(tokenizer, instructions: list[str], chat: ChatOptions | None = None) -> list[list[int]]:
    """Token ids of each rendered chat prompt (as `refusal_ray.data.prompt_tokens`)."""
    return tokenizer(render(tokenizer, list(instructions), chat or ChatOptions()),
                     add_special_tokens=False)["input_ids"]


from refusal_ray.stats import principal_angles  # noqa: E402,F401  (re-exported: the stage's own name for it)


# -- the run side of the declaration (`STAGE.inputs`, `.skip`, `.run`) ---------------------------------
ROW_COLUMNS = ("cell_id", "seed", "dim", "index", "layer", "position", "vector", "loss_initial", "loss_final",
               "losses", "steps", "seconds", "peak_memory_mb", "stopped", "kind")


def inputs(settings: dict, needs: dict) -> dict:
    """`STAGE.inputs`: the DIM direction the stage starts from and scales by: its (layer, position) is the
    block's `layer` (at `position`, or select's position), else stage select's choice, else the directions'
    best layer at `position`. {"layer", "position", "vector" (raw, float32 list), "alpha" (its norm),
    "source"}; {"skip": reason} when select ran and selected nothing."""
    from refusal_ray.stages.directions.run import best_layer
    from refusal_ray.stages.select.run import selected_direction

    cfg = settings["optimise"]
    rows = [r for r in needs["directions"]["directions"] if r["site"] == "resid_pre"]
    by_key = {(int(r["layer"]), int(r["position"])): r for r in rows}
    position, source = int(cfg.get("position", -1)), "directions' best"
    selected = selected_direction(needs["select"]["selection"]) if "select" in needs else None
    if "select" in needs and selected is None and cfg.get("layer") is None:
        return {"skip": "stage select selected no direction (stages.optimise.layer: null reads its layer)"}
    if selected is not None:
        position = selected["position"]
    if cfg.get("layer") is not None:
        layer, source = int(cfg["layer"]), "stages.optimise.layer"
    elif selected is not None:
        layer, source = selected["layer"], "select"
    else:
        layer = int(best_layer(rows, "resid_pre", position))
    row = by_key.get((layer, position))
    if row is None:
        return {"skip": f"no resid_pre direction at layer {layer}, position {position}"}
    vec = np.asarray(row["vector"], np.float32)
    return {"layer": layer, "position": position, "vector": vec.tolist(), "alpha": float(np.linalg.norm(vec)),
            "source": source}


def skip_reason(cell, payload) -> str | None:
    return (payload or {}).get("skip")


def initial(cfg: dict, dim_vector: np.ndarray, k: int, seed: int) -> np.ndarray | None:
    """[k, d_model] start rows for `init: dim` (the DIM direction, then Gaussian rows; seeded), None for random."""
    if cfg.get("init", "dim") != "dim" or not np.linalg.norm(dim_vector) > 0:
        return None
    g = torch.Generator().manual_seed(int(seed))
    rest = torch.randn(k - 1, len(dim_vector), generator=g).numpy() / math.sqrt(len(dim_vector))
    return np.concatenate([dim_vector[None] / np.linalg.norm(dim_vector), rest]).astype(np.float32)


def run_cell(lm, cell, payload: dict, train: dict, cfg: dict, token_ids: list[int], chat=None) -> list[dict]:
    """One cell: the learned set of `cell.params["dim"]` vectors, one row per vector (ROW_COLUMNS)."""
    from refusal_ray.ops.base import cell_seed

    k, seed = int(cell.params["dim"]), cell_seed(cell.id)
    harmful = prompt_ids(lm.tokenizer, train["harmful"].instructions, chat)
    harmless = prompt_ids(lm.tokenizer, train["harmless"].instructions, chat)
    vec = np.asarray(payload["vector"], np.float32)
    res = optimise(lm, harmful, harmless, dim=k, layer=payload["layer"], alpha=payload["alpha"],
                   token_ids=token_ids, kind=cell.params.get("kind", cfg.get("kind", "subspace")),
                   steps=cfg["steps"], lr=cfg["lr"], batch_size=cfg["batch_size"], weights=cfg["weights"], seed=seed,
                   retain_positions=cfg["retain_positions"], cone_samples_n=cfg["cone_samples"],
                   max_seconds=cfg.get("max_seconds"), max_memory_gb=cfg.get("max_memory_gb"),
                   init=initial(cfg, vec, k, seed))
    return [{"cell_id": cell.id, "seed": cell.seed, "dim": k, "index": i, "layer": int(payload["layer"]),
             "position": int(payload["position"]), "vector": res.vectors[i].tolist(),
             "loss_initial": res.loss_initial, "loss_final": res.loss_final, "losses": list(res.losses),
             "steps": res.steps, "seconds": res.seconds, "peak_memory_mb": res.peak_memory_mb,
             "stopped": res.stopped, "kind": cell.params.get("kind", "subspace")} for i in range(k)]


def run_task(session, cells, payload) -> dict:
    """`STAGE.run`: each cell on its seed's train prompts ({"optimised": rows})."""
    from refusal_ray.models import refusal_tokens
    from refusal_ray.models.loading import model_type

    cfg = session.settings["optimise"]
    tokens = refusal_tokens.resolve(cfg.get("refusal_tokens", "family"), session.lm.tokenizer,
                                    model_type(session.lm), session.judge.phrases)
    rows = []
    for cell in cells:
        rows += run_cell(session.lm, cell, payload, session.prompts[cell.seed]["train"], cfg, tokens, session.chat)
    return {"optimised": rows}
