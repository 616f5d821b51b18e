"""Conditional activation steering (CAST, refusal_ray/ops/conditional.py) against the paper's formula.

Reference: Lee et al. (IBM), ICLR 2025; IBM/activation-steering's LeashLayer: on the first forward call of
one unpadded prompt, h = hidden_states[0].mean(dim=0) (or [-1]), projector = ger(c, c) / dot(c, c),
sim = dot(h, tanh(projector @ h)) / (|h| |tanh(projector @ h)|), condition_met = (sim > t) == (comparator is
'smaller'). The reference below re-implements that loop, one prompt at a time, reading the decoder layer's
input with its own hook.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from refusal_ray.core.cells import Cell
from refusal_ray.data import encode
from refusal_ray.interventions import RowEdit, forward, row_edits
from refusal_ray.ops import OPS
from refusal_ray.ops.base import Chunk, SteerInputs, compose, control_direction
from refusal_ray.ops.conditional import ConditionalArm, condition_similarity, gate, prompt_state

from conftest import PROMPTS

CL = 1          # condition layer
ADD_LAYER = 2   # behaviour layer


@pytest.fixture(scope="module")
def lm(tiny_qwen_path):
    from refusal_ray import load_model

    return load_model(str(tiny_qwen_path), attn_implementation="eager")


def _paper_similarity(h: torch.Tensor, c: torch.Tensor, mode: str = "mean") -> float:
    """LeashLayer._process_single_condition on one unpadded prompt's hidden states h [pos, d_model]."""
    h = h.mean(dim=0) if mode == "mean" else h[-1, :]
    projector = torch.ger(c, c) / torch.dot(c, c)
    projected = torch.tanh(torch.matmul(projector, h))
    return float(torch.dot(h.flatten(), projected.flatten()) / (torch.norm(h) * torch.norm(projected)))


def _paper_condition_met(sim: float, threshold: float, paper_comparator: str) -> bool:
    """LeashLayer's runtime rule (strict both ways; find_best_condition_point's search writes
    `(sim > t) == (direction == 'smaller')`, which differs only at a tie or NaN under 'larger')."""
    if paper_comparator == "smaller":
        return sim > threshold
    return sim < threshold


def _layer_input(model, ids, layer: int) -> torch.Tensor:
    """The decoder layer's input hidden states for one unpadded prompt ([pos, d_model]), by a plain hook."""
    seen = {}

    def hook(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"])[0].detach().clone()

    handle = model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen["h"]


def _directions(lm, seed: int = 0) -> SteerInputs:
    rng = np.random.default_rng(seed)
    vecs = {layer: (rng.standard_normal(lm.sites.d_model) * 2).astype(np.float32) for layer in range(lm.sites.n_layers)}
    return SteerInputs(vecs, best=1)


def _cell(i: int, threshold: float, control: bool = False, **over) -> Cell:
    p = {"mode": "conditional", "behavior": "addition", "layer": ADD_LAYER, "coefficient": 4.0, "alpha": 0.0,
         "direction_layer": ADD_LAYER, "condition_layer": CL, "threshold": float(threshold),
         "comparator": "above", "aggregation": "mean", "control": control, **over}
    return Cell(f"cast{i}", "steer", "tiny", 0, p)


def _reference_sims(lm, d: SteerInputs, layer: int = CL, mode: str = "mean") -> list[float]:
    c = torch.from_numpy(d.vectors[layer])
    out = []
    for prompt in PROMPTS:
        ids, _ = encode(lm.tokenizer, [prompt])
        out.append(_paper_similarity(_layer_input(lm.model, ids, layer), c, mode))
    return out


def _split_threshold(sims: list[float]) -> float:
    """A threshold between the sims, away from every one, so some rows gate and some do not."""
    s = sorted(sims)
    gaps = [(s[i + 1] - s[i], (s[i] + s[i + 1]) / 2) for i in range(len(s) - 1)]
    gap, t = max(gaps)
    assert gap > 1e-4, s
    return t


# -- the formula ---------------------------------------------------------------------------------------


def test_similarity_and_gate_match_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 7, 16, generator=g, dtype=torch.float64)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, :3] = 0     # left padding
    mask[3, 5:] = 0     # right padding
    c = torch.randn(16, generator=g, dtype=torch.float64) * 5
    for mode in ("mean", "last"):
        ours = condition_similarity(prompt_state(h, mask, mode), c)
        for b in range(5):
            ref = _paper_similarity(h[b][mask[b].bool()], c, mode)
            assert abs(float(ours[b]) - ref) <= 1e-12
    sim = condition_similarity(prompt_state(h, mask, "mean"), c)
    for t in (-0.5, 0.0, float(sim.median())):
        for ours_cmp, paper_cmp in (("above", "smaller"), ("below", "larger")):
            assert gate(sim, t, ours_cmp).tolist() == [_paper_condition_met(float(s), t, paper_cmp) for s in sim]
    # P does not depend on the norm or sign of c
    assert torch.allclose(condition_similarity(prompt_state(h, mask, "mean"), -0.01 * c), sim, atol=1e-12)
    # a zero state or a zero direction never gates
    zero = condition_similarity(torch.zeros(2, 16, dtype=torch.float64), c)
    assert torch.isnan(zero).all() and not gate(zero, -1.0, "above").any() and not gate(zero, 1.0, "below").any()


