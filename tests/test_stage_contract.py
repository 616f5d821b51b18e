"""The stage contract (README "Adding a stage"): a stage is its declaration (spec block, cross-field checks,
cells, run) and its read side (summary columns, report section). A throwaway stage defined inside this
test, registered with `STAGES.register`, appears in the spec (its block validated, errors exit 2 naming
`stages.<name>.<field>`), runs, stores, summarises and reports, with no other file changed. And every
built-in stage declares its block, its checks and its read module."""

from __future__ import annotations

import json
import sys
import types

import pytest
from pydantic import Field
from typer.testing import CliRunner

from conftest import TOY_MODELS, TOY_PROMPTS

NAME, TABLE = "echo", "echo_rows"


def _validate(spec) -> None:
    block = spec.stages.echo
    if block is not None and 0 in block.ks:
        raise ValueError("stages.echo.ks: k = 0 echoes nothing")


def _inputs(settings, needs):
    """The number of direction rows of this (model, seed): what the task carries from its need."""
    return len((needs.get("directions") or {}).get("directions", []))


def _run(session, cells, payload):
    return {TABLE: [{"cell_id": c.id, "seed": c.seed, "k": c.params["k"], "value": c.params["k"] * c.params["scale"],
                     "n_directions": payload} for c in cells]}


def _summary(ctx, model, row):
    t = ctx.tables[TABLE]
    mine = t[t["model"] == model] if not t.empty else t
    return {"echo_total": float(mine["value"].sum())} if len(mine) else {}


def _report(ctx):
    from refusal_ray.core.render import markdown_table, not_run

    t = ctx.tables[TABLE]
    if t.empty:
        return ["## Echo", "", *not_run(NAME, ctx.stages)]
    return ["## Echo", "", *markdown_table(t[["model", "seed", "k", "value"]].sort_values(["seed", "k"])), ""]


@pytest.fixture
def echo_stage(monkeypatch):
    """The throwaway stage: its block class, checks and declaration here, its read module a module object
    (no file), its table added to the store's list; registered for the test, then removed."""
    from refusal_ray.core import tables
    from refusal_ray.ops.base import Strict
    from refusal_ray.stages import STAGES
    from refusal_ray.stages.base import Reader, Stage

    class EchoStage(Strict):
        ks: list[int] = Field([1, 2], min_length=1, description="Echoed values.")
        scale: float = Field(2.0, gt=0, description="Each value is k x scale.")

    read = types.ModuleType("echo_read")
    read.READER = Reader(summary=_summary, display=lambda: [("echo_total", "echo", "{:.1f}")], report=_report,
                         order=65, title="Echo", tables=(TABLE,))
    monkeypatch.setitem(sys.modules, "echo_read", read)
    monkeypatch.setattr(tables, "STAGE_TABLES", (*tables.STAGE_TABLES, TABLE))
    monkeypatch.setattr(tables, "TABLES", (*tables.TABLES, TABLE))
    stage = Stage(name=NAME, tables=(TABLE,), needs=("directions",),
                  cells=lambda spec, mp: [{"k": k, "scale": spec.stages.echo.scale} for k in spec.stages.echo.ks],
                  id_key=lambda spec: {}, inputs=_inputs, run=_run, block=EchoStage, validate=_validate,
                  read="echo_read")
    STAGES.register(stage)
    yield stage
    STAGES.unregister(NAME)


def _spec(tmp_path, echo) -> str:
    spec = {"name": "echo-toy", "models": [{"name": "qwen-xs", "path": str(TOY_MODELS / "toy-qwen-xs")}],
            "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                     "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")}, "n_train": 8, "n_val": 4, "n_test": 4},
            "stages": {"directions": {"sites": ["resid_pre"]}, "echo": echo},
            "generation": {"max_new_tokens": 4},
            "decision_rule": {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                                                 "addition_coefficient": 1.0, "ablation_alpha": 1.0},
                              "steering_labels": {"strong": 0.5, "weak": 0.2}}}
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))
    return str(path)


def test_a_throwaway_stage_is_in_the_spec_with_its_checks(echo_stage, tmp_path):
    from refusal_ray.cli import app
    from refusal_ray.spec import Spec, load_spec

    spec = load_spec(_spec(tmp_path, {"ks": [1, 3]}))
    assert type(spec.stages.echo) is echo_stage.block and spec.stages.echo.ks == [1, 3]
    assert list(Spec.model_json_schema()["$defs"]["Stages"]["properties"])[-1] == NAME
    assert load_spec(_spec(tmp_path, None)).stages.echo is None   # off unless set
    for echo, field, msg in (({"scale": -1}, "stages.echo.scale", "Input should be greater than 0"),
                             ({"typo": 1}, "stages.echo.typo", "unknown key"),
                             ({"ks": [0]}, None, "stages.echo.ks: k = 0 echoes nothing")):   # its validate
        f = _spec(tmp_path, echo)
        result = CliRunner().invoke(app, ["validate", f])
        assert (result.exit_code, result.output.strip()) == (2, f"error: {f}: {field + ': ' if field else ''}{msg}")


def test_a_throwaway_stage_runs_stores_summarises_and_reports(echo_stage, tmp_path):
    from refusal_ray.analysis.report import write_report
    from refusal_ray.analysis.summary import render, summarize
    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan
    from refusal_ray.runner import freeze_manifest
    from refusal_ray.store import Store

    plan = make_plan(_spec(tmp_path, {"ks": [1, 3], "scale": 0.5}))
    assert sorted(c.params["k"] for c in plan.cells if c.stage == NAME) == [1, 3]
    tables = run_local(plan, log=lambda *a: None)
    assert {r["stage"]: (r["status"], r["error"]) for r in tables["cells"]} == {"directions": ("done", None),
                                                                                NAME: ("done", None)}
    n_dirs = len(tables["directions"])
    assert [(r["k"], r["value"], r["n_directions"]) for r in tables[TABLE]] == [(1, 0.5, n_dirs), (3, 1.5, n_dirs)]
    store = Store(tmp_path / "out")
    freeze_manifest(plan, store)
    for table, rows in tables.items():
        store.write(table, "qwen-xs", [{k: v for k, v in r.items() if k != "model"} for r in rows])
    assert sorted(store.read(TABLE)["value"]) == [0.5, 1.5]
    summary = summarize(tmp_path / "out")
    assert summary.loc[0, "echo_total"] == 2.0
    assert "echo" in render(summary, wide=True).splitlines()[0]
    # compact layout: a plain (column, header, fmt) entry goes to a detail table under its reader's title,
    # its legend naming the summary column
    assert "  echo: column `echo_total` of summary.csv" in render(summary).splitlines()
    report = (tmp_path / "out" / "report.md").read_text() if write_report(tmp_path / "out") else ""
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections.index("## Echo") == sections.index("## Activation patching: top components") + 1   # order 65
    assert "| qwen-xs | 0 | 3 | 1.500 |" in report


def test_every_built_in_stage_declares_its_block_checks_and_read_side():
    import importlib

    from refusal_ray.stages import STAGES
    from refusal_ray.stages.base import Reader, _no_validation

    assert [s.name for s in STAGES] == ["directions", "select", "steer", "capability", "patch", "scrub", "optimise",
                                       "rank", "search"]
    for stage in STAGES:
        assert stage.block is not None and stage.block.__module__ == f"refusal_ray.stages.{stage.name}", stage.name
        assert stage.validate is not _no_validation, stage.name
        assert stage.read == f"refusal_ray.stages.{stage.name}.read", stage.name
        assert isinstance(importlib.import_module(stage.read).READER, Reader), stage.name
