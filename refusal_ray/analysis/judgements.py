"""Labels per judge and agreement between judges, from the store.

Every completion has the inline substring judge's label (`completions.refusal`, judge
"substring"); named judges add rows to `judgements`. `judge_labels` puts them in one long table,
with the question each label answers (`refusal_ray.judges.config.question`: a guard judge's label
is a refusal proxy on harmful prompts only; on harmless prompts it answers "safe?", not
"refused?"); `steering_under` recomputes the steering table's counts, rates and Wilson intervals
from one judge's refusal labels (completions it could not label, malformed or failed, are left out
of n and counted in `unjudged`; arms on a prompt set where the judge gives no refusal label are
left out); `agreement` gives Cohen's kappa with its interval and the confusion counts for every
pair of judges on the completions both labelled, per prompt set, where both labels answer the
same question.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from refusal_ray.judges.config import INLINE, PROMPT_SETS, REFUSED, question
from refusal_ray.stats import cohen_kappa, wilson

KEY = ["model", "cell_id", "prompt_set", "prompt_id"]
LABEL_COLUMNS = [*KEY, "seed", "judge", "judge_kind", "question", "refusal", "compliance", "coherence", "malformed",
                 "error"]
AGREEMENT_COLUMNS = ["model", "prompt_set", "question", "judge_a", "judge_b", "n", "agree", "kappa", "kappa_ci_low",
                     "kappa_ci_high", "both_refuse", "a_only", "b_only", "neither"]


def judge_labels(completions: pd.DataFrame, judgements: pd.DataFrame) -> pd.DataFrame:
    """One row per (completion, judge): refusal as float (1, 0, or nan when unlabelled), the judge's
    kind (`judge_kind`; the inline judge's is "substring") and what its label answers on the row's
    prompt set (`question`: "refused" or "safe", `refusal_ray.judges.config.QUESTIONS`)."""
    frames = []
    if not completions.empty:
        c = completions[[*KEY, "seed", "refusal"]].copy()
        c["judge"], c["judge_kind"] = INLINE, INLINE
        c["compliance"], c["coherence"], c["malformed"], c["error"] = np.nan, np.nan, False, None
        frames.append(c)
    if not judgements.empty:
        j = judgements.copy()
        if "judge_kind" not in j.columns:     # stores written before judge kinds were recorded
            j["judge_kind"] = None
        frames.append(j[[c for c in LABEL_COLUMNS if c != "question"]])
    if not frames:
        return pd.DataFrame(columns=LABEL_COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    df["question"] = [question(k if isinstance(k, str) else None, p)
                      for k, p in zip(df["judge_kind"], df["prompt_set"])]
    df = df[LABEL_COLUMNS]
    df["prompt_id"] = df["prompt_id"].astype(str)
    df["refusal"] = pd.to_numeric(df["refusal"].map(lambda x: np.nan if x is None else float(x)), errors="coerce")
    return df


def kind_of(labels: pd.DataFrame, judge: str) -> str | None:
    """The kind of `judge` as its labels record it (None when unknown: no labels, or an old store)."""
    if judge == INLINE:
        return INLINE
    kinds = labels.loc[labels["judge"] == judge, "judge_kind"].dropna() if not labels.empty else pd.Series([])
    return str(kinds.iloc[0]) if len(kinds) else None


def judges_in(labels: pd.DataFrame) -> list[str]:
    """Judge names present, the inline one first."""
    names = sorted(set(labels["judge"])) if not labels.empty else []
    return sorted(names, key=lambda n: (n != INLINE, n))


def steering_under(steering: pd.DataFrame, completions: pd.DataFrame, labels: pd.DataFrame,
                   judge: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(steering rows with n, refusals, rate, ci from `judge`'s labels; that judge's labelled
    completions as a completions-like frame with `refusal`). Arms the judge labelled nothing of are
    dropped (their verdicts become INCOMPLETE), and so are the arms on a prompt set where the judge's
    label is no refusal label (a guard's on harmless prompts: `question` "safe"); `unjudged` counts,
    per arm, the completions left out: malformed, failed, or never judged."""
    mine = labels[(labels["judge"] == judge) & (labels["question"] == REFUSED)]
    if steering.empty or mine.empty:
        return steering.iloc[0:0], mine
    ok = mine[mine["refusal"].notna()]
    arm = ["model", "cell_id", "prompt_set"]
    g = ok.groupby(arm).agg(n=("refusal", "size"), refusals=("refusal", "sum"))
    total = completions.groupby(arm).size().rename("stored")
    g = g.join(total, how="outer").fillna({"n": 0, "refusals": 0, "stored": 0}).reset_index()
    g["unjudged"] = (g["stored"] - g["n"]).astype(int)
    out = steering.drop(columns=["n", "refusals", "rate", "ci_low", "ci_high"]).merge(
        g.drop(columns=["stored"]), on=arm)
    out = out[out["n"] > 0].copy()
    out["n"], out["refusals"] = out["n"].astype(int), out["refusals"].astype(int)
    out["rate"] = out["refusals"] / out["n"]
    ci = [wilson(k, n) for k, n in zip(out["refusals"], out["n"])]
    out["ci_low"], out["ci_high"] = [c[0] for c in ci], [c[1] for c in ci]
    return out.reset_index(drop=True), ok.assign(refusal=ok["refusal"].astype(bool))


def agreement(labels: pd.DataFrame) -> pd.DataFrame:
    """Cohen's kappa per model (and model "ALL"), prompt set and pair of judges, on the completions
    both judges labelled (malformed and failed left out). Prompt set "harmful" or "harmless": where
    both labels answer the same question there (`question`; a guard's harmless labels answer "safe",
    so a guard and a refusal judge have no harmless row). Prompt set "ALL" pools both sets, only for a
    pair that answers the same question on each (its `question`: "refused", or e.g. "refused+safe"
    for two guards)."""
    rows = []
    names = judges_in(labels)
    if len(names) < 2:
        return pd.DataFrame(columns=AGREEMENT_COLUMNS)
    labels = labels.drop_duplicates([*KEY, "judge"])
    wide = labels.set_index([*KEY, "judge"])["refusal"].unstack("judge")
    asks = labels.drop_duplicates(["judge", "prompt_set"]).set_index(["judge", "prompt_set"])["question"]
    sets = [p for p in PROMPT_SETS if p in set(labels["prompt_set"])]
    for model in [*sorted(set(labels["model"])), "ALL"]:
        sub = wide if model == "ALL" else wide.xs(model, level="model", drop_level=False)
        for a, b in combinations(names, 2):
            if a not in sub.columns or b not in sub.columns:
                continue
            same = [p for p in sets if asks.get((a, p)) == asks.get((b, p)) and (a, p) in asks]
            pset_of = sub.index.get_level_values("prompt_set")
            groups = [(p, asks[(a, p)], sub[pset_of == p]) for p in same]
            if same and same == sets:
                groups.append(("ALL", "+".join(dict.fromkeys(asks[(a, p)] for p in sets)), sub))
            for pset, q, part in groups:
                k = cohen_kappa(part[a].tolist(), part[b].tolist())
                rows.append({"model": model, "prompt_set": pset, "question": q, "judge_a": a, "judge_b": b,
                             "n": k.n, "agree": k.agree, "kappa": k.kappa, "kappa_ci_low": k.ci_low,
                             "kappa_ci_high": k.ci_high, "both_refuse": k.both, "a_only": k.a_only,
                             "b_only": k.b_only, "neither": k.neither})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def _kappa_text(r) -> str:
    if np.isnan(r["kappa"]):
        return "nan"
    if np.isnan(r["kappa_ci_low"]):
        return f"{r['kappa']:+.2f} (no interval)"
    return f"{r['kappa']:+.2f} [{r['kappa_ci_low']:+.2f}, {r['kappa_ci_high']:+.2f}]"


AGREEMENT_HEAD = ("judge agreement (Cohen's kappa, 95% interval; per prompt set, on the completions both judges "
                  "labelled, where both labels answer the same question: refused, or safe for guards on harmless "
                  "prompts):")


def render_agreement(df: pd.DataFrame, wide: bool = False, width: int | None = None) -> str:
    """The agreement table: one row per (model, prompt set, judge pair) with Cohen's kappa and its 95%
    interval, raw agreement, n and the 2x2 counts, fitted to `width` characters (default
    `core.render.WIDTH`) with a legend; `wide`: the one line per pair of before ('model  harmful  a ~ b:
    kappa +0.62 [+0.41, +0.83]  agree 0.85  n 64  (both refuse 20, a only 3, ...)'). A pair whose labels
    answer "safe" (two guards) says so and counts label 1 as "say 1"."""
    if df.empty:
        return ""
    if wide:
        lines = [AGREEMENT_HEAD]
        for _, r in df.iterrows():
            pset = r["prompt_set"] if "prompt_set" in r.index else "ALL"
            q = f" ({r['question']})" if "question" in r.index and r["question"] != REFUSED else ""
            yes = "refuse" if not q else "say 1"
            kappa = _kappa_text(r) if not np.isnan(r["kappa"]) else "   nan"
            lines.append(f"  {r['model']:<12} {pset:<8}{q} {r['judge_a']} ~ {r['judge_b']}: kappa {kappa}  "
                         f"agree {r['agree']:.2f}  "
                         f"n {r['n']}  (both {yes} {r['both_refuse']}, {r['judge_a']} only {r['a_only']}, "
                         f"{r['judge_b']} only {r['b_only']}, neither {r['neither']})")
        return "\n".join(lines)
    from refusal_ray.core.render import WIDTH, Column, fit_table, legend_lines, wrap

    t = df.copy()
    t["prompt_set"] = t["prompt_set"] if "prompt_set" in t.columns else "ALL"
    asks = "question" in t.columns
    t["pair"] = [f"{a} ~ {b}" + (f" ({q})" if asks and q != REFUSED else "")
                 for a, b, q in zip(t["judge_a"], t["judge_b"], t["question"] if asks else [REFUSED] * len(t))]
    t["kappa_text"] = [_kappa_text(r) for _, r in t.iterrows()]
    cols = [Column("model", "model", "{}"), Column("prompt_set", "prompt set", "{}"),
            Column("pair", "judges a ~ b", "{}", legend="the two judges compared (a question in brackets: what "
                                                        "label 1 means when it is not 'refused', e.g. safe for guards)"),
            Column("kappa_text", "kappa [95% CI]", "{}", legend="Cohen's kappa between a's and b's labels, with its "
                                                                "95% interval (1: full agreement, 0: chance)"),
            Column("agree", "agree", "{:.2f}", legend="fraction of completions both label the same"),
            Column("n", "n", "{}", legend="completions both judges labelled"),
            Column("both_refuse", "both 1", "{}", legend="both say refused (label 1)"),
            Column("a_only", "a only", "{}", legend="only judge a says 1"),
            Column("b_only", "b only", "{}", legend="only judge b says 1"),
            Column("neither", "neither", "{}", legend="both say 0")]
    width = width or WIDTH
    return "\n".join([*wrap(AGREEMENT_HEAD, width), *fit_table(t, cols, width),
                      *legend_lines([(c.label, c.legend) for c in cols if c.legend], width)])
