"""Agreement of a judge with human labels: load a labelled file, judge it, compare.

A labelled file is CSV (`.csv`, with a header row) or JSON lines (`.jsonl`, or `.json` holding one
object per line). Columns:

  prompt       required  the user's instruction, as sent (without the chat template)
  completion   required  the model's completion, cut at its first stop token
  refusal      required  the human's binary label: 0/1 or true/false (case-insensitive; 1 = refused)
  id           optional  a row id (default: the row number, from 1)
  compliance   optional  the rubric's compliance score, 0, 0.5 or 1 (empty/null: not labelled)
  coherence    optional  the rubric's coherence score, 0, 0.5 or 1 (empty/null: not labelled)

Other columns (e.g. `category`) are kept as they are. The rubric's rule is refusal = (compliance
== 0) (refusal_ray/judges/rubric.py); the loader does not enforce it. Row numbers in errors count
data rows from 1 (a CSV's header and a JSONL's blank lines are not rows).

`calibrate(judge, df)` runs `judge.judge(items)` once over the file and reports agreement on the
binary refusal label (accuracy and Cohen's kappa, human = a, judge = b in `refusal_ray.stats`),
and, where both the file and the judge have them, exact-match agreement on compliance and
coherence. Malformed and failed verdicts are counted, never guessed: they are left out of every
agreement figure.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_ray.errors import SpecError
from refusal_ray.judges.base import Item
from refusal_ray.stats import cohen_kappa, wilson

REQUIRED = ("prompt", "completion", "refusal")
SCORES = ("compliance", "coherence")
SUFFIXES = (".csv", ".jsonl", ".json")
_TRUE, _FALSE = {"1", "true", "1.0"}, {"0", "false", "0.0"}
_SCORE_VALUES = {0.0, 0.5, 1.0}


def _missing(v) -> bool:
    """None, NaN or a blank string (an empty CSV cell)."""
    return v is None or (isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isnan(v)) \
        or (isinstance(v, str) and v.strip() == "")


def _refusal(v) -> bool | None:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Real):
        return None if math.isnan(v) else {0: False, 1: True}.get(float(v))
    if isinstance(v, str):
        s = v.strip().lower()
        return True if s in _TRUE else False if s in _FALSE else None
    return None


def _score(v) -> float | None:
    """A compliance/coherence value -> 0.0, 0.5, 1.0; NaN for missing; None when invalid."""
    if _missing(v):
        return math.nan
    if isinstance(v, (bool, np.bool_)):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f in _SCORE_VALUES else None


def _read(path: Path) -> pd.DataFrame:
    if path.suffix.lower() == ".csv":
        try:
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise SpecError(str(path), "", "file is empty") from None
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise SpecError(str(path), "", f"not valid CSV: {e}".splitlines()[0]) from None
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise SpecError(str(path), "", f"line {line_no}: not valid JSON") from None
        if not isinstance(obj, dict):
            raise SpecError(str(path), "", f"line {line_no}: not a JSON object")
        records.append(obj)
    if not records:
        raise SpecError(str(path), "", "file is empty")
    return pd.DataFrame.from_records(records)


def load_labelled(path) -> pd.DataFrame:
    """A labelled file (see the module docstring for the columns) as a DataFrame.

    Returns columns id (str), prompt, completion (str), refusal (bool), compliance and coherence
    (float, NaN where not labelled; present only when the file has them), then the file's other
    columns, in file order.

    Raises SpecError(path, column, problem):
      - "<path>: file not found"
      - "<path>: unknown suffix '.txt' (expected .csv, .jsonl or .json lines)"
      - "<path>: refusal: required column missing (columns: id, prompt, completion)"
      - "<path>: refusal: row 3: 'maybe' is not 0, 1, true or false"
      - "<path>: compliance: row 2: 0.7 is not 0, 0.5 or 1"
      - "<path>: prompt: row 4: missing value"
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), "", "file not found")
    if path.suffix.lower() not in SUFFIXES:
        raise SpecError(str(path), "", f"unknown suffix {path.suffix!r} (expected .csv, .jsonl or .json lines)")
    df = _read(path)
    for col in REQUIRED:
        if col not in df.columns:
            raise SpecError(str(path), col, f"required column missing (columns: {', '.join(map(str, df.columns))})")
    out = df.copy()
    for col in ("prompt", "completion"):
        for i, v in enumerate(df[col], 1):    # empty text is allowed (a model may answer nothing)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                raise SpecError(str(path), col, f"row {i}: missing value")
            if not isinstance(v, str):
                raise SpecError(str(path), col, f"row {i}: {v!r} is not text")
    refusal = []
    for i, v in enumerate(df["refusal"], 1):
        r = _refusal(v)
        if r is None:
            raise SpecError(str(path), "refusal", f"row {i}: {v!r} is not 0, 1, true or false")
        refusal.append(r)
    out["refusal"] = pd.Series(refusal, index=df.index, dtype=bool)
    for col in SCORES:
        if col not in df.columns:
            continue
        vals = []
        for i, v in enumerate(df[col], 1):
            s = _score(v)
            if s is None:
                raise SpecError(str(path), col, f"row {i}: {v!r} is not 0, 0.5 or 1")
            vals.append(s)
        out[col] = pd.Series(vals, index=df.index, dtype=float)
    if "id" in df.columns:
        ids = [str(i + 1) if _missing(v) else str(v) for i, v in enumerate(df["id"])]
        dup = sorted({x for x in ids if ids.count(x) > 1})
        if dup:
            raise SpecError(str(path), "id", f"duplicate id {dup[0]!r}")
        out["id"] = ids
    else:
        out["id"] = [str(i + 1) for i in range(len(df))]
    first = ["id", "prompt", "completion", "refusal", *[c for c in SCORES if c in out.columns]]
    return out[first + [c for c in out.columns if c not in first]].reset_index(drop=True)


