"""The published studies as specs (sweeps/*.yaml) and their toy twins (sweeps/toy/*.yaml).

- every real spec is schema-valid, starts with a header naming the study and saying where our method
  differs, points at the user's own prompt files (relative paths) and at hub models only, and its layer
  indices fit the published depths of its models;
- every toy twin has the real spec's stage blocks and options, except models, data, sizes, layer indices
  and a short explicit allow-list (`ALLOWED`, each entry with its reason);
- every toy twin runs end to end in this process (`run_local`), with no failed or skipped cell, and the
  tables its study reads are there; what its study reports equals an independent recomputation from the
  stored rows: both verdicts and the layers they read (exact fractions of the completions' labels,
  `expected_verdicts`), the selection (filters and criterion, tests/test_e2e.py `check_selection`),
  scrubbing faithfulness exp(-mean KL), patching recovery and the top component, the subspace columns;
- `refusal-ray validate` on a real spec without the hub exits 0 and names each model it could not check.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, TOY_PROMPTS, make_tiny
from test_e2e import check_selection

SWEEPS = REPO / "sweeps"
TOY = SWEEPS / "toy"
CLI = REPO / ".venv" / "bin" / "refusal-ray"

STUDIES = ["scale_audit", "scale_audit_wide", "qwen1_8b_replication", "llama32_subspace",
           "preregistered_replication"]

# What a toy twin may change (dotted paths of the specs' dumps, every default filled in; `*` matches one
# key or list index). Everything else must be equal to the real spec's.
ALLOWED = {
    "name": "the store's name",
    # models and data: checked by `_model_options` and `_data_options` below
    "data.harmful.path": "toy prompts",
    "data.harmless.path": "toy prompts",
    "data.harmless.reference_column": "the toy harmless prompts have checkable answers",
    "data.n_train": "size", "data.n_val": "size", "data.n_test": "size",
    "stages.patch.n_pairs": "size", "stages.scrub.n_pairs": "size",
    "stages.capability.text.n": "size", "stages.capability.lm_eval.limit": "size",
    "generation.max_new_tokens": "size",
    "stages.select.layers": "layer indices", "stages.steer.addition.layers": "layer indices",
    "stages.steer.ablation.layers": "layer indices", "stages.steer.subspace.layers": "layer indices",
    "stages.steer.subspace.ablation_layers": "layer indices", "stages.patch.layers": "layer indices",
    "stages.scrub.hypotheses.*.protected": "layer indices (site patterns)",
    "stages.scrub.scrubbed": "layer indices (site patterns)",
    "stages.capability.text.path": "the toy held-out conversations",
    "stages.capability.lm_eval.tasks": "the local toy task instead of registry tasks (hub data)",
    "stages.capability.lm_eval.include_path": "the local toy task's folder",
    "stages.select.kl_max": "the paper's 0.1 drops every toy candidate (README: Direction selection)",
}
MODEL_SOURCE = {"name", "path", "hub_id", "revision", "dtype"}   # may differ; other model options may not


def _flatten(obj, prefix: str = "") -> dict:
    """{dotted path: value} of a dump; lists of dicts are walked by index, other lists are values."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out or {prefix[:-1]: {}}
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        out = {f"{prefix}len": len(obj)}
        for i, v in enumerate(obj):
            out |= _flatten(v, f"{prefix}{i}.")
        return out
    return {prefix[:-1]: obj}


def _allowed(path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, pat) for pat in ALLOWED)


def _dump(spec) -> dict:
    return spec.model_dump(mode="json")


def _model_options(spec) -> list[dict]:
    """Every model's options other than its source and dtype, deduplicated (a twin may have fewer models)."""
    seen = []
    for m in _dump(spec)["models"]:
        opts = {k: v for k, v in m.items() if k not in MODEL_SOURCE}
        if opts not in seen:
            seen.append(opts)
    return seen


