"""Conditional activation steering (CAST): a condition direction and a threshold gate a behaviour per row.

Source: Lee et al. (IBM), "Programming Refusal with Conditional Activation Steering", ICLR 2025, Sec. 3;
code IBM/activation-steering (`LeashLayer._process_single_condition`, `compute_similarity`,
`MalleableModel.steer` / `find_best_condition_point`).

The gate (decided once per row, on the prompt, then fixed for every generated token of that row):

    h     = the prompt's resid_pre activations at the condition layer, [pos, d_model] (the paper wraps each
            decoder layer and reads its input hidden states: resid_pre)
    h_bar = mean over the prompt's real tokens (`aggregation: mean`, the paper's default
            `condition_threshold_comparison_mode`) or the last real token (`last`)          [d_model]
    P     = c c^T / (c . c)          the condition projector (the paper's `torch.ger(c, c) / torch.dot(c, c)`)
    sim   = cos(h_bar, tanh(P h_bar))                                                     scalar in [-1, 1]
    gate  = sim > threshold (`comparator: above`; the paper's `condition_comparator_threshold_is: smaller`)
            sim < threshold (`comparator: below`; the paper's `larger`), strict both ways as the LeashLayer
            (find_best_condition_point's search counts a tie as below). NaN (h_bar or c zero): no gate.

The behaviour, only on gated rows (rows not gated carry zero tensors: bit-identical to the baseline):

    behavior: addition  x <- x + coefficient * v at resid_pre[layer], every position (prompt and generated
                        tokens), v the difference of means at that layer (as stage steer's addition arms);
                        the paper's `x + strength * behavior_vector` at its behaviour layers
    behavior: ablation  x <- x - alpha (x . u) u at resid_pre, attn_out and mlp_out of `ablation_layers`
                        (as the directional ablation arms), u the unit direction of `direction_layer`

Where we depart from the paper:
- The condition direction c is the seed's stored difference of means at resid_pre[condition layer] and
  steer.position (stage directions), not the paper's condition vector (the first PCA component of
  pairwise-centred hidden states of contrastive condition prompts, `SteeringVector.train` with
  `pca_pairwise`). P, and so the similarity, does not depend on c's norm or sign, so only its line matters.
- The gate reads an unedited prefill pass of the row's own prompt (`Operator.prefill`), so the behaviour
  applies at every behaviour layer from the first prompt token on. In the paper the gate is decided
  inside the first (prompt) forward call, so on that call behaviour layers before the condition layer are
  not yet steered; from the first generated token on both agree. A gated row here equals the plain
  behaviour operator's row exactly.
- Rows are batched and left padded: the mean runs over real tokens only (the paper runs one unpadded
  prompt at a time, so its mean is over the same tokens). Aggregation and similarity in float64.
- One condition layer per arm (the paper's `find_best_condition_point` default `max_layers_to_combine=1`);
  (condition layer, threshold) is a sweep grid instead of the paper's F1 search over it.

Random control: the same gate (same condition direction, layer, threshold, so the same rows are gated)
with a norm-matched Gaussian behaviour direction seeded by the control cell's id. A random condition would
gate different rows, so the arm and its control would differ in which rows are steered as well as in the
direction; with the same gate the difference is the behaviour direction's effect on the same rows.

Capability cost: its capability arms are its steering arms (measured by default when the block is set). Stage
capability gates them per text (`stages.capability.GatedEdits`): per batch of texts, `prefill` on that batch's
unedited gate tokens, then `edits` for it, so each text is gated on its own tokens, as a steering prompt. The
gate reads a CE document's chat prompt (a plain-text document: the whole document, it has no prompt part),
and each first-token KL / generated prompt itself. lm-eval batches its requests itself under one set of hooks,
so a per-request gate cannot be honoured there: these arms get no lm-eval metrics (stated in the plan line).
An arm whose threshold gates no text measures exactly the baseline; one that gates every text, the plain
addition (ablation) arm of the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from refusal_ray.ops.base import (ABLATION_SITES, LayerList, Operator, Strict, check_layers, direction_of, layer_list,
                                  register)

Comparator = Literal["above", "below"]
Aggregation = Literal["mean", "last"]
ADDITION_FIELDS = ("layers", "coefficients")
ABLATION_FIELDS = ("alphas", "ablation_layers", "direction_layer")


class ConditionalArm(Strict):
    """CAST (Lee et al. 2025): gate = cos(h_bar, tanh(P h_bar)) vs threshold at the condition layer, decided on
    the prompt; the behaviour (activation addition or directional ablation) only on gated rows."""

    condition_layers: list[int] = Field(min_length=1, description=(
        "Layers whose resid_pre (the decoder layer's input, as the paper's LeashLayer) the gate reads; the "
        "condition direction is the seed's difference of means there at steer.position. One arm per layer."))
    thresholds: list[float] = Field(min_length=1, description=(
        "Thresholds on the condition similarity cos(h_bar, tanh(P h_bar)), each in [-1, 1]. A sweep axis."))
    comparator: Comparator = Field("above", description=(
        "'above': gate where similarity > threshold (the paper's comparator 'smaller'); 'below': where "
        "similarity < threshold (the paper's 'larger')."))
    aggregation: Aggregation = Field("mean", description=(
        "How the prompt's tokens give h_bar: 'mean' over its real tokens (the paper's default) or its 'last' "
        "token (with steer.position -1, the token the condition direction was fit at)."))
    behavior: Literal["addition", "ablation"] = Field("addition", description=(
        "What gated rows get: 'addition' (x + c v at resid_pre[layer], the paper's use: induce refusal where "
        "the condition holds) or 'ablation' (x - alpha (x.u) u at resid_pre, attn_out, mlp_out)."))
    layers: list[int] | None = Field(None, min_length=1, description=(
        "behavior addition: layers to add at, each with its own difference of means (None: the condition layer)."))
    coefficients: list[float] = Field([1.0], min_length=1, description=(
        "behavior addition: coefficients c (nonzero; c = 0 is the baseline arm)."))
    alphas: list[float] = Field([1.0], min_length=1, description="behavior ablation: ablation strengths.")
    ablation_layers: LayerList = Field("all", description="behavior ablation: layers ablated at.")
    direction_layer: Literal["selected", "best"] | int = Field("best", description=(
        "behavior ablation: the direction ablated ('selected': stage select's choice; 'best': highest "
        "separation at steer.position; or a layer, at steer.position)."))

    @field_validator("thresholds")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        bad = [t for t in v if not -1.0 <= t <= 1.0]
        if bad:
            raise ValueError(f"thresholds {bad} outside [-1, 1] (the similarity is a cosine)")
        return v

    @field_validator("coefficients")
    @classmethod
    def _nonzero(cls, v: list[float]) -> list[float]:
        if any(c == 0 for c in v):
            raise ValueError("coefficient 0 is the baseline arm: leave it out")
        return v

    @model_validator(mode="after")
    def _behavior_fields(self):
        other = ABLATION_FIELDS if self.behavior == "addition" else ADDITION_FIELDS
        given = [f for f in other if f in self.model_fields_set]
        if given:
            raise ValueError(f"{', '.join(given)}: not used with behavior {self.behavior!r} "
                             f"({', '.join(other)} are for behavior "
                             f"{'ablation' if self.behavior == 'addition' else 'addition'})")
        return self


@dataclass
class Resolved:
    """One CAST cell's tensors.

    condition: c [d_model] float32, the difference of means at resid_pre[condition_layer]
    vector: the behaviour vector v [d_model] float32 (a control cell: Gaussian, same norm, seeded by its id)
    direction_layer / direction_position: where v comes from
    """

    condition_layer: int
    condition: np.ndarray
    threshold: float
    comparator: str
    aggregation: str
    behavior: str
    vector: np.ndarray
    direction_layer: int
    direction_position: int


# -- the math (batched, per row) -----------------------------------------------------------------------


def prompt_state(h, mask, aggregation: str):
    """h_bar, the prompt state the gate reads. h: [batch, pos, d_model]; mask: [batch, pos] (1 = real token,
    either padding side) -> [batch, d_model] float64. 'mean': mean over real tokens; 'last': the last real
    token. A row without real tokens gives zeros (similarity NaN, no gate)."""
    import torch

    h = h.to(torch.float64)
    m = mask.to(device=h.device, dtype=torch.float64)
    if aggregation == "mean":
        return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
    pos = torch.arange(m.shape[1], device=h.device)
    last = torch.where(m > 0, pos, -1).max(dim=1).values
    out = h[torch.arange(h.shape[0], device=h.device), last.clamp(min=0)]
    return torch.where((last >= 0)[:, None], out, torch.zeros_like(out))


def condition_similarity(hbar, c):
    """cos(h_bar, tanh(P h_bar)) with P = c c^T / (c . c) (Lee et al. 2025, Sec. 3; LeashLayer's
    `compute_similarity` of `tanh(condition_projector @ h)`). P h_bar = ((h_bar . c) / (c . c)) c.
    hbar: [batch, d_model]; c: [batch, d_model] or [d_model] -> [batch] float64 (NaN where h_bar or c is 0)."""
    import torch

    hbar = hbar.to(torch.float64)
    c = c.to(device=hbar.device, dtype=torch.float64).expand_as(hbar)
    coef = (hbar * c).sum(-1) / (c * c).sum(-1)                     # [batch]
    p = torch.tanh(coef[:, None] * c)                                # [batch, d_model]
    return (hbar * p).sum(-1) / (hbar.norm(dim=-1) * p.norm(dim=-1))


def gate(sim, threshold, comparator: str):
    """Whether the condition holds: sim > threshold ('above') or sim < threshold ('below'); NaN: False.
    sim, threshold: [batch] (or broadcastable) -> [batch] bool."""
    return (sim > threshold) if comparator == "above" else (sim < threshold)


# -- the operator --------------------------------------------------------------------------------------


@register
class CAST(Operator):
    name = "conditional"
    label = "conditional steering (CAST)"
    order = 60
    config = ConditionalArm
    field_description = ("Conditional activation steering (CAST, Lee et al. 2025): a condition direction and "
                         "threshold gate activation addition (or ablation) per prompt.")
    effect = "both"
    arm_keys = ("behavior", "condition_layer", "threshold")
    capability_needs_block = True   # its capability arms are its steering arms (stages.steer.conditional)
    # per-completion gate columns (steer) and per-row gate counts (steer's rows, capability's metric rows)
    column_types = {"gate": "bool", "condition_similarity": "float64", "gate_rate": "float64", "gate_n": "int64"}
    short = "cast"
    color = "tab:olive"

    # spec and plan
    def arms(self, spec, block, n_layers):
        gate_params = {"comparator": block.comparator, "aggregation": block.aggregation}
        out = []
        for cl in block.condition_layers:
            for t in block.thresholds:
                cond = {"condition_layer": int(cl), "threshold": float(t), **gate_params}
                if block.behavior == "addition":
                    for layer in (block.layers or [cl]):
                        for c in block.coefficients:
                            out.append({"mode": self.name, "behavior": "addition", "layer": int(layer),
                                        "coefficient": float(c), "alpha": 0.0, "direction_layer": int(layer),
                                        **cond})
                    continue
                extra = {"ablation_layers": layer_list(block.ablation_layers, n_layers)}
                if block.direction_layer == "selected" and spec.stages.select is not None:
                    extra["select"] = spec.stages.select.model_dump(mode="json", exclude={"batch_size"})
                for a in block.alphas:
                    out.append({"mode": self.name, "behavior": "ablation", "layer": None, "coefficient": 0.0,
                                "alpha": float(a), "direction_layer": block.direction_layer, **extra, **cond})
        return out

    def cost_setting(self, rule):
        """The summary's capability cost reads the arms at the first threshold (the one its headline names)."""
        return "threshold", None

    def describe(self, spec, block):
        what = (f"addition at layers {block.layers or 'the condition layer'}, coefficients {block.coefficients}"
                if block.behavior == "addition" else
                f"ablation of {block.direction_layer} at layers {block.ablation_layers}, alphas {block.alphas}")
        return [f"conditional (CAST): gate cos(h_{block.aggregation}, tanh(P h)) {block.comparator} thresholds "
                f"{block.thresholds} at resid_pre of condition layers {block.condition_layers}; {what}; "
                f"capability cost: CE, first-token KL and generations with the gate decided per text (no lm-eval)"]

    def check(self, plan, block) -> None:
        if block is None:
            return
        check_layers(plan, "stages.steer.conditional.condition_layers", block.condition_layers)
        if block.behavior == "addition" and block.layers is not None:
            check_layers(plan, "stages.steer.conditional.layers", block.layers)
        if block.behavior == "ablation":
            check_layers(plan, "stages.steer.conditional.ablation_layers", block.ablation_layers)
            if isinstance(block.direction_layer, int):
                check_layers(plan, "stages.steer.conditional.direction_layer", [block.direction_layer])

    def validate(self, spec, block) -> None:
        if block is not None and block.behavior == "ablation" and block.direction_layer == "selected" \
                and spec.stages.select is None:
            raise ValueError("stages.steer.conditional.direction_layer 'selected' needs a stages.select block "
                             "(or direction_layer: best / a layer)")

    # run time
    def resolve(self, cell, d) -> Resolved:
        """The condition direction (never randomised: a control keeps the arm's gate) and the behaviour vector
        (a control cell: `control_direction` of it, seeded by `draw_id`). LookupError: no usable condition
        direction at that layer (missing or zero) on this seed."""
        p = cell.params
        cl = int(p["condition_layer"])
        c = d.vectors.get(cl)
        if c is None:
            raise LookupError(f"no resid_pre direction at condition layer {cl} (position {d.position}) for this seed")
        if not float(np.linalg.norm(c)) > 0:
            raise LookupError(f"the condition direction at layer {cl} (position {d.position}) is zero: "
                              f"the gate would never fire (choose another condition layer)")
        if p["behavior"] == "addition" and int(p["direction_layer"]) not in d.vectors:
            raise LookupError(f"no resid_pre direction at layer {p['direction_layer']} for this seed")
        layer, pos, v = direction_of(cell, d)      # addition: the layer's own direction, as the addition arms
        return Resolved(cl, np.asarray(c, np.float32), float(p["threshold"]), p["comparator"], p["aggregation"],
                        p["behavior"], v, layer, pos)

    def prefill(self, lm, input_ids, attention_mask, rows, d):
        """The gate of every row of this operator: one unedited forward pass over those rows, reading resid_pre
        at their condition layers. Returns {"sim": [batch] float64 (NaN on other rows), "gate": [batch] bool
        (False on other rows)}, indexed by the batch's row index. input_ids, attention_mask: [batch, pos]."""
        import torch

        from refusal_ray.interventions import capture
        from refusal_ray.models.sites import site_name

        n = input_ids.shape[0]
        sim = torch.full((n,), float("nan"), dtype=torch.float64)
        fired = torch.zeros(n, dtype=torch.bool)
        if not rows:
            return {"sim": sim, "gate": fired}
        idx = sorted({i for i, _, _ in rows})
        pos = {i: j for j, i in enumerate(idx)}
        sub = torch.tensor(idx, device=input_ids.device)
        ids, mask = input_ids[sub], attention_mask[sub]
        keep = mask.bool().any(0)                       # drop columns that are padding on every kept row
        ids, mask = ids[:, keep], mask[:, keep]
        layers = sorted({r.condition_layer for _, _, r in rows})
        acts = capture(lm.model, ids, mask, [site_name("resid_pre", layer) for layer in layers], lm.sites)
        mask_cpu = mask.cpu()
        states: dict = {}
        for i, _, r in rows:
            key = (r.condition_layer, r.aggregation)
            if key not in states:
                states[key] = prompt_state(acts[site_name("resid_pre", r.condition_layer)], mask_cpu, r.aggregation)
            hbar = states[key][pos[i]][None]             # [1, d_model]
            s = condition_similarity(hbar, torch.from_numpy(r.condition))[0]
            sim[i] = s
            fired[i] = bool(gate(s, r.threshold, r.comparator))
        return {"sim": sim, "gate": fired}

    def edits(self, rows, chunk, d):
        """The behaviour's per-row tensors on gated rows only (zero elsewhere; a site no gated row edits is
        left out). Addition: [n, d_model] vectors c v at resid_pre[layer]. Ablation: [n, d_model] unit
        directions and [n] strengths at the ablation sites. Needs this operator's prefill (`chunk.prefill`);
        raises RuntimeError without it (a pass that cannot gate per row must not steer every row)."""
        import torch

        from refusal_ray.interventions import RowEdit

        pre = chunk.prefill.get(self.name)
        if pre is None:
            if not rows:
                return {}
            raise RuntimeError("conditional steering (CAST) decides its gate on each row's prompt: this pass made "
                               "no prefill for it (Operator.prefill), so it cannot run here")
        n, dm = chunk.n, chunk.d_model
        add: dict = {}
        dirs: dict = {}
        alpha: dict = {}
        for i, cell, r in rows:
            if not bool(pre["gate"][i]):
                continue
            p = cell.params
            if r.behavior == "addition":
                add.setdefault(("resid_pre", int(p["layer"])), torch.zeros(n, dm))[i] = \
                    torch.from_numpy(r.vector) * p["coefficient"]
                continue
            u = torch.from_numpy(r.vector) / max(float(np.linalg.norm(r.vector)), 1e-30)
            for layer in p["ablation_layers"]:
                for kind in ABLATION_SITES:
                    dirs.setdefault((kind, layer), torch.zeros(n, dm))[i] = u
                    alpha.setdefault((kind, layer), torch.zeros(n))[i] = p["alpha"]
        out = {key: RowEdit(dirs[key], alpha[key]) for key in dirs}
        for key, t in add.items():
            e = out.get(key)
            out[key] = RowEdit(add=t) if e is None else RowEdit(e.ablate_dirs, e.ablate_alpha, t)
        return out

    def columns(self, cell, resolved: Resolved) -> dict:
        return {"direction_layer": resolved.direction_layer, "direction_position": resolved.direction_position,
                "direction": str(cell.params["direction_layer"]),
                "vector_norm": float(np.linalg.norm(resolved.vector)),
                "behavior": resolved.behavior, "condition_layer": resolved.condition_layer,
                "threshold": resolved.threshold, "comparator": resolved.comparator,
                "aggregation": resolved.aggregation,
                "condition_norm": float(np.linalg.norm(resolved.condition))}

    # per-row results (stage steer's completion and steering rows; stage capability's metric rows)
    def completion_columns(self, prefill, i: int) -> dict:
        """Columns of completion row i of a chunk (from this operator's prefill state): {"gate": whether the
        gate fired, "condition_similarity": the similarity (None where NaN)}."""
        s = float(prefill["sim"][i])
        return {"gate": bool(prefill["gate"][i]), "condition_similarity": None if np.isnan(s) else s}

    def group_columns(self, rows: list[dict]) -> dict:
        """Columns of one steering row (cell, prompt set) from its completion rows' `completion_columns`:
        {"gate_rate": the fraction of its prompts gated on, "gate_n": how many}."""
        fired = [bool(r["gate"]) for r in rows if "gate" in r]
        return {"gate_rate": sum(fired) / len(fired) if fired else None, "gate_n": sum(fired)}
