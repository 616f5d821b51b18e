"""Scale-trend summary: one row per model, sorted by parameter count, with both verdicts.

Rates pooled over seeds count each distinct test prompt once (`pooled_arms`, with
`refusal_ray.stats.prompt_pooled_rate`): per prompt, the mean refusal label over the seeds that
judged it; the rate is the mean over prompts, and the Wilson interval takes n = distinct prompts.
Per-seed rates and intervals are the steering table's own rows (`per_seed_arms`). The best
layer is the one with the highest mean separation (Cohen's d on val) over seeds. Rules
(DESIGN.md); every ">=" and "<" in them compares a rate or a difference of rates with a threshold
within MARGIN_TOL = 1e-9 (`meets`: x >= t - MARGIN_TOL), so an exact margin such as 70/100 - 20/100
= 0.5 meets 0.5 despite rounding:

Steered layer: an addition arm is measured only at the layers the spec steered, which need not
  include the best layer. Each rule below reads its addition arm at the best layer when it was
  steered, otherwise at the steered layer nearest to it (ties: the lower); the layer used is in
  `addition_layer` (control_margin) and `label_layer` (steering_labels).
control_margin: INCOMPLETE if an arm it needs was not measured; NO-BASELINE-REFUSAL if baseline
  harmful refusal < baseline_min; SUPPORTED if ablation (alpha = ablation_alpha, best direction)
  lowers harmful refusal by >= baseline_margin from baseline and >= control_margin from its
  random control, and addition (c = addition_coefficient at `addition_layer`) raises harmless
  refusal by the same two margins; otherwise NOT-SUPPORTED naming the arm(s) that fell short.
operators (not part of either verdict; each operator's `summary_columns`, `refusal_ray.ops`), e.g.
  subspace ablation (the verdicts read single-direction ablation): for the subspace most
  seeds ablated (`subspace`, e.g. "L7,L8,L9,L10/p-1 (2 of 2 seeds)"), at alpha = control_margin's
  ablation_alpha when it is among the subspace alphas, else the first subspace alpha
  (`subspace_alpha`): `subspace_harmful_refusal`, `subspace_suppression` (baseline harmful refusal
  minus it) and `subspace_suppression_vs_control` (its random same-rank subspace's minus it).
steering_labels, from the addition curve at `label_layer`: induce = max over c > 0 of the rise
  in harmless refusal over baseline; suppress = max over c < 0 of the drop in harmful refusal.
  INCOMPLETE when either is unmeasured (no baseline, no c > 0 or no c < 0 arm, no addition arm);
  works-fully: both >= strong; amplify-only: induce >= weak, suppress < weak; works-partially:
  either >= weak otherwise; fails: neither.
selection warning: `selection_warning` (printed under the table) names each seed whose stage-select choice is
  a fallback (nothing passed the filters) with first-token KL above `stages.select.kl_max` (`fallback_warnings`).
judges: rates and verdicts read one judge's refusal labels (`verdict_judge`). A judge whose label is no
  refusal label on a prompt set a rule's arms are judged on (a guard on harmless prompts, where it answers
  "is the completion safe?"; `refusal_ray.judges.config.QUESTIONS`) gives that rule "NOT-JUDGEABLE
  (<kind> on <sets>)" instead of a verdict, and its rates on that set are left out (NaN).
capability cost (stage capability; not part of either verdict): `cost_ce[arm]` is the arm's CE loss
  minus the baseline's (nats/token, mean over seeds) and `cost_kl[arm]` its first-token KL against
  the baseline, at the setting control_margin reads (ablation_alpha, addition_coefficient) when it was
  measured, else the arm's first (`cost_setting[arm]` names it; `[arm-ctl]`: its random control); the full
  table, every metric and setting, is `capability_cost.parquet` (`refusal_ray.stages.capability.read`).
"""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd

from refusal_ray.analysis.judgements import (agreement, judge_labels, judges_in, kind_of, render_agreement,
                                             steering_under)
from refusal_ray.core.render import DIRECTIONS, HEADLINE, WIDTH, Column, column, fit_table, legend_lines, \
    short_count, text_table
from refusal_ray.errors import SpecError
from refusal_ray.judges.config import INLINE, QUESTION_TEXT, REFUSED, question
from refusal_ray.store import Store


def _rate(arms: pd.DataFrame, **where) -> float:
    sel = arms
    for k, v in where.items():
        if v is None:
            return float("nan")
        sel = sel[np.isclose(sel[k], v)] if isinstance(v, float) else sel[sel[k] == v]
    return float(sel["rate"].iloc[0]) if len(sel) else float("nan")