def test_prefill_gate_equals_the_paper_on_each_prompt_alone(lm):
    """The gate from one padded batch equals the paper's loop run on each unpadded prompt by itself."""
    op, d = OPS["conditional"], _directions(lm)
    for mode in ("mean", "last"):
        ref = _reference_sims(lm, d, CL, mode)
        t = _split_threshold(ref)
        cells = [_cell(i, t, aggregation=mode) for i in range(len(PROMPTS))]
        ids, mask = encode(lm.tokenizer, PROMPTS)
        rows = [(i, c, op.resolve(c, d)) for i, c in enumerate(cells)]
        pre = op.prefill(lm, ids, mask, rows, d)
        assert np.allclose(pre["sim"].numpy(), ref, atol=1e-5), (pre["sim"], ref)
        assert pre["gate"].tolist() == [_paper_condition_met(s, t, "smaller") for s in ref]
        assert 0 < int(pre["gate"].sum()) < len(PROMPTS)


# -- the behaviour on gated rows only --------------------------------------------------------------------


def _edited(lm, ids, mask, rows_by_op: dict, d, n_layers=None):
    """Compose the operators' edits for one chunk as steer does (prefill, then edits in apply order)."""
    chunk = Chunk(n=ids.shape[0], d_model=lm.sites.d_model, n_layers=lm.sites.n_layers)
    per_op = []
    for name, rows in rows_by_op.items():
        op = OPS[name]
        if op.has_prefill():
            chunk.prefill[name] = op.prefill(lm, ids, mask, rows, d)
        per_op.append((op.rank, op.edits(rows, chunk, d)))
    return compose(per_op), chunk


def _logits(lm, ids, mask, edits):
    with row_edits(lm.sites, edits), torch.no_grad():
        return forward(lm.model, ids, mask).logits


def _greedy(lm, ids, mask, edits, n=6):
    with row_edits(lm.sites, edits), torch.no_grad():
        out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                min_new_tokens=n, pad_token_id=lm.tokenizer.pad_token_id)
    return out[:, ids.shape[1]:]