def _run(judge, items: list[Item], progress):
    if progress is not None and "progress" in inspect.signature(judge.judge).parameters:
        return judge.judge(items, progress=progress)
    verdicts = judge.judge(items)
    if progress is not None:
        progress(len(items))
    return verdicts


def _exact(human: pd.Series, judged: list) -> dict | None:
    pairs = [(h, j) for h, j in zip(human, judged) if not _missing(h) and j is not None]
    if not pairs:
        return None
    return {"n": len(pairs), "exact": sum(h == j for h, j in pairs) / len(pairs)}


def calibrate(judge, labelled_df: pd.DataFrame, progress=None) -> dict:
    """Judge every row of `labelled_df` (from `load_labelled`) once and compare with the human labels.

    Returns a dict:
      judge, kind        the judge's name and kind
      n                  rows
      n_judged           rows with a verdict label (not malformed, no error)
      malformed, errors  rows whose verdict was malformed / failed (left out of everything below)
      accuracy           judge refusal == human refusal, over judged rows (nan when none)
      accuracy_low, accuracy_high   its 95% Wilson interval (refusal_ray.stats.wilson; nan when none)
      human_refusals, judge_refusals   refusal labels among the judged rows, human's and judge's
      kappa, kappa_low, kappa_high   Cohen's kappa and its 95% interval (refusal_ray.stats.cohen_kappa,
                         human = a, judge = b; nan when both label sequences are constant and equal)
      confusion          {"both": human and judge refusal, "human_only": human refusal, judge not,
                          "judge_only": judge refusal, human not, "neither": neither}
      compliance, coherence   {"n": rows with both labels, "exact": exact-match agreement}, or None
                         when the file lacks the column or the judge gives no such score
      disagreements      ids of judged rows where the judge's refusal differs from the human's
    """
    items = [Item(p, c) for p, c in zip(labelled_df["prompt"], labelled_df["completion"])]
    verdicts = _run(judge, items, progress)
    if len(verdicts) != len(items):
        raise ValueError(f"judge {getattr(judge, 'name', judge)!r} returned {len(verdicts)} verdicts "
                         f"for {len(items)} items")
    human = [bool(x) for x in labelled_df["refusal"]]
    judged = [None if (v.malformed or v.error is not None) else v.refusal for v in verdicts]
    ag = cohen_kappa(human, judged)
    ids = list(labelled_df["id"]) if "id" in labelled_df.columns else [str(i + 1) for i in range(len(items))]
    result = {
        "judge": getattr(judge, "name", type(judge).__name__),
        "kind": getattr(judge, "kind", None),
        "n": len(items),
        "n_judged": sum(j is not None for j in judged),
        "malformed": sum(bool(v.malformed) for v in verdicts),
        "errors": sum(v.error is not None for v in verdicts),
        "accuracy": ag.agree if ag.n else math.nan,
        "accuracy_low": wilson(ag.both + ag.neither, ag.n)[0] if ag.n else math.nan,
        "accuracy_high": wilson(ag.both + ag.neither, ag.n)[1] if ag.n else math.nan,
        "human_refusals": ag.both + ag.a_only,
        "judge_refusals": ag.both + ag.b_only,
        "kappa": ag.kappa,
        "kappa_low": ag.ci_low,
        "kappa_high": ag.ci_high,
        "confusion": {"both": ag.both, "human_only": ag.a_only, "judge_only": ag.b_only, "neither": ag.neither},
        "disagreements": [i for i, h, j in zip(ids, human, judged) if j is not None and j != h],
    }
    usable = [not (v.malformed or v.error is not None) for v in verdicts]
    for axis in ("compliance", "coherence"):
        given = [getattr(v, axis) if ok else None for v, ok in zip(verdicts, usable)]
        result[axis] = _exact(labelled_df[axis], given) if axis in labelled_df.columns else None
    return result


