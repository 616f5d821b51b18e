"""The `refusal-ray` command line (typer).

Exit codes: 0 done; 1 the run finished with failed cells or completions that could not be judged;
2 bad input (spec, paths, flags),
reported as one line naming the file and field, with nothing written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from refusal_ray.errors import SpecError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distributed sweeps of refusal-direction experiments (difference of means, "
                       "activation addition, directional ablation) on Ray.")
toy_app = typer.Typer(no_args_is_help=True, help="The toy model family (the embedded default).")
app.add_typer(toy_app, name="toy")
prompts_app = typer.Typer(no_args_is_help=True, help="Prompt sets: per-split files and datasets as single files.")
app.add_typer(prompts_app, name="prompts")


WIDE_HELP = ("Print the summary as one wide table of every column (short headers, no legend) instead of the "
             "headline and detail tables.")


def _bad_input(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def _default_out(spec_name: str) -> str:
    return f"outputs/{spec_name}"


@app.command()
def validate(spec: Annotated[Path, typer.Argument(help="Sweep spec (YAML).")]):
    """Check a spec (schema, files, models, layers) without running it. Offline, hub models are
    checked as far as the spec goes and the rest is listed as not checked (exit 0)."""
    from refusal_ray.plan import make_plan

    try:
        plan = make_plan(spec, offline_ok=True)
    except SpecError as e:
        _bad_input(e)
    offline = [line for line in plan.unchecked if line.startswith(("models.", "data."))]
    if not offline:
        typer.echo(f"{spec}: ok ({len(plan.cells)} cells)")
    else:
        typer.echo(f"{spec}: ok as far as it can be checked without the hub (schema, prompt and data files, "
                   f"options; {len(plan.cells)} cells of the models it could read)")
    for line in plan.unchecked:
        typer.echo(f"{'could not check offline' if line in offline else 'not checked before the run'}: {line}")
    if offline:
        typer.echo("(a hub model's config or a hub dataset could not be fetched: `refusal-ray plan` with the hub "
                   "reachable checks it)")


@app.command()
def plan(spec: Annotated[Path, typer.Argument(help="Sweep spec (YAML).")],
         out: Annotated[str | None, typer.Option(help="Store (path or URI) to count done cells in.")] = None,
         submission_id: Annotated[bool, typer.Option("--submission-id", help="Print only the sweep's stable "
                                                     "`ray job submit --submission-id`.")] = False):
    """Explain a spec: cells per stage and model, layers, memory estimate and placement per model."""
    from refusal_ray.plan import describe, make_plan
    from refusal_ray.store import Store

    try:
        p = make_plan(spec)
    except SpecError as e:
        _bad_input(e)
    if submission_id:
        typer.echo(p.submission_id())
        return
    store = Store(out or _default_out(p.spec.name))
    typer.echo(describe(p, store.done_cells() if store.exists() else set()))


@app.command()
def schema():
    """Print the JSON Schema of a sweep spec (for editors)."""
    from refusal_ray.spec import Spec

    typer.echo(json.dumps(Spec.model_json_schema(), indent=2))


@app.command()
def run(spec: Annotated[Path, typer.Argument(help="Sweep spec (YAML).")],
        out: Annotated[str | None, typer.Option(help="Store: a directory or a URI such as s3://bucket/sweep "
                                                     "(default outputs/<sweep name>).")] = None,
        address: Annotated[str | None, typer.Option(help="Ray address ('auto' joins a running cluster); "
                                                         "default: RAY_ADDRESS, else a local Ray.")] = None,
        models: Annotated[str | None, typer.Option(help="Comma-separated subset of model names.")] = None,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
        wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False):
    """Run a sweep, resuming by default; prints the summary at the end (a headline table within 120
    characters and the detail tables, each with a legend; `--wide`: one table of every column)."""
    from refusal_ray.cluster.security import check_address
    from refusal_ray.plan import make_plan
    from refusal_ray.runner import run as run_plan

    try:
        check_address(address or os.environ.get("RAY_ADDRESS"))
        p = make_plan(spec, [m for m in models.split(",") if m] if models else None)
        out = out or _default_out(p.spec.name)
        if "://" not in out and Path(out).exists() and not Path(out).is_dir():
            raise SpecError("--out", "", f"not a directory: {out}")
        failed = run_plan(p, out, address=address, progress=progress,
                          log=lambda m: typer.echo(m, err=True))
    except SpecError as e:
        _bad_input(e)
    _print_summary(out, wide=wide)
    if failed:
        typer.echo(f"{failed} cell(s) failed or completion(s) unjudged; see the cells table (status == 'failed') and "
                   f"the judgements table (error is not null)", err=True)
        raise typer.Exit(1)



@app.command()
def search(spec: Annotated[Path, typer.Argument(help="Sweep spec (YAML) with a stages.search block.")],
           out: Annotated[str | None, typer.Option(help="Store directory (default outputs/<sweep name>).")] = None,
           address: Annotated[str | None, typer.Option(help="Ray address ('auto' joins a running cluster); "
                                                            "default: RAY_ADDRESS, else a local Ray.")] = None,
           models: Annotated[str | None, typer.Option(help="Comma-separated subset of model names.")] = None,
           progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True):
    """Run the search studies of a spec (stages.search): its other stages first (the directions), then one Optuna
    study per (model, seed) on the model's actors, resumed from its journal, then the held-out re-runs."""
    from refusal_ray.cluster.search import run_search
    from refusal_ray.cluster.security import check_address
    from refusal_ray.plan import make_plan
    from refusal_ray.runner import run as run_plan
    from refusal_ray.store import Store

    try:
        check_address(address or os.environ.get("RAY_ADDRESS"))
        p = make_plan(spec, [m for m in models.split(",") if m] if models else None)
        if p.spec.stages.search is None:
            raise SpecError(str(spec), "stages.search", "the spec has no search block")
        out = out or _default_out(p.spec.name)
        if "://" in out:
            raise SpecError("--out", "", f"a search study needs a local store for its journal file, not {out}")
        log = lambda m: typer.echo(m, err=True)  # noqa: E731
        failed = run_plan(p, out, address=address, progress=progress, log=log)
        if failed:
            typer.echo(f"{failed} cell(s) failed before the search; see the cells table", err=True)
            raise typer.Exit(1)
        studies = run_search(p, Store(out), address=address, log=log)
    except SpecError as e:
        _bad_input(e)
    for s in studies:
        typer.echo(f"{s['study']}: {s['finished']} trials ({s['pruned']} pruned, {s['failed']} failed), "
                   f"{s['pareto']} on the Pareto front, criterion {'met' if s['meets_criterion'] else 'not met'}")

