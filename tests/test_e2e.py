"""End to end on a local Ray: run, read with pandas, rerun skips done cells, SIGKILL then resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import refusal_ray
from refusal_ray.store import Store

from conftest import REPO, TOY_MODELS, TOY_PROMPTS

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "refusal_ray.cli"]


def small_spec(tmp_path: Path, seeds=(0,), select: bool = False, judge: bool = False) -> Path:
    """Two toy models, directions at the post-instruction positions (the default) and steering.

    select: run stage select and ablate its choice (direction_layer 'selected', one more cell per
    (model, seed)); otherwise ablate the highest-separation direction (direction_layer 'best').
    judge: add the toy chat judge (a Ray actor of its own) as judge 'rubric'."""
    spec = {
        "name": "e2e",
        "models": [{"name": "qwen-xs", "path": str(TOY_MODELS / "toy-qwen-xs")},
                   {"name": "llama-s", "path": str(TOY_MODELS / "toy-llama-s")}],
        "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                 "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl"), "reference_column": "reference"},
                 "n_train": 16, "n_val": 8, "n_test": 8},
        "seeds": list(seeds),
        "stages": {"steer": {"addition": {"coefficients": [-1.0, 1.0]},
                             "ablation": {"alphas": [1.0], "direction_layer": "selected" if select else "best"},
                             "batch_size": 64}},
        "generation": {"max_new_tokens": 12},
        "decision_rule": {
            "control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                               "addition_coefficient": 1.0, "ablation_alpha": 1.0},
            "steering_labels": {"strong": 0.5, "weak": 0.2}},
    }
    if select:
        # Arditi's criterion and layer/induce filters; the KL filter off, as the quickstart's (0.1 drops every
        # toy candidate): llama-s then selects, and the 2-layer qwen-xs cannot (int(0.8 L) keeps only its
        # zero layer-0 directions), so both the selected and the skipped paths run
        spec["stages"]["select"] = {"batch_size": 128, "kl_max": None}
    if judge:
        from refusal_ray.toy.judge import TOY_RUBRIC

        spec["judges"] = [{"name": "rubric", "kind": "chat", "path": str(TOY_MODELS / "toy-judge"),
                           "rubric": TOY_RUBRIC, "batch_size": 64}]
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    return f


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # never join a cluster that happens to be running
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600, **kw)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    spec = small_spec(tmp, select=True, judge=True)
    out = tmp / "out"
    result = run_cli("run", str(spec), "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    return spec, out, result


def _skip_expected(cells: pd.DataFrame, selection: pd.DataFrame) -> pd.Series:
    """Per cell: an ablation arm of stage select's choice in a (model, seed) where nothing was selected."""
    chosen = {(m, int(s)) for m, s in selection.loc[selection["selected"].astype(bool), ["model", "seed"]]
              .itertuples(index=False)}
    params = cells["params"].map(json.loads)
    return ((cells["stage"] == "steer") & params.map(lambda p: p.get("mode") == "ablation"
                                                     and p.get("direction_layer") == "selected")
            & pd.Series([(m, int(s)) not in chosen for m, s in zip(cells["model"], cells["seed"])], index=cells.index))