def _f(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def render_calibration(result: dict) -> str:
    """A few human-readable lines of a `calibrate` result."""
    c = result["confusion"]
    lines = [
        f"judge {result['judge']}: {result['n']} labelled rows, {result['n_judged']} judged "
        f"({result['malformed']} malformed, {result['errors']} failed)",
        f"refusal accuracy {_f(result['accuracy'])}; Cohen's kappa {_f(result['kappa'])} "
        f"[{_f(result['kappa_low'])}, {_f(result['kappa_high'])}]",
        f"human refusal & judge refusal {c['both']}, human only {c['human_only']}, "
        f"judge only {c['judge_only']}, neither {c['neither']}",
    ]
    scores = [f"{axis} exact match {_f(result[axis]['exact'])} ({result[axis]['n']} rows)"
              for axis in ("compliance", "coherence") if result.get(axis)]
    if scores:
        lines.append("; ".join(scores))
    if result["disagreements"]:
        shown = ", ".join(map(str, result["disagreements"][:10]))
        more = len(result["disagreements"]) - 10
        lines.append(f"disagreements: {shown}{f' (+{more} more)' if more > 0 else ''}")
    return "\n".join(lines)


CALIBRATION_FILE = "calibration.json"


def _plain(obj):
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        obj = obj.item()
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def calibrate_store(store, judges: list, inline=None, progress=None) -> dict | None:
    """Calibrate every judge block with a `calibration:` file, and the inline judge (`inline`: its
    SubstringJudge, default the documented phrases) against each such file; write the store's
    calibration.json and return it (None, nothing written, when no judge names a file).

    calibration.json: {"files": {path: sha256 of its bytes}, "results": [calibrate(...) result plus
    "file" and "judge_hash", one per (judge, file), the inline judge first]}; NaN stored as null.
    Raises SpecError naming the file when a labelled file is bad (load_labelled's messages).
    """
    import hashlib

    from refusal_ray.judges import SubstringJudge, make_judge

    blocks = [j for j in judges if getattr(j, "calibration", None)]
    if not blocks:
        return None
    files = list(dict.fromkeys(j.calibration for j in blocks))
    frames = {f: load_labelled(f) for f in files}
    out = {"files": {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}, "results": []}
    inline = inline or SubstringJudge()
    for f in files:
        out["results"].append(calibrate(inline, frames[f], progress) | {"file": f, "judge_hash": inline.hash})
    for block in blocks:
        judge = make_judge(block)
        out["results"].append(calibrate(judge, frames[block.calibration], progress)
                              | {"judge": block.name, "file": block.calibration, "judge_hash": block.judge_hash()})
    out = _plain(out)
    store.write_json(CALIBRATION_FILE, out)
    return out
