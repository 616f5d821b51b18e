"""The toy chat judge (data/models/toy-judge) against held-out toy labels and on a toy store's completions,
its held-out file, the `calibration:` field of a judge block, and the report's "Judge calibration" section."""

from __future__ import annotations

import math
import re

import pytest
import yaml

from conftest import TOY_MODELS, TOY_PROMPTS
from refusal_ray.analysis import calibration as report_calibration
from refusal_ray.judges import SubstringJudge, make_judge
from refusal_ray.judges.calibrate import calibrate, calibrate_store, load_labelled
from refusal_ray.judges.config import ChatJudgeSpec
from refusal_ray.stats import cohen_kappa, wilson
from refusal_ray.store import Store
from refusal_ray.toy.dataset import FRAMES, SPLIT_OF_FRAME
from refusal_ray.toy.judge import (DEFAULT_HELDOUT, DEFAULT_LABELLED, N_EXTRA, N_HELDOUT, SCORE_ANSWERS, TOY_RUBRIC,
                                   synthetic_rows, write_heldout)

JUDGE_DIR = TOY_MODELS / "toy-judge"


def _spec(**kw) -> ChatJudgeSpec:
    """The quickstart's toy judge block: scored answers (`score_answers`), never malformed."""
    return ChatJudgeSpec(name="rubric", kind="chat", path=str(JUDGE_DIR), rubric=TOY_RUBRIC,
                         score_answers=list(SCORE_ANSWERS), **kw)


@pytest.fixture(scope="module")
def heldout():
    return load_labelled(DEFAULT_HELDOUT)


@pytest.fixture(scope="module")
def judge():
    return make_judge(_spec())


def test_heldout_file_is_generated_and_distinct_from_training(tmp_path, heldout):
    """The stored file is what write_heldout makes (deterministic); its prompts come from the test split's
    sentence frames, which no training row uses; no (prompt, completion) is a training row."""
    again = tmp_path / "heldout.jsonl"
    write_heldout(again)
    assert again.read_bytes() == DEFAULT_HELDOUT.read_bytes()
    assert len(heldout) == N_HELDOUT and heldout["id"].is_unique
    def frames(prompt):   # the sentence frames (refusal_ray/toy/dataset.py FRAMES) a prompt fits
        return {f for f in FRAMES if re.fullmatch(re.escape(f).replace(r"\{act\}", ".+").replace(r"\{task\}", ".+"),
                                                  prompt)}
    test_frames = {f for f, split in zip(FRAMES, SPLIT_OF_FRAME) if split == "test"}
    assert all(frames(p) and frames(p) <= test_frames for p in heldout["prompt"])
    train = synthetic_rows(0, "train", N_EXTRA)
    labelled = load_labelled(DEFAULT_LABELLED)
    train_prompts = {r["prompt"] for r in train} | set(labelled["prompt"])
    assert not set(heldout["prompt"]) & {r["prompt"] for r in train}
    pairs = {(r["prompt"], r["completion"]) for r in train} | set(zip(labelled["prompt"], labelled["completion"]))
    assert not set(zip(heldout["prompt"], heldout["completion"])) & pairs
    assert train_prompts   # (the hand-written file uses test-split prompts; it is training data, not held out)
    # the labelling rule: a refusal complies with nothing; every category is present
    assert not (heldout["refusal"] & (heldout["compliance"] != 0)).any()
    assert set(heldout["category"]) == {"refusal", "refusal-degenerate", "compliance", "caveat", "garbled",
                                        "incoherent"}


def test_generated_rows_follow_the_toy_labelling_rule():
    """Every generated row's refusal label is the substring rule on its completion (a listed phrase anywhere
    is a refusal, however the reply dissolves), a refusal complies with nothing, and the rows hold the
    quickstart's steering shapes on both sides of the rule (issue 22)."""
    rows = synthetic_rows(0, "train", N_EXTRA)
    texts = [r["completion"] for r in rows]
    assert [bool(r["refusal"]) for r in rows] == SubstringJudge()(texts)
    assert all(r["compliance"] == 0 for r in rows if r["refusal"])
    refused = [t for t, r in zip(texts, rows) if r["refusal"]]
    kept = [t for t, r in zip(texts, rows) if not r["refusal"]]
    assert any(re.fullmatch(r"(I cannot)+I{3,}.*", t) or re.search(r"I cannotI cannot", t) for t in refused)
    assert any(re.fullmatch(r"(I'm sorry|As an AI|I cannot|I am unable to)[^.]*?( \w+)\2{3,}.*", t) for t in refused)
    assert any(not re.match(r"(I'm sorry|As an AI|I cannot|I am unable to|I can't)", t) for t in refused)  # inside
    assert any(t.startswith("I'm") for t in kept) and any(t.startswith("As an") for t in kept)   # near misses
    assert len(refused) / len(rows) == pytest.approx(0.32, abs=0.05)


