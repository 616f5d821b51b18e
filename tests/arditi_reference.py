"""An independent re-implementation of Arditi et al.'s (2024) direction selection, for parity tests.

Written from the text of the paper (Sec. 2.3, App. C) and of its published pipeline
(`andyrdt/refusal_direction`: `pipeline/submodules/select_direction.py`, `generate_directions.py`,
`run_pipeline.py`, `config.py`, `utils/hook_utils.py`), in our own words. It deliberately shares
no code with `refusal_ray.stages` or `refusal_ray.interventions`: plain PyTorch forward hooks on a
Hugging Face Llama/Qwen2-style model (`model.model.layers[L]`, `.self_attn`, `.mlp`), one
candidate at a time, as the paper's loop does.

What the paper's code does, and this module by default reproduces:

- Prompts are tokenized as one left-padded batch (`padding=True`) and the model is called with
  `input_ids` and `attention_mask` only: no `position_ids`, so under left padding a row's real
  tokens start at position `n_pad`, not 0 (`position_ids_from_mask=True` derives them from the
  mask instead, as refusal-ray does).
- Refusal score of a prompt: `log(p + 1e-8) - log(1 - p + 1e-8)`, p the summed softmax
  probability (float64) of the refusal tokens at the last position.
- Ablation of a candidate r: `x <- x - (x . r^) r^` with `r^ = r / (|r| + 1e-8)`, at every block's
  input (forward pre-hook on the decoder layer) and at every attention and MLP output.
- Activation addition: `x <- x + r` (raw vector, coefficient 1) at the candidate's own block input.
- KL of a candidate: the mean over harmless prompts of
  `sum_v p_base (log(p_base + 1e-6) - log(p_abl + 1e-6))` of the last position's distributions
  (float64 softmax; note the epsilon 1e-6 inside both logs, `kl_div_fn`'s default). `kl_epsilon=0`
  gives the exact KL (terms with p_base = 0 count 0).
- filter_fn: a candidate is dropped when any score is NaN, when
  `layer >= int(n_layers * (1 - prune_layer_percentage))`, when `kl > kl_threshold` or when
  `induce < induce_refusal_threshold` (a None threshold is off); paper defaults 0.1, 0.0, 0.2.
- The selected candidate is the kept one with the lowest bypass score.
- filter_val / filter_train: keep harmful prompts with refusal score > 0 and harmless ones < 0.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

REFUSAL_EPSILON = 1e-8      # select_direction.refusal_score
KL_EPSILON = 1e-6           # select_direction.kl_div_fn
NORM_EPSILON = 1e-8         # hook_utils: direction / (norm + 1e-8)
PAPER_FILTERS = {"kl_threshold": 0.1, "induce_refusal_threshold": 0.0, "prune_layer_percentage": 0.2}


# -- model access -----------------------------------------------------------------------------
def blocks(model) -> list[torch.nn.Module]:
    """The decoder layers of a Llama/Qwen2/Mistral-style `*ForCausalLM` (`model.model.layers`)."""
    return list(model.model.layers)


def tokenize(tokenizer, prompts: list[str]):
    """Left-padded batch of already rendered chat prompts: (input_ids, attention_mask) [batch, pos].

    The prompt text carries the template's special tokens, so none are added here.
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, padding=True, truncation=False, return_tensors="pt", add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"], enc["attention_mask"]


# -- hooks (the paper's hook_utils, restated) -----------------------------------------------------
def _unit(direction: torch.Tensor) -> torch.Tensor:
    return direction / (direction.norm() + NORM_EPSILON)