def check_selection(selection: pd.DataFrame, n_layers: dict[str, int], cfg: dict) -> int:
    """Assert stage select's rows obey its definitions, recomputed from each row's values and the spec's
    `stages.select` block (refusal_ray/stages/select.py `choose` and `ranked`; Arditi et al.'s `filter_fn`):
    a candidate passes when it is not zero-norm, its bypass, induce and KL are not NaN, its layer is below
    int(n_layers * max_layer_fraction), KL <= kl_max and induce >= induce_min; where any passes, exactly
    one row of the (model, seed) is selected, the best passing one by the criterion (bypass: lowest;
    swing, separation: highest; ties: the lower layer, then the later position); where none passes,
    nothing is selected, or without a fallback nothing at all. Returns the number of (model, seed) where
    some candidate passed (a caller asserts it is > 0 where its filters let some pass)."""
    frac = cfg.get("max_layer_fraction", 0.8)
    kl_max, induce_min = cfg.get("kl_max", 0.1), cfg.get("induce_min", 0.0)
    criterion, fallback = cfg.get("criterion", "bypass"), cfg.get("fallback")
    with_pass = 0
    for (model, seed), g in selection.groupby(["model", "seed"]):
        scores = g[["bypass", "induce", "kl"]].to_numpy(float)
        eligible = np.isfinite(scores).all(axis=1) & ~g["zero_norm"].astype(bool).to_numpy()
        ok = eligible.copy()
        if frac is not None:
            ok &= (g["layer"].astype(int) < int(n_layers[model] * frac)).to_numpy()
        if kl_max is not None:
            ok &= (g["kl"].astype(float) <= kl_max).to_numpy()          # NaN compares False: never passes
        if induce_min is not None:
            ok &= (g["induce"].astype(float) >= induce_min).to_numpy()
        assert (g["passed"].astype(bool).to_numpy() == ok).all(), (model, seed, g.loc[g["passed"].astype(bool) != ok])
        assert (g["filter"].isna().to_numpy() == ok).all(), (model, seed)
        chosen = g[g["selected"].astype(bool)]
        if ok.any():
            pool, by, label = g[ok], criterion, criterion
            with_pass += 1
        elif fallback is not None and eligible.any():
            pool, by, label = g[eligible], fallback, f"fallback:{fallback}"
        else:
            assert chosen.empty, (model, seed, chosen)
            continue
        pool = pool[pool[by].notna()]
        rank = pool[by].astype(float) * (1 if by == "bypass" else -1)
        order = pool.assign(_rank=rank, _later=-pool["position"].astype(int), _layer=pool["layer"].astype(int))
        best = order.sort_values(["_rank", "_layer", "_later"], kind="stable").iloc[0]
        assert len(chosen) == 1, (model, seed, chosen)
        assert (int(chosen["layer"].iloc[0]), int(chosen["position"].iloc[0])) == (int(best["layer"]),
                                                                                  int(best["position"])), (model, seed)
        assert chosen["selected_by"].iloc[0] == label
    return with_pass


def test_check_selection_sees_what_it_must():
    """The helper is not vacuous (no model, no Ray): on rows chosen by stage select's own `choose` with
    16 layers it passes, and it fails on a wrong choice, on layer 12 = int(0.8 * 16) passing, on a NaN
    score passing and on nothing selected where candidates pass."""
    from refusal_ray.stages.select import choose

    cfg = {"criterion": "bypass", "max_layer_fraction": 0.8, "kl_max": 0.1, "induce_min": 0.0, "fallback": None}
    rows = [{"layer": layer, "position": p, "bypass": b, "induce": 1.0, "kl": 0.05, "swing": 0.0, "separation": 0.0,
             "zero_norm": False} for layer, p, b in ((3, -1, -2.0), (3, -2, -2.0), (2, -1, -2.0), (5, -1, -1.0),
                                                     (12, -1, -9.0), (11, -1, float("nan")))]
    good = pd.DataFrame(choose([dict(r) for r in rows], 16, cfg)).assign(model="m", seed=0)
    assert check_selection(good, {"m": 16}, cfg) == 1
    chosen = good[good["selected"]].iloc[0]
    assert (chosen["layer"], chosen["position"]) == (2, -1)          # tie on bypass: the lower layer
    broken = []
    wrong = good.assign(selected=(good["layer"] == 3) & (good["position"] == -1))   # the later position of layer 3,
    broken.append(wrong)                                             # but layer 2 ranks first
    broken.append(good.assign(passed=good["passed"] | (good["layer"] == 12)))
    broken.append(good.assign(passed=good["passed"] | good["bypass"].isna()))
    broken.append(good.assign(selected=False))
    for df in broken:
        with pytest.raises(AssertionError):
            check_selection(df, {"m": 16}, cfg)
    assert check_selection(good.assign(kl=1.0, passed=False, filter="kl>0.1", selected=False), {"m": 16}, cfg) == 0