def test_below_threshold_is_the_baseline_and_above_is_plain_addition(lm):
    op, d = OPS["conditional"], _directions(lm)
    t = _split_threshold(_reference_sims(lm, d))
    ids, mask = encode(lm.tokenizer, PROMPTS)
    cells = [_cell(i, t) for i in range(len(PROMPTS))]
    rows = [(i, c, op.resolve(c, d)) for i, c in enumerate(cells)]
    edits, chunk = _edited(lm, ids, mask, {"conditional": rows}, d)
    fired = chunk.prefill["conditional"]["gate"].tolist()
    assert any(fired) and not all(fired)
    # the plain addition operator on the same rows and prompts (same layer, coefficient, direction)
    add = OPS["addition"]
    add_cells = [Cell(f"add{i}", "steer", "tiny", 0, {"mode": "addition", "layer": ADD_LAYER, "coefficient": 4.0,
                                                      "alpha": 0.0, "direction_layer": ADD_LAYER, "control": False})
                 for i in range(len(PROMPTS))]
    add_edits, _ = _edited(lm, ids, mask, {"addition": [(i, c, add.resolve(c, d)) for i, c in enumerate(add_cells)]}, d)
    base, plain, cast = _logits(lm, ids, mask, {}), _logits(lm, ids, mask, add_edits), _logits(lm, ids, mask, edits)
    g_base, g_plain = _greedy(lm, ids, mask, {}), _greedy(lm, ids, mask, add_edits)
    g_cast = _greedy(lm, ids, mask, edits)
    for i, f in enumerate(fired):
        if f:
            assert torch.equal(cast[i], plain[i]) and torch.equal(g_cast[i], g_plain[i])
            assert (cast[i] - base[i]).abs().max() > 1e-3
        else:
            assert torch.equal(cast[i], base[i]) and torch.equal(g_cast[i], g_base[i])
    # no gated row at all: no edit anywhere
    never = [(i, c, op.resolve(c, d)) for i, c in enumerate(_cell(i, 1.0) for i in range(len(PROMPTS)))]
    none_edits, _ = _edited(lm, ids, mask, {"conditional": never}, d)
    assert none_edits == {}


def test_control_keeps_the_gate_and_draws_a_norm_matched_behaviour_direction(lm):
    op, d = OPS["conditional"], _directions(lm)
    arm, ctl = op.resolve(_cell(0, 0.1), d), op.resolve(_cell(1, 0.1, control=True), d)
    assert np.array_equal(arm.condition, ctl.condition) and arm.threshold == ctl.threshold
    assert np.array_equal(ctl.vector, control_direction("cast1", d.vectors[ADD_LAYER]))
    assert np.isclose(np.linalg.norm(ctl.vector), np.linalg.norm(arm.vector), rtol=1e-5)
    assert np.array_equal(arm.vector, d.vectors[ADD_LAYER])


def test_ablation_behaviour_on_gated_rows(lm):
    """behavior: ablation: gated rows equal the directional ablation operator's rows, others the baseline."""
    op, d = OPS["conditional"], _directions(lm)
    t = _split_threshold(_reference_sims(lm, d))
    layers = list(range(lm.sites.n_layers))
    over = dict(behavior="ablation", layer=None, coefficient=0.0, alpha=1.0, direction_layer="best",
                ablation_layers=layers)
    cells = [_cell(i, t, **over) for i in range(len(PROMPTS))]
    ids, mask = encode(lm.tokenizer, PROMPTS)
    edits, chunk = _edited(lm, ids, mask, {"conditional": [(i, c, op.resolve(c, d)) for i, c in enumerate(cells)]}, d)
    fired = chunk.prefill["conditional"]["gate"].tolist()
    abl = OPS["ablation"]
    acells = [Cell(f"abl{i}", "steer", "tiny", 0, {"mode": "ablation", "layer": None, "coefficient": 0.0, "alpha": 1.0,
                                                   "direction_layer": "best", "control": False})
              for i in range(len(PROMPTS))]
    aedits, _ = _edited(lm, ids, mask, {"ablation": [(i, c, abl.resolve(c, d)) for i, c in enumerate(acells)]}, d)
    base, plain, cast = _logits(lm, ids, mask, {}), _logits(lm, ids, mask, aedits), _logits(lm, ids, mask, edits)
    assert any(fired) and not all(fired)
    for i, f in enumerate(fired):
        assert torch.equal(cast[i], plain[i] if f else base[i])


