"""The import layers of pyproject.toml's [tool.importlinter] (README "Layout"): they hold on the repo,
they fail on a deliberate violation (in a copy of the package, so the check provably can fail), and
reading a store back (analysis) loads no torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="250")   # one line per contract, unwrapped
    if pythonpath is not None:   # the copy shadows the installed (editable) package
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_lint_imports_passes_on_the_repo():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout
    for name in ("cli -> runner -> cluster -> pipeline -> analysis -> spec -> stages -> ops -> models -> core",
                 "analysis reads a store: no torch, no stage's run side (only declarations and read modules), no "
                 "cluster, pipeline or runner internals",
                 "no import circles (between sibling modules or packages, at every depth)"):
        assert f"{name} KEPT" in result.stdout


@pytest.fixture
def package_copy(tmp_path):
    """A copy of refusal_ray/ and pyproject.toml; returns (root, edit) where edit(module path, line)
    appends an import line to one module of the copy."""
    shutil.copytree(REPO / "refusal_ray", tmp_path / "refusal_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")

    def edit(rel: str, line: str) -> None:
        path = tmp_path / "refusal_ray" / rel
        path.write_text(path.read_text() + f"\n{line}\n")
    return tmp_path, edit


def test_the_unchanged_copy_passes(package_copy):
    root, _ = package_copy
    result = lint(root, root)
    assert result.returncode == 0, result.stdout[-4000:]


def test_an_upward_import_breaks_the_layers(package_copy):
    root, edit = package_copy
    edit("models/sites.py", "import refusal_ray.runner  # deliberate: models -> runner")
    result = lint(root, root)
    assert result.returncode != 0
    out = result.stdout
    assert "cli -> runner -> cluster -> pipeline -> analysis -> spec -> stages -> ops -> models -> core BROKEN" in out
    assert "refusal_ray.models.sites -> refusal_ray.runner" in out
    assert "analysis reads a store" in out and "no import circles" in out   # the other contracts still ran


def test_analysis_importing_torch_or_a_stage_run_module_is_forbidden(package_copy):
    """analysis may import the stages' declarations and read modules (the summary loops over them), never a
    stage's run side (`refusal_ray.stages.*.run`, the wildcard in pyproject) nor torch."""
    root, edit = package_copy
    edit("analysis/judgements.py", "import torch  # deliberate")
    edit("analysis/figures.py", "from refusal_ray.stages.patch import run  # deliberate")
    edit("analysis/report_stages.py", "from refusal_ray.stages.steer import read  # allowed")
    result = lint(root, root)
    assert result.returncode != 0
    out = result.stdout
    assert "analysis reads a store: no torch, no stage's run side" in out and " BROKEN" in out
    assert "refusal_ray.analysis.judgements -> torch" in out
    assert "refusal_ray.analysis.figures -> refusal_ray.stages.patch.run" in out
    assert "refusal_ray.analysis.report_stages -> refusal_ray.stages.steer.read" not in out


def test_a_circle_between_sibling_modules_is_named(package_copy):
    """Two modules of one layer (`:` lets them import each other) that import each other: the layers
    contract allows it, the acyclic contract names the circle."""
    root, edit = package_copy
    edit("core/cells.py", "from refusal_ray import stats  # deliberate")
    edit("stats.py", "from refusal_ray.core import cells  # deliberate")
    result = lint(root, root)
    assert result.returncode != 0
    out = result.stdout
    assert "cli -> runner -> cluster -> pipeline -> analysis -> spec -> stages -> ops -> models -> core KEPT" in out
    assert "no import circles (between sibling modules or packages, at every depth) BROKEN" in out
    assert "No cycles are allowed in refusal_ray." in out
    assert ".core -> .stats" in out or ".stats -> .core" in out


def test_a_new_top_level_module_must_be_placed_in_a_layer(package_copy):
    root, _ = package_copy
    (root / "refusal_ray" / "unplaced.py").write_text('"""A module no layer names."""\n')
    result = lint(root, root)
    assert result.returncode != 0
    assert "refusal_ray.unplaced" in result.stdout


def test_reading_a_store_back_loads_no_torch():
    """The spec, the stage declarations (and their read modules, which the summary imports) and analysis are
    torch-free: a stage's torch-side functions are `lazy` until called."""
    code = ("import sys, refusal_ray.spec, refusal_ray.stages, refusal_ray.analysis.summary, "
            "refusal_ray.analysis.report; from refusal_ray.analysis.summary import display; display(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_the_store_knows_every_stage_table_without_importing_the_stages():
    from refusal_ray.core.tables import TABLES, check_declared
    from refusal_ray.stages import STAGES
    from refusal_ray.stages import TABLES as DECLARED
    from refusal_ray.stages.base import Stage

    assert set(DECLARED) <= set(TABLES) and TABLES[-1] == "judgements"
    check_declared(STAGES)
    rogue = Stage("rogue", ("rogue_rows",), cells=None, id_key=None, run=None)
    with pytest.raises(RuntimeError, match="stage 'rogue' writes table 'rogue_rows', which refusal_ray/core/tables.py "
                                           "does not list: add it to STAGE_TABLES"):
        check_declared([rogue])
