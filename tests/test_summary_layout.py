"""The printed summary fits a terminal (issue 22): a headline table of at most 120 characters whose every
header is explained in the legend under it, the detail tables (directions and layers, other operators,
capability cost, ...) each within 120 characters, `--wide` the single wide table of before, and the same
layout in report.md; summary.parquet / summary.csv unchanged by the layout."""

from __future__ import annotations

import json
import re

import pytest

from conftest import TOY_MODELS, TOY_PROMPTS

MODELS = ("qwen-xs", "qwen-s", "llama-s")   # 2- and 4-layer toys, both families: >= 3 models as the quickstart


def quickstart_spec(tmp_path) -> str:
    """The quickstart's stages and decision rule (sweeps/quickstart.yaml) on three of its models, fewer prompts."""
    spec = {
        "name": "layout-toy",
        "models": [{"name": m, "path": str(TOY_MODELS / f"toy-{m}")} for m in MODELS],
        "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                 "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl"), "reference_column": "reference"},
                 "n_train": 16, "n_val": 8, "n_test": 8},
        "seeds": [0, 1],
        "stages": {"directions": {"sites": ["resid_pre"], "positions": "post_instruction"},
                   "select": {"criterion": "bypass", "max_layer_fraction": 0.8, "kl_max": None, "induce_min": 0.0,
                              "fallback": None},
                   "steer": {"addition": {"layers": "all", "coefficients": [-3, -2, -1, 1, 2, 3]},
                             "ablation": {"layers": "all", "alphas": [1.0], "direction_layer": "selected"},
                             "subspace": {"top_k": 2, "ablation_layers": "all", "alphas": [1.0]},
                             "controls": True, "batch_size": 64},
                   "capability": {"coefficients": [1.0], "alphas": [1.0],
                                  "text": {"path": str(TOY_PROMPTS / "heldout.jsonl"), "n": 8}}},
        "generation": {"max_new_tokens": 12},
        "decision_rule": {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                                             "addition_coefficient": 1.0, "ablation_alpha": 1.0},
                          "steering_labels": {"strong": 0.5, "weak": 0.2}},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))   # JSON is YAML
    return str(path)


def build_store(tmp) -> object:
    """A store written as `run` writes one, from run_local (no Ray)."""
    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan
    from refusal_ray.runner import freeze_manifest
    from refusal_ray.store import Store

    plan = make_plan(quickstart_spec(tmp))
    tables = run_local(plan, log=lambda *a: None)
    failed = [r for r in tables["cells"] if r["status"] == "failed"]
    assert not failed, failed[0]
    out = tmp / "out"
    store = Store(out)
    freeze_manifest(plan, store)
    for table, rows in tables.items():
        for model in {r["model"] for r in rows}:
            store.write(table, model, [{k: v for k, v in r.items() if k != "model"} for r in rows if r["model"] == model])
    return out


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("layout"))


# today's single table (before issue 22), as `--wide` prints it: these headers in this order
WIDE_HEADERS = ["model", "params", "L", "best", "sep(d)", "selected", "ablated", "add L", "label L", "base",
                "abl-base", "abl-ctl", "add-base", "add-ctl", "subspace", "sub-base", "sub-ctl", "abl dCE", "abl KL",
                "orth dCE", "add dCE", "control_margin", "steering_labels"]


def _sections(text: str) -> dict[str, list[str]]:
    """{title line: its lines up to the next blank line} of the compact layout."""
    out, title = {}, None
    for line in text.splitlines():
        if not line:
            title = None
        elif title is None:
            title, out[line] = line, []
        else:
            out[title].append(line)
    return out


def _header_and_legend(lines: list[str]) -> tuple[list[str], list[str]]:
    """(the header labels, the legend lines) of one table: the header lines above the dashed rule, whose
    columns the rule's dashes delimit."""
    rule = next(i for i, line in enumerate(lines) if set(line) <= {"-", " "})
    spans, pos = [], 0
    for dashes in lines[rule].split("  "):
        spans.append((pos, pos + len(dashes)))
        pos += len(dashes) + 2
    labels = [" ".join(w for line in lines[:rule] if (w := line[a:b].strip())) for a, b in spans]
    return labels, [line for line in lines[rule + 1:] if line.startswith("  ")]


def test_headline_fits_120_and_every_header_is_in_the_legend(store_dir):
    from refusal_ray.analysis.summary import render, write_summary

    df = write_summary(store_dir)
    assert len(df) == len(MODELS)
    text = render(df)
    assert max(len(line) for line in text.splitlines()) <= 120
    sections = _sections(text)
    head = next(t for t in sections if t.startswith("headline"))
    labels, legend = _header_and_legend(sections[head])
    assert labels == ["model", "params", "layers", "direction", "baseline refusal", "ablation drop", "drop vs control",
                      "addition rise", "rise vs control", "control_margin", "steering_labels"]
    for title, lines in sections.items():
        if "-------" not in "".join(lines):
            continue   # the footer
        labels, legend = _header_and_legend(lines)
        explained = [line.strip().split(": ")[0] for line in legend if not line.startswith("    ")]
        assert [x for x in labels if x != "model" or title == head] == explained, title
    # every model's verdict is in the headline, as the summary holds it (wrapped cells rejoin to it)
    body = " ".join(sections[head])
    for verdict in df["verdict_control_margin"]:
        assert verdict.split(" (")[0] in body