def test_run_writes_every_table(finished_run):
    from statsmodels.stats.proportion import proportion_confint

    spec, out, result = finished_run
    cells = refusal_ray.read(out, "cells")
    assert len(cells) == 12 + 20 + 2                 # + one select cell per (model, seed)
    selection = refusal_ray.read(out, "selection")
    skipped = _skip_expected(cells, selection)
    # every cell ran, except ablation arms of a seed where no candidate was selected: those are
    # stored as skipped, with the reason
    assert (cells.loc[~skipped, "status"] == "done").all()
    assert (cells.loc[skipped, "status"] == "skipped").all()
    assert cells.loc[skipped, "error"].str.startswith("no direction selected for this seed").all()
    assert cells["cell_id"].is_unique
    for table in ("directions", "selection", "steering", "completions"):
        df = pd.read_parquet(out / table)         # plain pandas, hive partitions
        assert set(df["model"].astype(str)) == {"qwen-xs", "llama-s"}
    steering = refusal_ray.read(out, "steering")
    ran = cells[(cells["stage"] == "steer") & (cells["status"] == "done")]
    assert len(steering) == 2 * len(ran)  # every steer cell that ran: harmful + harmless rows
    lo, hi = proportion_confint(steering["refusals"], steering["n"], method="wilson")
    np.testing.assert_allclose(steering["ci_low"], lo, rtol=0, atol=1e-12)
    np.testing.assert_allclose(steering["ci_high"], hi, rtol=0, atol=1e-12)
    assert (steering["rate"] == steering["refusals"] / steering["n"]).all()
    completions = refusal_ray.read(out, "completions")
    assert not completions.duplicated(["cell_id", "prompt_set", "prompt_id"]).any()
    assert len(completions) == (len(steering)) * 8
    judged = completions.groupby(["cell_id", "prompt_set"])["refusal"].agg(["sum", "size"])
    counts = steering.set_index(["cell_id", "prompt_set"])[["refusals", "n"]]
    assert (judged.loc[counts.index, "sum"] == counts["refusals"]).all()
    assert (judged.loc[counts.index, "size"] == counts["n"]).all()
    manifest = json.loads((out / "manifest.json").read_text())
    directions = refusal_ray.read(out, "directions")
    # one row per layer x post-instruction position at resid_pre
    assert len(directions) == sum(manifest["models"][m]["n_layers"] * len(manifest["models"][m]["positions"])
                                  for m in ("qwen-xs", "llama-s"))
    assert all(len(v) == d for v, d in zip(directions["vector"], directions["model"].map({"qwen-xs": 48, "llama-s": 96})))
    # stage select: every layer x position candidate of every (model, seed), scored
    for model in ("qwen-xs", "llama-s"):
        n_layers, positions = manifest["models"][model]["n_layers"], manifest["models"][model]["positions"]
        assert len(positions) > 1                      # the template's post-instruction tokens
        for seed in (0,):
            sel = selection[(selection["model"] == model) & (selection["seed"] == seed)]
            assert len(sel) == n_layers * len(positions)
            assert set(zip(sel["layer"].astype(int), sel["position"].astype(int))) == {
                (layer, p) for layer in range(n_layers) for p in positions}
            # scored unless zero-norm (layer 0 at a template token: every prompt embeds it alike)
            zero = sel["zero_norm"].astype(bool)
            assert np.isfinite(sel.loc[~zero, ["bypass", "induce", "kl"]].to_numpy(float)).all()
            assert np.isnan(sel.loc[zero, ["bypass", "induce", "kl"]].to_numpy(float)).all()
            assert (sel.loc[zero, "norm"] <= 1e-6 * sel["norm"].max()).all()
    # the filters and the choice, recomputed from the rows and the spec's select block
    n_layers = {m: manifest["models"][m]["n_layers"] for m in ("qwen-xs", "llama-s")}
    assert check_selection(selection, n_layers, manifest["spec"]["stages"]["select"]) == 1   # llama-s only
    assert not selection.loc[selection["model"] == "qwen-xs", "selected"].astype(bool).any()
    summary = pd.read_parquet(out / "summary.parquet")
    assert summary["model"].tolist() == ["qwen-xs", "llama-s"]   # sorted by parameter count
    assert summary["params"].is_monotonic_increasing
    assert summary["rule_hash"].iloc[0] == manifest["rule_hash"]
    assert {"torch", "ray", "transformers"} <= set(manifest["libraries"])
    assert "qwen-xs" in result.stdout and "control_margin" in result.stdout
    # the printed headline table (its title to the first blank line) fits a terminal of 120 columns
    printed = result.stdout.splitlines()
    start = next(i for i, line in enumerate(printed) if line.startswith("headline ("))
    headline = printed[start: next((i for i in range(start, len(printed)) if not printed[i].strip()), len(printed))]
    assert len(headline) >= 4 and any("qwen-xs" in line for line in headline)
    assert max(map(len, headline)) <= 120, "\n".join(headline)
    # the chat judge (its own Ray actor) labelled every completion once
    judgements = refusal_ray.read(out, "judgements")
    key = ["model", "cell_id", "prompt_set", "prompt_id"]
    assert len(judgements) == len(completions) and set(judgements["judge"]) == {"rubric"}
    assert set(map(tuple, judgements[key].astype(str).values)) == set(map(tuple, completions[key].astype(str).values))
    assert judgements["error"].isna().all()
    ok = judgements[~judgements["malformed"].astype(bool)]
    # the toy rubric's explicit refusal line: a refusal has compliance 0 (refusal 1 with compliance > 0 is
    # malformed), gibberish is compliance 0 without being a refusal
    assert len(ok) and (~ok["refusal"].astype(bool) | (ok["compliance"] == 0)).all()
    assert set(pd.read_parquet(out / "agreement.parquet")["model"]) == {"qwen-xs", "llama-s", "ALL"}
    assert manifest["judges"]["rubric"]["kind"] == "chat" and summary["judge"].iloc[0] == "substring"
    assert "substring ~ rubric" in result.stdout and "kappa [95% CI]" in result.stdout   # the agreement table
    for fig in ("steering.png", "separation.png", "cosines.png", "scale_trend.png", "selection.png"):
        assert (out / "figures" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig   # content: tests/test_figures.py


def test_baseline_rows_match_model_behaviour(finished_run):
    _, out, _ = finished_run
    s = refusal_ray.read(out, "steering")
    base = s[s["mode"] == "baseline"].set_index(["model", "prompt_set"])["rate"]
    assert (base.xs(("harmful"), level=1) >= 0.9).all()     # the toy models refuse harmful requests
    assert (base.xs(("harmless"), level=1) <= 0.1).all()


def test_rerun_skips_done_cells(finished_run):
    spec, out, _ = finished_run
    before = sorted(p.name for p in out.rglob("*.parquet"))
    result = run_cli("run", str(spec), "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "34 cells, 34 already done, 0 to run" in result.stderr
    after = sorted(p.name for p in out.rglob("*.parquet") if p.parent.parent.name in
                   ("cells", "steering", "directions", "selection", "completions"))
    assert set(after) <= set(before)


def test_summarize_and_report_commands(finished_run):
    _, out, _ = finished_run
    result = run_cli("summarize", str(out))
    assert result.returncode == 0 and "llama-s" in result.stdout
    assert run_cli("report", str(out)).returncode == 0
    assert "![steering.png]" in (out / "report.md").read_text()


def test_changed_rule_is_refused(finished_run, tmp_path):
    spec, out, _ = finished_run
    raw = yaml.safe_load(spec.read_text())
    raw["decision_rule"]["steering_labels"]["strong"] = 0.9
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    result = run_cli("run", str(changed), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {changed}: decision_rule: differs from the rule frozen in")


def test_killed_driver_resumes_without_recomputing(tmp_path):
    spec = small_spec(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([*CLI, "run", str(spec), "--out", str(out), "--no-progress"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "cells").rglob("*.parquet"))) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)          # the driver and the Ray it started, nothing else
    proc.wait()
    done_before = Store(out).done_cells()
    assert 0 < len(done_before) < 32
    result = run_cli("run", str(spec), "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"32 cells, {len(done_before)} already done, {32 - len(done_before)} to run" in result.stderr
    raw = pd.read_parquet(out / "cells")
    done_rows = raw[raw["status"] == "done"]
    assert done_rows["cell_id"].value_counts().max() == 1    # no cell was computed twice
    for table, key in (("steering", ["cell_id", "prompt_set"]), ("completions", ["cell_id", "prompt_set", "prompt_id"])):
        df = refusal_ray.read(out, table)
        assert not df.duplicated(key).any()
    assert len(refusal_ray.read(out, "cells")) == 32


def test_failing_cells_are_stored_and_exit_1(tmp_path, tokenizer_dir):
    """A model that fails every batch (GPT-2 with 16 positions, prompts of ~50 tokens)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=len(tok),
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    broken = tmp_path / "short-gpt2"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(broken)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (broken / f).write_bytes((tokenizer_dir / f).read_bytes())
    spec = small_spec(tmp_path)
    raw = yaml.safe_load(spec.read_text())
    raw["models"] = [raw["models"][0], {"name": "short", "path": str(broken)}]
    spec.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    result = run_cli("run", str(spec), "--out", str(out), "--no-progress")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "cell(s) failed" in result.stderr
    cells = refusal_ray.read(out, "cells")
    failed, done = cells[cells["status"] == "failed"], cells[cells["status"] == "done"]
    assert set(failed["model"]) == {"short"} and set(done["model"]) == {"qwen-xs"}
    assert len(done) == 12 and len(failed) == 1 + 1 + 2 * 2 * 2 + 2
    directions_failure = failed[failed["stage"] == "directions"].iloc[0]
    assert directions_failure["attempts"] == 3 and directions_failure["error"]
    assert (failed[failed["stage"] == "steer"]["error"].str.startswith("directions failed: ")).all()
    assert "qwen-xs" in result.stdout                      # the summary still prints


def test_worker_killed_mid_batch_is_restarted_and_retried(tmp_path):
    spec = small_spec(tmp_path)
    out = tmp_path / "out"
    marker = tmp_path / "crashed"
    env = dict(os.environ, REFUSAL_RAY_CRASH_ONCE=str(marker))
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([*CLI, "run", str(spec), "--out", str(out), "--no-progress"], capture_output=True,
                            text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists()                                   # a worker really died
    assert "retrying steer batch" in result.stderr and "worker died" in result.stderr
    cells = refusal_ray.read(out, "cells")
    assert len(cells) == 32 and (cells["status"] == "done").all()
    assert (cells["attempts"] == 2).any()
    raw = pd.read_parquet(out / "cells")
    assert raw["cell_id"].value_counts().max() == 1          # every cell stored exactly once
    completions = refusal_ray.read(out, "completions")
    assert not completions.duplicated(["cell_id", "prompt_set", "prompt_id"]).any()


def test_one_model_runs_on_two_replicas(tmp_path):
    spec = small_spec(tmp_path, seeds=(0, 1))
    raw = yaml.safe_load(spec.read_text())
    raw["models"] = raw["models"][:1]
    raw["stages"]["steer"]["batch_size"] = 16      # 4 cells per batch: 3 steering batches per seed
    spec.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    result = run_cli("run", str(spec), "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    cells = refusal_ray.read(out, "cells")
    assert len(cells) == 24 and cells["worker"].nunique() == 2


def test_run_into_a_uri_store(tmp_path):
    spec = small_spec(tmp_path)
    raw = yaml.safe_load(spec.read_text())
    raw["models"] = raw["models"][:1]
    spec.write_text(yaml.safe_dump(raw))
    uri = f"file://{tmp_path}/uri-store"
    result = run_cli("run", str(spec), "--out", uri, "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(refusal_ray.read(uri, "cells")) == 12
    assert refusal_ray.read(uri, "summary")["model"].tolist() == ["qwen-xs"]
    assert (tmp_path / "uri-store" / "figures" / "steering.png").stat().st_size > 1000
    assert run_cli("summarize", uri).returncode == 0


def test_circuit_sweep_end_to_end(tmp_path):
    """patch + scrub on a toy model through the CLI: tables, summary columns, and a rerun that skips."""
    spec = yaml.safe_load((REPO / "sweeps" / "circuit.yaml").read_text())
    spec["models"] = [{"name": "qwen-s", "path": str(TOY_MODELS / "toy-qwen-s")}]
    spec["seeds"] = [0]
    for cls in ("harmful", "harmless"):
        spec["data"][cls]["path"] = str(TOY_PROMPTS / f"{cls}.jsonl")
    spec["data"].update(n_train=16, n_val=8, n_test=8)
    spec["stages"]["patch"].update(n_pairs=6, confirm_top_k=10, sites=["resid_post", "mlp_out", "z"])
    spec["stages"]["scrub"].update(n_pairs=4, hypotheses=spec["stages"]["scrub"]["hypotheses"][:2])
    f = tmp_path / "circuit.yaml"
    f.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    result = run_cli("run", str(f), "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    patching = refusal_ray.read(out, "patching")
    n_targets = 4 * (2 + 4)                      # toy-qwen-s: 4 layers, 4 heads
    assert len(patching) == n_targets * 6 and patching["attribution"].notna().all()
    assert patching["recovery"].notna().sum() == 10 * 6
    assert set(patching["head"].dropna().astype(int)) <= set(range(4))
    scrubbing = refusal_ray.read(out, "scrubbing")
    assert sorted(scrubbing["hypothesis"]) == ["late-attn", "late-attn-mlp"]
    for _, row in scrubbing.iterrows():
        assert row["mean_kl"] == pytest.approx(float(np.mean(row["kl_per_example"])), rel=1e-12, abs=0)
        assert row["faithfulness"] == pytest.approx(float(np.exp(-row["mean_kl"])), rel=1e-12, abs=0)
        assert row["threshold"] == spec["stages"]["scrub"]["threshold"]
        assert row["verdict"] == ("FAITHFUL" if row["faithfulness"] >= row["threshold"] else "UNFAITHFUL")
    summary = pd.read_parquet(out / "summary.parquet")
    assert {"top_component", "attribution_spearman", "faithfulness[late-attn]", "verdict[late-attn-mlp]"} <= set(summary)
    cells = refusal_ray.read(out, "cells")
    assert cells.groupby("stage").size().to_dict() == {"directions": 1, "patch": 1, "scrub": 2}
    again = run_cli("run", str(f), "--out", str(out), "--no-progress")
    assert again.returncode == 0 and "0 to run" in again.stdout + again.stderr
