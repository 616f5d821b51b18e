"""Guard judges on harmless prompts (issue 18 item 7): a guard's stored label is "safe", a refusal proxy
on harmful prompts only. Rates and verdicts under a guard never read its harmless labels as refusals,
agreement is per prompt set (pooled only where both judges answer the same question), and
`--verdict-judge` refuses a judge that cannot judge the rule's arms. Synthetic stores, no Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import typing

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from refusal_ray.analysis.judgements import agreement, judge_labels, steering_under
from refusal_ray.analysis.summary import (arms_by_judge, read_context, judge_tables, render_judges, summarize, verdict_judge_error,
                                          write_summary)
from refusal_ray.judges.config import QUESTIONS, REFUSED, SAFE, JudgeSpec, question
from refusal_ray.store import Store
from test_summary import RULE, arms_for, tables

CLI = [sys.executable, "-m", "refusal_ray.cli"]
GUARD_MESSAGE = ("error: --verdict-judge: judge 'guard' cannot judge the decision rule's arms: control_margin's "
                 "addition arm and steering_labels' induction curve are judged on harmless prompts, where a guard "
                 "judge's label answers \"is the completion safe?\", not \"did the model refuse?\"")


def guard_safe(row) -> bool:
    """A guard's view: every harmless completion is safe (refused or not); a harmful completion is safe
    when the model refused it, and p7's (a mild completion) always is."""
    return row["prompt_set"] == "harmless" or bool(row["refusal"]) or row["prompt_id"] == "p7"


def judgement_rows(completions: pd.DataFrame, name: str, kind: str, label) -> list[dict]:
    return [{"judgement_id": f"{name}-{r['cell_id']}-{r['prompt_set']}-{r['prompt_id']}", "model": r["model"],
             "cell_id": r["cell_id"], "seed": int(r["seed"]), "prompt_set": r["prompt_set"],
             "prompt_id": r["prompt_id"], "judge": name, "judge_kind": kind, "judge_hash": f"h-{name}",
             "refusal": bool(label(r)), "compliance": None, "coherence": None, "score": None, "raw": None,
             "malformed": False, "error": None, "seconds": 0.0} for _, r in completions.iterrows()]


JUDGES = {"guard": ("guard", guard_safe), "guard2": ("guard", guard_safe),
          "strict": ("substring", lambda r: bool(r["refusal"]) and r["prompt_id"] != "p0")}


@pytest.fixture
def synthetic():
    steering, completions = tables(arms_for([12]), seeds=(0, 1))
    judgements = pd.DataFrame([row for name, (kind, label) in JUDGES.items()
                               for row in judgement_rows(completions, name, kind, label)])
    return steering, completions, judgements


def make_store(root, synthetic) -> Store:
    steering, completions, judgements = synthetic
    store = Store(root)
    store.write_json("manifest.json", {
        "decision_rule": RULE, "rule_hash": "abc", "models": {"m": {"params": 1000, "n_layers": 30}},
        "steer_position": -1, "spec": {"stages": {"steer": {}}},
        "judges": {n: {"kind": k, "hash": f"h-{n}", "config": {}} for n, (k, _) in JUDGES.items()}})
    store.write("directions", "m", [{"seed": s, "site": "resid_pre", "position": -1, "layer": L,
                                     "separation": 5.0 - abs(L - 12) / 10, "vector": np.ones(4, np.float32)}
                                    for s in (0, 1) for L in range(30)])
    store.write("steering", "m", steering.drop(columns="model").to_dict("records"))
    store.write("completions", "m", completions.drop(columns="model").to_dict("records"))
    store.write("judgements", "m", judgements.drop(columns="model").to_dict("records"))
    return store


def test_every_judge_kind_states_its_question_per_prompt_set():
    blocks = typing.get_args(typing.get_args(JudgeSpec)[0])           # the union's spec classes
    kinds = {typing.get_args(c.model_fields["kind"].annotation)[0] for c in blocks}
    assert set(QUESTIONS) == kinds == {"substring", "chat", "openai", "classifier", "guard"}
    for kind in kinds:
        assert question(kind, "harmful") == REFUSED
        assert question(kind, "harmless") == (SAFE if kind == "guard" else REFUSED)
    assert question(None, "harmless") == REFUSED          # an old store without judge_kind: as before
    with pytest.raises(ValueError, match="^unknown prompt set 'val'; known: harmful, harmless$"):
        question("guard", "val")


def test_the_defect_a_guard_read_as_refusal_everywhere(synthetic):
    """What a naive read of the guard's labels gives: harmless baseline refusal 1, so no induction."""
    steering, completions, judgements = synthetic
    base = steering[(steering["mode"] == "baseline")]["cell_id"]
    g = judgements[(judgements["judge"] == "guard") & judgements["cell_id"].isin(base)]
    assert g[g["prompt_set"] == "harmless"]["refusal"].mean() == 1.0