def _ablate_(x: torch.Tensor, unit: torch.Tensor) -> None:
    """In place: x <- x - (x . u) u, u cast to x's dtype and device."""
    u = unit.to(x)
    x -= (x @ u).unsqueeze(-1) * u


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer's hidden_states, passed positionally (transformers 5.24) or by keyword."""
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def attached(pre_hooks: list, hooks: list):
    """Register (module, fn(module, args, kwargs)) forward pre-hooks and (module, fn(module, args,
    output)) forward hooks for the block; remove them after. Every hook edits in place."""
    handles = [m.register_forward_pre_hook(f, with_kwargs=True) for m, f in pre_hooks]
    handles += [m.register_forward_hook(f) for m, f in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def ablation_hooks(model, direction: torch.Tensor) -> tuple[list, list]:
    """Directional ablation of `direction` [d_model] at every block input and attn/mlp output."""
    unit = _unit(direction)

    def pre(module, args, kwargs):
        _ablate_(_block_input(args, kwargs), unit)      # edits the block input in place

    def post(module, args, output):
        _ablate_(_first(output), unit)

    layers = blocks(model)
    return ([(b, pre) for b in layers],
            [(b.self_attn, post) for b in layers] + [(b.mlp, post) for b in layers])


def addition_hooks(model, vector: torch.Tensor, layer: int, coeff: float = 1.0) -> tuple[list, list]:
    """Activation addition x <- x + coeff * vector at block `layer`'s input."""
    def pre(module, args, kwargs):
        x = _block_input(args, kwargs)
        x += coeff * vector.to(x)

    return [(blocks(model)[layer], pre)], []


# -- scores -----------------------------------------------------------------------------------
def refusal_score(last_logits: torch.Tensor, refusal_toks: list[int], epsilon: float = REFUSAL_EPSILON) -> torch.Tensor:
    """log(p + eps) - log(1 - p + eps), p = softmax mass of `refusal_toks`: [batch, vocab] -> [batch] float64."""
    probs = last_logits.double().softmax(-1)
    p = probs[:, refusal_toks].sum(-1)
    return torch.log(p + epsilon) - torch.log(1 - p + epsilon)


def kl_div(logits_a: torch.Tensor, logits_b: torch.Tensor, epsilon: float = KL_EPSILON) -> torch.Tensor:
    """Per-row sum_v p_a (log(p_a + eps) - log(p_b + eps)), float64 softmax: [batch, vocab] -> [batch].

    epsilon = 0 is the exact KL(a || b), with 0 * log 0 terms counted as 0.
    """
    pa, pb = logits_a.double().softmax(-1), logits_b.double().softmax(-1)
    if epsilon:
        terms = pa * (torch.log(pa + epsilon) - torch.log(pb + epsilon))
    else:
        terms = torch.where(pa > 0, pa * (torch.log(pa) - torch.log(pb)), torch.zeros_like(pa))
    return terms.sum(-1)


@torch.inference_mode()
def last_logits(model, tokenizer, prompts: list[str], hooks: tuple[list, list] = ([], []), batch_size: int = 32,
                position_ids_from_mask: bool = False) -> torch.Tensor:
    """Last position logits [n_prompts, vocab] (float64), `batch_size` prompts per padded batch."""
    out = []
    device = model.get_input_embeddings().weight.device
    for i in range(0, len(prompts), batch_size):
        ids, mask = tokenize(tokenizer, prompts[i:i + batch_size])
        kwargs = {}
        if position_ids_from_mask:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        with attached(*hooks):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs).logits
        out.append(logits[:, -1].double().cpu())
    return torch.cat(out)


def refusal_scores(model, tokenizer, prompts, refusal_toks, hooks=([], []), batch_size=32, **kw) -> torch.Tensor:
    """Per-prompt refusal scores [n_prompts] float64 (the paper's get_refusal_scores)."""
    return refusal_score(last_logits(model, tokenizer, prompts, hooks, batch_size, **kw), refusal_toks)


def filter_prompts(model, tokenizer, harmful: list[str], harmless: list[str], refusal_toks, batch_size=32, **kw):
    """filter_train / filter_val: (harmful with score > 0, harmless with score < 0), order kept."""
    sh = refusal_scores(model, tokenizer, harmful, refusal_toks, batch_size=batch_size, **kw).tolist()
    ss = refusal_scores(model, tokenizer, harmless, refusal_toks, batch_size=batch_size, **kw).tolist()
    return [p for p, s in zip(harmful, sh) if s > 0], [p for p, s in zip(harmless, ss) if s < 0]


