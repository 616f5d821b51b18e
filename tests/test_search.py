"""Stage search (issue 21): heretic's kernel against an independent recomputation, batched trials equal trials
run alone, an interrupted study resumes with no trial number lost or repeated, the held-out rows, exact errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from refusal_ray.cli import app
from refusal_ray.errors import SpecError
from refusal_ray.spec import load_spec
from refusal_ray.stages.search.space import bounds, interpolated, kernel_weights, layer_directions

from conftest import REPO

pytest.importorskip("optuna")

TOY_SPEC = REPO / "sweeps" / "toy" / "search.yaml"


# -- the search space --------------------------------------------------------------------------
def _heretic_weight(layer, top, peak, low_frac, reach):
    """heretic model.py's kernel, written out again: skip beyond reach, else linear from top to low."""
    distance = abs(layer - peak)
    if distance > reach:
        return 0.0
    low = low_frac * top
    return top + (distance / reach) * (low - top)


@pytest.mark.parametrize("peak,reach,low", [(2.3, 1.4, 0.5), (0.0, 1.0, 0.0), (9.7, 3.0, 1.0), (5.0, 0.6, 0.2)])
def test_kernel_weights_match_heretic(peak, reach, low):
    params = {"mlp_out.max_weight": 1.2, "mlp_out.max_weight_position": peak, "mlp_out.min_weight": low,
              "mlp_out.min_weight_distance": reach}
    got = kernel_weights(params, "mlp_out", 12)
    want = [_heretic_weight(layer, 1.2, peak, low, reach) for layer in range(12)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got[int(round(peak))] > 0 and all(got[layer] == 0 for layer in range(12) if abs(layer - peak) > reach)


def test_interpolated_direction_is_the_normalised_lerp():
    rng = np.random.default_rng(0)
    dirs = {i: rng.standard_normal(16) * (i + 1) for i in range(5)}
    u = {i: v / np.linalg.norm(v) for i, v in dirs.items()}
    want = u[2] + 0.25 * (u[3] - u[2])
    np.testing.assert_allclose(interpolated(dirs, 2.25), want / np.linalg.norm(want), atol=1e-12)
    np.testing.assert_allclose(interpolated(dirs, 4.0), u[4], atol=1e-12)      # the top layer alone
    per = layer_directions({"direction_scope": "per_layer"}, dirs, 5)
    np.testing.assert_allclose(per, np.stack([u[i] for i in range(5)]), atol=1e-12)


def test_bounds_are_heretics_ranges():
    from refusal_ray.stages.search import SearchSpace

    b = bounds(SearchSpace().model_dump(mode="json"), 11)         # last layer index 10
    assert b["direction_index"] == pytest.approx((4.0, 9.0))
    assert b["attn_out.max_weight"] == (0.8, 1.5)
    assert b["mlp_out.max_weight_position"] == pytest.approx((6.0, 10.0))
    assert b["mlp_out.min_weight"] == (0.0, 1.0)
    assert b["attn_out.min_weight_distance"] == pytest.approx((1.0, 6.0))


# -- the toy study (one model, few prompts, few trials) -------------------------------------------
def _spec(tmp_path, **search) -> str:
    spec = yaml.safe_load(TOY_SPEC.read_text())
    spec["models"] = [{"name": "qwen-s", "path": str(REPO / "data/models/toy-qwen-s")}]
    spec["data"].update({"n_train": 16, "n_val": 8, "n_test": 8})
    for k in ("harmful", "harmless"):
        spec["data"][k]["path"] = str(REPO / spec["data"][k]["path"])
    spec["stages"]["search"].update({"n_trials": 6, "n_startup_trials": 2, "kl_bound": None, "held_out_max": 2,
                                     "batch_size": 16} | search)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A plan, a store holding its directions, and one in-process session of toy-qwen-s."""
    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan, model_payload, settings_payload
    from refusal_ray.session import ModelSession
    from refusal_ray.store import Store

    tmp = tmp_path_factory.mktemp("search")
    plan = make_plan(_spec(tmp))
    store = Store(tmp / "out")
    run_local(plan, store, log=lambda m: None)
    session = ModelSession(model_payload(plan, "qwen-s"), plan.prompts, settings_payload(plan), 1)
    return plan, store, session, tmp


def _payload(plan, store, trials, **cfg):
    from refusal_ray.stages.search.study import config, seed_directions

    return {"kind": "trials", "seed": 0, "study": "t", "config": config(plan, "qwen-s") | cfg,
            "directions": seed_directions(store, "qwen-s", 0), "trials": trials}


def _params(plan, seed):
    import optuna

    from refusal_ray.stages.search.space import suggest
    from refusal_ray.stages.search.study import config

    trial = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    return suggest(trial, config(plan, "qwen-s")["space"], plan.models["qwen-s"].n_layers)


def test_batched_trials_equal_trials_alone(toy):
    from refusal_ray.stages.search.run import evaluate

    plan, store, session, _ = toy
    trials = [{"number": i, "params": _params(plan, i)} for i in range(3)]
    together = evaluate(session, _payload(plan, store, trials, batch_size=7))   # chunks mix trials
    alone = [evaluate(session, _payload(plan, store, [t]))[0] for t in trials]
    for a, b in zip(together, alone):
        assert a["number"] == b["number"]
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-6, abs=1e-9)
        assert a["refusal"] == b["refusal"]
    assert together[0]["trials_in_call"] == 3 and alone[0]["trials_in_call"] == 1


def test_zero_weight_trial_is_the_baseline_and_kl_matches_capability(toy):
    """A kernel whose weights are all 0 gives KL 0 and the baseline's refusals; a trial's KL equals capability's
    first_token_kl recomputed with broadcast RowEdits of its weights."""
    import torch

    from refusal_ray.capability.measures import first_token_kl, next_token_logprobs
    from refusal_ray.data import prompt_tokens
    from refusal_ray.interventions import RowEdit
    from refusal_ray.stages.search.run import evaluate
    from refusal_ray.stages.search.study import seed_directions

    plan, store, session, _ = toy
    p = _params(plan, 7)
    comps = ("attn_out", "mlp_out", "resid_pre")
    zero = {**p, **{f"{c}.max_weight": 0.0 for c in comps}}
    got = evaluate(session, _payload(plan, store, [{"number": 0, "params": zero}, {"number": 1, "params": p}],
                                     kl_prompts="all"))                 # every harmless val prompt
    assert got[0]["kl"] == pytest.approx(0.0, abs=1e-12)
    harmless = session.prompts[0]["val"]["harmless"].instructions[:8]
    seqs = prompt_tokens(session.lm.tokenizer, harmless, session.chat)
    base = next_token_logprobs(session.lm, seqs, 4)
    dirs = {int(k): np.asarray(v) for k, v in seed_directions(store, "qwen-s", 0).items()}
    r = torch.as_tensor(layer_directions(p, dirs, 4), dtype=torch.float32)          # [n_layers, d_model]
    edits = {(c, layer): RowEdit(ablate_dirs=r[layer][None], ablate_alpha=torch.tensor([w]))
             for c in comps for layer, w in enumerate(kernel_weights(p, c, 4)) if w}
    want = float(first_token_kl(base, next_token_logprobs(session.lm, seqs, 4, edits)).mean())
    assert got[1]["kl"] == pytest.approx(want, rel=1e-5)


def test_answered_kl_prompts_leave_out_the_harmless_prompts_the_model_refuses(toy):
    """kl_prompts 'answered': the KL objective is the mean over the harmless val prompts whose unedited greedy
    completion the judge does not call a refusal (recomputed here per prompt with broadcast RowEdits)."""
    import torch

    from refusal_ray.capability.measures import first_token_kl, next_token_logprobs
    from refusal_ray.data import prompt_tokens
    from refusal_ray.interventions import RowEdit
    from refusal_ray.stages.search.run import ArmEdit, arm_completions, evaluate
    from refusal_ray.stages.search.study import config, seed_directions

    plan, store, session, _ = toy
    p = _params(plan, 3)
    cfg = config(plan, "qwen-s")
    harmless = session.prompts[0]["val"]["harmless"].instructions[:8]
    refused = session.judge(arm_completions(session, [ArmEdit({})], harmless, cfg["max_new_tokens"], 16)[0])
    seqs = prompt_tokens(session.lm.tokenizer, harmless, session.chat)
    dirs = {int(k): np.asarray(v) for k, v in seed_directions(store, "qwen-s", 0).items()}
    r = torch.as_tensor(layer_directions(p, dirs, 4), dtype=torch.float32)
    edits = {(c, layer): RowEdit(ablate_dirs=r[layer][None], ablate_alpha=torch.tensor([w]))
             for c in cfg["components"] for layer, w in enumerate(kernel_weights(p, c, 4)) if w}
    per_prompt = first_token_kl(next_token_logprobs(session.lm, seqs, 4),
                                next_token_logprobs(session.lm, seqs, 4, edits)).numpy()
    trial = [{"number": 0, "params": p}]
    every = evaluate(session, _payload(plan, store, trial, kl_prompts="all"))[0]
    kept = evaluate(session, _payload(plan, store, trial, kl_prompts="answered"))[0]
    keep = [not x for x in refused]
    assert 0 < sum(keep) < 8, refused          # the filter drops something and keeps something: not vacuous
    assert (every["n_harmless"], kept["n_harmless"]) == (8, sum(keep))
    assert every["kl"] == pytest.approx(float(per_prompt.mean()), rel=1e-5)
    assert kept["kl"] == pytest.approx(float(per_prompt[keep].mean()), rel=1e-5)
    assert kept["refusal"] == every["refusal"]                    # the refusal objective is untouched


def test_kl_bound_prunes_without_counting_refusals(toy):
    from refusal_ray.stages.search.run import evaluate

    plan, store, session, _ = toy
    trials = [{"number": i, "params": _params(plan, i)} for i in range(2)]
    free = evaluate(session, _payload(plan, store, trials))
    bound = (free[0]["kl"] + free[1]["kl"]) / 2 if free[0]["kl"] != free[1]["kl"] else None
    assert bound is not None
    got = evaluate(session, _payload(plan, store, trials, kl_bound=bound))
    for f, g in zip(free, got):
        assert g["pruned"] == (f["kl"] > bound)
        assert g["refusal"] == (None if g["pruned"] else f["refusal"])


class _Abandoning:
    """A pool of one in-process session with 2 slots whose calls run at submit; `run_study(stop_after=1)` leaves the
    second call's trials RUNNING, as a killed driver would."""

    slots = 2

    def __init__(self, session):
        from refusal_ray.stages.search.study import LocalPool

        self.inner = LocalPool(session)
        self.submit, self.next, self.close = self.inner.submit, self.inner.next, self.inner.close


def test_interrupted_study_resumes_without_losing_or_repeating_trials(toy):
    from optuna.trial import TrialState

    from refusal_ray.stages.search.study import LocalPool, journal_path, open_study, run_study, config

    plan, store, session, _ = toy
    first = run_study(plan, store, "qwen-s", 0, _Abandoning(session), log=lambda m: None, stop_after=1)
    assert first["finished"] == 2                      # one call of 2 trials told, the other abandoned
    study = open_study(journal_path(store, "qwen-s"), "qwen-s-seed0", config(plan, "qwen-s"), 0)
    running = [t.number for t in study.trials if t.state == TrialState.RUNNING]
    assert running == [2, 3]
    again = run_study(plan, store, "qwen-s", 0, LocalPool(session), log=lambda m: None)
    assert again["resumed"] == 2 and again["numbers"] == list(range(6))
    study = open_study(journal_path(store, "qwen-s"), "qwen-s-seed0", config(plan, "qwen-s"), 0)
    assert sorted(t.number for t in study.trials) == list(range(6))         # nothing asked twice
    rows = store.read("trials")
    rows = rows[rows["study"] == "qwen-s-seed0"]
    assert sorted(rows["number"]) == list(range(6))                        # one row per trial
    assert set(rows["state"]) <= {"complete", "pruned"}
    # a rerun at the same n_trials adds nothing; the trials' params are the journal's
    third = run_study(plan, store, "qwen-s", 0, LocalPool(session), log=lambda m: None)
    assert third["numbers"] == list(range(6)) and third["resumed"] == 0
    for t in study.trials:
        assert rows.set_index("number").loc[t.number, "kl"] == pytest.approx(t.values[1])


def test_held_out_rows(toy):
    from refusal_ray.stages.search.study import LocalPool, held_out, run_study

    plan, store, session, _ = toy
    run_study(plan, store, "qwen-s", 0, LocalPool(session), log=lambda m: None)
    rows = held_out(plan, store, "qwen-s", 0, LocalPool(session), log=lambda m: None)
    assert rows and all(r["held_out"] for r in rows[:2])
    vals = [(r["val_refusal"], r["val_kl"]) for r in rows]
    assert vals == sorted(vals)                                              # lowest refusal first
    for a in vals:   # a Pareto front: no member dominates another
        assert not any(b != a and b[0] <= a[0] and b[1] <= a[1] for b in vals)
    r = rows[0]
    n = r["trial_harmful_n"]
    k = round(r["trial_harmful_rate"] * n)
    from refusal_ray.stats import wilson

    assert (r["trial_harmful_ci_low"], r["trial_harmful_ci_high"]) == pytest.approx(wilson(k, n))
    assert r["meets_criterion"] == (r["trial_harmful_rate"] <= 0.1
                                    and abs(r["control_harmful_rate"] - r["baseline_harmful_rate"]) <= 0.1
                                    and r["trial_kl"] <= r["plain_kl"])
    stored = store.read("pareto")
    assert len(stored) == len(rows)


# -- warm start: plain ablation enqueued ----------------------------------------------------------
@pytest.mark.parametrize("n_layers,space", [
    (4, {"components": ["attn_out", "mlp_out", "resid_pre"], "direction_scope": ["global", "per_layer"],
         "max_weight": [0.8, 2.0]}),
    (28, {"components": ["resid_pre", "attn_out", "mlp_out"]}),
    (2, {"components": ["attn_out", "mlp_out", "resid_pre"], "direction_index": [0.6, 0.8]}),   # no integer
])
def test_plain_ablation_point_is_arditis_ablation(n_layers, space):
    """Each enqueued point, as the space's `suggest` returns it, is Arditi's directional ablation of its candidate
    direction: weight 1 at every layer's resid_pre, attn_out and mlp_out, one direction everywhere (the ArmEdit
    sites equal `ArmEdit.plain`'s)."""
    from refusal_ray.stages.search import SearchSpace
    from refusal_ray.stages.search.run import ArmEdit
    from refusal_ray.stages.search.space import plain_ablation_points

    sp = SearchSpace(**space).model_dump(mode="json")
    points = plain_ablation_points(sp, n_layers)
    lo, hi = bounds(sp, n_layers)["direction_index"]
    assert [p["direction_index"] for _, p in points] == ([float(i) for i in range(math.ceil(lo), math.floor(hi) + 1)]
                                                        or [(lo + hi) / 2])
    rng = np.random.default_rng(1)
    dirs = {i: rng.standard_normal(8) for i in range(n_layers)}
    for fixed, params in points:
        assert set(fixed) <= set(params) and all(params[k] == v for k, v in fixed.items())
        got = ArmEdit.kernel(params, dirs, n_layers, sp["components"]).sites
        want = ArmEdit.plain(interpolated(dirs, params["direction_index"]), n_layers).sites
        assert set(got) == set(want)
        for kind in want:
            np.testing.assert_array_equal(got[kind][0], np.ones(n_layers))
            np.testing.assert_allclose(got[kind][1], want[kind][1], rtol=0, atol=1e-12)


def test_enqueued_plain_ablation_is_trial_0_and_a_resume_does_not_enqueue_again(toy, monkeypatch):
    from optuna.trial import TrialState

    import refusal_ray.stages.search.study as study_mod
    from refusal_ray.stages.search.space import plain_ablation_points
    from refusal_ray.stages.search.study import LocalPool, config, open_study, run_study

    plan, store, session, tmp = toy
    journal = tmp / "enqueue.journal"
    monkeypatch.setattr(study_mod, "journal_path", lambda store, model: journal)
    cfg = config(plan, "qwen-s")
    assert cfg["enqueue"] == ["plain_ablation"]                       # the toy spec turns it on
    [(fixed, params)] = plain_ablation_points(cfg["space"], 4)        # one candidate layer in [1.2, 2.7]: layer 2
    first = run_study(plan, store, "qwen-s", 0, _Abandoning(session), log=lambda m: None, stop_after=1)
    assert first["finished"] == 2
    study = open_study(journal, "qwen-s-seed0", cfg, 0)
    t0 = study.trials[0]
    assert t0.state == TrialState.COMPLETE and t0.user_attrs["enqueued"] == "plain_ablation"
    assert t0.params == fixed and t0.user_attrs["params"] == params
    assert all("enqueued" not in t.user_attrs for t in study.trials[1:])
    again = run_study(plan, store, "qwen-s", 0, LocalPool(session), log=lambda m: None)
    assert again["numbers"] == list(range(6))
    study = open_study(journal, "qwen-s-seed0", cfg, 0)
    assert [t.number for t in study.trials if "enqueued" in t.user_attrs] == [0]   # not enqueued again
    assert not [t for t in study.trials if t.state == TrialState.WAITING]


def test_a_stale_journal_lock_left_by_a_killed_driver_is_released(tmp_path):
    """A `<journal>.lock` file left behind (a SIGKILLed driver): opening the study and adding a trial completes
    (Optuna's open lock removes it after LOCK_GRACE_S), and the lock is gone afterwards."""
    from optuna.storages.journal import JournalFileOpenLock

    from refusal_ray.stages.search.study import LOCK_GRACE_S, open_study

    cfg = {"sampler": "random", "sampler_seed": 0, "n_startup_trials": 0}
    path = tmp_path / "m.journal"
    study = open_study(path, "m-seed0", cfg, 0)
    study.tell(study.ask(), [0.5, 0.1])
    lock = tmp_path / "m.journal.lock"
    lock.write_text("")                                            # as a driver killed mid-append leaves it
    again = open_study(path, "m-seed0", cfg, 0)
    assert isinstance(again._storage._backend._lock, JournalFileOpenLock)
    assert again._storage._backend._lock.grace_period == LOCK_GRACE_S < 30
    again.tell(again.ask(), [0.4, 0.2])
    assert [t.number for t in open_study(path, "m-seed0", cfg, 0).trials] == [0, 1]
    assert not lock.exists()


def test_enqueue_stays_out_of_the_dump_when_unset():
    """`enqueue` is newer than the stored search specs: absent from their dump (so their hash) when empty."""
    from refusal_ray.stages.search import SearchBlock

    assert "enqueue" not in SearchBlock().model_dump(mode="json")
    assert SearchBlock(enqueue=["plain_ablation"]).model_dump(mode="json")["enqueue"] == ["plain_ablation"]
    heretic = load_spec(REPO / "sweeps" / "search_heretic_space.yaml")
    assert "enqueue" not in heretic.model_dump(mode="json")["stages"]["search"]


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    ({"n_startup_trials": 70}, "stages.search.n_startup_trials 70 exceeds n_trials 64"),
    ({"held_out": "lowest_refusal", "kl_bound": None}, "stages.search.held_out 'lowest_refusal' needs "
                                                       "stages.search.kl_bound"),
    ({"n_val": 33}, "stages.search.n_val 33 exceeds data.n_val 32"),
    ({"space": {"max_weight": [1.5, 0.8]}}, "stages.search.space.max_weight: low 1.5 is above high 0.8"),
    ({"space": {"direction_index": [0.4, 1.2]}}, "stages.search.space.direction_index: fractions of the last "
                                                 "layer index must lie in [0, 1], got [0.4, 1.2]"),
    ({"sampler": "cmaes"}, "stages.search.sampler"),
    ({"enqueue": ["plain_ablation"], "space": {"components": ["attn_out", "mlp_out"]}},
     "stages.search.enqueue 'plain_ablation': space.components lacks resid_pre (plain ablation edits attn_out, "
     "mlp_out and resid_pre)"),
    ({"enqueue": ["plain_ablation"], "space": {"components": ["attn_out", "mlp_out", "resid_pre"],
                                               "max_weight": [1.2, 2.0]}},
     "stages.search.enqueue 'plain_ablation': space.max_weight [1.2, 2.0] does not contain weight 1"),
    ({"enqueue": ["plain_ablation"], "space": {"components": ["attn_out", "mlp_out", "resid_pre"],
                                               "min_weight_distance": [1.0, 0.4]}},
     "stages.search.enqueue 'plain_ablation': no kernel of the space reaches every layer"),
    ({"enqueue": ["heretic"]}, "stages.search.enqueue"),
])
def test_bad_search_blocks_name_the_field(tmp_path, change, message):
    spec = yaml.safe_load(TOY_SPEC.read_text())
    spec["stages"]["search"].update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_cli_search_without_a_block_exits_2(tmp_path):
    spec = yaml.safe_load(TOY_SPEC.read_text())
    del spec["stages"]["search"]
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["search", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"error: {path}: stages.search: the spec has no search block" in result.output
    assert not (tmp_path / "o").exists()


def test_heretic_space_spec_validates_offline():
    from refusal_ray.cli import app as cli

    result = CliRunner().invoke(cli, ["validate", str(REPO / "sweeps" / "search_heretic_space.yaml")])
    assert result.exit_code == 0, result.output
    s = load_spec(REPO / "sweeps" / "search_heretic_space.yaml").stages.search
    assert (s.n_trials, s.n_startup_trials, s.sampler) == (200, 60, "tpe")
    assert set(s.space.direction_scope) == {"global", "per_layer"}
    assert s.space.max_weight == (0.8, 1.5) and s.space.min_weight_distance == (1.0, 0.6)


def test_max_concurrent_counts_overlapping_calls():
    from refusal_ray.stages.search.read import max_concurrent

    assert max_concurrent(zip([0, 1, 2], [1, 2, 3])) == 1            # back to back: one at a time (an iterator)
    assert max_concurrent([(0, 2), (1, 3), (1.5, 4), (3.5, 5)]) == 3
    assert max_concurrent([]) == 0


def test_report_section_and_figure(toy):
    """The read side on the toy study's store: the studies table, the Pareto table and the figure."""
    from refusal_ray.stages.base import ReadContext
    from refusal_ray.stages.search.read import READER, studies
    from refusal_ray.stages.search.study import LocalPool, held_out, run_study

    plan, store, session, _ = toy
    run_study(plan, store, "qwen-s", 0, LocalPool(session), log=lambda m: None)
    held_out(plan, store, "qwen-s", 0, LocalPool(session), log=lambda m: None)
    s = studies(store.read("trials"), store.read("pareto"))
    assert s.loc[0, "trials"] == 6 and s.loc[0, "max_concurrent"] == 1 and s.loc[0, "workers"] == 1
    ctx = ReadContext(store=None, manifest={"spec": {"stages": {"search": {}}}}, rule={}, judge="substring",
                      readers=(READER,))
    ctx.tables = {"trials": store.read("trials"), "pareto": store.read("pareto")}
    lines = READER.report(ctx)
    assert lines[0].startswith("## Search") and any("Pareto front of qwen-s seed 0" in x for x in lines)
    assert ctx.figures["search_pareto.png"][:4] == b"\x89PNG"
    assert READER.summary(ctx, "qwen-s", {})["search_trials"] == 6


DRIVER = """
import sys
from refusal_ray.plan import make_plan, model_payload, settings_payload
from refusal_ray.session import ModelSession
from refusal_ray.stages.search.study import LocalPool, run_study
from refusal_ray.store import Store
plan = make_plan(sys.argv[1])
pool = LocalPool(ModelSession(model_payload(plan, "qwen-s"), plan.prompts, settings_payload(plan), 1))
run_study(plan, Store(sys.argv[2]), "qwen-s", 0, pool)
"""


@pytest.mark.slow
def test_killed_driver_resumes_without_losing_or_repeating_trials(toy, tmp_path):
    """A driver process killed (SIGKILL) mid-study: the rerun finishes the study with trial numbers 0..n-1, each
    once in the journal and once in the trials table."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from refusal_ray.stages.search.study import LocalPool, journal_path, open_study, run_study, config
    from refusal_ray.store import Store

    plan0, store0, session, tmp = toy
    spec = _spec(tmp_path, n_trials=40, n_startup_trials=4)
    shutil.copytree(store0.path + "/directions", tmp_path / "out" / "directions")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, spec, str(tmp_path / "out")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "out" / "search" / "qwen-s.journal"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count('"state":1') >= 6:   # a few trials told
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the driver finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(tmp_path / "out")
    from refusal_ray.plan import make_plan

    plan = make_plan(spec)
    killed = open_study(journal_path(store, "qwen-s"), "qwen-s-seed0", config(plan, "qwen-s"), 0)
    assert 0 < len(killed.trials) < 40
    done = run_study(plan, store, "qwen-s", 0, LocalPool(session), log=lambda m: None)
    assert done["numbers"] == list(range(40))
    study = open_study(journal_path(store, "qwen-s"), "qwen-s-seed0", config(plan, "qwen-s"), 0)
    assert [t.number for t in study.trials] == list(range(40))
    rows = store.read("trials")
    assert sorted(rows["number"]) == list(range(40))


def test_refusal_score_objective_matches_first_token_probabilities(toy, tmp_path):
    """objective refusal_score: a harmful val prompt counts as refused when the refusal tokens' first-token mass
    exceeds 1/2, recomputed here from capability's next_token_logprobs (an unedited trial: zero weights)."""
    from refusal_ray.capability.measures import next_token_logprobs
    from refusal_ray.data import prompt_tokens
    from refusal_ray.plan import make_plan
    from refusal_ray.stages.search.run import evaluate

    _, store, session, _ = toy
    plan = make_plan(_spec(tmp_path, objective="refusal_score"))
    ids = plan.models["qwen-s"].refusal_tokens["ids"]
    assert ids
    p = _params(plan, 3)
    zero = {**p, **{f"{c}.max_weight": 0.0 for c in ("attn_out", "mlp_out", "resid_pre")}}
    got = evaluate(session, _payload(plan, store, [{"number": 0, "params": zero}]))[0]
    harmful = session.prompts[0]["val"]["harmful"].instructions[:8]
    lp = next_token_logprobs(session.lm, prompt_tokens(session.lm.tokenizer, harmful, session.chat), 4)
    mass = lp[:, ids].exp().sum(-1)
    assert got["refusal"] == pytest.approx(float((mass > 0.5).double().mean()))


@pytest.mark.slow
def test_ray_pool_spreads_trials_over_the_actors(toy, tmp_path):
    """The study on Ray (`refusal_ray.cluster.search.run_search`): two actors of the model, every trial number once,
    trials on both actors, and the held-out rows written."""
    import shutil

    import ray

    from refusal_ray.cluster.search import run_search
    from refusal_ray.plan import make_plan
    from refusal_ray.store import Store

    _, store0, _, _ = toy
    shutil.copytree(store0.path + "/directions", tmp_path / "out" / "directions")
    plan = make_plan(_spec(tmp_path, n_trials=8, n_startup_trials=2, trials_per_call=1))
    store = Store(tmp_path / "out")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        (summary,) = run_search(plan, store, log=lambda m: None, replicas=2)
    finally:
        ray.shutdown()
    assert summary["numbers"] == list(range(8)) and summary["max_in_flight"] == 2
    rows = store.read("trials")
    assert sorted(rows["number"]) == list(range(8)) and rows["worker"].nunique() == 2
    assert len(store.read("pareto")) == summary["pareto"] > 0


def test_a_trial_that_fails_every_time_stops_the_study_at_n_trials_failures(toy, monkeypatch, tmp_path):
    """A pool whose every call fails (a model the objective cannot serve, e.g. kl_prompts 'answered' on a model
    that refuses every harmless val prompt): the study stops after n_trials failed trials, naming the error,
    instead of asking forever."""
    import refusal_ray.stages.search.study as study_mod
    from refusal_ray.stages.search.study import config, run_study

    plan, store, session, tmp = toy
    monkeypatch.setattr(study_mod, "journal_path", lambda store, model: tmp_path / "failing.journal")
    error = "ValueError: the model refuses every harmless val prompt"

    class Failing:
        slots = 2

        def __init__(self):
            self.queue, self.calls = [], 0

        def submit(self, payload):
            self.calls += 1
            self.queue.append(self.calls)
            return self.calls

        def next(self):
            return self.queue.pop(0), {"ok": False, "error": error}

    logs, pool = [], Failing()
    out = run_study(plan, store, "qwen-s", 0, pool, log=logs.append, stop_after=50)
    n = config(plan, "qwen-s")["n_trials"]
    assert out["finished"] == 0 and n <= out["failed"] < n + 2 * pool.slots   # stops at the budget, not at 50
    assert pool.calls < 50
    assert any(f"failed trials, as many as n_trials: stopping the study; last error: {error}" in m for m in logs)