def test_rates_and_verdicts_under_a_guard_skip_harmless_prompts(tmp_path, synthetic):
    make_store(tmp_path / "out", synthetic)
    row = summarize(tmp_path / "out", judge="guard").iloc[0]
    assert row["judge"] == "guard"
    assert np.isnan(row["baseline_harmless_refusal"]) and np.isnan(row["addition_induction"])
    assert row["verdict_control_margin"] == "NOT-JUDGEABLE (guard on harmless)"
    assert row["verdict_steering_labels"] == "NOT-JUDGEABLE (guard on harmless)"
    assert row["unjudged"] == 0                              # harmless completions are not "unjudged"
    # the harmful rates are the guard's harmful labels, recomputed here (p7 counts as safe: 8/8)
    steering, _, judgements = synthetic
    base = steering[steering["mode"] == "baseline"]["cell_id"]
    g = judgements[(judgements["judge"] == "guard") & judgements["cell_id"].isin(base)
                   & (judgements["prompt_set"] == "harmful")]
    assert row["baseline_harmful_refusal"] == pytest.approx(g["refusal"].mean()) == 1.0
    abl = steering[(steering["mode"] == "ablation") & ~steering["control"]]["cell_id"]
    g = judgements[(judgements["judge"] == "guard") & judgements["cell_id"].isin(abl)
                   & (judgements["prompt_set"] == "harmful")]
    assert row["ablation_suppression"] == pytest.approx(1.0 - g["refusal"].mean()) == pytest.approx(7 / 8)
    # a substring-kind named judge reads both sets
    strict = summarize(tmp_path / "out", judge="strict").iloc[0]
    assert strict["baseline_harmless_refusal"] == 0.0 and strict["verdict_control_margin"] == "SUPPORTED"


def test_steering_under_a_guard_has_no_harmless_arms(synthetic):
    steering, completions, judgements = synthetic
    labels = judge_labels(completions, judgements)
    rows, labelled = steering_under(steering, completions, labels, "guard")
    assert set(rows["prompt_set"]) == {"harmful"} and set(labelled["prompt_set"]) == {"harmful"}
    assert len(rows) == (steering["prompt_set"] == "harmful").sum()
    rows, _ = steering_under(steering, completions, labels, "strict")
    assert set(rows["prompt_set"]) == {"harmful", "harmless"}


def kappa(a: pd.Series, b: pd.Series) -> float:
    a, b = a.astype(bool).to_numpy(), b.astype(bool).to_numpy()
    p_o = (a == b).mean()
    p_e = a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean())
    return (p_o - p_e) / (1 - p_e)


def test_agreement_per_prompt_set_and_only_on_the_same_question(synthetic):
    _, completions, judgements = synthetic
    agree = agreement(judge_labels(completions, judgements))
    pairs = agree.groupby(["judge_a", "judge_b"])

    def sets(a, b, model="m"):
        g = pairs.get_group((a, b))
        return dict(zip(g[g["model"] == model]["prompt_set"], g[g["model"] == model]["question"]))

    # a guard and a refusal judge: harmful only (no harmless row, no pooled row), per model and ALL
    for other in ("substring", "strict"):
        a, b = sorted([other, "guard"], key=lambda n: (n != "substring", n))
        assert sets(a, b) == sets(a, b, "ALL") == {"harmful": REFUSED}
    # two guards: both questions per set, and pooled since each set's questions match
    assert sets("guard", "guard2") == {"harmful": REFUSED, "harmless": SAFE, "ALL": "refused+safe"}
    assert sets("substring", "strict") == {"harmful": REFUSED, "harmless": REFUSED, "ALL": REFUSED}
    # kappa recomputed independently on the rows of each set
    m = completions.merge(judgements[judgements["judge"] == "strict"], on=["cell_id", "prompt_set", "prompt_id"])
    got = agree[(agree["judge_a"] == "substring") & (agree["judge_b"] == "strict") & (agree["model"] == "m")]
    for pset in ("harmful", "ALL"):
        part = m if pset == "ALL" else m[m["prompt_set"] == pset]
        r = got[got["prompt_set"] == pset].iloc[0]
        assert r["n"] == len(part) and r["kappa"] == pytest.approx(kappa(part["refusal_x"], part["refusal_y"]))
    g = judgements[judgements["judge"] == "guard"]
    m = completions.merge(g[g["prompt_set"] == "harmful"], on=["cell_id", "prompt_set", "prompt_id"])
    r = agree[(agree["judge_a"] == "substring") & (agree["judge_b"] == "guard") & (agree["model"] == "m")].iloc[0]
    assert r["n"] == len(m) and r["kappa"] == pytest.approx(kappa(m["refusal_x"], m["refusal_y"]))
    assert r["b_only"] == int((~m["refusal_x"].astype(bool) & m["refusal_y"].astype(bool)).sum()) > 0