@app.command()
def judge(out: Annotated[str | None, typer.Argument(help="Store (path or URI) whose completions to judge.")] = None,
          judges: Annotated[Path | None, typer.Option("--judges", help="YAML file with a `judges:` list "
                                                      "(default: the store's spec's judges).")] = None,
          calibrate: Annotated[Path | None, typer.Option("--calibrate", help="Labelled CSV/JSONL (prompt, completion, "
                                                         "refusal; see data/judges/README.md): report each judge's "
                                                         "agreement with it instead of judging a store.")] = None,
          verdict_judge: Annotated[str | None, typer.Option("--verdict-judge", help="Recompute the summary's verdicts "
                                                            "under this judge (recorded in the manifest).")] = None,
          address: Annotated[str | None, typer.Option(help="Ray address for local model judges (default: "
                                                           "RAY_ADDRESS, else a local Ray).")] = None,
          progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True):
    """(Re-)judge stored completions without regenerating them (resumable: each (completion, judge)
    is judged once), or calibrate judges against human labels."""
    from refusal_ray.spec import load_judges

    try:
        chosen = load_judges(judges) if judges is not None else None
        if calibrate is not None:
            _calibrate(calibrate, chosen)
            return
        if out is None:
            raise SpecError("STORE", "", "give a store to judge (or --calibrate FILE)")
        _require_store(out)
        from refusal_ray.cluster.judging import judge_store
        from refusal_ray.store import Store

        store = Store(out)
        manifest = store.read_json("manifest.json")
        source = str(judges) if judges is not None else f"{out}/manifest.json"
        if chosen is None:
            from pydantic import TypeAdapter, ValidationError

            from refusal_ray.judges.config import JudgeSpec

            blocks = (manifest.get("spec") or {}).get("judges") or []
            if not blocks:
                raise SpecError(source, "spec.judges", "the store's spec names no judges; give --judges FILE")
            try:
                chosen = [TypeAdapter(JudgeSpec).validate_python(b) for b in blocks]
            except ValidationError as e:
                err = e.errors()[0]
                raise SpecError(source, "spec.judges", err["msg"].removeprefix("Value error, ")) from None
        from refusal_ray.plan import check_judges

        check_judges(chosen, source)
        known = {"substring", *(manifest.get("judges") or {}), *(j.name for j in chosen)}
        if verdict_judge is not None and verdict_judge not in known:
            raise SpecError("--verdict-judge", "",
                            f"unknown judge {verdict_judge!r}; known: {', '.join(sorted(known))}")
        if verdict_judge is not None:
            from refusal_ray.analysis.summary import check_verdict_judge

            check_verdict_judge(manifest, verdict_judge, {j.name: j.kind for j in chosen})
        result = judge_store(store, chosen, source=source, address=address, progress=progress,
                             log=lambda m: typer.echo(m, err=True))
    except SpecError as e:
        _bad_input(e)
    if result.total_written or verdict_judge is not None:
        _print_summary(out, verdict_judge)
    if result.total_failed:
        typer.echo(f"{result.total_failed} completion(s) could not be judged; see the judgements table "
                   f"(error is not null); rerun to retry them", err=True)
        raise typer.Exit(1)