def structure_diff(real, toy) -> list[str]:
    """The differences between a real spec and its twin outside the allow-list: stage blocks present in
    one only, options that differ, model options other than the source, and the prompt files' columns
    (pairing and splits: the toy harmless file may add a reference column)."""
    problems = []
    stages = lambda s: sorted(k for k, v in _dump(s)["stages"].items() if v is not None)   # noqa: E731
    if stages(real) != stages(toy):
        problems.append(f"stage blocks: {stages(real)} != {stages(toy)}")
    a = {k: v for k, v in _flatten(_dump(real)).items() if not k.startswith("models.")}
    b = {k: v for k, v in _flatten(_dump(toy)).items() if not k.startswith("models.")}
    for path in sorted(a.keys() | b.keys()):
        if _allowed(path):
            continue
        if path not in a or path not in b:
            problems.append(f"{path}: only in the {'real spec' if path in a else 'twin'}")
        elif a[path] != b[path]:
            problems.append(f"{path}: {a[path]!r} != {b[path]!r}")
    if [o for o in _model_options(toy) if o not in _model_options(real)]:
        problems.append(f"model options: {_model_options(real)} != {_model_options(toy)}")
    return problems


def _load(path: Path):
    from refusal_ray.spec import load_spec

    return load_spec(path)


def _header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


# -- the real specs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("study", STUDIES)
def test_real_spec_is_valid_and_names_its_study(study):
    path = SWEEPS / f"{study}.yaml"
    spec = _load(path)
    header = _header(path)
    assert header.startswith("# Study: "), header[:80]
    assert "Reproduces" in header and "differ" in header, header
    assert "prompts/harmful.jsonl" in header and "prompts/harmless.jsonl" in header
    assert spec.name == study
    # the user's own prompt files, relative to where the sweep is run; hub checkpoints only
    for cls in ("harmful", "harmless"):
        assert getattr(spec.data, cls).path == f"prompts/{cls}.jsonl"
    for m in spec.models:
        assert m.path is None and m.hub_id and m.dtype == "bfloat16" and not m.trust_remote_code, m
    cap = spec.stages.capability
    if cap is not None:
        assert cap.text.path == "prompts/heldout.jsonl" and "prompts/heldout.jsonl" in header


# published depths (config.json: num_hidden_layers) of the checkpoints the specs name
DEPTH = {"Qwen/Qwen2-0.5B-Instruct": 24, "Qwen/Qwen2.5-0.5B-Instruct": 24, "Qwen/Qwen2.5-1.5B-Instruct": 28,
         "Qwen/Qwen2.5-3B-Instruct": 36, "Qwen/Qwen1.5-1.8B-Chat": 24, "meta-llama/Llama-3.2-1B-Instruct": 16,
         "google/gemma-3-1b-it": 26}


@pytest.mark.parametrize("study", STUDIES)
def test_real_spec_layers_fit_every_model(study):
    """What `validate` checks against each model's config, done here against the published depths
    (offline the hub configs cannot be read)."""
    from refusal_ray.models.patterns import expand

    spec = _load(SWEEPS / f"{study}.yaml")
    depth = min(DEPTH[m.hub_id] for m in spec.models)
    layers = []
    steer = spec.stages.steer
    if steer is not None and steer.subspace is not None and steer.subspace.layers:
        layers += steer.subspace.layers
    for block in (steer.addition if steer else None, steer.ablation if steer else None, spec.stages.select,
                  spec.stages.patch):
        if block is not None and block.layers != "all":
            layers += block.layers
    assert all(0 <= layer < depth for layer in layers), (layers, depth)
    if spec.stages.scrub is not None:
        for h in spec.stages.scrub.hypotheses:
            expand(h.protected, depth, 64)       # raises PatternError for a layer out of range


def test_qwen_replication_uses_arditis_prompt_format():
    """Arditi et al.'s QWEN_CHAT_TEMPLATE: no system turn; the toy family's own template is the same text."""
    from jinja2 import Template

    spec = _load(SWEEPS / "qwen1_8b_replication.yaml")
    template = spec.models[0].chat_template
    text = Template(template).render(messages=[{"role": "user", "content": "INSTRUCTION"}],
                                     add_generation_prompt=True)
    assert text == "<|im_start|>user\nINSTRUCTION<|im_end|>\n<|im_start|>assistant\n"
    assert (REPO / "data/models/toy-qwen-s/chat_template.jinja").read_text() == template


# -- the twins' structure --------------------------------------------------------------------------------