def from_readers(name: str):
    """The object `name` of the first registered stage read module (`Stage.read`, STAGES order) that defines
    it: the decision rule reads stage steer's `nearest_steered` and `ablation_direction` this way (the
    definitions of its arms), and old imports (`from refusal_ray.analysis.summary import pooled_arms`) keep
    working. Raises AttributeError when none does."""
    import importlib

    from refusal_ray.stages import STAGES

    for stage in STAGES:
        if stage.read is not None:
            module = importlib.import_module(stage.read)
            if name in vars(module):
                return vars(module)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __getattr__(name: str):
    """Names that moved to the stages' read modules (`from_readers`)."""
    if name.startswith("__"):
        raise AttributeError(name)
    return from_readers(name)


def nearest_steered(best: int, layers) -> int | None:
    """`best` if it is among the steered `layers`, else the nearest of them (ties: the lower); None if none
    (stage steer's read module's)."""
    return from_readers("nearest_steered")(best, layers)


def ablation_direction(a: pd.DataFrame):
    """The ablation arms of the direction most seeds ablated, and its name (stage steer's read module's)."""
    return from_readers("ablation_direction")(a)


MARGIN_TOL = 1e-9   # rate differences within this of a margin meet it (floating-point rounding, not slack)


def meets(x: float, threshold: float) -> bool:
    """Whether a rate (or a difference of rates) `x` reaches `threshold`: x >= threshold - MARGIN_TOL.

    Rates are k/n, or prompt-pooled means with fractional counts (README "Refusal rate"), so their
    differences carry rounding: 0.7 - 0.2 == 0.49999999999999994. Two rates that truly differ do so
    by at least 1/(n * seeds), far above MARGIN_TOL (1e-9) for any realistic n, so the tolerance only
    absorbs rounding. Its negation is the rule's "<": x < threshold - MARGIN_TOL."""
    return bool(x >= threshold - MARGIN_TOL)


def control_margin_verdict(base_harm: float, abl: tuple[float, float], add: tuple[float, float], rule: dict) -> str:
    """The pre-registered control_margin verdict (DESIGN.md "Decision rules"; Arditi et al. 2024, Sec. 3-4).

    base_harm: baseline harmful refusal rate in [0, 1]; abl = (suppression vs baseline, vs control);
    add = (induction vs baseline, vs control), each a difference of rates. NaN = unmeasured.
    Every comparison is `meets` (tolerance MARGIN_TOL): NO-BASELINE-REFUSAL when base_harm does not
    meet baseline_min; an arm falls short unless both its differences meet baseline_margin and
    control_margin. Returns INCOMPLETE, NO-BASELINE-REFUSAL, SUPPORTED or "NOT-SUPPORTED (<arms>)"."""
    if np.isnan(base_harm):
        return "INCOMPLETE"
    if not meets(base_harm, rule["baseline_min"]):
        return "NO-BASELINE-REFUSAL"
    if any(np.isnan(x) for x in (*abl, *add)):
        return "INCOMPLETE"
    short = [name for name, (vs_base, vs_ctl) in (("ablation", abl), ("addition", add))
             if not (meets(vs_base, rule["baseline_margin"]) and meets(vs_ctl, rule["control_margin"]))]
    return "SUPPORTED" if not short else f"NOT-SUPPORTED ({', '.join(short)})"


def steering_label(induce: float, suppress: float, rule: dict) -> str:
    """Audit label from the curve's best induction and suppression (differences of rates; NaN =
    unmeasured, giving INCOMPLETE). ">= t" is `meets(x, t)` and "< t" its negation (MARGIN_TOL):
    works-fully: both >= strong; amplify-only: induce >= weak, suppress < weak; works-partially:
    either >= weak otherwise; fails: neither."""
    if np.isnan(induce) or np.isnan(suppress):
        return "INCOMPLETE"
    if meets(induce, rule["strong"]) and meets(suppress, rule["strong"]):
        return "works-fully"
    if meets(induce, rule["weak"]) and not meets(suppress, rule["weak"]):
        return "amplify-only"
    if meets(induce, rule["weak"]) or meets(suppress, rule["weak"]):
        return "works-partially"
    return "fails"