def test_compact_tables_hold_the_wide_tables_columns(store_dir):
    from refusal_ray.analysis.summary import display, read_context, tables, write_summary
    from refusal_ray.store import Store

    df = write_summary(store_dir)
    wide = [k for k, _, _ in display() if k in df.columns]
    compact = [c[0] for cols in tables(df).values() for c in cols]
    assert sorted(set(compact)) == sorted(wide)   # every column once, besides each detail table's model column
    assert [h for k, h, _ in display() if k in df.columns] == WIDE_HEADERS
    assert read_context(Store(store_dir)).judge == "substring"


def test_pattern_columns_expand_to_every_matching_summary_column():
    """A display pattern such as scrub's "faithfulness[*]" names every summary column of that stem, in the
    summary's order, under its own name (and nothing of another stem): the compact layout's scrubbing table."""
    import pandas as pd

    from refusal_ray.analysis.summary import tables
    from refusal_ray.stages.scrub.read import SCRUBBING

    df = pd.DataFrame({"model": ["m"], "faithfulness[late-attn]": [0.9], "faithfulness[all]": [1.0],
                       "faithfulness_mean": [0.5], "verdict[late-attn]": ["FAITHFUL"], "verdict[all]": ["-"]})
    found = {c[0]: title for title, cols in tables(df).items() for c in cols}
    assert [k for k in found if k.startswith(("faithfulness", "verdict"))] == [
        "faithfulness[late-attn]", "faithfulness[all]", "verdict[late-attn]", "verdict[all]"]
    assert found["faithfulness[all]"] == found["verdict[all]"] == SCRUBBING


def test_wide_prints_todays_single_table_and_leaves_the_summary_files_alone(store_dir):
    from typer.testing import CliRunner

    from refusal_ray.analysis.summary import render_wide
    from refusal_ray.cli import app
    from refusal_ray.store import read

    before = {f: (store_dir / f).read_bytes() for f in ("summary.parquet", "summary.csv")}
    res = CliRunner().invoke(app, ["summarize", str(store_dir), "--wide"])
    assert res.exit_code == 0, res.output
    first = res.output.splitlines()[0]
    assert first.split() == " ".join(WIDE_HEADERS).split()
    assert res.output.startswith(render_wide(read(store_dir, "summary")))
    narrow = CliRunner().invoke(app, ["summarize", str(store_dir)])
    assert narrow.exit_code == 0 and narrow.output.startswith("headline")
    assert {f: (store_dir / f).read_bytes() for f in before} == before   # the layout changes no stored byte


def test_report_uses_the_compact_layout(store_dir):
    from refusal_ray.analysis.report import write_report
    from refusal_ray.analysis.summary import render, write_summary

    text = open(write_report(store_dir)).read()
    block = text[text.index("## Summary"):]
    start = block.index("```\n") + 4
    block = block[start: block.index("\n```", start)]
    assert block == render(write_summary(store_dir))
    assert max(len(line) for line in block.splitlines()) <= 120


def test_fit_table_wraps_headers_then_cells_within_the_width():
    import pandas as pd

    from refusal_ray.core.render import Column, fit_table, wrap

    assert wrap("NOT-SUPPORTED (ablation, addition)", 14) == ["NOT-SUPPORTED", "(ablation,", "addition)"]
    assert wrap("works-partially", 10) == ["works-", "partially"] and wrap("-0.47", 2) == ["-0.47"]
    df = pd.DataFrame({"a": ["Qwen/Qwen2.5-1.5B-Instruct", "m"], "b": [0.5, None],
                       "v": ["NOT-SUPPORTED (ablation, addition)", "SUPPORTED"]})
    cols = [Column("a", "a", "{}", label="model name"), Column("b", "b", "{:+.2f}", label="ablation minus baseline"),
            Column("v", "v", "{}", label="control_margin")]
    lines = fit_table(df, cols, width=40)
    assert max(map(len, lines)) <= 40
    assert re.split(r"\s{2,}", fit_table(df, cols, width=200)[0])[1] == "ablation minus baseline"   # no wrap needed
    rule = next(i for i, line in enumerate(lines) if set(line) <= {"-", " "})
    assert lines[rule + 1].split() == ["Qwen/Qwen2.5-", "+0.50", "NOT-SUPPORTED"]   # cells wrap after a hyphen
    assert lines[rule + 2].split() == ["1.5B-Instruct", "(ablation,"] and lines[rule + 4].split()[:2] == ["m", "-"]