@torch.inference_mode()
def mean_diff(model, tokenizer, harmful: list[str], harmless: list[str], positions: list[int],
              batch_size: int = 32) -> torch.Tensor:
    """Candidate directions [n_pos, n_layers, d_model] float64: mean block input over harmful minus
    over harmless prompts at each negative position (the paper's generate_directions)."""
    layers = blocks(model)
    d_model = model.get_input_embeddings().weight.shape[1]

    def means(prompts):
        acc = torch.zeros(len(positions), len(layers), d_model, dtype=torch.float64)

        def reader(layer):
            def pre(module, args, kwargs):
                x = _block_input(args, kwargs)
                acc[:, layer] += x[:, positions].double().cpu().sum(0) / len(prompts)
            return pre

        with attached([(b, reader(i)) for i, b in enumerate(layers)], []):
            last_logits(model, tokenizer, prompts, batch_size=batch_size)
        return acc

    return means(harmful) - means(harmless)


# -- the candidate loop and selection -------------------------------------------------------------
@dataclass
class Scored:
    position: int
    layer: int
    bypass: float      # the paper's refusal_score (ablation on harmful)
    induce: float      # steering_score (addition on harmless)
    kl: float          # kl_div_score (ablation on harmless), with kl_div_fn's epsilon
    kl_exact: float    # the same with epsilon 0: the exact mean KL(baseline || ablated)


def score(model, tokenizer, harmful: list[str], harmless: list[str], candidates: dict[tuple[int, int], torch.Tensor],
          refusal_toks: list[int], batch_size: int = 32, kl_epsilon: float = KL_EPSILON, **kw) -> list[Scored]:
    """Bypass, induce and KL of each candidate {(position, layer): vector [d_model]}, one at a time
    (the paper's three loops, fused per candidate), on already filtered val prompts."""
    base = last_logits(model, tokenizer, harmless, batch_size=batch_size, **kw)
    out = []
    for (pos, layer), v in candidates.items():
        abl = ablation_hooks(model, v)
        ablated = last_logits(model, tokenizer, harmless, abl, batch_size, **kw)
        kl, kl_exact = kl_div(base, ablated, kl_epsilon).mean(), kl_div(base, ablated, 0.0).mean()
        bypass = refusal_scores(model, tokenizer, harmful, refusal_toks, abl, batch_size, **kw).mean()
        induce = refusal_scores(model, tokenizer, harmless, refusal_toks, addition_hooks(model, v, layer),
                                batch_size, **kw).mean()
        out.append(Scored(pos, layer, float(bypass), float(induce), float(kl), float(kl_exact)))
    return out


def discard(s: Scored, n_layers: int, kl_threshold=0.1, induce_refusal_threshold=0.0,
            prune_layer_percentage=0.2) -> bool:
    """The paper's filter_fn: True when the candidate is filtered out."""
    if math.isnan(s.bypass) or math.isnan(s.induce) or math.isnan(s.kl):
        return True
    if prune_layer_percentage is not None and s.layer >= int(n_layers * (1.0 - prune_layer_percentage)):
        return True
    if kl_threshold is not None and s.kl > kl_threshold:
        return True
    if induce_refusal_threshold is not None and s.induce < induce_refusal_threshold:
        return True
    return False


def select(scored: list[Scored], n_layers: int, **filters) -> Scored | None:
    """The kept candidate with the lowest bypass (None when every one is filtered out; the paper
    asserts instead). Ties keep the first in the paper's order: position -n..-1, then layer."""
    kept = [s for s in scored if not discard(s, n_layers, **filters)]
    kept.sort(key=lambda s: (s.position, s.layer))
    return min(kept, key=lambda s: s.bypass) if kept else None