@pytest.mark.parametrize("study", STUDIES)
def test_toy_twin_has_the_real_specs_stages_and_options(study):
    real, toy = _load(SWEEPS / f"{study}.yaml"), _load(TOY / f"{study}.yaml")
    assert structure_diff(real, toy) == []
    assert _header(TOY / f"{study}.yaml").startswith(f"# Toy twin of sweeps/{study}.yaml")
    for m in toy.models:
        assert m.path and m.path.startswith("data/models/toy-"), m
    for cls in ("harmful", "harmless"):
        assert getattr(toy.data, cls).path == f"data/prompts/toy/{cls}.jsonl"
    assert 16 <= toy.data.n_train <= 32 and 8 <= toy.data.n_val <= 16 and 8 <= toy.data.n_test <= 16
    assert toy.generation.max_new_tokens <= 16
    if toy.stages.capability is not None and toy.stages.capability.lm_eval is not None:
        assert toy.stages.capability.lm_eval.tasks == ["toy_choice"]
        assert toy.stages.capability.lm_eval.include_path == "tests/lmeval"


def test_structure_diff_sees_what_it_must():
    """The helper is not vacuous: a changed option, a dropped stage block and a changed model option are
    reported; an allowed difference is not."""
    from refusal_ray.spec import Spec

    real = _load(SWEEPS / "llama32_subspace.yaml")
    toy = _dump(_load(TOY / "llama32_subspace.yaml"))

    def changed(**edits):
        d = yaml.safe_load(yaml.safe_dump(toy))
        for path, value in edits.items():
            *keys, last = path.split(".")
            node = d
            for k in keys:
                node = node[int(k)] if isinstance(node, list) else node[k]
            node[last] = value
        return structure_diff(real, Spec.model_validate(d))

    assert changed() == []
    assert changed(**{"data.n_test": 12, "stages.steer.subspace.layers": [2, 3]}) == []
    assert changed(**{"stages.steer.controls": False}) == ["stages.steer.controls: True != False"]
    assert changed(**{"stages.select.criterion": "swing"}) == ["stages.select.criterion: 'bypass' != 'swing'"]
    assert changed(**{"stages.capability.arms": ["baseline", "ablation", "subspace"]}) == [
        "stages.capability.arms: ['baseline', 'ablation', 'subspace', 'orthogonalized', 'orthogonalized_subspace'] != "
        "['baseline', 'ablation', 'subspace']"]
    assert changed(**{"stages.capability": None})[0].startswith("stage blocks:")
    assert changed(**{"models.0.chat_template": "{{ messages[0]['content'] }}"})[0].startswith("model options:")
    assert changed(**{"data.harmful.split_column": None}) == ["data.harmful.split_column: 'split' != None"]


# -- the twins end to end --------------------------------------------------------------------------------

def _run_twin(study: str, tmp_path: Path, monkeypatch) -> tuple[dict, pd.DataFrame]:
    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan
    from refusal_ray.runner import freeze_manifest
    from refusal_ray.store import Store
    from refusal_ray.analysis.summary import write_summary

    monkeypatch.chdir(REPO)                        # the twins' paths are relative to the repository
    plan = make_plan(TOY / f"{study}.yaml")
    store = Store(tmp_path / "out")
    freeze_manifest(plan, store)
    out = run_local(plan, store, log=lambda m: None)
    cells = pd.DataFrame(out["cells"])
    bad = cells[cells["status"] != "done"]
    assert bad.empty, bad[["model", "stage", "status", "error"]].to_string()
    assert len(cells) == len(plan.cells)
    return {k: pd.DataFrame(v) for k, v in out.items()}, write_summary(store.uri)


def _models(study: str) -> set[str]:
    return {m.name for m in _load(TOY / f"{study}.yaml").models}


def _per_model_seed(df: pd.DataFrame, study: str) -> None:
    """Rows for every (model, seed) of the twin."""
    spec = _load(TOY / f"{study}.yaml")
    want = {(m.name, s) for m in spec.models for s in spec.seeds}
    assert set(map(tuple, df[["model", "seed"]].drop_duplicates().to_numpy())) == want


