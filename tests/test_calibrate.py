"""Calibration of judges against human labels (refusal_ray/judges/calibrate.py)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import TOY_MODELS
from refusal_ray.errors import SpecError
from refusal_ray.judges import SubstringJudge, make_judge
from refusal_ray.judges.base import Verdict
from refusal_ray.judges.calibrate import calibrate, load_labelled, render_calibration
from refusal_ray.judges.config import ChatJudgeSpec
from refusal_ray.toy.judge import DEFAULT_LABELLED, TOY_RUBRIC


@pytest.fixture(scope="module")
def labelled():
    return load_labelled(DEFAULT_LABELLED)


def test_load_labelled_columns(labelled):
    assert list(labelled.columns[:6]) == ["id", "prompt", "completion", "refusal", "compliance", "coherence"]
    assert "category" in labelled.columns
    assert len(labelled) == 40 and labelled["id"].is_unique
    assert labelled["refusal"].dtype == bool
    assert set(labelled["compliance"]) <= {0.0, 0.5, 1.0} and set(labelled["coherence"]) <= {0.0, 0.5, 1.0}
    # the documented labelling rule: a refusal complies with nothing; compliance 0 without a refusal is
    # exactly the word salad (does not attempt the task, does not refuse either)
    assert not (labelled["refusal"] & (labelled["compliance"] != 0)).any()
    no_attempt = (labelled["compliance"] == 0) & ~labelled["refusal"]
    assert set(labelled.loc[no_attempt, "category"]) == {"incoherent"} and no_attempt.sum() == 7
    assert (labelled.loc[no_attempt, "coherence"] == 0).all()
    assert labelled["category"].value_counts().to_dict() == {"refusal": 10, "compliance": 10, "caveat": 10,
                                                              "incoherent": 10}


def test_substring_kappa_matches_hand_computation(labelled):
    human = list(labelled["refusal"])
    judge = SubstringJudge()(list(labelled["completion"]))
    both = sum(h and j for h, j in zip(human, judge))
    human_only = sum(h and not j for h, j in zip(human, judge))
    judge_only = sum(j and not h for h, j in zip(human, judge))
    neither = sum(not h and not j for h, j in zip(human, judge))
    n = len(human)
    # the file's documented mix: 10 refusals (2 without a listed phrase); 2 non-refusals containing
    # "I can't" / "I'm sorry"
    assert (both, human_only, judge_only, neither) == (8, 2, 2, 28)
    p_o = (both + neither) / n
    human_yes, judge_yes = (both + human_only) / n, (both + judge_only) / n
    p_e = human_yes * judge_yes + (1 - human_yes) * (1 - judge_yes)
    kappa = (p_o - p_e) / (1 - p_e)

    r = calibrate(SubstringJudge(), labelled)
    assert r["judge"] == "substring" and r["n"] == r["n_judged"] == 40
    assert (r["malformed"], r["errors"]) == (0, 0)
    assert r["confusion"] == {"both": both, "human_only": human_only, "judge_only": judge_only, "neither": neither}
    assert r["accuracy"] == pytest.approx(p_o)
    assert r["kappa"] == pytest.approx(kappa, abs=1e-12)
    assert r["kappa_low"] < r["kappa"] < r["kappa_high"]
    assert r["compliance"] is None and r["coherence"] is None     # the substring judge gives no scores
    assert len(r["disagreements"]) == human_only + judge_only
    text = render_calibration(r)
    assert text.splitlines()[0] == "judge substring: 40 labelled rows, 40 judged (0 malformed, 0 failed)"
    assert f"Cohen's kappa {kappa:.3f}" in text


def test_toy_judge_agrees_perfectly(labelled):
    judge = make_judge(ChatJudgeSpec(name="toy-judge", kind="chat", path=str(TOY_MODELS / "toy-judge"),
                                     rubric=TOY_RUBRIC))
    seen = []
    r = calibrate(judge, labelled, progress=seen.append)
    assert sum(seen) == 40
    assert (r["n_judged"], r["malformed"], r["errors"]) == (40, 0, 0)
    assert r["accuracy"] == 1.0 and r["kappa"] == pytest.approx(1.0)
    assert r["compliance"] == {"n": 40, "exact": 1.0} and r["coherence"] == {"n": 40, "exact": 1.0}
    assert r["disagreements"] == []
    assert "compliance exact match 1.000 (40 rows); coherence exact match 1.000 (40 rows)" in render_calibration(r)


class _Stub:
    """A judge with fixed verdicts: malformed and failed rows are counted, never scored."""

    name, kind = "stub", "chat"

    def __init__(self, verdicts):
        self.verdicts = verdicts

    def judge(self, items):
        return self.verdicts[: len(items)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # statsmodels' z of a 0 kappa
def test_malformed_and_failed_are_left_out(labelled):
    df = labelled.iloc[:4].reset_index(drop=True)          # refusal: True, True, True, True
    verdicts = [Verdict(refusal=True, compliance=0.0, coherence=1.0, raw="x"),
                Verdict(raw="I think so", malformed=True),
                Verdict(error="timeout"),
                Verdict(refusal=False, compliance=1.0, coherence=1.0, raw="y")]
    r = calibrate(_Stub(verdicts), df)
    assert (r["n"], r["n_judged"], r["malformed"], r["errors"]) == (4, 2, 1, 1)
    assert r["accuracy"] == 0.5
    assert r["confusion"] == {"both": 1, "human_only": 1, "judge_only": 0, "neither": 0}
    assert r["kappa"] == pytest.approx(0.0)    # p_o = 0.5 = p_e (the human labels are constant)
    assert r["compliance"] == {"n": 2, "exact": 0.5}
    assert r["disagreements"] == [df["id"][3]]


# ------------------------------------------------------------------------------------ load errors


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_column(tmp_path):
    p = _jsonl(tmp_path / "l.jsonl", [{"id": "a", "prompt": "p", "completion": "c"}])
    with pytest.raises(SpecError) as e:
        load_labelled(p)
    assert str(e.value) == f"{p}: refusal: required column missing (columns: id, prompt, completion)"


def test_bad_refusal_value(tmp_path):
    p = _jsonl(tmp_path / "l.jsonl", [{"prompt": "p", "completion": "c", "refusal": 1},
                                      {"prompt": "p", "completion": "c", "refusal": "maybe"}])
    with pytest.raises(SpecError) as e:
        load_labelled(p)
    assert str(e.value) == f"{p}: refusal: row 2: 'maybe' is not 0, 1, true or false"
    p = _jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "completion": "c", "refusal": 2}])
    with pytest.raises(SpecError, match=r": refusal: row 1: 2 is not 0, 1, true or false$"):
        load_labelled(p)


def test_bad_score_value_in_csv(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("prompt,completion,refusal,compliance\np,c,0,1\np,c,1,0.7\n")
    with pytest.raises(SpecError) as e:
        load_labelled(p)
    assert str(e.value) == f"{p}: compliance: row 2: '0.7' is not 0, 0.5 or 1"


def test_unknown_suffix_and_missing_file(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("prompt,completion,refusal\n")
    with pytest.raises(SpecError) as e:
        load_labelled(p)
    assert str(e.value) == f"{p}: unknown suffix '.txt' (expected .csv, .jsonl or .json lines)"
    with pytest.raises(SpecError) as e:
        load_labelled(tmp_path / "nope.jsonl")
    assert str(e.value) == f"{tmp_path / 'nope.jsonl'}: file not found"


def test_csv_and_json_lines_forms(tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_text('prompt,completion,refusal,coherence\n"Hi, there",I cannot.,TRUE,\nQ,A,false,0.5\n')
    df = load_labelled(csv)
    assert list(df["id"]) == ["1", "2"] and list(df["refusal"]) == [True, False]
    assert df["prompt"][0] == "Hi, there" and math.isnan(df["coherence"][0]) and df["coherence"][1] == 0.5
    js = _jsonl(tmp_path / "l.json", [{"prompt": "p", "completion": "", "refusal": True, "id": 7}])
    df = load_labelled(js)
    assert list(df["id"]) == ["7"] and list(df["refusal"]) == [True] and df["completion"][0] == ""


def test_a_calibration_file_is_checked_at_plan_time_not_when_a_block_is_read(tmp_path):
    """A judge block names its file wherever it is read (a Ray worker, a re-judge from another directory);
    only the plan, on the driver, checks that the file exists."""
    import yaml
    from pydantic import TypeAdapter

    from refusal_ray.judges.config import JudgeSpec
    from refusal_ray.plan import make_plan
    from test_bad_input import base_spec

    block = {"name": "sub", "kind": "substring", "calibration": "no/such/labels.jsonl"}
    assert TypeAdapter(JudgeSpec).validate_python(block).calibration == "no/such/labels.jsonl"
    spec = base_spec(TOY_MODELS / "toy-qwen-xs")
    spec["judges"] = [block]
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as e:
        make_plan(str(f))
    assert str(e.value) == f"{f}: judges.0.calibration: calibration file not found: no/such/labels.jsonl"


def test_the_judge_worker_payload_holds_no_calibration_path(monkeypatch):
    """The calibration file is the driver's: the payload a JudgeWorker actor validates leaves it out."""
    import pandas as pd

    from refusal_ray.cluster import judge_worker, judging

    seen = []

    class Stop(Exception):
        pass

    class Fake:
        @staticmethod
        def options(**k):
            return Fake

        @staticmethod
        def remote(cfg, threads):
            seen.append(cfg)
            raise Stop

    monkeypatch.setattr(judge_worker, "JudgeWorker", Fake)
    cfg = ChatJudgeSpec(name="toy-judge", kind="chat", path=str(TOY_MODELS / "toy-judge"), rubric=TOY_RUBRIC,
                        calibration="data/judges/toy_heldout.jsonl")
    with pytest.raises(Stop):
        judging._judge_on_ray(cfg, pd.DataFrame(), None, 8, {"CPU": 4, "GPU": 0})
    assert "calibration" not in seen[0] and seen[0]["name"] == "toy-judge"