def _calibrate(path: Path, judges: list | None) -> None:
    from refusal_ray.judges import SubstringJudge, make_judge
    from refusal_ray.judges.calibrate import calibrate, load_labelled, render_calibration

    labelled = load_labelled(path)
    if judges is None:
        built = [SubstringJudge()]
    else:
        from refusal_ray.plan import check_judges

        check_judges(judges, "--judges")
        built = []
        for c in judges:
            try:
                built.append(make_judge(c))
            except Exception as e:  # noqa: BLE001 - a judge that cannot load is bad input here
                raise SpecError("--judges", f"judges.{c.name}", f"cannot load: {e}".splitlines()[0]) from None
    for j in built:
        typer.echo(render_calibration(calibrate(j, labelled)))


def _print_summary(out: str, verdict_judge: str | None = None, wide: bool = False) -> None:
    from refusal_ray.analysis.report import write_report
    from refusal_ray.store import read
    from refusal_ray.analysis.summary import render

    report = write_report(out, verdict_judge)  # also writes summary.parquet and the per-judge tables
    typer.echo(render(read(out, "summary"), wide=wide))
    _print_extras(out, wide)
    typer.echo(f"store: {out}  report: {report}")


def _print_extras(out: str, wide: bool = False) -> None:
    """The per-judge table and the capability-cost table, where the store has them."""
    from refusal_ray.analysis.summary import judge_tables, read_cost, render_cost, render_judges

    for text in (render_judges(*judge_tables(out), wide=wide), render_cost(read_cost(out), wide=wide)):
        if text:
            typer.echo(text)


@app.command()
def summarize(out: Annotated[str, typer.Argument(help="Store (path or URI).")],
              verdict_judge: Annotated[str | None, typer.Option("--verdict-judge", help="The judge whose labels the "
                                                                "verdicts read (default: the last chosen, else the "
                                                                "decision rule's).")] = None,
              wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False):
    """Print the scale-trend summary of a store (and rewrite summary.parquet / summary.csv): a headline
    table within 120 characters and the detail tables, each with a legend (`--wide`: one table)."""
    from refusal_ray.store import Store
    from refusal_ray.analysis.summary import check_verdict_judge, known_judges, render, write_summary

    _require_store(out)
    manifest = Store(out).read_json("manifest.json")
    known = known_judges(manifest)
    if verdict_judge is not None and verdict_judge not in known:
        _bad_input(SpecError("--verdict-judge", "", f"unknown judge {verdict_judge!r}; known: {', '.join(known)}"))
    if verdict_judge is not None:
        try:
            check_verdict_judge(manifest, verdict_judge)
        except SpecError as e:
            _bad_input(e)
    typer.echo(render(write_summary(out, verdict_judge), wide=wide))
    _print_extras(out, wide)


