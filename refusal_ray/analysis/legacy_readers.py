"""Transitional: the read side of the stages whose packages have no `read.py` yet, from the analysis
code they used to live in (each entry goes when its stage declares `read`; then this module goes).
"""

from __future__ import annotations

import pandas as pd

from refusal_ray.core.render import integral, markdown_table, not_run
from refusal_ray.stages.base import Reader


# -- directions ---------------------------------------------------------------------------------------
def _directions_summary(ctx, model, row):
    dirs = ctx.tables["directions"]
    position = ctx.manifest.get("steer_position", -1)
    d = dirs[(dirs["model"] == model) & (dirs["site"] == "resid_pre") & (dirs["position"] == position)] \
        if not dirs.empty else dirs
    if d.empty:
        return {}
    sep = d.groupby("layer")["separation"].mean()
    best = int(sep.idxmax())
    return {"best_layer": best, "separation": float(sep[best]), "seeds": int(d["seed"].nunique())}


def _directions_report(ctx):
    from refusal_ray.analysis import report_stages as st
    from refusal_ray.analysis.report import plot_cosines, plot_separation

    dirs = ctx.tables["directions"]
    models = list(ctx.summary["model"]) if not ctx.summary.empty else []
    with_dirs = [m for m in models if not dirs.empty and (dirs["model"] == m).any()]
    lines = ["## Directions (difference of means, Arditi et al. 2024 Sec. 2.1)", "", *st.directions_diagnostics(dirs), ""]
    if with_dirs:
        lines += [*ctx.figure("separation.png", plot_separation(dirs, with_dirs)),
                  *ctx.figure("cosines.png", plot_cosines(dirs, with_dirs))]
    return lines


DIRECTIONS = Reader(summary=_directions_summary, report=_directions_report, order=10, tables=("directions",),
                    display=lambda: [("best_layer", "best", "{:.0f}"), ("separation", "sep(d)", "{:.2f}")])


# -- select --------------------------------------------------------------------------------------------
def _select_summary(ctx, model, row):
    from refusal_ray.analysis.summary import fallback_warnings, selection_columns

    if "best_layer" not in row:
        return {}
    selection = ctx.tables["selection"]
    mine = selection[selection["model"] == model] if not selection.empty else selection
    out = selection_columns(mine)
    block = ctx.stages.get("select")
    if block is not None:
        warn = fallback_warnings(mine, model, block.get("kl_max"))
        out["selection_warning"] = "\n".join(warn) if warn else None
    return out


def _select_report(ctx):
    from refusal_ray.analysis import report_select as rs
    from refusal_ray.analysis.summary import warning_lines

    selection = ctx.tables["selection"]
    lines = ["## Direction selection (Arditi et al. 2024, Sec. 2.3 and App. C)", ""]
    if selection.empty:
        return lines + not_run("select", ctx.stages)
    warn = warning_lines(ctx.summary)
    return lines + [*rs.selection_table(selection), "", *[f"**{w}**" for w in warn], *([""] if warn else []),
                    *ctx.figure("selection.png", rs.plot_selection(selection))]


SELECT = Reader(summary=_select_summary, report=_select_report, order=20, tables=("selection",),
                display=lambda: [("selected", "selected", "{}")])


# -- steer ---------------------------------------------------------------------------------------------
def _pooled(ctx):
    from refusal_ray.analysis.summary import pooled_arms

    steering = ctx.judged("steering")
    return pooled_arms(steering, ctx.judged("completions") if not steering.empty else None)


def _steer_summary(ctx, model, row):
    from refusal_ray.analysis.summary import ablation_direction
    from refusal_ray.ops import OPS

    steer_spec = ctx.stages.get("steer")
    if "best_layer" not in row or steer_spec is None:
        return {}
    arms = ctx.arms
    a, _ = ablation_direction(arms[arms["model"] == model] if not arms.empty else arms)
    out = {}
    for op in OPS.by_report_order():
        block = steer_spec.get(op.name)
        if block is not None or (a["mode"] == op.name).any():
            out |= op.summary_columns(a, ctx.rule, block)
    return out


def _steer_display():
    from refusal_ray.ops import OPS

    return [c for op in OPS.by_report_order() for c in op.display]