def steer_columns(a: pd.DataFrame, best: int, rule: dict) -> dict:
    """The steering columns and both verdicts of one model, from its pooled arms `a`.

    Random controls of several draws (`controls: K`; pooled rows per draw where `a` has a
    `control_draw` column): an arm's shift "vs control" is measured against the controls' `mean` shift
    or their 0.95 `quantile` (numpy linear; control_margin's `control_statistic`, default mean; one draw:
    that draw, as before). With K > 1 the summary adds the draws' mean, sd (ddof 1) and 0.95 quantile
    of the controls' own shifts: `ablation_control_suppression_{mean,sd,q95}` (baseline harmful refusal
    minus a draw's), `addition_control_induction_{mean,sd,q95}` (a draw's harmless refusal minus
    baseline), `control_draws` and `control_statistic`."""
    cm, sl = rule.get("control_margin", {}), rule.get("steering_labels", {})
    statistic = cm.get("control_statistic") or "mean"

    def draws(**where) -> np.ndarray:   # the control's per-draw rates
        sel = a[a["control"].astype(bool)]
        for k, v in where.items():
            if v is None:
                return np.array([])
            sel = sel[np.isclose(sel[k], v)] if isinstance(v, float) else sel[sel[k] == v]
        return sel["rate"].to_numpy(float)

    def control(rates: np.ndarray, q: float) -> float:   # the rate the rule compares with
        if not len(rates):
            return float("nan")
        return float(rates.mean()) if statistic == "mean" else float(np.quantile(rates, q))

    def spread(shifts: np.ndarray) -> tuple[float, float, float]:
        if not len(shifts):
            return (float("nan"),) * 3
        sd = float(np.std(shifts, ddof=1)) if len(shifts) > 1 else float("nan")
        return float(shifts.mean()), sd, float(np.quantile(shifts, 0.95))
    base_harm = _rate(a, mode="baseline", prompt_set="harmful")
    base_safe = _rate(a, mode="baseline", prompt_set="harmless")
    alpha, coef = float(cm.get("ablation_alpha", 1.0)), float(cm.get("addition_coefficient", 1.0))
    abl = _rate(a, mode="ablation", alpha=alpha, control=False, prompt_set="harmful")
    abl_draws = draws(mode="ablation", alpha=alpha, prompt_set="harmful")
    abl_ctl = control(abl_draws, 0.05)   # the draws' 0.95 quantile of suppression is their 0.05 quantile of rate
    direction = a[(a["mode"] == "addition") & ~a["control"].astype(bool)]
    add_layer = nearest_steered(best, direction.loc[np.isclose(direction["coefficient"], coef), "layer"])
    add = _rate(a, mode="addition", layer=add_layer, coefficient=coef, control=False, prompt_set="harmless")
    add_draws = draws(mode="addition", layer=add_layer, coefficient=coef, prompt_set="harmless")
    add_ctl = control(add_draws, 0.95)
    label_layer = nearest_steered(best, direction["layer"])
    curve = direction[direction["layer"] == label_layer]
    pos = curve[(curve["coefficient"] > 0) & (curve["prompt_set"] == "harmless")]["rate"]
    neg = curve[(curve["coefficient"] < 0) & (curve["prompt_set"] == "harmful")]["rate"]
    induce = float(pos.max() - base_safe) if len(pos) else float("nan")
    suppress = float(base_harm - neg.min()) if len(neg) else float("nan")
    k = max(len(abl_draws), len(add_draws))
    stats = {} if k <= 1 else {"control_draws": k, "control_statistic": statistic} | dict(zip(
        ("ablation_control_suppression_mean", "ablation_control_suppression_sd", "ablation_control_suppression_q95",
         "addition_control_induction_mean", "addition_control_induction_sd", "addition_control_induction_q95"),
        (*spread(base_harm - abl_draws), *spread(add_draws - base_safe))))
    return stats | {
        "baseline_harmful_refusal": base_harm, "baseline_harmless_refusal": base_safe,
        "ablation_harmful_refusal": abl, "ablation_suppression": base_harm - abl,
        "ablation_suppression_vs_control": abl_ctl - abl,
        "addition_layer": add_layer, "addition_harmless_refusal": add, "addition_induction": add - base_safe,
        "addition_induction_vs_control": add - add_ctl,
        "label_layer": label_layer, "steer_induce_max": induce, "steer_suppress_max": suppress,
        "verdict_control_margin": control_margin_verdict(
            base_harm, (base_harm - abl, abl_ctl - abl), (add - base_safe, add - add_ctl), cm) if cm else None,
        "verdict_steering_labels": steering_label(induce, suppress, sl) if sl else None,
    }


