"""Re-judging stored completions: `refusal-ray judge` writes judgements (and the summary) only, is
idempotent, reports agreement between judges, and judges through an OpenAI-compatible endpoint
(a real loopback server) without losing anything to a failing server or leaking the key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, TOY_MODELS, TOY_PROMPTS
from openai_stub import StubServer
from refusal_ray.store import read

CLI = [sys.executable, "-m", "refusal_ray.cli"]
KEY = "sk-test-REFUSAL-RAY-7f3a9c"


def _spec(tmp: Path) -> Path:
    spec = {
        "name": "rejudge",
        "models": [{"name": "qwen-xs", "path": str(TOY_MODELS / "toy-qwen-xs")}],
        "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                 "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")}, "n_train": 16, "n_val": 8, "n_test": 6},
        "stages": {"steer": {"addition": {"coefficients": [-1.0, 1.0]},
                             "ablation": {"alphas": [1.0], "direction_layer": "best"}, "batch_size": 64}},
        "generation": {"max_new_tokens": 10},
        "decision_rule": {
            "control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                               "addition_coefficient": 1.0, "ablation_alpha": 1.0},
            "steering_labels": {"strong": 0.5, "weak": 0.2}},
    }
    f = tmp / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    return f


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Path:
    """A finished store of the toy qwen-xs (steering, 6 test prompts per class), built without Ray."""
    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan
    from refusal_ray.analysis.report import write_report
    from refusal_ray.runner import freeze_manifest
    from refusal_ray.store import Store

    tmp = tmp_path_factory.mktemp("rejudge")
    plan = make_plan(_spec(tmp))
    store = Store(tmp / "out")
    freeze_manifest(plan, store)
    run_local(plan, store, log=lambda m: None)
    write_report(store.uri)
    return tmp / "out"


@pytest.fixture
def store_copy(stored, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(stored, out)
    return out


def cli(*args, env=None) -> subprocess.CompletedProcess:
    full = dict(os.environ) | (env or {})
    full.pop("RAY_ADDRESS", None)
    flags = ["--no-progress"] if args[0] in ("judge", "run") else []
    return subprocess.run([*CLI, *args, *flags], capture_output=True, text=True, cwd=REPO, env=full,
                          timeout=600)


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def judges_file(tmp: Path, *blocks: dict) -> Path:
    f = tmp / "judges.yaml"
    f.write_text(yaml.safe_dump({"judges": list(blocks)}))
    return f


STRICT = {"name": "strict", "kind": "substring", "phrases": ["I cannot"]}


def test_rejudge_writes_only_judgements_and_summary_then_nothing(store_copy, tmp_path):
    before = files(store_copy)
    comps = pd.read_parquet(store_copy / "completions")
    result = cli("judge", str(store_copy), "--judges", str(judges_file(tmp_path, STRICT)))
    assert result.returncode == 0, result.stderr[-2000:]
    after = files(store_copy)
    new = {f for f in after if f not in before}
    changed = {f for f in before if after[f] != before[f]}
    summary_files = {"summary_by_judge.parquet", "steering_by_judge.parquet", "agreement.parquet", "agreement.csv"}
    assert new and all(f.startswith("judgements/") or f in summary_files for f in new), new
    assert changed <= {"summary.parquet", "summary.csv", "manifest.json", "report.md"} | {
        f for f in before if f.startswith("figures/")}, changed
    assert not any(f.startswith(("completions/", "steering/", "cells/", "directions/")) for f in new | changed)
    judged = read(store_copy, "judgements")
    assert len(judged) == len(comps) and judged["judgement_id"].is_unique
    assert set(judged["judge"]) == {"strict"} and judged["error"].isna().all()
    # the strict judge's labels are its phrase, recomputed here
    merged = comps.merge(judged, on=["cell_id", "prompt_set", "prompt_id"])
    assert (merged["refusal_y"] == merged["completion"].str.lower().str.contains("i cannot")).all()
    # a second call writes nothing at all
    again = cli("judge", str(store_copy), "--judges", str(judges_file(tmp_path, STRICT)))
    assert again.returncode == 0, again.stderr[-2000:]
    assert files(store_copy) == after
    assert "nothing to judge" in again.stderr


def test_agreement_is_cohens_kappa_of_the_stored_labels(store_copy, tmp_path):
    assert cli("judge", str(store_copy), "--judges", str(judges_file(tmp_path, STRICT))).returncode == 0
    comps = pd.read_parquet(store_copy / "completions")
    judged = read(store_copy, "judgements")
    m = comps.merge(judged, on=["cell_id", "prompt_set", "prompt_id"])
    a, b = m["refusal_x"].astype(bool), m["refusal_y"].astype(bool)
    n = len(m)
    p_o = float((a == b).mean())
    p_e = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    agree = pd.read_parquet(store_copy / "agreement.parquet").query("model == 'qwen-xs'")
    assert list(agree["prompt_set"]) == ["harmful", "harmless", "ALL"]   # two substring judges: same question
    row = agree.query("prompt_set == 'ALL'").iloc[0]
    assert (row["judge_a"], row["judge_b"], row["n"], row["question"]) == ("substring", "strict", n, "refused")
    assert row["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e), abs=1e-12)
    harmful = agree.query("prompt_set == 'harmful'").iloc[0]
    assert harmful["n"] == int((m["prompt_set"] == "harmful").sum())
    assert harmful["both_refuse"] == int((a & b & (m["prompt_set"] == "harmful")).sum())
    assert (row["both_refuse"], row["a_only"], row["b_only"], row["neither"]) == (
        int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum()))
    assert row["kappa_ci_low"] < row["kappa"] < row["kappa_ci_high"]


def test_verdicts_under_another_judge_are_recorded(store_copy, tmp_path):
    assert cli("judge", str(store_copy), "--judges", str(judges_file(tmp_path, STRICT))).returncode == 0
    default = pd.read_parquet(store_copy / "summary.parquet").iloc[0]
    assert default["judge"] == "substring"
    result = cli("summarize", str(store_copy), "--verdict-judge", "strict")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verdicts under judge: strict" in result.stdout
    row = pd.read_parquet(store_copy / "summary.parquet").iloc[0]
    assert row["judge"] == "strict"
    import json

    manifest = json.loads((store_copy / "manifest.json").read_text())
    assert manifest["verdicts"] == {"judge": "strict", "judge_hash": manifest["judges"]["strict"]["hash"],
                                    "rule_judge": "substring", "pre_registered": False}
    # the baseline harmful rate under 'strict' is the mean of its labels on the baseline harmful completions
    cells = pd.read_parquet(store_copy / "steering")
    base = cells[(cells["mode"] == "baseline") & (cells["prompt_set"] == "harmful")]["cell_id"]
    judged = read(store_copy, "judgements")
    labels = judged[judged["cell_id"].isin(base) & (judged["prompt_set"] == "harmful")]["refusal"]
    assert row["baseline_harmful_refusal"] == pytest.approx(labels.mean())
    # steering rates per judge: the strict judge's baseline harmful arm is the same mean, with its interval
    arms = pd.read_parquet(store_copy / "steering_by_judge.parquet")
    base = arms[(arms["judge"] == "strict") & (arms["mode"] == "baseline") & (arms["prompt_set"] == "harmful")].iloc[0]
    assert base["rate"] == pytest.approx(labels.mean()) and base["ci_low"] <= base["rate"] <= base["ci_high"]
    assert set(arms["judge"]) == {"substring", "strict"}


def test_judges_file_errors_exit_2(store_copy, tmp_path):
    bad = judges_file(tmp_path, {"name": "j", "kind": "chat", "path": str(TOY_MODELS / "toy-qwen-xs"),
                                 "rubric": "no placeholders here"})
    result = cli("judge", str(store_copy), "--judges", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {bad}: judges.0.rubric: rubric lacks the placeholders {{prompt}} and "
                                     f"{{completion}} (the rubric needs both {{prompt}} and {{completion}})")
    assert cli("judge", str(store_copy), "--judges", str(judges_file(tmp_path, STRICT))).returncode == 0
    other = judges_file(tmp_path, {**STRICT, "phrases": ["sorry"]})
    result = cli("judge", str(store_copy), "--judges", str(other))
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {other}: judges.strict: this store already has a judge 'strict' "
                                            f"with other settings")
    result = cli("summarize", str(store_copy), "--verdict-judge", "strcit")
    assert (result.returncode, result.stderr.strip()) == (
        2, "error: --verdict-judge: unknown judge 'strcit'; known: substring, strict")
    result = cli("judge", str(tmp_path / "nowhere"))
    assert (result.returncode, result.stderr.strip()) == (
        2, f"error: {tmp_path / 'nowhere'}: not a refusal-ray store (no manifest.json)")


def _openai_block(server: StubServer, **kw) -> dict:
    return {"name": "api", "kind": "openai", "base_url": server.base_url, "model": "stub-judge",
            "api_key_env": "REFUSAL_RAY_TEST_KEY", "max_concurrency": 3, "timeout_s": 5.0, "max_retries": 1} | kw


def test_openai_judge_survives_a_failing_server_and_never_stores_the_key(store_copy, tmp_path):
    comps = pd.read_parquet(store_copy / "completions")
    counts = comps["completion"].value_counts()
    marker = counts.index[-1]                        # the rarest completion: the server fails on it for good
    failing = int(comps["completion"].str.contains(marker, regex=False).sum())
    assert 0 < failing < len(comps)
    env = {"REFUSAL_RAY_TEST_KEY": KEY}
    os.environ["REFUSAL_RAY_TEST_KEY"] = KEY         # the spec block checks the variable when it is parsed
    try:
        with StubServer(delay=0.02, fail_first=3, fail_when=marker, echo_auth=True) as server:   # a leaky server
            jf = judges_file(tmp_path, _openai_block(server))
            first = cli("judge", str(store_copy), "--judges", str(jf), env=env)
            assert first.returncode == 1, first.stderr[-2000:]
            assert f"{failing} completion(s) could not be judged" in first.stderr
            judged = read(store_copy, "judgements")
            assert len(judged) == len(comps)
            errors = judged[judged["error"].notna()]
            assert len(errors) == failing and errors["refusal"].isna().all()
            ok = judged[judged["error"].isna()]
            assert ok["refusal"].notna().all() and (ok["raw"].str.startswith("compliance:")).all()
            assert 1 < server.max_in_flight <= 3
            assert all(a == f"Bearer {KEY}" for a in server.auth)
            # the server recovers: a rerun judges only the failed completions
            server.fail_when = None
            sent = server.requests
            second = cli("judge", str(store_copy), "--judges", str(jf), env=env)
            assert second.returncode == 0, second.stderr[-2000:]
            assert server.requests - sent == failing
            judged = read(store_copy, "judgements")
            assert len(judged) == len(comps) and judged["error"].isna().all()
            # labels follow the server's fixed rules on each completion
            from openai_stub import reply_text

            expect = comps.set_index(["cell_id", "prompt_set", "prompt_id"])["completion"].map(
                lambda c: reply_text(c).startswith("compliance: 0\n"))
            got = judged.set_index(["cell_id", "prompt_set", "prompt_id"])["refusal"].astype(bool)
            assert (got.sort_index() == expect.sort_index()).all()
    finally:
        os.environ.pop("REFUSAL_RAY_TEST_KEY", None)
    for path in store_copy.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    for text in (first.stdout, first.stderr, second.stdout, second.stderr):
        assert KEY not in text


def test_two_names_with_the_same_settings_keep_their_own_rows(store_copy, tmp_path):
    twin = {**STRICT, "name": "strict-twin"}
    assert cli("judge", str(store_copy), "--judges", str(judges_file(tmp_path, STRICT, twin))).returncode == 0
    judged = read(store_copy, "judgements")
    comps = read(store_copy, "completions")
    assert judged.groupby("judge").size().to_dict() == {"strict": len(comps), "strict-twin": len(comps)}
    agree = pd.read_parquet(store_copy / "agreement.parquet").query("model == 'ALL' and prompt_set == 'ALL'")
    assert agree.set_index(["judge_a", "judge_b"]).loc[("strict", "strict-twin"), "kappa"] == pytest.approx(1.0)


def test_judgements_table_is_known_before_any_judge_ran(stored):
    assert read(stored, "judgements").empty
    with pytest.raises(ValueError, match="unknown table 'judgement'"):
        read(stored, "judgement")


def test_a_judge_with_a_calibration_file_is_calibrated_once_and_reported(store_copy, tmp_path):
    """`calibration:` on a judge block: `refusal-ray judge` stores calibration.json (the judge and the inline
    substring judge against the labelled file, figures recomputed here), report.md gets the section after
    Judges, and a second call recalibrates nothing."""
    from refusal_ray.judges.calibrate import load_labelled

    labelled = REPO / "data" / "judges" / "toy_heldout.jsonl"
    block = {**STRICT, "calibration": str(labelled)}
    result = cli("judge", str(store_copy), "--judges", str(judges_file(tmp_path, block)))
    assert result.returncode == 0, result.stderr[-2000:]
    stored = json.loads((store_copy / "calibration.json").read_text())
    assert [(r["judge"], r["file"]) for r in stored["results"]] == [("substring", str(labelled)),
                                                                    ("strict", str(labelled))]
    rows = load_labelled(labelled)
    strict = next(r for r in stored["results"] if r["judge"] == "strict")
    said = rows["completion"].str.lower().str.contains("i cannot")
    assert strict["n"] == len(rows) and strict["accuracy"] == pytest.approx((said == rows["refusal"]).mean())
    report = (store_copy / "report.md").read_text()
    assert report.index("## Judges") < report.index("## Judge calibration")
    assert "| strict | `" in report
    mtime = (store_copy / "calibration.json").stat().st_mtime_ns
    again = cli("judge", str(store_copy), "--judges", str(judges_file(tmp_path, block)))
    assert again.returncode == 0 and "calibrating" not in again.stderr
    assert (store_copy / "calibration.json").stat().st_mtime_ns == mtime


def test_a_failing_calibration_warns_one_line_and_keeps_the_judgements(store_copy, tmp_path):
    """A judge whose calibration raises (its labelled file missing, as from another working directory, or
    unreadable) is one warning line naming the judge; its judgements and the other judge's calibration are
    stored, and the command succeeds. The file is not checked when the judge block is read (only at plan time)."""
    labelled = REPO / "data" / "judges" / "toy_heldout.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": "p", "completion": "c", "refusal": "maybe"}) + "\n")
    blocks = [{**STRICT, "calibration": "no/such/labels.jsonl"}, {**STRICT, "name": "loose", "calibration": str(bad)},
              {**STRICT, "name": "fine", "calibration": str(labelled)}]
    result = cli("judge", str(store_copy), "--judges", str(judges_file(tmp_path, *blocks)))
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert warnings[0] == ("judges: WARNING: calibration of judge strict against no/such/labels.jsonl failed (its "
                           "judgements are stored): SpecError: no/such/labels.jsonl: file not found")
    assert warnings[1].startswith(f"judges: WARNING: calibration of judge loose against {bad} failed (its "
                                  f"judgements are stored): SpecError: {bad}") and len(warnings) == 2
    judged = read(store_copy, "judgements")
    comps = pd.read_parquet(store_copy / "completions")
    assert {n: (judged["judge"] == n).sum() for n in ("strict", "loose", "fine")} == dict.fromkeys(
        ("strict", "loose", "fine"), len(comps))
    stored = json.loads((store_copy / "calibration.json").read_text())
    assert [(r["judge"], r["file"]) for r in stored["results"]] == [("substring", str(labelled)),
                                                                    ("fine", str(labelled))]
    assert list(stored["files"]) == [str(labelled)]