def _pooled(t: dict, model: str, prompt_set: str, **arm) -> Fraction | None:
    """One arm's refusal rate pooled over seeds, recomputed from the completions as an exact fraction
    (per prompt the mean label over the seeds that judged it, then the mean over prompts; the
    summary's definition, refusal_ray.stats.prompt_pooled_rate); None when the arm has no rows."""
    st = t["steering"]
    st = st[(st["model"] == model) & (st["prompt_set"] == prompt_set)]
    for k, v in arm.items():
        if k == "control":
            st = st[st[k].astype(bool) == v]
        elif v is None:
            st = st[st[k].isna()]
        elif isinstance(v, str):
            st = st[st[k] == v]
        else:
            st = st[np.isclose(st[k].astype(float), float(v))]
    c = t["completions"]
    c = c[(c["model"] == model) & c["cell_id"].isin(set(st["cell_id"])) & (c["prompt_set"] == prompt_set)]
    if c.empty:
        return None
    per_prompt = [Fraction(int(y.astype(bool).sum()), len(y)) for _, y in c.groupby("prompt_id")["refusal"]]
    return sum(per_prompt, Fraction(0)) / len(per_prompt)


def _best_layer(t: dict, model: str, position: int) -> int:
    """Highest mean separation over seeds at resid_pre and the steering position (ties: the lower layer)."""
    d = t["directions"]
    d = d[(d["model"] == model) & (d["site"] == "resid_pre") & (d["position"] == position)]
    sep = d.groupby("layer")["separation"].mean()
    return int(sep[sep == sep.max()].index.min())


def _nearest(best: int, layers) -> int | None:
    layers = sorted({int(x) for x in layers})
    return min(layers, key=lambda x: (abs(x - best), x)) if layers else None


def expected_verdicts(t: dict, spec, model: str) -> dict:
    """Both verdicts of one model recomputed from the stored rows by the rules' definitions
    (refusal_ray/analysis/summary.py docstring; DESIGN.md), in exact fractions: the steering label from
    the addition curve at the steered layer nearest the best one, the control margin from the baseline,
    the ablation arm of the direction most seeds ablated (ties: the lower layer, then the later
    position) and the addition arm at the rule's coefficient, each against its random control."""
    rule = spec.decision_rule.model_dump()
    cm, sl = rule.get("control_margin"), rule.get("steering_labels")
    best = _best_layer(t, model, spec.stages.steer.position)
    st = t["steering"][t["steering"]["model"] == model]
    add = st[(st["mode"] == "addition") & ~st["control"].astype(bool)]
    base_harm, base_safe = (_pooled(t, model, p, mode="baseline") for p in ("harmful", "harmless"))
    out = {"best_layer": best}
    if sl is not None:
        label_layer = _nearest(best, add["layer"])
        coefs = sorted(set(add.loc[add["layer"] == label_layer, "coefficient"].astype(float))) if label_layer is not None else []
        pos = [_pooled(t, model, "harmless", mode="addition", layer=label_layer, coefficient=c, control=False)
               for c in coefs if c > 0]
        neg = [_pooled(t, model, "harmful", mode="addition", layer=label_layer, coefficient=c, control=False)
               for c in coefs if c < 0]
        strong, weak = Fraction(str(sl["strong"])), Fraction(str(sl["weak"]))
        if base_harm is None or base_safe is None or not pos or not neg:
            label = "INCOMPLETE"
        else:
            induce, suppress = max(pos) - base_safe, base_harm - min(neg)
            label = ("works-fully" if induce >= strong and suppress >= strong else
                     "amplify-only" if induce >= weak and suppress < weak else
                     "works-partially" if induce >= weak or suppress >= weak else "fails")
        out |= {"label_layer": label_layer, "verdict_steering_labels": label}
    if cm is not None:
        alpha, coef = float(cm["ablation_alpha"]), float(cm["addition_coefficient"])
        abl = st[(st["mode"] == "ablation") & np.isclose(st["alpha"].astype(float), alpha)]
        main = abl[~abl["control"].astype(bool)]
        abl_rate = abl_ctl = None
        if not main.empty:
            seeds = main.groupby(["direction_layer", "direction_position"])["seed"].nunique().reset_index()
            seeds = seeds.sort_values(["seed", "direction_layer", "direction_position"], ascending=[False, True, False])
            layer, position = seeds.iloc[0][["direction_layer", "direction_position"]]
            mine = dict(mode="ablation", alpha=alpha, direction_layer=layer, direction_position=position)
            abl_rate = _pooled(t, model, "harmful", control=False, **mine)
            abl_ctl = _pooled(t, model, "harmful", control=True, **mine)
        add_layer = _nearest(best, add.loc[np.isclose(add["coefficient"].astype(float), coef), "layer"])
        add_rate = add_ctl = None
        if add_layer is not None:
            where = dict(mode="addition", layer=add_layer, coefficient=coef)
            add_rate = _pooled(t, model, "harmless", control=False, **where)
            add_ctl = _pooled(t, model, "harmless", control=True, **where)
        if base_harm is None:
            verdict = "INCOMPLETE"
        elif base_harm < Fraction(str(cm["baseline_min"])):
            verdict = "NO-BASELINE-REFUSAL"
        elif None in (base_safe, abl_rate, abl_ctl, add_rate, add_ctl):
            verdict = "INCOMPLETE"
        else:
            margin, ctl_margin = Fraction(str(cm["baseline_margin"])), Fraction(str(cm["control_margin"]))
            short = [name for name, vs_base, vs_ctl in (("ablation", base_harm - abl_rate, abl_ctl - abl_rate),
                                                        ("addition", add_rate - base_safe, add_rate - add_ctl))
                     if not (vs_base >= margin and vs_ctl >= ctl_margin)]
            verdict = "SUPPORTED" if not short else f"NOT-SUPPORTED ({', '.join(short)})"
        sel = t.get("selection")
        if (verdict == "INCOMPLETE" and spec.stages.select is not None and sel is not None
                and not sel[(sel["model"] == model) & sel["selected"].astype(bool)].shape[0]):
            verdict = "NO-SELECTION"
        out |= {"addition_layer": add_layer, "verdict_control_margin": verdict,
                "baseline_harmful_refusal": base_harm, "ablation_harmful_refusal": abl_rate}
    return out