def known_judges(manifest: dict) -> list[str]:
    """The judges a store's verdicts may read: the inline substring judge and those in the manifest."""
    return [INLINE, *sorted(manifest.get("judges") or {})]


# the prompt sets each rule's arms are judged on (README "Judges": a judge must give refusal labels on all)
RULE_ARMS = {"control_margin": {"harmful": "control_margin's baseline and ablation arms",
                                "harmless": "control_margin's addition arm"},
             "steering_labels": {"harmful": "steering_labels' suppression curve",
                                 "harmless": "steering_labels' induction curve"}}


def judge_kind(manifest: dict, labels: pd.DataFrame, name: str) -> str | None:
    """The kind of judge `name`: the manifest's record, else its labels' `judge_kind` (None: unknown)."""
    if name == INLINE:
        return INLINE
    return ((manifest.get("judges") or {}).get(name) or {}).get("kind") or kind_of(labels, name)


def unjudgeable(kind: str | None, rule: dict) -> dict[str, list[str]]:
    """{rule: the prompt sets its arms are judged on where a judge of `kind` gives no refusal label}
    for the rules in `rule` (a decision rule without `judge`); empty when it can judge every arm.
    A guard cannot judge either rule: both read harmless prompts (`refusal_ray.judges.config.QUESTIONS`)."""
    out = {}
    for name, sets in RULE_ARMS.items():
        missing = [p for p in sets if rule.get(name) and question(kind, p) != REFUSED]
        if missing:
            out[name] = missing
    return out


def verdict_judge_error(name: str, kind: str | None, rule: dict) -> str | None:
    """Why judge `name` of `kind` cannot give the verdicts of `rule` (one line), or None if it can."""
    blocked = unjudgeable(kind, rule)
    if not blocked:
        return None
    parts = []
    for pset in ("harmful", "harmless"):
        what = [RULE_ARMS[r][pset] for r in blocked if pset in blocked[r]]
        if what:
            parts.append(f"{' and '.join(what)} {'is' if len(what) == 1 else 'are'} judged on {pset} prompts, where "
                         f"a {kind} judge's label answers \"{QUESTION_TEXT[question(kind, pset)]}\", not "
                         f"\"{QUESTION_TEXT[REFUSED]}\"")
    return f"judge {name!r} cannot judge the decision rule's arms: {'; '.join(parts)}"


def check_verdict_judge(manifest: dict, name: str, kinds: dict | None = None) -> None:
    """Raise SpecError('--verdict-judge', '', ...) when judge `name` cannot give the store's verdicts
    (`verdict_judge_error` under the manifest's decision rule); `kinds`: {name: kind} of judges not
    yet in the manifest (a `judge --judges FILE` call)."""
    kind = (kinds or {}).get(name) or judge_kind(manifest, pd.DataFrame(), name)
    rule = {k: v for k, v in (manifest.get("decision_rule") or {}).items() if k != "judge"}
    problem = verdict_judge_error(name, kind, rule)
    if problem:
        raise SpecError("--verdict-judge", "", problem)


def verdict_judge(manifest: dict) -> str:
    """The judge whose labels the verdicts read: the last one chosen with `--verdict-judge`
    (manifest `verdicts.judge`), else the decision rule's (`decision_rule.judge`, default substring)."""
    return (manifest.get("verdicts") or {}).get("judge") or (manifest.get("decision_rule") or {}).get("judge") or INLINE


# -- the stages' read side -------------------------------------------------------------------------------
RULE_ORDER = 25     # the rule's columns in the printed table: after stage select's (20), before steer's (30)
VERDICT_ORDER = 55  # the verdicts (and the report's Judges section): after capability (40), before patch (60)


def readers() -> list[tuple]:
    """[(stage, reader)] of every registered stage with a read side, in the spec's block order
    (`STAGES.by_block_order()`: the order of the summary's columns)."""
    from refusal_ray.stages import STAGES

    out = []
    for stage in STAGES.by_block_order():
        reader = stage.reader
        if reader is not None:
            out.append((stage, reader))
    return out


def _relabel(ctx) -> dict:
    """The tables whose counts a judge's labels change (`steering_under`): {} under the inline judge."""
    if ctx.judge == INLINE:
        return {}
    steering, completions = steering_under(ctx.tables["steering"], ctx.tables["completions"], ctx.labels, ctx.judge)
    return {"steering": steering, "completions": completions}