@app.command()
def report(out: Annotated[str, typer.Argument(help="Store (path or URI).")]):
    """Write figures/*.png and report.md for a store."""
    from refusal_ray.analysis.report import write_report

    _require_store(out)
    typer.echo(write_report(out))


@prompts_app.command("merge")
def prompts_merge(spec: Annotated[Path, typer.Argument(help="Sweep spec (YAML).")],
                  out: Annotated[Path, typer.Option(help="Folder for harmful.jsonl / harmless.jsonl.")]):
    """Write the spec's prompt sets as single files (a per-split or `datasets` set as its canonical merged
    JSONL; a single file copied as it is) and print the equivalent `data:` block: a spec with that block
    gets the same draws and the same cell ids (README: "Prompt sets")."""
    from refusal_ray.data import write_merged
    from refusal_ray.spec import load_spec

    try:
        block = write_merged(load_spec(spec), out, str(spec))
    except SpecError as e:
        _bad_input(e)
    typer.echo(block, nl=False)


@toy_app.command("build")
def toy_build(out: Annotated[Path, typer.Option(help="Models directory.")] = Path("data/models"),
              seed: Annotated[int, typer.Option(help="Seed for data and training (>= 0).")] = 0,
              sizes: Annotated[str | None, typer.Option(help="Comma-separated sizes (default: all).")] = None,
              steps: Annotated[int | None, typer.Option(help="Override training steps (for quick checks).")] = None,
              data_dir: Annotated[Path | None, typer.Option(help="Prompt directory (default <out>/../prompts/toy).")] = None,
              judge: Annotated[bool, typer.Option("--judge", help="Also rebuild the toy chat judge (<out>/toy-judge) "
                                                  "and its held-out labelled file (<out>/../judges/toy_heldout.jsonl), "
                                                  "from <out>/../judges/toy_labelled.jsonl; ~10 min on 2 cores.")] = False):
    """Regenerate the toy data set and models from a seed (`--judge`: and the toy judge)."""
    from refusal_ray.toy.train import SIZES

    if seed < 0:
        _bad_input(SpecError("--seed", "", f"must be >= 0, got {seed}"))
    names = [s for s in sizes.split(",") if s] if sizes else list(SIZES)
    unknown = [s for s in names if s not in SIZES]
    if unknown:
        _bad_input(SpecError("--sizes", "", f"unknown size {unknown[0]!r}; known: {', '.join(SIZES)}"))
    if steps is not None and steps < 1:
        _bad_input(SpecError("--steps", "", f"must be >= 1, got {steps}"))
    data_dir = data_dir or out.parent / "prompts" / "toy"
    for opt, d in (("--out", out), ("--data-dir", data_dir)):
        if not _writable(d):
            _bad_input(SpecError(opt, "", f"not writable: {d}"))
    from refusal_ray.toy.build import build

    build(out, seed, names, steps, data_dir, log=lambda m: typer.echo(m, err=True))
    if judge:
        from refusal_ray.toy.judge import build_all

        judges = out.parent / "judges"
        build_all(out / "toy-judge", judges / "toy_heldout.jsonl", seed=seed, steps=steps,
                  labelled_path=judges / "toy_labelled.jsonl", log=lambda m: typer.echo(m, err=True))


def _require_store(out: str) -> None:
    from refusal_ray.store import Store

    if not Store(out).exists("manifest.json"):
        _bad_input(SpecError(out, "", "not a refusal-ray store (no manifest.json)"))


def _writable(path: Path) -> bool:
    p = path
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would drown the sweep's own progress
    try:
        app()
    finally:
        # Arrow objects collected during interpreter teardown can join pool threads after Arrow's own
        # state is gone: an intermittent SIGABRT ("terminate called without an active exception") after
        # the command's work is done (apache/arrow#34314). Collect them while Arrow is still alive.
        import gc

        gc.collect()


if __name__ == "__main__":
    main()