def check_verdicts(t: dict, summary: pd.DataFrame, study: str) -> list[dict]:
    """The summary's verdicts and the layers they read equal `expected_verdicts` for every model."""
    spec = _load(TOY / f"{study}.yaml")
    assert set(summary["model"]) == _models(study)
    found = []
    for _, row in summary.iterrows():
        want = expected_verdicts(t, spec, row["model"])
        for k, v in want.items():
            got = row[k]
            if isinstance(v, Fraction):
                assert got == pytest.approx(float(v), abs=1e-12), (row["model"], k, got, v)
            elif v is None:
                assert got is None or pd.isna(got), (row["model"], k, got)
            else:
                assert got == v, (row["model"], k, got, v)
        found.append(want)
    return found


def check_scrubbing(t: dict, summary: pd.DataFrame) -> None:
    """Per row: mean KL = mean of its per-example KLs, faithfulness = exp(-mean KL), verdict against the
    threshold; per model and hypothesis the summary's faithfulness is exp(-mean KL over every example
    of every seed) and its verdict follows."""
    sc = t["scrubbing"]
    for _, r in sc.iterrows():
        kl = np.asarray(r["kl_per_example"], float)
        assert len(kl) == r["n_examples"] and (kl >= -1e-9).all()
        assert r["mean_kl"] == pytest.approx(float(kl.mean()), rel=1e-12, abs=1e-15)
        assert r["faithfulness"] == pytest.approx(float(np.exp(-kl.mean())), rel=1e-12, abs=0)
        assert r["verdict"] == ("FAITHFUL" if r["faithfulness"] >= r["threshold"] else "UNFAITHFUL")
    for (model, hyp), g in sc.groupby(["model", "hypothesis"]):
        faith = float(np.exp(-np.concatenate([np.asarray(v, float) for v in g["kl_per_example"]]).mean()))
        row = summary[summary["model"] == model].iloc[0]
        assert row[f"faithfulness[{hyp}]"] == pytest.approx(faith, rel=1e-12, abs=0), (model, hyp)
        assert row[f"verdict[{hyp}]"] == ("FAITHFUL" if faith >= float(g["threshold"].iloc[0]) else "UNFAITHFUL")