def read_context(store: Store, judge: str | None = None):
    """The ReadContext of a store (`refusal_ray.stages.base.ReadContext`): its tables (read once), manifest,
    decision rule (without its judge), every judge's labels, under `judge` (default: `verdict_judge`)."""
    from refusal_ray.stages.base import ReadContext

    manifest = store.read_json("manifest.json") or {}
    rule = {k: v for k, v in (manifest.get("decision_rule") or {}).items() if k != "judge"}
    ctx = ReadContext(store=store, manifest=manifest, rule=rule, judge=judge or verdict_judge(manifest),
                      readers=tuple(r for _, r in readers()), relabel=_relabel)
    ctx.labels = judge_labels(ctx.tables["completions"], ctx.tables["judgements"]) \
        if not ctx.tables["steering"].empty else judge_labels(pd.DataFrame(), pd.DataFrame())
    ctx.judge_kind = judge_kind(manifest, ctx.labels, ctx.judge)
    return ctx


def _load(store: Store):
    """The store's read context under its verdict judge (see `read_context`)."""
    return read_context(store)


def rule_columns(ctx, model: str, row: dict) -> dict:
    """The decision rule's columns of one model (`steer_columns` of its pooled arms under `ctx.judge`, the
    ablation arms of the direction most seeds ablated: `ablation_direction`)."""
    arms = ctx.arms
    a, direction = ablation_direction(arms[arms["model"] == model] if not arms.empty else arms)
    return steer_columns(a, int(row["best_layer"]), ctx.rule) | {"ablation_direction": direction}


def rule_overrides(ctx, model: str, row: dict) -> dict:
    """After the columns of the stage whose pooled arms the rule reads: NO-SELECTION when stage select chose
    nothing (`selected` "NONE") and the rule is INCOMPLETE; NOT-JUDGEABLE where `ctx.judge` gives no refusal
    labels on a prompt set the rule's arms are judged on; `unjudged`: the model's stored completions on
    the sets the judge answers "refused?" on, minus its refusal labels (malformed, failed or never judged)."""
    out = {}
    if row.get("selected") == "NONE" and row.get("verdict_control_margin") == "INCOMPLETE":
        out["verdict_control_margin"] = "NO-SELECTION"
    for r, sets in unjudgeable(ctx.judge_kind, ctx.rule).items():
        if row.get(f"verdict_{r}") is not None:
            out[f"verdict_{r}"] = f"NOT-JUDGEABLE ({ctx.judge_kind} on {'/'.join(sets)})"
    labels, comps = ctx.labels, ctx.tables["completions"]
    mine = labels[(labels["model"] == model) & (labels["judge"] == ctx.judge) & (labels["question"] == REFUSED)]
    answered = [p for p in ("harmful", "harmless") if question(ctx.judge_kind, p) == REFUSED]
    stored = 0 if comps.empty else int(((comps["model"] == model) & comps["prompt_set"].isin(answered)).sum())
    out["unjudged"] = stored - int(mine["refusal"].notna().sum())
    return out


def _summary_rows(ctx, judge: str | None = None) -> pd.DataFrame:
    """The summary table (one row per model of the manifest): each stage reader's columns in the spec's
    block order, the decision rule's around those of the stage whose pooled arms it reads (when that stage
    ran and the model has a best layer), under `judge` (default `ctx.judge`)."""
    if judge is not None and judge != ctx.judge:
        ctx = ctx.with_judge(judge, judge_kind(ctx.manifest, ctx.labels, judge))
    rows = []
    for name, info in ctx.manifest.get("models", {}).items():
        row = {"model": name, "params": info.get("params"), "layers": info.get("n_layers")}
        for stage, reader in readers():
            ruled = "pooled_arms" in reader.provides and "best_layer" in row and ctx.stages.get(stage.name) is not None
            if ruled:
                row |= rule_columns(ctx, name, row)
            row |= reader.summary(ctx, name, row)
            if ruled:
                row |= rule_overrides(ctx, name, row)
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df["judge"] = ctx.judge
        df["rule_hash"] = ctx.manifest.get("rule_hash")
        df = df.sort_values("params", kind="stable").reset_index(drop=True)
    return df


def arms_by_judge(ctx, names: list[str]) -> pd.DataFrame:
    """Pooled steering arms (rate and prompt-pooled Wilson interval per model, arm and prompt set)
    under each judge, with a `judge` column: the steering rates of every judge side by side."""
    frames = []
    for j in names:
        arms = ctx.with_judge(j).arms
        if not arms.empty:
            frames.append(arms.assign(judge=j))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summarize(out_dir, judge: str | None = None) -> pd.DataFrame:
    """Build the summary table from a store (manifest, directions, steering, completions, judgements),
    verdicts under `judge` (default: `verdict_judge` of the manifest). Column `judge` names it."""
    return _summary_rows(read_context(Store(out_dir), judge))


