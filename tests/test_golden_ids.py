"""Golden cell ids of the quickstart: stored results stay reproducible across refactors.

The digests are of the sorted cell ids per (stage, arm kind), as computed before the paper-exact
issue (commit e97f015) for every kind whose result that issue did not change. That issue changed
the definitions of stage select (refusal score epsilon, layer cutoff, tokens, KL smoothing, val
filtering), so the select cells and every arm that reads the selected direction (ablation,
subspace, the orthogonalized arms) got new ids; those are pinned as of that issue. A refactor (the
operators issue) must keep every digest here; an issue that changes a result on purpose updates the
digest of exactly the kinds it changes and says so."""

from __future__ import annotations

import hashlib

from refusal_ray.plan import make_plan

from conftest import REPO

UNCHANGED_SINCE_E97F015 = {
    "directions:-": (8, "e8df16e9c549ca71"),
    "steer:baseline": (8, "7186d036c4f2ffaa"),
    "steer:addition": (336, "94e640e6d4efdf56"),
    "capability:baseline": (8, "cc45c6b319fcb1eb"),
    "capability:addition": (16, "7e0914144531ed17"),
}
AS_OF_PAPER_EXACT = {
    "select:-": (8, "dc2c716b5f4fc98e"),
    "steer:ablation": (16, "61135f7fb58d7093"),
    "steer:subspace": (16, "697c1af698e3a807"),
    "capability:ablation": (16, "15d8689074a59e17"),
    "capability:subspace": (16, "4badea6f3ba718f4"),
    "capability:orthogonalized": (16, "0471e42fab855377"),
    "capability:orthogonalized_subspace": (16, "eaceb9a5cb90da41"),
}


def test_quickstart_cell_ids_are_pinned(monkeypatch):
    monkeypatch.chdir(REPO)
    groups: dict[str, list[str]] = {}
    for c in make_plan("sweeps/quickstart.yaml").cells:
        groups.setdefault(f"{c.stage}:{c.params.get('mode') or c.params.get('arm') or '-'}", []).append(c.id)
    got = {k: (len(v), hashlib.sha256(",".join(sorted(v)).encode()).hexdigest()[:16]) for k, v in groups.items()}
    assert got == {**UNCHANGED_SINCE_E97F015, **AS_OF_PAPER_EXACT}