def check_patching(t: dict, summary: pd.DataFrame) -> None:
    """Recovery = (patched - corrupted) / (clean - corrupted) from each row's scores; the summary's top
    component is the component (attention or MLP output, or a z head) of highest mean recovery over
    pairs and seeds, and its rank correlation is Spearman's over the site means (scipy)."""
    from scipy.stats import spearmanr

    p = t["patching"]
    assert p["patched_score"].notna().all()                     # confirm_top_k null: every site patched
    want = (p["patched_score"] - p["corrupted_score"]) / (p["clean_score"] - p["corrupted_score"])
    np.testing.assert_allclose(p["recovery"].astype(float), want, rtol=1e-9, atol=1e-12)
    assert np.isfinite(p["attribution"].astype(float)).all()
    for model, g in p.groupby("model"):
        g = g.assign(head=g["head"].fillna(-1).astype(int))
        means = g.groupby(["site", "kind", "head"]).agg(recovery=("recovery", "mean"),
                                                          attribution=("attribution", "mean")).reset_index()
        comp = means[means["kind"].isin(["attn_out", "mlp_out", "z"])].sort_values("recovery", ascending=False)
        top = comp.iloc[0]
        name = top["site"] + ("" if top["head"] < 0 else f"[{int(top['head'])}]")
        row = summary[summary["model"] == model].iloc[0]
        assert row["top_component"] == name and row["top_recovery"] == pytest.approx(top["recovery"], abs=1e-12)
        rho = spearmanr(means["attribution"], means["recovery"]).statistic
        assert row["attribution_spearman"] == pytest.approx(rho, abs=1e-12), model


def _manifest(tmp_path: Path) -> dict:
    from refusal_ray.store import Store

    return Store(tmp_path / "out").read_json("manifest.json")


def test_toy_scale_audit_runs_all_four_stages(tmp_path, monkeypatch):
    t, summary = _run_twin("scale_audit", tmp_path, monkeypatch)
    for table in ("directions", "steering", "patching", "scrubbing"):
        _per_model_seed(t[table], "scale_audit")
    s = t["steering"]
    add = s[s["mode"] == "addition"]
    assert set(add["coefficient"]) == {-3, -2, -1, 1, 2, 3} and set(add["control"]) == {False, True}
    for model, n_layers in (("qwen-xs", 2), ("qwen-s", 4), ("qwen-m", 4)):   # addition at every layer
        assert set(add[add["model"] == model]["layer"]) == set(range(n_layers))
    assert set(s[s["mode"] == "ablation"]["control"]) == {False, True}
    p = t["patching"]
    kinds = {re.sub(r"^blocks\.\d+\.", "", site) for site in p["site"]}
    assert kinds == {"hook_resid_pre", "hook_attn_out", "hook_mlp_out", "attn.hook_z"}
    assert p.loc[p["site"].str.endswith("attn.hook_z"), "head"].notna().all()
    check_patching(t, summary)
    sc = t["scrubbing"]
    assert set(sc["hypothesis"]) == {"late-attn", "late-attn-mlp", "all-mlp", "nothing"}
    assert len(sc) == 4 * 3 * 2
    check_scrubbing(t, summary)
    # the best layer, both verdicts and the layers they read, recomputed from the stored rows
    found = check_verdicts(t, summary, "scale_audit")
    assert all(f["verdict_steering_labels"] != "INCOMPLETE" for f in found)   # every label is reached
    for _, row in summary.iterrows():
        d = t["directions"]
        d = d[(d["model"] == row["model"]) & (d["position"] == -1)]
        assert row["separation"] == pytest.approx(d.groupby("layer")["separation"].mean().max(), abs=1e-12)


def test_toy_scale_audit_wide_runs(tmp_path, monkeypatch):
    t, summary = _run_twin("scale_audit_wide", tmp_path, monkeypatch)
    _per_model_seed(t["steering"], "scale_audit_wide")
    s = t["steering"]
    assert set(s["mode"]) == {"baseline", "addition"}
    assert set(s.loc[s["mode"] == "addition", "coefficient"]) == {-20, -10, 10, 20}
    found = check_verdicts(t, summary, "scale_audit_wide")
    assert all(f["verdict_steering_labels"] != "INCOMPLETE" for f in found)
    assert {f["verdict_control_margin"] for f in found} <= {"INCOMPLETE", "NO-BASELINE-REFUSAL"}   # no ablation arm