def test_mixed_chunk_batched_equals_unbatched(lm):
    """CAST rows (gated and not) beside addition, ablation and baseline rows: every other row is bit-identical
    to the same chunk without CAST, and each CAST row equals itself run alone (gate and logits)."""
    op, d = OPS["conditional"], _directions(lm)
    prompts = PROMPTS * 2
    sims = _reference_sims(lm, d)
    t = _split_threshold(sims)
    ids, mask = encode(lm.tokenizer, prompts)
    cast_rows = [(i, c, op.resolve(c, d)) for i, c in ((i, _cell(i, t)) for i in range(4))]   # rows 0-3
    add, abl = OPS["addition"], OPS["ablation"]
    ac = Cell("add", "steer", "tiny", 0, {"mode": "addition", "layer": 0, "coefficient": -2.0, "alpha": 0.0,
                                          "direction_layer": 0, "control": True})
    bc = Cell("abl", "steer", "tiny", 0, {"mode": "ablation", "layer": None, "coefficient": 0.0, "alpha": 1.0,
                                          "direction_layer": "best", "control": False})
    others = {"addition": [(4, ac, add.resolve(ac, d)), (5, ac, add.resolve(ac, d))],
              "ablation": [(6, bc, abl.resolve(bc, d))]}                                        # row 7: baseline
    mixed_edits, chunk = _edited(lm, ids, mask, {**others, "conditional": cast_rows}, d)
    without, _ = _edited(lm, ids, mask, others, d)
    mixed, ref = _logits(lm, ids, mask, mixed_edits), _logits(lm, ids, mask, without)
    for i in range(4, 8):
        assert torch.equal(mixed[i], ref[i])
    fired = chunk.prefill["conditional"]["gate"].tolist()
    assert fired[:4] == [s > t for s in sims] and fired[4:] == [False] * 4
    for i, cell, _ in cast_rows:
        one_ids, one_mask = encode(lm.tokenizer, [prompts[i]])
        alone_edits, alone_chunk = _edited(lm, one_ids, one_mask, {"conditional": [(0, cell, op.resolve(cell, d))]}, d)
        assert alone_chunk.prefill["conditional"]["gate"].tolist() == [fired[i]]
        sim_alone, sim_mixed = alone_chunk.prefill["conditional"]["sim"][0], chunk.prefill["conditional"]["sim"][i]
        assert abs(float(sim_alone) - float(sim_mixed)) <= 1e-6
        alone = _logits(lm, one_ids, one_mask, alone_edits)
        L = one_ids.shape[1]
        assert (mixed[i, -L:] - alone[0]).abs().max() <= 1e-4


def test_edits_without_prefill_refuse_to_steer_every_row(lm):
    op, d = OPS["conditional"], _directions(lm)
    cell = _cell(0, 0.0)
    with pytest.raises(RuntimeError, match="no prefill"):
        op.edits([(0, cell, op.resolve(cell, d))], Chunk(n=1, d_model=lm.sites.d_model, n_layers=3), d)
    assert op.edits([], Chunk(n=1, d_model=lm.sites.d_model, n_layers=3), d) == {}


def test_zero_condition_direction_is_a_skip_reason(lm):
    op, d = OPS["conditional"], _directions(lm)
    d.vectors[CL] = np.zeros_like(d.vectors[CL])
    with pytest.raises(LookupError, match="condition direction at layer 1 .* is zero"):
        op.resolve(_cell(0, 0.0), d)


# -- config and arms -------------------------------------------------------------------------------------


def test_arms_grid():
    class _Spec:
        class stages:
            select = None

    op = OPS["conditional"]
    block = ConditionalArm(condition_layers=[1, 2], thresholds=[0.1, 0.2, 0.3], layers=[0, 2], coefficients=[1.0, 2.0])
    arms = op.arms(_Spec, block, 3)
    assert len(arms) == 2 * 3 * 2 * 2
    assert {(a["condition_layer"], a["threshold"]) for a in arms} == {(c, t) for c in (1, 2) for t in (0.1, 0.2, 0.3)}
    assert all(a["mode"] == "conditional" and a["behavior"] == "addition" and a["layer"] == a["direction_layer"]
               for a in arms)
    default = op.arms(_Spec, ConditionalArm(condition_layers=[2], thresholds=[0.5]), 3)
    assert [(a["layer"], a["coefficient"]) for a in default] == [(2, 1.0)]   # the condition layer, c = 1
    abl = op.arms(_Spec, ConditionalArm(condition_layers=[1], thresholds=[0.5], behavior="ablation",
                                        alphas=[1.0, 0.5]), 3)
    assert [(a["alpha"], a["ablation_layers"], a["direction_layer"]) for a in abl] == [(1.0, [0, 1, 2], "best"),
                                                                                       (0.5, [0, 1, 2], "best")]
    assert op.capability_arms(_Spec, block, 3) == op.arms(_Spec, block, 3)   # its steering arms
    assert op.capability_arms(_Spec, None, 3) == [] and op.in_default_capability(_Spec, block)
    assert not op.in_default_capability(_Spec, None)


