"""The report's "Judge calibration" section: each judge against a labelled file, as the run stored it.

A judge block with `calibration: FILE` (refusal_ray/judges/config.py) is calibrated after the run
(`refusal_ray.judges.calibrate.calibrate_store`, the `refusal-ray judge --calibrate` figures); the
results are in the store's `calibration.json`. This module only reads that file (no torch, no
judge is loaded here): one markdown table row per (judge, labelled file), the inline substring
judge first.

Figures per row (refusal_ray.judges.calibrate.calibrate): labelled rows, rows judged (malformed and
failed verdicts are left out of every figure, never guessed), agreement on the binary refusal label
with its 95% Wilson interval (Wilson 1927, refusal_ray.stats.wilson), Cohen's kappa with its 95%
interval (refusal_ray.stats.cohen_kappa, human = a, judge = b), the human's and the judge's refusal
counts, and exact-match agreement on the rubric's compliance and coherence scores where both give them.
"""

from __future__ import annotations

import math

from refusal_ray.judges.calibrate import CALIBRATION_FILE   # the file name only (no torch is imported)
from refusal_ray.store import Store

TITLE = "## Judge calibration"


def _f(x, digits: int = 2, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _exact(axis: dict | None) -> str:
    return "-" if not axis else f"{axis['exact']:.2f} ({axis['n']})"


def rows(calibration: dict) -> list[list[str]]:
    """Table rows (strings) of a stored calibration.json, in its order."""
    out = []
    for r in calibration.get("results") or []:
        out.append([
            str(r["judge"]), f"`{r['file']}`", str(r["n"]), str(r["n_judged"]), str(r["malformed"] + r["errors"]),
            f"{_f(r['accuracy'])} [{_f(r.get('accuracy_low'))}, {_f(r.get('accuracy_high'))}]",
            f"{_f(r['kappa'], signed=True)} [{_f(r['kappa_low'], signed=True)}, {_f(r['kappa_high'], signed=True)}]",
            f"{r.get('human_refusals', '-')} / {r.get('judge_refusals', '-')}",
            _exact(r.get("compliance")), _exact(r.get("coherence")),
        ])
    return out


def _stale(calibration: dict, manifest: dict | None) -> list[str]:
    """Judges whose hash in the manifest differs from the one calibrated (re-judged since)."""
    known = (manifest or {}).get("judges") or {}
    out = []
    for r in calibration.get("results") or []:
        h = (known.get(r["judge"]) or {}).get("hash")
        if h and r.get("judge_hash") and h != r["judge_hash"]:
            out.append(r["judge"])
    return out


def section(out_dir, manifest: dict | None = None) -> list[str]:
    """The markdown lines of the report's "Judge calibration" section, or [] when the run stored no
    calibration and no judge of the manifest's spec names a calibration file.

    out_dir: the store (path or URI); manifest: its manifest.json (read from the store when None).
    Reads `<out_dir>/calibration.json` only. When a judge names a file but nothing was stored, the
    section says so and how to compute it.
    """
    store = Store(out_dir)
    manifest = store.read_json("manifest.json") if manifest is None else manifest
    calibration = store.read_json(CALIBRATION_FILE)
    if calibration is None:
        named = [j.get("name") for j in ((manifest or {}).get("spec") or {}).get("judges") or []
                 if j.get("calibration")]
        if not named:
            return []
        return [TITLE, "", f"Not stored: judge(s) {', '.join(named)} name a calibration file, but the store has no "
                           f"{CALIBRATION_FILE}. `refusal-ray judge {out_dir}` stores it (and `refusal-ray report` "
                           f"then shows it).",
                ""]
    header = ["judge", "labelled file", "rows", "judged", "unjudged", "agreement [95% Wilson]",
              "Cohen's kappa [95%]", "refusals human / judge", "compliance exact (n)", "coherence exact (n)"]
    lines = [TITLE, "",
             "Each judge against the labels of the file its block names (`calibration:`; the toy judge's is "
             "synthetic and held out from its training), beside the inline substring judge on the same file. Agreement is on the binary refusal "
             "label; unjudged rows (malformed or failed verdicts) are left out of every figure, never guessed.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(calibration)]
    stale = _stale(calibration, manifest)
    if stale:
        lines += ["", f"Stale: judge(s) {', '.join(stale)} changed since this calibration (another content hash)."]
    return lines + [""]
