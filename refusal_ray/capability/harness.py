"""lm-evaluation-harness on our loaded model, with an arm's intervention active.

The Qwen-1.8B and Llama-3.2-1B studies measured the capability cost of weight orthogonalisation with
lm-evaluation-harness (ARC-Easy/Challenge, BoolQ, HellaSwag, PIQA, TruthfulQA-MC1, Winogrande). Here
lm-eval's HF wrapper (`HFLM(pretrained=<model instance>)`) runs on the model the worker already
holds, so the arm's hooks (or orthogonalised weights) are active in every lm-eval forward pass; the
model is never reloaded or written anywhere.

Local tasks: a folder of lm-eval YAML tasks (`stages.capability.lm_eval.include_path`) is read at plan
time and shipped with the payload (`ship_tasks`), so workers on other nodes need no shared disk; a
task's relative `dataset_kwargs.data_files` are read against its YAML's folder (lm-eval itself would
read them against the working directory). Registry tasks (e.g. `arc_easy`) pass by name and
download their data from the hub at run time.

Settings differing from lm-eval's CLI defaults: log-softmax in float32 (`softmax_dtype`) whatever the
model's dtype; no chat template (lm-eval's default, and the studies'); seeds fixed at lm-eval's
defaults.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

MAX_SHIPPED_BYTES = 64 * 2**20


def _load_yaml(path: Path, resolve: bool) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own loader: `include:` and `!function` tags

    return load_yaml(path, resolve_func=resolve)


def local_tasks(include_path: str | Path) -> dict[str, str]:
    """{task name: YAML path relative to include_path} of every task YAML under the folder (files
    without a `task:` key, such as group or template files, are skipped). Raises ValueError for an
    unreadable YAML."""
    root = Path(include_path)
    out: dict[str, str] = {}
    for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
        try:
            cfg = _load_yaml(path, resolve=False)
        except Exception as e:  # noqa: BLE001 - any YAML or include problem, reported with the file
            raise ValueError(f"{path}: {e}") from None
        if isinstance(cfg.get("task"), str):
            out[cfg["task"]] = str(path.relative_to(root))
    return out


def ship_tasks(tasks: list[str], include_path: str | None) -> dict:
    """What a worker needs to run `tasks`: {"tasks": [{"name", "yaml"}] ("yaml" None: a registry task),
    "files": {relative path: bytes} (every file under include_path)}. Raises ValueError naming a task
    that is neither local nor in lm-eval's registry, or a folder above MAX_SHIPPED_BYTES."""
    local = local_tasks(include_path) if include_path else {}
    registry = [t for t in tasks if t not in local]
    if registry:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager(verbosity="ERROR").all_tasks)
        unknown = [t for t in registry if t not in known]
        if unknown:
            where = f" nor a task YAML in {include_path}" if include_path else " (no include_path given)"
            raise ValueError(f"task {unknown[0]!r} is neither an lm-eval registry task{where}")
    files: dict[str, bytes] = {}
    if include_path:
        root = Path(include_path)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            files[str(path.relative_to(root))] = path.read_bytes()
        size = sum(map(len, files.values()))
        if size > MAX_SHIPPED_BYTES:
            raise ValueError(f"{include_path} holds {size / 2**20:.0f} MiB; at most {MAX_SHIPPED_BYTES // 2**20} MiB "
                             f"is shipped to workers (keep only the task files there)")
    return {"tasks": [{"name": t, "yaml": local.get(t)} for t in tasks], "files": files}


def _absolute(data_files, folder: Path):
    """data_files (a path, a list, or {split: path or list}) with relative paths made absolute in `folder`."""
    if isinstance(data_files, dict):
        return {k: _absolute(v, folder) for k, v in data_files.items()}
    if isinstance(data_files, list):
        return [_absolute(v, folder) for v in data_files]
    if isinstance(data_files, str) and "://" not in data_files and not Path(data_files).is_absolute():
        return str(folder / data_files)
    return data_files


def _task_specs(shipped: dict, root: Path) -> list:
    specs = []
    for task in shipped["tasks"]:
        if task["yaml"] is None:
            specs.append(task["name"])
            continue
        path = root / task["yaml"]
        cfg = _load_yaml(path, resolve=True)
        kwargs = dict(cfg.get("dataset_kwargs") or {})
        if "data_files" in kwargs:
            kwargs["data_files"] = _absolute(kwargs["data_files"], path.parent)
            cfg["dataset_kwargs"] = kwargs
        specs.append(cfg)
    return specs


def result_rows(results: dict) -> list[dict]:
    """One row per (task, metric) of lm-eval's results: metric "lm_eval/<task>/<metric>" (a filter
    other than "none" in brackets), value, stderr (None where lm-eval gives none), n (documents)."""
    rows = []
    n_samples = results.get("n-samples", {})
    for task, res in results["results"].items():
        n = (n_samples.get(task) or {}).get("effective", res.get("sample_len"))
        for key, value in res.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, flt = key.split(",", 1)
            stderr = res.get(f"{metric}_stderr,{flt}")
            rows.append({"metric": f"lm_eval/{task}/{metric}" + ("" if flt == "none" else f"[{flt}]"),
                         "value": float(value), "n": None if n is None else int(n),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return rows


def run_tasks(lm, shipped: dict, *, batch_size: int = 16, num_fewshot: int | None = None,
              limit: int | None = None, log_samples: bool = False) -> dict:
    """Run the shipped tasks on `lm` as it is now (any active hooks and weight edits included).

    Returns lm-eval's results dict (`results`, `n-samples`, and `samples` when log_samples).
    Raises whatever lm-eval raises (a registry task offline: a hub connection error).
    """
    import torch
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    root, manager = _materialized(shipped)
    head = lm.model.get_output_embeddings()
    head_weight = None if head is None else head.weight
    model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size, device=str(lm.device),
                 softmax_dtype=torch.float32)
    if head is not None and head.weight is not head_weight:
        # HFLM.__init__ calls model.tie_weights(): inside `orthogonalized`, which unties lm_head on purpose
        # (its own copy of the original matrix), that would re-tie it to the edited embedding
        head.weight = head_weight
    with contextlib.redirect_stdout(None):
        return evaluator.simple_evaluate(model=model, tasks=_task_specs(shipped, root), num_fewshot=num_fewshot,
                                         limit=limit, log_samples=log_samples, task_manager=manager,
                                         verbosity="ERROR")


# per process: the shipped files written once and lm-eval's task index built once (indexing the registry
# takes seconds), not once per arm
_MATERIALIZED: dict[str, tuple[Path, object]] = {}


def _materialized(shipped: dict) -> tuple[Path, object]:
    """(folder holding the shipped files, lm-eval TaskManager over it), cached by the shipped content;
    the folder is removed at interpreter exit."""
    from lm_eval.tasks import TaskManager

    digest = hashlib.sha256(json.dumps([t["name"] for t in shipped["tasks"]]).encode())
    for rel in sorted(shipped["files"]):
        digest.update(rel.encode() + b"\0" + hashlib.sha256(shipped["files"][rel]).digest())
    key = digest.hexdigest()
    if key not in _MATERIALIZED:
        root = Path(tempfile.mkdtemp(prefix="refusal-ray-lmeval-"))
        atexit.register(shutil.rmtree, root, True)
        for rel, data in shipped["files"].items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        registry = any(t["yaml"] is None for t in shipped["tasks"])
        manager = TaskManager(verbosity="ERROR", include_path=str(root) if shipped["files"] else None,
                              include_defaults=registry)
        _MATERIALIZED[key] = (root, manager)
    return _MATERIALIZED[key]
