"""Stage `rank`, the read side (pandas / numpy / matplotlib, no torch): the rank sweep pooled over seeds, the
refusal rank per model and source, the per-category cosine and transfer matrices, the summary's columns, the
report section and its figures (suppression against k with Wilson intervals; rank and k = 1 suppression against
parameters).

Refusal rank of (model, source) = the smallest k with
    baseline harmful refusal - rate_k >= margin  and  control rate_k - rate_k >= control margin
(`analysis.summary.meets`: within 1e-9), where margin is `stages.rank.margin` (null: the decision rule's
control_margin.baseline_margin) and the control margin the rule's control_margin.control_margin; "> K" when no
k <= K meets both; "n/a" when the baseline refusal does not meet the rule's baseline_min (or is unmeasured).
Rates are pooled over seeds (refusals / prompts) and read the inline judge's labels (the rank table's).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from refusal_ray.core.render import Column, not_run, plt, png
from refusal_ray.stages.base import Reader
from refusal_ray.stats import principal_angles, wilson

TITLE = "Refusal rank (subspace ablation of k = 1..K directions per source)"
RANK_TABLE = "refusal rank per source"
CURVE_COLUMNS = ["model", "source", "k", "basis_rank", "seeds", "n", "rate", "ci_low", "ci_high", "control_rate",
                 "control_ci_low", "control_ci_high", "suppression", "suppression_vs_control"]
MARGIN_TOL = 1e-9


def _meets(x: float, threshold: float) -> bool:
    return bool(x >= threshold - MARGIN_TOL)


def _pool(g: pd.DataFrame) -> dict:
    k, n = int(g["refusals"].sum()), int(g["n"].sum())
    lo, hi = wilson(k, n) if n else (np.nan, np.nan)
    return {"seeds": int(g["seed"].nunique()), "n": n, "refusals": k, "rate": k / n if n else np.nan,
            "ci_low": lo, "ci_high": hi}


def _main_rows(rank: pd.DataFrame) -> pd.DataFrame:
    """The sweep's rows over all prompts (no category split, no transfer arms, no skipped cells)."""
    if rank.empty:
        return rank
    m = rank["category"].isna() & ~rank["transfer"].astype(bool)
    if "skipped" in rank.columns:
        m &= rank["skipped"].isna()
    return rank[m]