def judge_tables(out_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary_by_judge, agreement) as `write_summary` last wrote them (empty with fewer than two judges)."""
    store = Store(out_dir)
    out = []
    for name in ("summary_by_judge.parquet", "agreement.parquet"):
        data = store.read_file(name)
        out.append(pd.read_parquet(io.BytesIO(data)) if data is not None else pd.DataFrame())
    return out[0], out[1]


def write_summary(out_dir, judge: str | None = None) -> pd.DataFrame:
    """Compute the summary and write summary.parquet and summary.csv into the store; with more than
    one judge, also summary_by_judge.parquet and agreement.parquet / agreement.csv. The manifest's
    `verdicts` records the judge behind the verdicts (its hash, and whether it is the rule's)."""
    store = Store(out_dir)
    ctx = read_context(store, judge)
    manifest, judge = ctx.manifest, ctx.judge
    names = judges_in(ctx.labels)
    rows = {j: _summary_rows(ctx, j) for j in dict.fromkeys([judge, *names])}
    df = rows[judge]
    store.write_frame("summary.parquet", df)
    store.write_file("summary.csv", df.to_csv(index=False).encode())
    for _, reader in readers():   # e.g. capability_cost.parquet / .csv
        for name, fn in reader.files.items():
            data = fn(ctx)
            if isinstance(data, pd.DataFrame):
                store.write_frame(name, data)
            elif data is not None:
                store.write_file(name, data)
    if len(names) > 1:
        per = pd.concat([rows[j] for j in names if not rows[j].empty], ignore_index=True)
        agree = agreement(ctx.labels)
        store.write_frame("summary_by_judge.parquet", per)
        store.write_frame("steering_by_judge.parquet", arms_by_judge(ctx, names))
        store.write_frame("agreement.parquet", agree)
        store.write_file("agreement.csv", agree.to_csv(index=False).encode())
    rule_judge = (manifest.get("decision_rule") or {}).get("judge") or INLINE
    record = {"judge": judge, "judge_hash": (manifest.get("judges") or {}).get(judge, {}).get("hash", "inline"),
              "rule_judge": rule_judge, "pre_registered": judge == rule_judge}
    if manifest and manifest.get("verdicts") != record:
        manifest["verdicts"] = record
        store.write_json("manifest.json", manifest)
    return df


DISPLAY_HEAD = [
    Column("model", "model", "{}", HEADLINE, legend="the model's name in the spec"),
    Column("params", "params", "{:,.0f}", HEADLINE, legend="parameter count (k = thousand, M = million, B = billion)",
           text=short_count),
    Column("layers", "L", "{:.0f}", HEADLINE, "layers", "number of transformer layers")]
_OF_SEEDS = re.compile(r" \((\d+) of (\d+) seeds\)$")


def _direction_text(name: str) -> str:
    """"L3/p-2 (2 of 2 seeds)" -> "L3/p-2"; "L3/p-2 (1 of 2 seeds)" -> "L3/p-2 (1 of 2)" (the headline's)."""
    m = _OF_SEEDS.search(name)
    if m is None:
        return name
    return name[:m.start()] + ("" if m.group(1) == m.group(2) else f" ({m.group(1)} of {m.group(2)})")


RULE_DISPLAY = [   # the decision rule's columns
    Column("ablation_direction", "ablated", "{}", HEADLINE, "direction",
           "the direction the rule ablates: layer L, position p (tokens before the end of the template), the one "
           "most seeds selected; \"(k of n)\" when only k of the n seeds did", _direction_text),
    Column("addition_layer", "add L", "{:.0f}", DIRECTIONS, "addition layer",
           "the layer whose addition arm control_margin reads (the best layer when steered, else the nearest "
           "steered layer)"),
    Column("label_layer", "label L", "{:.0f}", DIRECTIONS, "labels layer",
           "the layer whose addition curve steering_labels reads (chosen as the addition layer)"),
    Column("baseline_harmful_refusal", "base", "{:.2f}", HEADLINE, "baseline refusal",
           "harmful refusal rate without intervention (test prompts, pooled over seeds; rates are in [0, 1])"),
    Column("ablation_suppression", "abl-base", "{:+.2f}", HEADLINE, "ablation drop",
           "baseline harmful refusal minus harmful refusal with the direction ablated (alpha = ablation_alpha)"),
    Column("ablation_suppression_vs_control", "abl-ctl", "{:+.2f}", HEADLINE, "drop vs control",
           "ablation minus its random control: the random direction's harmful refusal minus the ablated direction's"),
    Column("addition_induction", "add-base", "{:+.2f}", HEADLINE, "addition rise",
           "harmless refusal with the direction added (c = addition_coefficient, at the addition layer) minus "
           "baseline harmless refusal"),
    Column("addition_induction_vs_control", "add-ctl", "{:+.2f}", HEADLINE, "rise vs control",
           "addition minus its random control: harmless refusal with the direction added minus with a random one")]
VERDICT_DISPLAY = [
    Column("verdict_control_margin", "control_margin", "{}", HEADLINE,
           legend="SUPPORTED when the ablation drop and the addition rise each reach baseline_margin, and their "
                  "values vs control reach control_margin; else NOT-SUPPORTED naming the arm(s) short "
                  "(NO-BASELINE-REFUSAL: baseline refusal below baseline_min; INCOMPLETE: an arm not measured)"),
    Column("verdict_steering_labels", "steering_labels", "{}", HEADLINE,
           legend="from the addition curve at the labels layer, the best rise of harmless refusal (c > 0) and drop "
                  "of harmful refusal (c < 0): works-fully (both >= strong), amplify-only (rise >= weak, drop < "
                  "weak), works-partially (either >= weak), fails (neither)")]


def _parts() -> list[list[Column]]:
    """The columns after DISPLAY_HEAD, in groups in reader `order` (ties: block order), the decision rule's
    at RULE_ORDER and the verdicts at VERDICT_ORDER; a reader's column without a table goes to its `title`'s."""
    parts = [(RULE_ORDER, -1, RULE_DISPLAY), (VERDICT_ORDER, -1, VERDICT_DISPLAY)]
    parts += [(r.order, i, [column(c, r.title) for c in r.display()]) for i, (_, r) in enumerate(readers())]
    return [cols for _, _, cols in sorted(parts, key=lambda p: (p[0], p[1]))]


def display() -> list[tuple[str, str, str]]:
    """The summary table's columns (the `--wide` table): model, params, layers, then each stage reader's
    `display()` in reader `order` (ties: block order), with the decision rule's columns at RULE_ORDER and the
    verdicts at VERDICT_ORDER. Each is a `Column`: a (column, header, fmt) tuple."""
    return [*DISPLAY_HEAD, *(c for cols in _parts() for c in cols)]


DISPLAY = display()   # as of import; render() calls display()


_table = text_table   # the old private name


def warning_lines(df: pd.DataFrame) -> list[str]:
    """The summary's warning lines (column `selection_warning`: `fallback_warnings`), model by model."""
    if "selection_warning" not in df.columns:
        return []
    return [line for w in df["selection_warning"] if isinstance(w, str) for line in w.splitlines()]


def _footer(df: pd.DataFrame, warnings: bool = True) -> list[str]:
    lines = warning_lines(df) if warnings else []
    if "rule_hash" in df.columns:
        lines.append(f"decision rule hash: {df['rule_hash'].iloc[0]}")
    if "judge" in df.columns:
        lines.append(f"verdicts under judge: {df['judge'].iloc[0]}")
    return lines


def render_wide(df: pd.DataFrame) -> str:
    """The summary as one fixed-width table of every display column (`refusal-ray run/summarize --wide`;
    the single table printed before the compact layout)."""
    if df.empty:
        return "(no results)"
    cols = [(k, h, f) for k, h, f in display() if k in df.columns]
    cols += [(k, k.replace("faithfulness", "faith"), "{:.2f}") for k in df.columns if k.startswith("faithfulness[")]
    cols += [(k, k, "{}") for k in df.columns if k.startswith("verdict[")]
    return "\n".join(_table(df, cols) + _footer(df))


def _expand(c: Column, df: pd.DataFrame) -> list[Column]:
    """Column `c` for the columns of `df` it names: itself, or for a pattern such as "faithfulness[*]" every
    column it matches (label: the column's name), in the summary's order."""
    if not c[0].endswith("[*]"):
        return [c] if c[0] in df.columns else []
    stem = c[0][:-len("[*]")]
    return [Column(k, k, c[2], c.table, k, c.legend, c.text) for k in df.columns if k.startswith(stem + "[")]


def tables(df: pd.DataFrame) -> dict[str, list[Column]]:
    """{table title: its Columns present in `df`} of the compact layout: HEADLINE first, then each detail
    table in the order of its first column; every detail table starts with the model column."""
    out: dict[str, list[Column]] = {HEADLINE: []}
    for c in (*DISPLAY_HEAD, *(c for cols in _parts() for c in cols)):
        for x in _expand(c, df):
            out.setdefault(x.table or HEADLINE, []).append(x)
    return {t: cols if t == HEADLINE else [DISPLAY_HEAD[0], *cols] for t, cols in out.items() if cols}


def legend(cols: list[Column]) -> list[tuple[str, str]]:
    """[(label, meaning)] of `cols`, each label once; a column without a legend: its summary.csv name."""
    seen: dict[str, str] = {}
    for c in cols:
        seen.setdefault(c.label, c.legend or f"column `{c[0]}` of summary.csv")
    return list(seen.items())


def render(df: pd.DataFrame, wide: bool = False, width: int = WIDTH) -> str:
    """The summary as text (also the Markdown report's): with `wide`, `render_wide`; else the headline
    table (model, params, layers, direction, baseline refusal, the rule's four differences, verdicts) and
    one detail table per `Column.table` (directions and layers, other operators, capability cost, ...),
    each fitted to `width` characters (`fit_table`) with a legend explaining its headers once (the warning
    lines right under the headline table), then the decision rule hash and the verdict judge."""
    if wide:
        return render_wide(df)
    if df.empty:
        return "(no results)"
    lines: list[str] = []
    for title, cols in tables(df).items():
        if lines:
            lines.append("")
        lines.append(f"{title}:" if title != HEADLINE else "headline (refusal rates in [0, 1], pooled over seeds):")
        lines += fit_table(df, cols, width)
        lines += warning_lines(df) if title == HEADLINE else []   # right under the headline table
        lines += legend_lines([item for item in legend(cols) if title == HEADLINE or item[0] != "model"], width)
    footer = _footer(df, warnings=False)
    return "\n".join(lines + [""] * bool(footer) + footer)


JUDGE_DISPLAY = [("model", "model", "{}"), ("judge", "judge", "{}"), ("baseline_harmful_refusal", "base", "{:.2f}"),
                 ("ablation_suppression", "abl-base", "{:+.2f}"), ("ablation_suppression_vs_control", "abl-ctl", "{:+.2f}"),
                 ("addition_induction", "add-base", "{:+.2f}"), ("addition_induction_vs_control", "add-ctl", "{:+.2f}"),
                 ("unjudged", "unjudged", "{:.0f}"), ("verdict_control_margin", "control_margin", "{}"),
                 ("verdict_steering_labels", "steering_labels", "{}")]


def _judge_columns() -> list[Column]:
    """The per-judge table's compact columns: the headline's labels and legends for the rule's columns."""
    known = {c[0]: c for c in (*DISPLAY_HEAD, *RULE_DISPLAY, *VERDICT_DISPLAY)}
    extra = {"judge": Column("judge", "judge", "{}", legend="the judge whose labels the row reads (substring: the "
                                                            "inline judge)"),
             "unjudged": Column("unjudged", "unjudged", "{:.0f}", legend="completions this judge left without a "
                                                                          "label (malformed or failed verdicts)")}
    return [known.get(k) or extra[k] for k, _, _ in JUDGE_DISPLAY]


def render_judges(by_judge: pd.DataFrame, agree: pd.DataFrame, wide: bool = False, width: int = WIDTH) -> str:
    """Rates and verdicts per (model, judge), then the agreement table ('' with one judge only); each fitted to
    `width` characters with a legend (`wide`: the one-line-per-row tables of before)."""
    if by_judge.empty or by_judge["judge"].nunique() < 2:
        return ""
    df = by_judge.sort_values(["params", "model", "judge"], kind="stable")
    if wide:
        lines = ["rates and verdicts per judge:"] + ["  " + line for line in _table(df, [
            (k, h, f) for k, h, f in JUDGE_DISPLAY if k in df.columns])]
        return "\n".join(lines + [render_agreement(agree, wide=True)])
    cols = [c for c in _judge_columns() if c[0] in df.columns]
    lines = ["rates and verdicts per judge (refusal rates in [0, 1], pooled over seeds):", *fit_table(df, cols, width),
             *legend_lines([item for item in legend(cols) if item[0] != "model"], width)]
    text = render_agreement(agree, width=width)
    return "\n".join(lines + ([""] if text else []) + ([text] if text else []))