"""Experiment tracking (refusal_ray/tracking.py): a toy sweep logged to a local MLflow file store and read
back; a failing tracker does not fail the run; without the block mlflow is never imported."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_bad_input import base_spec

REPO = Path(__file__).resolve().parent.parent
QWEN_XS = REPO / "data" / "models" / "toy-qwen-xs"


def _run(tmp_path, tracking: dict | None) -> tuple[object, Path, list[str]]:
    """run_local fills a store, then runner.run finds every cell done (no Ray) and tracks."""
    from refusal_ray import runner
    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan
    from refusal_ray.store import Store

    spec = base_spec(QWEN_XS)
    if tracking is not None:
        spec["tracking"] = tracking
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    plan = make_plan(str(f))
    out = tmp_path / "out"
    run_local(plan, Store(out), log=lambda m: None)
    lines: list[str] = []
    failed = runner.run(plan, out, progress=False, log=lines.append)
    assert failed == 0
    return plan, out, lines


def test_mlflow_run_holds_the_summary_metrics(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    plan, out, lines = _run(tmp_path, {"mlflow": uri, "experiment": "toy"})
    assert any(line.startswith("tracking: MLflow run ") for line in lines), lines
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # reading back (tracking sets it for its call only)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("toy")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    summary = pd.read_parquet(out / "summary.parquet")
    checked = 0
    for row in summary.to_dict("records"):
        for col in ("baseline_harmful_refusal", "ablation_suppression_vs_control", "addition_induction_vs_control",
                    "separation"):
            if isinstance(row.get(col), float) and math.isfinite(row[col]):
                assert run.data.metrics[f"{row['model']}.{col}"] == row[col], sorted(run.data.metrics)[:20]
                checked += 1
        assert run.data.tags[f"{row['model']}.verdict_control_margin"] == row["verdict_control_margin"]
    assert checked >= 2
    p = run.data.params
    assert p["spec_hash"] == plan.spec.spec_hash() and p["rule_hash"] == plan.spec.rule_hash()
    assert p["sweep"] == "broken" and p["models"] == "tiny" and p["seeds"] == "0"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "manifest.json", "report.md", "summary.csv", "figures"} <= names
    figs = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figs and all(f.endswith(".png") for f in figs)


def test_tracking_failure_warns_one_line_and_keeps_the_run(tmp_path):
    # a file where the store's directory should be: MLflow cannot create its experiment there
    (tmp_path / "blocked").write_text("not a directory")
    _, out, lines = _run(tmp_path, {"mlflow": (tmp_path / "blocked" / "mlruns").as_uri()})
    warned = [line for line in lines if line.startswith("tracking: WARNING: MLflow logging")]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert (out / "summary.parquet").exists()


def _tracking_spec(tmp_path, tracking: dict, name: str = "spec") -> Path:
    spec = base_spec(QWEN_XS)
    spec["tracking"] = tracking
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(spec))
    return f


def test_credentials_in_the_uri_are_bad_input(tmp_path):
    from refusal_ray.errors import SpecError
    from refusal_ray.spec import load_spec

    f = _tracking_spec(tmp_path, {"mlflow": "https://user:secret@mlflow.example:5000"})
    with pytest.raises(SpecError, match=r"tracking\.mlflow: credentials in the URI"):
        load_spec(f)


def test_any_userinfo_or_token_in_the_uri_is_refused_at_plan_time(tmp_path):
    """Not only a password: a user name (a token as user), and secret-bearing query keys; one line naming
    tracking.mlflow, before anything runs."""
    from refusal_ray.errors import SpecError
    from refusal_ray.plan import make_plan, uri_credentials

    cases = [("https://someone@mlflow.example:5000", "user@ before the host"),
             ("https://ghp_abc123@mlflow.example", "user@ before the host"),
             ("https://mlflow.example/?token=abc", "query key 'token'"),
             ("https://mlflow.example/?experiment=1&api_key=abc", "query key 'api_key'"),
             ("https://mlflow.example/?access_token=abc", "query key 'access_token'"),
             ("https://mlflow.example/?X-Amz-Signature=abc", "query key 'X-Amz-Signature'"),
             ("https://mlflow.example/?sig=abc", "query key 'sig'"),
             ("https://mlflow.example/?secret=abc", "query key 'secret'"),
             ("https://mlflow.example/?password=", "query key 'password'"),
             ("https://mlflow.example/?key=abc", "query key 'key'")]
    for i, (uri, what) in enumerate(cases):
        f = _tracking_spec(tmp_path, {"mlflow": uri}, f"cred{i}")
        with pytest.raises(SpecError) as e:
            make_plan(str(f))
        assert str(e.value) == (f"{f}: tracking.mlflow: credentials in the URI ({what}) would be stored in the "
                                "manifest; set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
                                "MLFLOW_TRACKING_TOKEN) instead")
    for fine in ("file:./mlruns", "./mlruns", "sqlite:///mlflow.db", "http://127.0.0.1:5000",
                 "https://mlflow.example/?experiment=3"):
        assert uri_credentials(fine) is None, fine


def test_the_store_tag_has_no_userinfo():
    from refusal_ray.tracking import without_userinfo

    assert without_userinfo("s3://AKIA:secret@bucket/runs/x") == "s3://bucket/runs/x"
    assert without_userinfo("gs://me@bucket/x") == "gs://bucket/x"
    assert without_userinfo("/local/out") == "/local/out" and without_userinfo("s3://bucket/x") == "s3://bucket/x"


def test_wandb_missing_is_one_line_naming_the_field(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    from refusal_ray.errors import SpecError
    from refusal_ray.spec import load_spec

    f = _tracking_spec(tmp_path, {"wandb": "proj"})
    with pytest.raises(SpecError, match=r"tracking\.wandb: wandb is not installed: pip install wandb"):
        load_spec(f)


def test_without_the_block_mlflow_is_not_imported(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); from pathlib import Path; "
            "import test_tracking as t; t._run(Path(sys.argv[1]), None); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'wandb')))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_token_auth_banner_is_filtered_only_it():
    import logging

    from refusal_ray.cluster.driver import TOKEN_AUTH_BANNER, _AUTH_LOGGER, quiet_token_auth_banner

    quiet_token_auth_banner()
    quiet_token_auth_banner()
    logger = logging.getLogger(_AUTH_LOGGER)
    assert len(logger.filters) == 1
    banner = logger.makeRecord(_AUTH_LOGGER, logging.WARNING, __file__, 0,
                               TOKEN_AUTH_BANNER + " Set RAY_AUTH_MODE=disabled to opt out.", (), None)
    other = logger.makeRecord(_AUTH_LOGGER, logging.WARNING, __file__, 0,
                              "Token authentication is disabled for this Ray cluster.", (), None)
    assert not logger.filter(banner) and logger.filter(other)


def test_joining_a_cluster_filters_the_banner_too(monkeypatch):
    """connect(address) installs the banner filter before ray.init(address=...), as for a local start."""
    import logging

    from refusal_ray.cluster import driver

    logger = logging.getLogger(driver._AUTH_LOGGER)
    monkeypatch.setattr(logger, "filters", [])
    seen = []
    monkeypatch.setattr(driver.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(driver.ray, "init", lambda **k: seen.append((k, list(logger.filters))))
    assert driver.connect("ray://head.example:10001") is False
    assert seen == [({"address": "ray://head.example:10001", "log_to_driver": False},
                     [driver._drop_token_auth_banner])]


def test_wandb_run_gets_the_same_metrics(tmp_path, monkeypatch):
    """W&B (not installed here): a stand-in `wandb` module records what log_wandb hands it."""
    import types

    from refusal_ray import tracking
    from refusal_ray.store import Store

    _, out, _ = _run(tmp_path, None)
    from refusal_ray.analysis.report import write_report

    write_report(str(out))
    seen = {}

    class Run:
        id = "w1"
        summary: dict = {}

        def log_artifact(self, art):
            seen["files"] = art.files

        def log(self, d):
            seen["images"] = sorted(d)

        def finish(self, exit_code=0):
            seen["exit"] = exit_code

    class Artifact:
        def __init__(self, name, type):
            self.files = []

        def add_file(self, path, name):
            self.files.append(name)

    def init(**kw):
        seen["init"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Artifact=Artifact, Image=str))
    rid = tracking.log_wandb(types.SimpleNamespace(wandb="proj"), Store(out))
    assert rid == "w1" and seen["exit"] == 0 and seen["init"]["project"] == "proj"
    metrics, _ = tracking.summary_metrics(pd.read_parquet(out / "summary.parquet"))
    assert {k: Run.summary[k] for k in metrics} == metrics
    assert {"manifest.json", "report.md", "summary.csv"} <= set(seen["files"])
    assert seen["images"] and all(i.startswith("figures/") for i in seen["images"])


def test_local_ray_start_prints_no_token_auth_banner(tmp_path):
    """A real local Ray start through driver.connect (RAY_AUTH_MODE unset, as for a new user)."""
    import os

    from refusal_ray.cluster.driver import TOKEN_AUTH_BANNER

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    code = ("import ray; from refusal_ray.cluster.driver import connect; "
            "assert connect(None, 1); ray.shutdown()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert TOKEN_AUTH_BANNER not in r.stderr