@pytest.mark.parametrize("kw, message", [
    (dict(condition_layers=[1], thresholds=[1.5]), "thresholds [1.5] outside [-1, 1] (the similarity is a cosine)"),
    (dict(condition_layers=[1], thresholds=[0.1], coefficients=[0.0]),
     "coefficient 0 is the baseline arm: leave it out"),
    (dict(condition_layers=[1], thresholds=[0.1], alphas=[1.0]),
     "alphas: not used with behavior 'addition' (alphas, ablation_layers, direction_layer are for behavior ablation)"),
    (dict(condition_layers=[1], thresholds=[0.1], behavior="ablation", layers=[1]),
     "layers: not used with behavior 'ablation' (layers, coefficients are for behavior addition)"),
    (dict(condition_layers=[], thresholds=[0.1]), "List should have at least 1 item"),
    (dict(condition_layers=[1], thresholds=[0.1], comparator="larger"), "Input should be 'above' or 'below'"),
    (dict(condition_layers=[1], thresholds=[0.1], aggregation="max"), "Input should be 'mean' or 'last'"),
    (dict(thresholds=[0.1]), "condition_layers\n  Field required"),
])
def test_bad_config_errors(kw, message):
    with pytest.raises(ValidationError) as e:
        ConditionalArm(**kw)
    assert message in str(e.value)


# -- end to end through stage steer ----------------------------------------------------------------------


def test_run_steer_gates_per_prompt(lm):
    """Through run_steer: a CAST arm's completions equal the baseline's on prompts below the threshold and the
    plain addition arm's on prompts above it; its control keeps the gate; its rows carry the gate columns."""
    from refusal_ray.data import PromptSet
    from refusal_ray.stages.steer import run_steer

    d = _directions(lm)
    sims = _reference_sims(lm, d)
    t = _split_threshold(sims)
    prompts = {"harmful": PromptSet(["a", "b"], PROMPTS[:2], [None, None]),
               "harmless": PromptSet(["c", "d"], PROMPTS[2:], [None, None])}
    base = {"layer": None, "coefficient": 0.0, "alpha": 0.0, "direction_layer": None, "control": False}
    plain = {"mode": "addition", "layer": ADD_LAYER, "coefficient": 4.0, "alpha": 0.0, "direction_layer": ADD_LAYER}
    cells = [Cell("base", "steer", "tiny", 0, {**base, "mode": "baseline"}),
             Cell("add", "steer", "tiny", 0, {**plain, "control": False}),
             Cell("addc", "steer", "tiny", 0, {**plain, "control": True}),
             _cell(0, t), _cell(1, t, control=True)]
    arms, comps = run_steer(lm, cells, prompts, d, max_new_tokens=6, batch_size=64)
    text = {(c["cell_id"], c["prompt_id"]): c["completion"] for c in comps}
    ids = ["a", "b", "c", "d"]
    fired = [s > t for s in sims]
    assert any(fired) and not all(fired)
    for pid, f in zip(ids, fired):
        assert text[("cast0", pid)] == text[("add" if f else "base", pid)]
    # the control: same gate; ungated prompts are the baseline's (its gated ones use a random direction)
    for pid, f in zip(ids, fired):
        if not f:
            assert text[("cast1", pid)] == text[("base", pid)]
    mine = [a for a in arms if a["mode"] == "conditional"]
    assert len(mine) == 4
    for a in mine:
        assert (a["condition_layer"], a["threshold"], a["behavior"], a["comparator"]) == (CL, t, "addition", "above")
        assert a["layer"] == ADD_LAYER and a["direction_layer"] == ADD_LAYER
        assert np.isclose(a["vector_norm"], np.linalg.norm(d.vectors[ADD_LAYER]), rtol=1e-5)
    # batch size 1 (each row its own generate call, its own prefill) gives the same completions
    _, single = run_steer(lm, cells, prompts, d, max_new_tokens=6, batch_size=1)
    assert [c["completion"] for c in single] == [c["completion"] for c in comps]


