"""Experiment tracking: one MLflow (and/or W&B) run per `refusal-ray run` of a spec with a `tracking:` block.

Logged (read from the store, after the run): params (sweep, spec hash, decision rule hash, models,
seeds, package version, git sha, data fingerprint, verdict judge), summary metrics per model as
`<model>.<column>` (every finite number in summary.parquet, e.g. `qwen-s.ablation_suppression_vs_control`;
`cost_ce[addition]` becomes `cost_ce.addition`), the summary's text columns (verdicts, selected
direction) as tags, and the spec file, manifest.json, summary.csv, report.md and figures/*.png as artifacts.

mlflow and wandb are imported here only, lazily: a run without the block imports nothing. A tracking failure
(server down, bad URI) never fails the finished run: `log_run` returns an error line, the caller warns.
No environment (tokens, passwords) is logged; plan refuses credentials inside the tracking URI (userinfo,
token-like query keys: `plan.check_tracking`), and the store's address is logged without its userinfo.
"""

from __future__ import annotations

import io
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from refusal_ray.store import Store

# MLflow key characters: alphanumerics, _ - . / space (mlflow.utils.validation)
_BAD_KEY = re.compile(r"[^\w.\-/ ]")
# a server that does not answer must not hold the finished run for minutes (MLflow's default: 7 retries)
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def metric_key(model: str, column: str) -> str:
    """`<model>.<column>` with MLflow's key characters: 'cost_ce[addition-ctl]' -> 'cost_ce.addition-ctl'."""
    return _BAD_KEY.sub("_", f"{model}.{column.replace('[', '.').replace(']', '')}")


def summary_metrics(summary: pd.DataFrame) -> tuple[dict[str, float], dict[str, str]]:
    """({metric key: value}, {tag key: text}) of a summary table (one row per model): finite numbers
    are metrics, non-empty strings are tags. Booleans count as numbers (0/1)."""
    metrics, tags = {}, {}
    for row in summary.to_dict("records"):
        model = str(row["model"])
        for col, v in row.items():
            if col == "model":
                continue
            if isinstance(v, (bool, int, float)) and not isinstance(v, str):
                if math.isfinite(float(v)):
                    metrics[metric_key(model, col)] = float(v)
            elif isinstance(v, str) and v:
                tags[metric_key(model, col)] = v
    return metrics, tags


def run_params(manifest: dict, summary: pd.DataFrame) -> dict[str, str]:
    """The run's params from the manifest (strings; None values dropped)."""
    spec = manifest.get("spec", {})
    p = {"sweep": manifest.get("sweep"), "spec_hash": manifest.get("spec_hash"),
         "rule_hash": manifest.get("rule_hash"), "models": ",".join(sorted(manifest.get("models", {}))),
         "seeds": ",".join(str(s) for s in spec.get("seeds", [])),
         "package_version": manifest.get("package_version"), "git_sha": manifest.get("git_sha"),
         "data_fingerprint": manifest.get("data_fingerprint"),
         "judge": str(summary["judge"].iloc[0]) if "judge" in summary.columns and len(summary) else None}
    return {k: str(v) for k, v in p.items() if v not in (None, "")}


def without_userinfo(uri: str) -> str:
    """`uri` with any 'user:pass@' before its host removed (what is logged of a store's address)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri and ":" not in uri.split("/")[0]


@contextmanager
def _env_defaults(uri: str):
    """MLflow settings for this call only, where the user has not set them: short HTTP retries, and
    MLFLOW_ALLOW_FILE_STORE=true for a file store the spec names (MLflow >= 3.7 refuses one without it)."""
    defaults = _HTTP_DEFAULTS | ({"MLFLOW_ALLOW_FILE_STORE": "true"} if _is_file_store(uri) else {})
    set_here = [k for k in defaults if k not in os.environ]
    os.environ.update({k: defaults[k] for k in set_here})
    try:
        yield
    finally:
        for k in set_here:
            os.environ.pop(k, None)


def _artifacts(store: Store, spec_file: str | None, folder: Path) -> list[tuple[Path, str | None]]:
    """Copy the store's files to log into `folder` (the store may be remote): [(local file, artifact dir)]."""
    import pyarrow.fs as pafs

    out = []
    if spec_file and Path(spec_file).is_file():
        out.append((Path(spec_file), None))
    for name in ("manifest.json", "summary.csv", "report.md"):
        data = store.read_file(name)
        if data is not None:
            (folder / name).write_bytes(data)
            out.append((folder / name, None))
    infos = store.fs.get_file_info(pafs.FileSelector(f"{store.path.rstrip('/')}/figures", allow_not_found=True))
    (folder / "figures").mkdir(exist_ok=True)
    for info in sorted(infos, key=lambda i: i.path):
        base = info.path.rsplit("/", 1)[-1]
        if info.type == pafs.FileType.File and base.endswith(".png"):
            (folder / "figures" / base).write_bytes(store.read_file(f"figures/{base}"))
            out.append((folder / "figures" / base, "figures"))
    return out