def rank_curve(rank: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, source, k >= 1): the arm's pooled rate with its Wilson interval, its control's, the
    suppression (baseline - rate) and the suppression beyond the control (control rate - rate)."""
    main = _main_rows(rank)
    if main.empty:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    out = []
    for model, gm in main.groupby("model", sort=False):
        b = gm[gm["source"] == "baseline"]
        base = _pool(b)["rate"] if len(b) else np.nan
        for (source, k), g in gm[gm["source"] != "baseline"].groupby(["source", "k"], sort=False):
            arm, ctl = g[~g["control"].astype(bool)], g[g["control"].astype(bool)]
            if arm.empty:
                continue
            a = _pool(arm)
            c = _pool(ctl) if len(ctl) else {"rate": np.nan, "ci_low": np.nan, "ci_high": np.nan}
            out.append({"model": model, "source": source, "k": int(k), "basis_rank": int(arm["basis_rank"].max()),
                        "seeds": a["seeds"], "n": a["n"], "rate": a["rate"], "ci_low": a["ci_low"],
                        "ci_high": a["ci_high"], "control_rate": c["rate"], "control_ci_low": c["ci_low"],
                        "control_ci_high": c["ci_high"], "suppression": base - a["rate"],
                        "suppression_vs_control": c["rate"] - a["rate"]})
    return pd.DataFrame(out, columns=CURVE_COLUMNS).sort_values(["model", "source", "k"], kind="stable")


def baseline_rate(rank: pd.DataFrame, model: str) -> float:
    main = _main_rows(rank)
    b = main[(main["model"] == model) & (main["source"] == "baseline")] if not main.empty else main
    return _pool(b)["rate"] if len(b) else np.nan


def thresholds(ctx) -> dict:
    """{"margin", "control_margin", "baseline_min"}: stages.rank.margin (None: the rule's baseline_margin) and
    the decision rule's control_margin and baseline_min."""
    rule = (ctx.rule or {}).get("control_margin") or {}
    block = ctx.stages.get("rank") or {}
    margin = block.get("margin")
    return {"margin": float(rule.get("baseline_margin", np.nan) if margin is None else margin),
            "control_margin": float(rule.get("control_margin", np.nan)),
            "baseline_min": float(rule.get("baseline_min", np.nan))}


def refusal_rank(curve: pd.DataFrame, base: float, max_k: int, margin: float, control_margin: float,
                 baseline_min: float) -> str:
    """The refusal rank of one (model, source) from its curve rows (k, rate, control_rate): "k", "> K" or "n/a"."""
    if np.isnan(base) or not _meets(base, baseline_min):
        return "n/a"
    for _, r in curve.sort_values("k").iterrows():
        if _meets(base - r["rate"], margin) and _meets(r["control_rate"] - r["rate"], control_margin):
            return str(int(r["k"]))
    return f"> {max_k}"


def ranks(ctx) -> pd.DataFrame:
    """One row per (model, source): baseline refusal, the rank, the k = 1 suppression (and beyond control)."""
    rank = ctx.tables["rank"]
    curve = rank_curve(rank)
    t = thresholds(ctx)
    max_k = int((ctx.stages.get("rank") or {}).get("max_k") or (curve["k"].max() if len(curve) else 0))
    rows = []
    for (model, source), g in curve.groupby(["model", "source"], sort=False):
        base = baseline_rate(rank, model)
        one = g[g["k"] == 1]
        rows.append({"model": model, "source": source, "baseline": base,
                     "rank": refusal_rank(g, base, max_k, t["margin"], t["control_margin"], t["baseline_min"]),
                     "suppression_k1": float(base - one["rate"].iloc[0]) if len(one) else np.nan,
                     "suppression_vs_control_k1": float(one["suppression_vs_control"].iloc[0]) if len(one) else np.nan})
    return pd.DataFrame(rows, columns=["model", "source", "baseline", "rank", "suppression_k1",
                                       "suppression_vs_control_k1"])


# -- per-category directions ----------------------------------------------------------------------
def category_cosines(bases: pd.DataFrame, model: str, seed: int | None = None) -> pd.DataFrame:
    """Cosine matrix of one model's category directions (difference of means per category) of one seed
    (default: the first), categories in the stored order (size, then name)."""
    if bases.empty:
        return pd.DataFrame()
    b = bases[(bases["model"] == model) & (bases["source"] == "category")]
    if b.empty:
        return pd.DataFrame()
    seed = int(b["seed"].min()) if seed is None else seed
    b = b[b["seed"] == seed].sort_values("index")
    v = np.stack([np.asarray(x, float) for x in b["vector"]])
    u = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
    names = list(b["category"])
    return pd.DataFrame(u @ u.T, index=names, columns=names)


def source_agreement(bases: pd.DataFrame, model: str, seed: int | None = None, max_k: int | None = None) -> pd.DataFrame:
    """How far apart the sources' bases are: for each pair of sources (rows "a / b", in SOURCES order) and each
    k = 1..max_k (columns), the largest principal angle in degrees between the span of a's first k vectors and
    b's (Bjorck & Golub 1973; `stats.principal_angles`), from the rank_bases rows of one seed (default: the
    first; where a re-run left several cells' rows, the last written per (source, index)). 0 deg: the same
    subspace; 90 deg: some direction of one is orthogonal to the other. select, pca and category bases are
    nested in k (their first k vectors); stage rank stores one optimised set per seed (the largest dimension
    <= max_k that stage optimise learned), so optimised has an entry only at that set's dimension. NaN where
    a source has fewer than k vectors, or its first k are non-finite or linearly dependent (rank < k: the
    subspace arm would ablate fewer dimensions). max_k: default the most vectors any source has."""
    from refusal_ray.stages.rank import SOURCES

    if bases.empty:
        return pd.DataFrame()
    b = bases[bases["model"] == model]
    if b.empty:
        return pd.DataFrame()
    seed = int(b["seed"].min()) if seed is None else seed
    b = b[b["seed"] == seed].drop_duplicates(["source", "index"], keep="last")
    vecs = {src: [np.asarray(x, np.float64) for x in g.sort_values("index")["vector"]]
            for src, g in b.groupby("source")}
    names = [src for src in SOURCES if src in vecs] + sorted(set(vecs) - set(SOURCES))
    if len(names) < 2:
        return pd.DataFrame()
    max_k = max(len(v) for v in vecs.values()) if max_k is None else int(max_k)

    def span(src: str, k: int) -> np.ndarray | None:
        v = vecs[src]
        if (len(v) != k) if src == "optimised" else (len(v) < k):
            return None
        v = v[:k]
        if len({x.shape for x in v}) != 1 or not all(np.isfinite(x).all() for x in v):
            return None
        m = np.stack(v)
        return m if np.linalg.matrix_rank(m) == k else None

    rows = {}
    for i, a in enumerate(names):
        for bn in names[i + 1:]:
            row = []
            for k in range(1, max_k + 1):
                va, vb = span(a, k), span(bn, k)
                row.append(np.nan if va is None or vb is None or va.shape[1] != vb.shape[1]
                           else float(principal_angles(va, vb).max()))
            rows[f"{a} / {bn}"] = row
    return pd.DataFrame.from_dict(rows, orient="index", columns=[f"k={k}" for k in range(1, max_k + 1)])


def transfer_matrix(rank: pd.DataFrame, model: str, control: bool = False) -> pd.DataFrame:
    """Refusal rate on category b's test prompts (columns) with category a's direction ablated (rows), pooled
    over seeds; `control`: its random single-direction control's."""
    if rank.empty or "ablated_category" not in rank.columns:
        return pd.DataFrame()
    t = rank[(rank["model"] == model) & rank["transfer"].astype(bool) & rank["category"].notna()
             & (rank["control"].astype(bool) == control)]
    if t.empty:
        return pd.DataFrame()
    g = t.groupby(["ablated_category", "category"], sort=False)[["refusals", "n"]].sum()
    m = (g["refusals"] / g["n"]).unstack("category")
    order = list(dict.fromkeys(t["ablated_category"]))
    return m.reindex(index=order, columns=[c for c in order if c in m.columns])


# -- the summary ------------------------------------------------------------------------------------
def _ranks(ctx) -> pd.DataFrame:
    return ranks(ctx)


def summary(ctx, model: str, row: dict) -> dict:
    """`rank[<source>]` (text) and `rank_supp1[<source>]` per source of this model; {} without rank rows."""
    r = ctx.provided("rank_table")
    mine = r[r["model"] == model] if not r.empty else r
    out: dict = {}
    for _, x in mine.iterrows():
        out[f"rank[{x['source']}]"] = x["rank"]
        out[f"rank_supp1[{x['source']}]"] = x["suppression_k1"]
    return out


def display() -> list[Column]:
    """`rank[<source>]` then `rank_supp1[<source>]` of every source (those a summary lacks are left out)."""
    from refusal_ray.stages.rank import SOURCES

    rank = [Column(f"rank[{s}]", f"rank[{s}]", "{}", RANK_TABLE, f"rank {s}",
                   legend=("the smallest k whose ablation lowers harmful refusal by the margin from baseline and by "
                           "the control margin beyond a same-rank random subspace ('> K': none up to max_k; n/a: "
                           "baseline below baseline_min), with the " if i == 0 else "the refusal rank with the ")
                          + f"{s} basis") for i, s in enumerate(SOURCES)]
    supp = [Column(f"rank_supp1[{s}]", f"supp1[{s}]", "{:+.2f}", RANK_TABLE, f"k=1 {s}",
                   legend=f"baseline harmful refusal minus the rate with the {s} source's first direction ablated")
            for s in SOURCES]
    return rank + supp


# -- figures and the report -------------------------------------------------------------------------
def _source_index(source: str) -> int:
    """A source's fixed colour / marker index (its place in SOURCES), the same in every panel and figure."""
    from refusal_ray.stages.rank import SOURCES

    return SOURCES.index(source) if source in SOURCES else len(SOURCES)


def plot_curve(curve: pd.DataFrame) -> bytes | None:
    """Refusal rate against k per (model, source) with Wilson intervals; controls dashed."""
    if curve.empty:
        return None
    models = list(dict.fromkeys(curve["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        c = curve[curve["model"] == model]
        for source, g in c.groupby("source", sort=False):
            i = _source_index(source)
            color = f"C{i}"
            x = g["k"].to_numpy(float) + (i - 1.5) * 0.04
            ax.errorbar(x, g["rate"], yerr=[g["rate"] - g["ci_low"], g["ci_high"] - g["rate"]], color=color,
                        marker="o", ms=4, capsize=2, label=source)
            ax.errorbar(x, g["control_rate"], yerr=[g["control_rate"] - g["control_ci_low"],
                                                     g["control_ci_high"] - g["control_rate"]],
                        color=color, ls="--", marker="x", ms=4, capsize=2, alpha=0.6)
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("k (directions ablated)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xticks(sorted(set(c["k"])))
    axes[0][0].set_ylabel("harmful refusal (dashed: random control)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    axes[0][-1].legend([handles[k] for k in sorted(handles, key=_source_index)],
                       sorted(handles, key=_source_index), fontsize=7)
    return png(fig)


def _rank_number(text: str, max_k: int) -> float:
    if text == "n/a":
        return np.nan
    return float(max_k + 1) if text.startswith(">") else float(text)


def plot_scale(table: pd.DataFrame, params: dict, max_k: int) -> bytes | None:
    """Refusal rank ("> K" drawn at K + 1) and k = 1 suppression against parameters, one marker per model and
    source."""
    t = table[table["model"].map(lambda m: params.get(m) is not None)]
    if t.empty:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    for source, g in t.groupby("source", sort=False):
        i = _source_index(source)
        x = [params[m] for m in g["model"]]
        a.scatter(x, [_rank_number(r, max_k) for r in g["rank"]], color=f"C{i}", label=source, marker="os^D"[i % 4])
        b.scatter(x, g["suppression_k1"], color=f"C{i}", label=source, marker="os^D"[i % 4])
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
    a.set_ylabel(f"refusal rank ({max_k + 1} = '> {max_k}')")
    a.set_yticks(range(1, max_k + 2))
    b.set_ylabel("suppression at k = 1")
    b.legend(fontsize=7)
    return png(fig)


def report(ctx) -> list[str]:
    lines = [f"## {TITLE}", ""]
    rank = ctx.tables["rank"]
    if rank.empty:
        return lines + not_run("rank", ctx.stages)
    t = thresholds(ctx)
    table = ctx.provided("rank_table")
    curve = rank_curve(rank)
    max_k = int((ctx.stages.get("rank") or {}).get("max_k") or curve["k"].max())
    lines += [f"Refusal rank = the smallest k whose ablation lowers harmful refusal by at least {t['margin']:g} from "
              f"baseline and by at least {t['control_margin']:g} beyond a random subspace of the same rank "
              f"('> {max_k}': none up to K; n/a: baseline below {t['baseline_min']:g}). Rates pooled over seeds, "
              "inline judge.", "",
              "```", table.to_string(index=False, float_format=lambda x: f"{x:.3f}"), "```", "",
              "Suppression against k (Wilson 95% intervals):", "",
              "```", curve.to_string(index=False, float_format=lambda x: f"{x:.3f}"), "```", ""]
    skipped = rank[rank["skipped"].notna()] if "skipped" in rank.columns else rank.iloc[:0]
    if len(skipped):
        s = skipped.drop_duplicates(["model", "source", "k", "skipped"])
        lines += ["Not measured:", ""] + [f"- {r.model} {r.source} k = {r.k}: {r.skipped}" for r in s.itertuples()] + [""]
    lines += ctx.figure("rank_curve.png", plot_curve(curve))
    params = {} if ctx.summary is None else dict(zip(ctx.summary["model"], ctx.summary["params"]))
    lines += ctx.figure("rank_scale.png", plot_scale(table, params, max_k))
    bases = ctx.tables["rank_bases"]
    for model in dict.fromkeys(rank["model"]):
        cos = category_cosines(bases, model)
        if not cos.empty:
            lines += [f"Category directions of {model} (cosines; difference of means per category against the "
                      "shared harmless mean, first seed):", "", "```", cos.to_string(float_format=lambda x: f"{x:+.3f}"),
                      "```", ""]
        agree = source_agreement(bases, model, max_k=max_k)
        if not agree.empty:
            lines += [f"Agreement between the sources' bases of {model} (largest principal angle between the top-k "
                      "bases, degrees; first seed):", "", "```",
                      agree.to_string(float_format=lambda x: f"{x:.1f}", na_rep="-"), "```", ""]
        tr, tc = transfer_matrix(rank, model), transfer_matrix(rank, model, control=True)
        if not tr.empty:
            lines += [f"Transfer of {model}: harmful refusal on category b's test prompts (columns) with category "
                      "a's direction ablated (rows); beside it the random-direction control's:", "", "```",
                      tr.to_string(float_format=lambda x: f"{x:.2f}"), "", "control:",
                      tc.to_string(float_format=lambda x: f"{x:.2f}"), "```", ""]
    return lines


READER = Reader(summary=summary, display=display, report=report, order=75, title=TITLE, tables=("rank", "rank_bases"),
                provides={"rank_table": _ranks})