# -- through the spec (exit 2, one line naming file and field) -------------------------------------------

SPEC_CASES = [
    ("condition_layer_range", {"condition_layers": [7], "thresholds": [0.1]}, {},
     "stages.steer.conditional.condition_layers: layer 7 out of range: model 'tiny' has 3 layers (0..2)"),
    ("threshold_range", {"condition_layers": [1], "thresholds": [2.0]}, {},
     "stages.steer.conditional.thresholds: thresholds [2.0] outside [-1, 1] (the similarity is a cosine)"),
    ("selected_needs_select", {"condition_layers": [1], "thresholds": [0.1], "behavior": "ablation",
                               "direction_layer": "selected"}, {},
     "stages.steer.conditional.direction_layer 'selected' needs a stages.select block "
     "(or direction_layer: best / a layer)"),
]


def _spec_file(tmp_path, model_path, block: dict, stages: dict):
    import yaml
    from test_bad_input import base_spec

    spec = base_spec(model_path)
    spec["stages"]["steer"]["conditional"] = block
    spec["stages"].update(stages)
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    return f


@pytest.mark.parametrize("case,block,stages,message", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_bad_spec_exits_2(case, block, stages, message, tmp_path, tiny_qwen_path):
    from typer.testing import CliRunner

    from refusal_ray.cli import app

    f = _spec_file(tmp_path, tiny_qwen_path, block, stages)
    result = CliRunner().invoke(app, ["validate", str(f)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {f}: {message}"


def test_spec_arms_and_plan_line(tmp_path, tiny_qwen_path):
    from typer.testing import CliRunner

    from refusal_ray.cli import app
    from refusal_ray.spec import load_spec
    from refusal_ray.stages.steer import steer_params

    f = _spec_file(tmp_path, tiny_qwen_path, {"condition_layers": [1, 2], "thresholds": [0.1, 0.5]}, {})
    arms = [a for a in steer_params(load_spec(f), 3) if a["mode"] == "conditional"]
    assert [(a["condition_layer"], a["threshold"], a["control"]) for a in arms] == [
        (c, t, ctl) for c in (1, 2) for t in (0.1, 0.5) for ctl in (False, True)]
    result = CliRunner().invoke(app, ["plan", str(f)])
    assert result.exit_code == 0, result.output
    assert ("conditional (CAST): gate cos(h_mean, tanh(P h)) above thresholds [0.1, 0.5] at resid_pre of condition "
            "layers [1, 2]; addition at layers the condition layer, coefficients [1.0]") in result.output


def test_summary_columns_read_the_first_setting():
    import pandas as pd

    rows = [("baseline", False, None, None, "harmful", 0.9), ("baseline", False, None, None, "harmless", 0.1)]
    for t, harm, safe in ((0.1, 0.95, 0.3), (0.5, 0.92, 0.15)):
        rows += [("conditional", False, 1, t, "harmful", harm), ("conditional", False, 1, t, "harmless", safe),
                 ("conditional", True, 1, t, "harmful", 0.91), ("conditional", True, 1, t, "harmless", 0.12)]
    a = pd.DataFrame(rows, columns=["mode", "control", "condition_layer", "threshold", "prompt_set", "rate"])
    a["layer"], a["coefficient"], a["alpha"], a["direction_layer"], a["direction_position"] = 1, 2.0, 0.0, 1, -1
    a["behavior"] = "addition"
    out = OPS["conditional"].summary_columns(a, {}, None)
    assert out["conditional_induction"] == pytest.approx(0.3 - 0.1)
    assert out["conditional_induction_vs_control"] == pytest.approx(0.3 - 0.12)
    assert out["conditional_suppression"] == pytest.approx(0.9 - 0.95)
    assert out["conditional_suppression_vs_control"] == pytest.approx(0.91 - 0.95)
    assert "threshold=0.1" in out["conditional_setting"] and "condition_layer=1" in out["conditional_setting"]


def test_end_to_end_through_run_local(tmp_path):
    """A toy sweep (toy-qwen-xs) with CAST arms at thresholds -1 (every prompt gated) and 1 (none) beside the
    plain addition arm of the same layer and coefficient: the first's completions are the addition arm's, the
    second's the baseline's; every cell is done and the rows carry the gate settings."""
    import yaml

    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan

    from conftest import TOY_MODELS, TOY_PROMPTS

    spec = {"name": "cast", "models": [{"name": "qwen-xs", "path": str(TOY_MODELS / "toy-qwen-xs")}],
            "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                     "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")},
                     "n_train": 6, "n_val": 4, "n_test": 3},
            "seeds": [0],
            "stages": {"directions": {}, "steer": {
                "addition": {"layers": [1], "coefficients": [3.0]}, "ablation": None,
                "conditional": {"condition_layers": [1], "thresholds": [-1.0, 1.0], "layers": [1],
                                "coefficients": [3.0]}}},
            "generation": {"max_new_tokens": 6},
            "decision_rule": {"steering_labels": {"strong": 0.5, "weak": 0.2},
                              "control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                                                 "addition_coefficient": 3.0, "ablation_alpha": 1.0}}}
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    out = run_local(make_plan(str(f)), log=lambda *a: None)
    cells = {c["cell_id"]: c for c in out["cells"]}
    assert all(c["status"] == "done" for c in cells.values()), [c.get("error") for c in cells.values()]
    rows = [r for r in out["steering"] if r["mode"] == "conditional"]
    assert sorted((r["threshold"], bool(r["control"]), r["prompt_set"]) for r in rows) == sorted(
        (t, c, s) for t in (-1.0, 1.0) for c in (False, True) for s in ("harmful", "harmless"))
    assert all(r["condition_layer"] == 1 and r["behavior"] == "addition" and r["layer"] == 1 for r in rows)
    arm_of = {r["cell_id"]: r for r in out["steering"]}

    def texts(pick) -> dict:
        return {(c["prompt_set"], c["prompt_id"]): c["completion"] for c in out["completions"]
                if pick(arm_of[c["cell_id"]])}

    base = texts(lambda r: r["mode"] == "baseline")
    plain = texts(lambda r: r["mode"] == "addition" and not r["control"])
    always = texts(lambda r: r["mode"] == "conditional" and r["threshold"] == -1.0 and not r["control"])
    never = texts(lambda r: r["mode"] == "conditional" and r["threshold"] == 1.0 and not r["control"])
    never_ctl = texts(lambda r: r["mode"] == "conditional" and r["threshold"] == 1.0 and r["control"])
    assert len(base) == 6 and always == plain and never == base and never_ctl == base
    assert plain != base   # the addition does something here


def test_completion_and_group_columns(lm):
    """Per-row gate columns from the prefill state, and the steering row's gate rate from them."""
    op, d = OPS["conditional"], _directions(lm)
    sims = _reference_sims(lm, d)
    t = _split_threshold(sims)
    ids, mask = encode(lm.tokenizer, PROMPTS)
    rows = [(i, c, op.resolve(c, d)) for i, c in enumerate(_cell(i, t) for i in range(len(PROMPTS)))]
    pre = op.prefill(lm, ids, mask, rows, d)
    cols = [op.completion_columns(pre, i) for i in range(len(PROMPTS))]
    assert [c["gate"] for c in cols] == [s > t for s in sims]
    assert np.allclose([c["condition_similarity"] for c in cols], sims, atol=1e-5)
    fired = sum(s > t for s in sims)
    assert op.group_columns(cols) == {"gate_rate": fired / len(PROMPTS), "gate_n": fired}
    # rows of other operators in the chunk: no similarity, no gate
    pre = op.prefill(lm, ids, mask, rows[:1], d)
    assert op.completion_columns(pre, 2) == {"gate": False, "condition_similarity": None}