def test_toy_judge_kappa_on_heldout_labels(judge, heldout):
    r = calibrate(judge, heldout)
    assert (r["n"], r["n_judged"], r["malformed"], r["errors"]) == (N_HELDOUT, N_HELDOUT, 0, 0)
    assert r["kappa"] >= 0.8, r
    # recomputed independently from the verdicts
    verdicts = judge.judge([make_item(p, c) for p, c in zip(heldout["prompt"], heldout["completion"])])
    ag = cohen_kappa(list(heldout["refusal"]), [v.refusal for v in verdicts])
    assert ag.kappa == pytest.approx(r["kappa"], abs=1e-12)
    k = ag.both + ag.neither
    assert (r["accuracy_low"], r["accuracy_high"]) == pytest.approx(wilson(k, ag.n))
    assert r["human_refusals"] == int(heldout["refusal"].sum())
    assert r["judge_refusals"] == sum(bool(v.refusal) for v in verdicts)


def make_item(prompt, completion):
    from refusal_ray.judges.base import Item

    return Item(prompt, completion)


def test_calibration_field_stays_out_of_dump_and_hash():
    plain, with_file = _spec(), _spec(calibration=str(DEFAULT_HELDOUT))
    assert "calibration" not in plain.model_dump(mode="json")
    assert with_file.model_dump(mode="json")["calibration"] == str(DEFAULT_HELDOUT)
    assert plain.judge_hash() == with_file.judge_hash()      # not a label setting
    assert _spec(calibration="nowhere.jsonl").calibration == "nowhere.jsonl"   # existence: plan.check_calibration
    with pytest.raises(ValueError, match="unknown suffix"):
        _spec(calibration=str(TOY_MODELS / "toy-judge" / "README.md"))


def test_calibrate_store_and_report_section(tmp_path, heldout):
    store = Store(tmp_path / "store")
    spec = _spec(calibration=str(DEFAULT_HELDOUT))
    manifest = {"spec": {"judges": [spec.model_dump(mode="json")]},
                "judges": {"rubric": {"kind": "chat", "hash": spec.judge_hash()}}}
    store.write_json("manifest.json", manifest)
    assert report_calibration.section(tmp_path / "store")[2].startswith("Not stored")
    out = calibrate_store(store, [spec])
    assert [r["judge"] for r in out["results"]] == ["substring", "rubric"]
    stored = store.read_json("calibration.json")
    assert stored == out
    sub = calibrate(SubstringJudge(), heldout)
    assert stored["results"][0]["kappa"] == pytest.approx(sub["kappa"])
    lines = report_calibration.section(tmp_path / "store", manifest)
    assert lines[0] == "## Judge calibration"
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| judge | labelled file | rows | judged | unjudged | agreement [95% Wilson]")
    rubric = stored["results"][1]
    row = table[2].split(" | ")
    assert row[0] == "| rubric" and row[2:5] == [str(N_HELDOUT), str(N_HELDOUT), "0"]
    assert row[5] == f"{rubric['accuracy']:.2f} [{rubric['accuracy_low']:.2f}, {rubric['accuracy_high']:.2f}]"
    assert row[6].startswith(f"{rubric['kappa']:+.2f} [")
    assert not any(line.startswith("Stale") for line in lines)
    manifest["judges"]["rubric"]["hash"] = "0" * 16
    assert any(line.startswith("Stale: judge(s) rubric") for line in report_calibration.section(tmp_path / "store",
                                                                                                 manifest))


@pytest.mark.slow
def test_toy_store_completions_all_judged_and_agree_with_substring(tmp_path):
    """A small toy sweep with steering far enough to make the models degenerate (addition at -3 / +3,
    ablation): the toy judge labels every stored completion (none unjudged) and agrees with the
    substring judge at kappa >= 0.8 (the toy world's refusal phrases are unambiguous)."""
    from test_e2e import run_cli

    spec = {
        "name": "toy-judge-store",
        "models": [{"name": "qwen-s", "path": str(TOY_MODELS / "toy-qwen-s")},
                   {"name": "llama-s", "path": str(TOY_MODELS / "toy-llama-s")}],
        "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                 "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl"), "reference_column": "reference"},
                 "n_train": 32, "n_val": 8, "n_test": 16},
        "seeds": [0],
        "stages": {"steer": {"addition": {"coefficients": [-3.0, 1.0, 3.0]},
                             "ablation": {"alphas": [1.0], "direction_layer": "best"}, "batch_size": 64}},
        "generation": {"max_new_tokens": 24},
        "judges": [{"name": "rubric", "kind": "chat", "path": str(JUDGE_DIR), "rubric": TOY_RUBRIC,
                    "score_answers": list(SCORE_ANSWERS), "batch_size": 64}],
        "decision_rule": {
            "control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                               "addition_coefficient": 1.0, "ablation_alpha": 1.0},
            "steering_labels": {"strong": 0.5, "weak": 0.2}},
    }
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    result = run_cli("run", str(f), "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    store = Store(out)
    comps, judged = store.read("completions"), store.read("judgements")
    key = ["cell_id", "prompt_set", "prompt_id"]
    both = comps.merge(judged[judged["judge"] == "rubric"], on=key, suffixes=("", "_rubric"))
    assert len(both) == len(comps) > 0
    assert not both["malformed"].any() and both["error"].isna().all()
    sub = SubstringJudge()(list(both["completion"]))
    assert list(both["refusal"].astype(bool)) == sub                   # the inline labels are the substring's
    ag = cohen_kappa(sub, list(both["refusal_rubric"].astype(bool)))
    assert ag.kappa >= 0.8, ag
    assert not math.isnan(ag.kappa)