def test_toy_qwen1_8b_replication_runs(tmp_path, monkeypatch):
    t, summary = _run_twin("qwen1_8b_replication", tmp_path, monkeypatch)
    for table in ("directions", "selection", "steering", "capability"):
        _per_model_seed(t[table], "qwen1_8b_replication")
    d = t["directions"]
    assert (d["pairing"] == "paired").all()
    zero = d["norm"] == 0                                  # layer 0 at template positions
    assert d.loc[zero, "sequential_cosine"].isna().all()
    assert d.loc[~zero, "sequential_cosine"].notna().all() and d.loc[~zero, "sequential_cosine"].min() > 0.999
    sel = t["selection"]
    manifest = _manifest(tmp_path)
    n_layers = {m: v["n_layers"] for m, v in manifest["models"].items()}
    check_selection(sel, n_layers, manifest["spec"]["stages"]["select"])
    assert sel.groupby("seed")["selected"].sum().eq(1).all()
    s = t["steering"]
    assert set(s.loc[s["mode"] == "ablation", "alpha"]) == {0.75, 1.0, 1.25}
    cap = t["capability"]
    assert set(cap["arm"]) == {"baseline", "ablation", "orthogonalized"}
    assert set(cap.loc[cap["arm"] == "ablation", "alpha"]) == {0.75, 1.0, 1.25}
    for arm in ("baseline", "ablation", "orthogonalized"):
        metrics = set(cap.loc[cap["arm"] == arm, "metric"])
        assert {"ce_loss", "first_token_kl", "refusal_harmful", "refusal_harmless",
                "lm_eval/toy_choice/acc"} <= metrics, (arm, metrics)
    found = check_verdicts(t, summary, "qwen1_8b_replication")
    assert all(f["verdict_control_margin"] not in ("INCOMPLETE", "NO-SELECTION") for f in found)


def test_toy_llama32_subspace_runs(tmp_path, monkeypatch):
    t, summary = _run_twin("llama32_subspace", tmp_path, monkeypatch)
    for table in ("directions", "selection", "steering", "capability"):
        _per_model_seed(t[table], "llama32_subspace")
    s = t["steering"]
    sub = s[s["mode"] == "subspace"]
    assert set(sub["direction"]) == {"L1,L2,L3/p-1"} and set(sub["control"]) == {False, True}
    assert (sub["subspace_rank"] >= 2).all()
    assert not s[(s["mode"] == "ablation")].empty
    cap = t["capability"]
    assert set(cap["arm"]) == {"baseline", "ablation", "subspace", "orthogonalized", "orthogonalized_subspace"}
    assert set(cap.loc[cap["arm"] == "subspace", "direction"]) == {"L1,L2,L3/p-1"}
    # the subspace projected out of the weights equals hook subspace ablation (same basis, every layer)
    main = cap[~cap["control"].astype(bool) & cap["metric"].isin(["ce_loss", "first_token_kl"])]
    hook = main[main["arm"] == "subspace"].set_index(["seed", "metric"])["value"]
    weights = main[main["arm"] == "orthogonalized_subspace"].set_index(["seed", "metric"])["value"]
    assert (hook - weights).abs().max() <= 1e-4
    assert set(cap.loc[cap["metric"] == "lm_eval/toy_choice/acc", "arm"]) == set(cap["arm"])
    # the subspace columns recomputed from the completions of the subspace arm (one subspace, every seed)
    spec = _load(TOY / "llama32_subspace.yaml")
    alphas = spec.stages.steer.subspace.alphas
    want_alpha = spec.decision_rule.control_margin.ablation_alpha
    alpha = want_alpha if want_alpha in alphas else alphas[0]
    seeds = len(spec.seeds)
    for _, row in summary.iterrows():
        rate = _pooled(t, row["model"], "harmful", mode="subspace", alpha=alpha, control=False)
        ctl = _pooled(t, row["model"], "harmful", mode="subspace", alpha=alpha, control=True)
        base = _pooled(t, row["model"], "harmful", mode="baseline")
        assert row["subspace"] == f"L1,L2,L3/p-1 ({seeds} of {seeds} seeds)"
        assert row["subspace_harmful_refusal"] == pytest.approx(float(rate), abs=1e-12)
        assert row["subspace_suppression"] == pytest.approx(float(base - rate), abs=1e-12)
        assert row["subspace_suppression_vs_control"] == pytest.approx(float(ctl - rate), abs=1e-12)
    check_verdicts(t, summary, "llama32_subspace")