def test_written_tables_and_rendering(tmp_path, synthetic):
    out = tmp_path / "out"
    make_store(out, synthetic)
    write_summary(out)
    by_judge, agree = judge_tables(out)
    guard = by_judge[by_judge["judge"] == "guard"].iloc[0]
    assert guard["verdict_control_margin"] == "NOT-JUDGEABLE (guard on harmless)"
    assert by_judge[by_judge["judge"] == "substring"].iloc[0]["verdict_control_margin"] == "SUPPORTED"
    text = render_judges(by_judge, agree, wide=True)   # one line per pair
    lines = [ln for ln in text.splitlines() if "~ guard:" in ln and "substring" in ln.split("~")[0]]
    assert lines and all(" harmful " in ln for ln in lines)
    assert any("harmless (safe) guard ~ guard2" in ln for ln in text.splitlines())
    compact = render_judges(by_judge, agree).splitlines()   # the fitted table: prompt set and pair columns
    rows = [ln for ln in compact if "substring ~ guard " in ln + " "]
    assert rows and all(" harmful " in ln for ln in rows)
    assert any(" harmless " in ln and "guard ~ guard2 (safe)" in ln for ln in compact)
    assert max(map(len, compact)) <= 120
    arms = arms_by_judge(read_context(Store(out)), ["guard"])
    assert set(arms["prompt_set"]) == {"harmful"}


def test_verdict_judge_error_names_the_arms():
    cm_only = {"control_margin": RULE["control_margin"]}
    sl_only = {"steering_labels": RULE["steering_labels"]}
    assert verdict_judge_error("g", "guard", cm_only) == (
        "judge 'g' cannot judge the decision rule's arms: control_margin's addition arm is judged on harmless "
        "prompts, where a guard judge's label answers \"is the completion safe?\", not \"did the model refuse?\"")
    assert "steering_labels' induction curve is judged on harmless" in verdict_judge_error("g", "guard", sl_only)
    for kind in ("substring", "chat", "openai", "classifier", None):
        assert verdict_judge_error("j", kind, RULE) is None
    assert verdict_judge_error("g", "guard", {}) is None    # no rule, nothing to judge


def cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def files(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_cli_refuses_a_guard_as_verdict_judge(tmp_path, synthetic):
    out = tmp_path / "out"
    make_store(out, synthetic)
    before = files(out)
    result = cli("summarize", str(out), "--verdict-judge", "guard")
    assert result.returncode == 2 and result.stderr.strip() == GUARD_MESSAGE and not result.stdout
    (tmp_path / "j.yaml").write_text("judges:\n  - {name: strict3, kind: substring, phrases: [I cannot]}\n")
    result = cli("judge", str(out), "--judges", str(tmp_path / "j.yaml"), "--verdict-judge", "guard",
                 "--no-progress")
    assert result.returncode == 2 and result.stderr.strip() == GUARD_MESSAGE
    assert files(out) == before                              # nothing written on exit 2
    assert cli("summarize", str(out), "--verdict-judge", "strict").returncode == 0


def test_judge_refuses_a_new_guard_from_the_judges_file_before_judging(tmp_path, synthetic, tiny_qwen_path):
    """A guard named only in --judges FILE (not yet in the manifest): its kind comes from the file."""
    out = tmp_path / "out"
    make_store(out, synthetic)
    before = files(out)
    (tmp_path / "j.yaml").write_text(f"judges:\n  - {{name: lg, kind: guard, path: {tiny_qwen_path}}}\n")
    result = cli("judge", str(out), "--judges", str(tmp_path / "j.yaml"), "--verdict-judge", "lg", "--no-progress")
    assert result.returncode == 2 and result.stderr.strip() == GUARD_MESSAGE.replace("'guard'", "'lg'")
    assert files(out) == before


def test_a_guard_as_the_pre_registered_verdict_judge_is_refused_at_load(tmp_path):
    import yaml

    from refusal_ray.errors import SpecError
    from refusal_ray.spec import load_spec

    spec = {"name": "g", "models": [{"name": "m", "path": "x"}],
            "data": {"harmful": {"path": "h.jsonl"}, "harmless": {"path": "s.jsonl"}},
            "judges": [{"name": "lg", "kind": "guard", "path": "guard-model"}],
            "decision_rule": {"judge": "lg",
                              "control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                                                 "addition_coefficient": 1.0, "ablation_alpha": 1.0},
                              "steering_labels": {"strong": 0.5, "weak": 0.2}}}
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as e:
        load_spec(f)
    assert str(e.value).endswith(
        "decision_rule.judge 'lg' is a guard judge: its labels on harmless prompts answer 'is the completion safe?', "
        "not 'did the model refuse?', and the rule's addition arm and induction curve are judged there")
    spec["decision_rule"]["judge"] = "substring"          # the guard as a second judge is fine
    f.write_text(yaml.safe_dump(spec))
    assert load_spec(f).decision_rule.judge == "substring"