def _steer_report(ctx):
    from refusal_ray.analysis import report_stages as st
    from refusal_ray.analysis.report import plot_steering_curves
    from refusal_ray.ops import OPS

    steering, summary, stages = ctx.tables["steering"], ctx.summary, ctx.stages
    arms = ctx.arms if not steering.empty else pd.DataFrame()
    lines = ["## Steering: activation addition and directional ablation, with random controls", ""]
    if steering.empty:
        lines += not_run("steer", stages)
    else:
        fig = []
        if "best_layer" in summary.columns and (steering["mode"] == "addition").any():
            fig = ctx.figure("steering.png", plot_steering_curves(arms, summary.dropna(subset=["best_layer"])))
        lines += [*st.steering_arms_table(arms, summary), "", *fig]
    for op in OPS.by_report_order():   # one section per operator with its own (the rule's arms: above)
        if not op.report_section:
            continue
        ran = not arms.empty and (arms["mode"] == op.name).any()
        if not ran and not op.dump_when_none and (stages.get("steer") or {}).get(op.name) is None:
            continue   # a newer operator that this sweep did not use gets no section
        lines += [f"## {op.section_title or op.label.capitalize()}", ""]
        lines += ([*markdown_table(integral(arms[arms["mode"] == op.name][[c for c in op.report_columns
                                                                            if c in arms.columns]])), ""] if ran else
                  [f"Not run in this sweep (no `stages.steer.{op.name}` block)." if "steer" in stages else
                   "Not run in this sweep (no `stages.steer` block).", ""])
    return lines


STEER = Reader(summary=_steer_summary, display=_steer_display, report=_steer_report, order=30,
               tables=("steering", "completions"), provides={"pooled_arms": _pooled})


# -- capability ----------------------------------------------------------------------------------------
def _cost(ctx):
    from refusal_ray.analysis.cost import capability_cost

    return capability_cost(ctx.tables["capability"], ctx.manifest.get("capability_key"))


def _cost_summary(ctx, model, row):
    from refusal_ray.analysis.cost import summary_columns

    return summary_columns(ctx.provided("cost"), model, ctx.rule) if "best_layer" in row else {}


def _cost_display():
    from refusal_ray.ops import OPS

    return [c for op in OPS.by_apply_order() for c in op.cost_display]


def _cost_report(ctx):
    from refusal_ray.analysis import report_stages as st
    from refusal_ray.analysis.summary import render_cost
    from refusal_ray.core.render import png

    cost = ctx.provided("cost")
    lines = ["## Capability cost (CE loss, first-token KL, task exact match, lm-eval)", ""]
    if cost.empty:
        return lines + not_run("capability", ctx.stages)
    fig = st.plot_capability(cost)
    return lines + ["```", render_cost(cost), "```", "", *ctx.figure("capability.png", None if fig is None else png(fig))]


def _cost_files():
    from refusal_ray.analysis.cost import cost_table

    return {"capability_cost.parquet": lambda ctx: None if ctx.provided("cost").empty else ctx.provided("cost"),
            "capability_cost.csv": lambda ctx: None if ctx.provided("cost").empty else
            cost_table(ctx.provided("cost")).to_csv(index=False).encode()}


CAPABILITY = Reader(summary=_cost_summary, display=_cost_display, report=_cost_report, order=40,
                    tables=("capability",), provides={"cost": _cost}, files=_cost_files())


# -- patch and scrub -----------------------------------------------------------------------------------
def _patch_summary(ctx, model, row):
    from refusal_ray.analysis.circuits import circuit_columns, scrub_verdicts, site_recovery

    return circuit_columns(model, site_recovery(ctx.tables["patching"]), scrub_verdicts(ctx.tables["scrubbing"]))


def _patch_report(ctx):
    from refusal_ray.analysis import report_circuits as rc
    from refusal_ray.analysis.circuits import site_recovery

    sites = site_recovery(ctx.tables["patching"])
    lines = ["## Activation patching: top components", ""]
    if sites.empty:
        return lines + not_run("patch", ctx.stages)
    models = list(ctx.summary["model"]) if not ctx.summary.empty else []
    return lines + [*rc.top_sites_table(sites), "",
                    *ctx.figure("patching.png", rc.plot_recovery(sites, [m for m in models if (sites["model"] == m).any()]))]


def _scrub_report(ctx):
    from refusal_ray.analysis import report_circuits as rc
    from refusal_ray.analysis.circuits import scrub_verdicts

    verdicts = scrub_verdicts(ctx.tables["scrubbing"])
    lines = ["## Causal scrubbing (resample ablation of each hypothesis' complement)", ""]
    if verdicts.empty:
        return lines + not_run("scrub", ctx.stages)
    return lines + ["```", verdicts.to_string(index=False, float_format=lambda x: f"{x:.3f}"), "```", "",
                    *ctx.figure("scrubbing.png", rc.plot_faithfulness(verdicts))]


PATCH = Reader(summary=_patch_summary, report=_patch_report, order=60, tables=("patching", "scrubbing"),
               display=lambda: [("top_component", "top component", "{}"), ("top_recovery", "recovery", "{:.2f}"),
                                ("attribution_spearman", "AtP rho", "{:.2f}")])
SCRUB = Reader(report=_scrub_report, order=70, tables=("scrubbing",))

READERS = {"directions": DIRECTIONS, "select": SELECT, "steer": STEER, "capability": CAPABILITY, "patch": PATCH,
           "scrub": SCRUB}