def test_toy_preregistered_replication_runs(tmp_path, monkeypatch):
    t, summary = _run_twin("preregistered_replication", tmp_path, monkeypatch)
    for table in ("directions", "selection", "steering", "capability"):
        _per_model_seed(t[table], "preregistered_replication")
    sel = t["selection"]
    manifest = _manifest(tmp_path)
    n_layers = {m: v["n_layers"] for m, v in manifest["models"].items()}
    assert check_selection(sel, n_layers, manifest["spec"]["stages"]["select"]) == 2 * 2   # swing, every seed
    chosen = sel[sel["selected"]]
    assert len(chosen) == 2 * 2 and set(chosen["selected_by"]) == {"swing"}
    cap = t["capability"]
    assert set(cap["arm"]) == {"baseline", "addition", "ablation", "orthogonalized"}   # the default list
    # the pre-registered verdict is reached on every model; the labels are not pre-registered (c = 1 only)
    found = check_verdicts(t, summary, "preregistered_replication")
    assert all(f["verdict_control_margin"] not in ("INCOMPLETE", "NO-SELECTION") for f in found), found
    assert all(f["verdict_steering_labels"] == "INCOMPLETE" for f in found)


def test_preregistered_default_arms_leave_orthogonalized_out_for_gemma3(tmp_path, tokenizer_dir, monkeypatch):
    """The real spec lists no arms: on a gemma3_text model (post-norm, as google/gemma-3-1b-it) the default
    list has no orthogonalized arm; listing it explicitly is exit 2. A tiny random gemma3_text model stands
    in for the hub checkpoint."""
    from refusal_ray.errors import SpecError
    from refusal_ray.plan import make_plan

    gemma = make_tiny("gemma3_text", tokenizer_dir, tmp_path / "tiny-gemma3")
    raw = yaml.safe_load((TOY / "preregistered_replication.yaml").read_text())
    raw["models"][0] = {"name": "gemma3", "path": str(gemma)}
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(REPO)
    modes = {}
    for c in make_plan(f).cells:
        if c.stage == "capability":
            modes.setdefault(c.model, set()).add(c.params["mode"])
    assert modes == {"gemma3": {"baseline", "addition", "ablation"},
                     "qwen-s": {"baseline", "addition", "ablation", "orthogonalized"}}
    raw["stages"]["capability"]["arms"] = ["baseline", "ablation", "orthogonalized"]
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=r"stages\.capability\.arms: 'orthogonalized' cannot run on model 'gemma3'"):
        make_plan(f)


# -- validate without the hub ----------------------------------------------------------------------------

@pytest.mark.parametrize("study", STUDIES)
def test_validate_offline_names_every_unreachable_model(study, tmp_path):
    spec = _load(SWEEPS / f"{study}.yaml")
    (tmp_path / "prompts").mkdir()
    for name in ("harmful", "harmless", "heldout"):          # stand-ins for the user's files
        shutil.copy(TOY_PROMPTS / f"{name}.jsonl", tmp_path / "prompts" / f"{name}.jsonl")
    shutil.copy(SWEEPS / f"{study}.yaml", tmp_path / f"{study}.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}   # an empty cache
    env.pop("HF_HUB_CACHE", None)
    env.pop("TRANSFORMERS_CACHE", None)
    result = subprocess.run([str(CLI), "validate", f"{study}.yaml"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.startswith("could not check offline")]
    for i, m in enumerate(spec.models):
        assert any(f"models.{i} ({m.hub_id})" in ln for ln in lines), (m.hub_id, lines)
    assert len([ln for ln in lines if ln.startswith("could not check offline: models.")]) == len(spec.models)
    assert not (tmp_path / "outputs").exists()
