"""The compiled Markdown report of a store: provenance, headlines (`report_stages.headline`), the summary
and its scale-trend figure, then each stage reader's section (`Reader.report`) and the Judges section."""

from __future__ import annotations

import pandas as pd

from refusal_ray.analysis.figures import _png, plt
from refusal_ray.analysis.summary import judge_tables, render, render_judges, write_summary
from refusal_ray.store import Store


def plot_scale_trend(summary: pd.DataFrame) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, label in (("separation", "separation (d) / 10"), ("ablation_suppression", "ablation suppression"),
                       ("addition_induction", "addition induction")):
        if col in summary.columns:
            y = summary[col] / (10 if col == "separation" else 1)
            ax.plot(summary["params"], y, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("effect")
    ax.legend(fontsize=8)
    return _png(fig)


def __getattr__(name: str):
    """Names that moved to the stages' read modules (steering_figure, plot_separation, ...; `summary.from_readers`)."""
    if name.startswith("__"):
        raise AttributeError(name)
    from refusal_ray.analysis.summary import from_readers

    return from_readers(name)


def write_report(out_dir, judge: str | None = None) -> str:
    """Write summary files, figures/*.png and report.md into the store; returns the report's path.
    `judge`: the judge whose labels the verdicts read (default: `summary.verdict_judge`).

    report.md is the compiled report of the sweep: provenance, a headline per model under the
    decision rule, the summary table (with its warning lines, e.g. a fallback selection above the KL
    filter, repeated in the selection section) and the scale trend, then each stage reader's section
    (`Reader.report`, in reader `order`: directions, selection, steering with controls and one section
    per other operator, capability cost, activation patching, causal scrubbing), each saying so when its
    stage did not run, with the Judges section at VERDICT_ORDER and, where a judge names a labelled file,
    the Judge calibration section after it (`analysis.calibration.section`). Stage sections read the inline judge's
    labels (their steering figure always did); the verdicts in the summary read `judge`'s."""
    from refusal_ray.analysis import calibration
    from refusal_ray.analysis import report_stages as st
    from refusal_ray.analysis.summary import VERDICT_ORDER, read_context, readers
    from refusal_ray.judges.config import INLINE

    store = Store(out_dir)
    summary = write_summary(out_dir, judge)
    ctx = read_context(store, INLINE)
    ctx.summary = summary
    manifest = ctx.manifest
    scale = ctx.figure("scale_trend.png", plot_scale_trend(summary)) \
        if not summary.empty and "separation" in summary.columns else []
    rule = ctx.rule
    lines = [f"# refusal-ray report: {manifest.get('sweep', store.uri)}", "",
             f"Decision rule hash `{manifest.get('rule_hash')}`, spec hash `{manifest.get('spec_hash')}`, "
             f"code `{manifest.get('git_sha')}`"
             + (f"; verdicts under judge `{summary['judge'].iloc[0]}`" if "judge" in summary.columns else "") + ".",
             "", "## Headlines", ""]
    lines += [f"- {st.headline(row, rule)}" for _, row in summary.iterrows()] or ["(no models finished)"]
    lines += ["", "## Summary", "", "```", render(summary), "```", "", *scale]
    sections = [(r.order, i, r.report) for i, (_, r) in enumerate(readers())]
    sections.append((VERDICT_ORDER, -1, lambda ctx: judges_section(out_dir)))
    sections.append((VERDICT_ORDER + 0.5, -1, lambda ctx: calibration.section(out_dir, manifest)))   # after Judges
    for _, _, section in sorted(sections, key=lambda s: (s[0], s[1])):
        lines += section(ctx)
    return store.write_file("report.md", ("\n".join(lines) + "\n").encode())


def judges_section(out_dir) -> list[str]:
    """The Judges section: rates and verdicts per judge and their agreement, as `write_summary` wrote them."""
    lines = ["## Judges", ""]
    judges_text = render_judges(*judge_tables(out_dir))
    return lines + (["Verdicts above read the judge named in the provenance line; the steering figure uses the "
                     "inline substring judge.", "", "```", judges_text, "```", ""] if judges_text else
                    ["One judge (the inline substring judge); no agreement to report.", ""])