def log_mlflow(tracking, store: Store, spec_file: str | None = None) -> str:
    """Log the store as one MLflow run at `tracking.mlflow` in experiment `tracking.experiment` (default:
    the sweep name). Reads summary.parquet and manifest.json (write them first). Returns the run id.
    Raises whatever MLflow raises (the caller turns it into a warning)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    manifest = store.read_json("manifest.json") or {}
    data = store.read_file("summary.parquet")
    summary = pd.read_parquet(io.BytesIO(data)) if data is not None else pd.DataFrame({"model": []})
    metrics, tags = summary_metrics(summary)
    params = run_params(manifest, summary)
    tags = {"refusal_ray.store": without_userinfo(store.uri), **tags}
    name = tracking.experiment or manifest.get("sweep") or "refusal-ray"
    with _env_defaults(tracking.mlflow):
        client = MlflowClient(tracking_uri=tracking.mlflow)
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        run = client.create_run(exp_id, run_name=manifest.get("sweep"))
        rid = run.info.run_id
        try:
            now = int(pd.Timestamp.now("UTC").timestamp() * 1000)
            m = [Metric(k, v, now, 0) for k, v in metrics.items()]
            p = [Param(k, v) for k, v in params.items()]
            t = [RunTag(k, v[:5000]) for k, v in tags.items()]
            for i in range(0, max(len(m), len(p), len(t)), 100):   # log_batch: at most 100 params/tags a call
                client.log_batch(rid, metrics=m[i:i + 100], params=p[i:i + 100], tags=t[i:i + 100])
            with tempfile.TemporaryDirectory() as tmp:
                for path, where in _artifacts(store, spec_file, Path(tmp)):
                    client.log_artifact(rid, str(path), where)
        except BaseException:
            client.set_terminated(rid, "FAILED")
            raise
        client.set_terminated(rid, "FINISHED")
    return rid


def log_wandb(tracking, store: Store, spec_file: str | None = None) -> str:
    """Log the store as one Weights & Biases run in project `tracking.wandb`: the params as config, the
    metrics and tags as the run summary, the files as one artifact, the figures as images. WANDB_MODE=offline
    keeps the run in ./wandb on this machine (`wandb sync` uploads it later). Returns the run id."""
    import wandb

    manifest = store.read_json("manifest.json") or {}
    data = store.read_file("summary.parquet")
    summary = pd.read_parquet(io.BytesIO(data)) if data is not None else pd.DataFrame({"model": []})
    metrics, tags = summary_metrics(summary)
    run = wandb.init(project=tracking.wandb, name=manifest.get("sweep"), config=run_params(manifest, summary),
                     job_type="refusal-ray-run")
    try:
        run.summary.update({**metrics, **tags})
        with tempfile.TemporaryDirectory() as tmp:
            files = _artifacts(store, spec_file, Path(tmp))
            art = wandb.Artifact(f"{manifest.get('sweep') or 'refusal-ray'}-store", type="refusal-ray-store")
            for path, where in files:
                art.add_file(str(path), name=f"{where}/{path.name}" if where else path.name)
            run.log_artifact(art)
            run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p, where in files if where == "figures"})
            run.finish()
    except BaseException:
        run.finish(exit_code=1)
        raise
    return run.id


def log_run(plan, out, log=print) -> list[str]:
    """After a run: rewrite the summary/report (so the logged numbers are this run's) and log the store
    to each configured tracker (MLflow, then W&B). Never raises: a failure is one warning line through
    `log`. Returns the run ids logged."""
    tracking = plan.spec.tracking
    if tracking is None:
        return []
    ids = []
    try:
        from refusal_ray.analysis.report import write_report

        write_report(str(out))
    except Exception as e:  # noqa: BLE001 - the run is done; tracking must not fail it
        log(f"tracking: not logged, the summary could not be written: {type(e).__name__}: {e}".splitlines()[0])
        return ids
    store = Store(out)
    if tracking.mlflow:
        try:
            ids.append(log_mlflow(tracking, store, plan.spec_file))
            log(f"tracking: MLflow run {ids[-1]} at {tracking.mlflow}")
        except Exception as e:  # noqa: BLE001 - server down, bad URI: warn, keep the run's exit status
            log(f"tracking: WARNING: MLflow logging to {tracking.mlflow} failed, the run itself is complete: "
                f"{type(e).__name__}: {e}".splitlines()[0])
    if tracking.wandb:
        try:
            ids.append(log_wandb(tracking, store, plan.spec_file))
            log(f"tracking: W&B run {ids[-1]} in project {tracking.wandb}")
        except Exception as e:  # noqa: BLE001 - as for MLflow
            log(f"tracking: WARNING: W&B logging to project {tracking.wandb} failed, the run itself is complete: "
                f"{type(e).__name__}: {e}".splitlines()[0])
    return ids
