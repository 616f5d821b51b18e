"""`run` end to end: plan, freeze the manifest, run missing cells on Ray, summarise."""

from __future__ import annotations

import getpass
import importlib.metadata as md
import platform
import socket
import subprocess
import time
from pathlib import Path

from refusal_ray.errors import SpecError
from refusal_ray.plan import Plan
from refusal_ray.stages import STAGES
from refusal_ray.store import Store

LIBRARIES = ("torch", "transformers", "accelerate", "ray", "pandas", "pyarrow", "bitsandbytes", "tokenizers")


def _git_sha() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def manifest(plan: Plan) -> dict:
    """The manifest: resolved spec and hashes, rule, code and environment (no secrets), and what each
    stage declares (`Stage.manifest`, every stage, enabled or not)."""
    spec = plan.spec
    return {
        "sweep": spec.name, "spec": spec.model_dump(mode="json"), "spec_hash": spec.spec_hash(),
        "spec_file": plan.spec_file,
        "decision_rule": spec.decision_rule.model_dump(mode="json"), "rule_hash": spec.rule_hash(),
        "data_fingerprint": plan.data_fingerprint, "data_sources": plan.data_sources,
        "models": {n: {"params": mp.params, "n_layers": mp.n_layers, "d_model": mp.d_model, "family": mp.family,
                       "estimate_bytes": mp.estimate_bytes, "positions": mp.positions,
                       "prompt_fingerprint": plan.fingerprints.get(n), **mp.chat,
                       **({"refusal_tokens": mp.refusal_tokens} if mp.refusal_tokens else {})}
                   for n, mp in plan.models.items()},
        "package_version": _version("refusal-ray"), "git_sha": _git_sha(),
        "libraries": {p: _version(p) for p in LIBRARIES},
        "host": {"hostname": socket.gethostname(), "python": platform.python_version(),
                 "platform": platform.platform(), "user": getpass.getuser()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **{key: value for stage in STAGES for key, value in stage.manifest(plan).items()},   # Stage.manifest
    }


def check_frozen_rule(plan: Plan, store: Store) -> None:
    """Refuse to run under a decision rule other than the one frozen in the store."""
    old = store.read_json("manifest.json")
    if old is not None and old.get("rule_hash") != plan.spec.rule_hash():
        raise SpecError(plan.spec_file, "decision_rule",
                        f"differs from the rule frozen in {store}/manifest.json "
                        f"(hash {plan.spec.rule_hash()} vs {old.get('rule_hash')}); use a new --out")


def freeze_manifest(plan: Plan, store: Store) -> None:
    """Write the manifest before any cell runs; refuse to change a frozen decision rule."""
    check_frozen_rule(plan, store)
    old = store.read_json("manifest.json")
    new = manifest(plan)
    if old is not None:
        new["created"] = old.get("created", new["created"])
        new["models"] = old.get("models", {}) | new["models"]
        for key in ("judges", "verdicts"):   # written by judging and the summary, kept across runs
            if key in old:
                new[key] = old[key]
    store.write_json("manifest.json", new)


def run(plan: Plan, out: str | Path, address: str | None = None, progress: bool = True, log=print) -> int:
    """Run the plan's missing cells, then its judges over every stored completion not yet judged
    (`refusal_ray.cluster.judging`), then, with a `tracking:` block only, log the store to MLflow
    (`refusal_ray.tracking`; without the block nothing is imported, and a tracking failure is one
    warning line). Returns the number of failed cells plus completions that could not be judged."""
    failed = _run(plan, out, address, progress, log)
    if plan.spec.tracking is not None:
        from refusal_ray.tracking import log_run

        log_run(plan, out, log=log)
    return failed


def _run(plan: Plan, out: str | Path, address: str | None, progress: bool, log) -> int:
    from refusal_ray.cluster.driver import Driver, cluster_placements, connect
    from refusal_ray.cluster.judging import judge_store, record_judges

    store = Store(out)
    check_frozen_rule(plan, store)
    record_judges(store, list(plan.spec.judges), plan.spec_file, write=False)   # name clashes: before any cell
    done = store.done_cells()
    todo = [c for c in plan.cells if c.id not in done]

    def judge() -> int:
        return judge_store(store, list(plan.spec.judges), source=plan.spec_file, address=address,
                           progress=progress, log=log).total_failed

    if not todo:
        freeze_manifest(plan, store)
        log(f"{len(plan.cells)} cells, {len(plan.cells)} already done, 0 to run")
        return judge()
    import ray

    started_here = connect(address)
    try:
        cluster, where = cluster_placements(plan)
        freeze_manifest(plan, store)  # after every check, before the first cell
        log(f"{len(plan.cells)} cells, {len(plan.cells) - len(todo)} already done, {len(todo)} to run")
        for name in sorted({c.model for c in todo}):
            log(f"  {name}: {where[name].describe()}")
        failed = Driver(plan, store, where, cluster, progress=progress, log=log).run(todo)
        return failed + judge()
    finally:
        if started_here:
            ray.shutdown()
