"""Stage rank (issue 20): the rank sweep recovers the planted rank of data/models/toy-planted-k{1,2,3} with the
pca and category sources; its bases span the planted directions; batched rows equal one-row-at-a-time rows; the
refusal rank recomputed independently from the stored completions; bad input is refused with exact messages.

The planted specs use margin 0.8 (stages.rank.margin): on model k, ablating j < k of the k planted directions
leaves the other categories refused (harmful refusal (k - j) / k, so a suppression of at most 2/3 < 0.8), and
the span of all k removes it (suppression 1.0); the random same-rank controls keep refusal near 1.0 (control
margin 0.25). The bases sit at the directions' best layer (>= 1: layer 0 has no signal at the post-instruction
positions) at position -1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import REPO

MODELS = REPO / "data" / "models"
PLANTED = REPO / "data" / "prompts" / "planted"
RULE = {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                           "addition_coefficient": 1.0, "ablation_alpha": 1.0},
        "steering_labels": {"strong": 0.5, "weak": 0.2}}


def planted_spec(tmp_path: Path, k: int, rank: dict | None = None, **over) -> str:
    """A spec of model toy-planted-k{k} on its own prompts (every train / val / test prompt: 10 / 5 / 5 per
    category), stage rank with pca and category up to K = 3, margin 0.8."""
    spec = {"name": f"planted-k{k}", "models": [{"name": f"planted-k{k}", "path": str(MODELS / f"toy-planted-k{k}")}],
            "data": {"harmful": {"path": str(PLANTED / f"k{k}" / "harmful.jsonl"), "category_column": "category"},
                     "harmless": {"path": str(PLANTED / f"k{k}" / "harmless.jsonl")},
                     "n_train": 10 * k, "n_val": 5 * k, "n_test": 5 * k},
            "seeds": [0],
            "stages": {"directions": {"sites": ["resid_pre"], "positions": "post_instruction"},
                       "rank": {"sources": ["pca", "category"], "max_k": 3, "margin": 0.8, **(rank or {})}},
            "generation": {"max_new_tokens": 8}, "decision_rule": RULE, **over}
    path = tmp_path / f"planted-k{k}.json"
    path.write_text(json.dumps(spec))
    return str(path)


def _run(spec_file: str) -> dict[str, pd.DataFrame]:
    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan

    tables = run_local(make_plan(spec_file), log=lambda *a: None)
    assert all(r["status"] == "done" for r in tables["cells"]), [r["error"] for r in tables["cells"]]
    return {name: pd.DataFrame(rows) for name, rows in tables.items()}


class Ctx:
    """The little of a ReadContext that `read.ranks` reads."""

    def __init__(self, tables, margin=0.8, max_k=3):
        self.tables, self.rule = tables, RULE
        self.stages = {"rank": {"margin": margin, "max_k": max_k}}


@pytest.fixture(scope="module", params=[1, 2, 3])
def planted_run(request, tmp_path_factory):
    k = request.param
    return k, _run(planted_spec(tmp_path_factory.mktemp(f"k{k}"), k))


def test_rank_sweep_recovers_the_planted_rank(planted_run):
    from refusal_ray.stages.rank.read import ranks

    k, t = planted_run
    table = ranks(Ctx(t))
    got = dict(zip(table["source"], table["rank"]))
    assert got == {"pca": str(k), "category": str(k)}, table
    assert (table["baseline"] == 1.0).all()
    assert (t["rank"]["layer"] >= 1).all()


def test_pca_bases_span_and_category_directions_match_the_planted_directions(planted_run):
    from refusal_ray.toy.planted import planted_directions

    k, t = planted_run
    d = planted_directions(MODELS / f"toy-planted-k{k}").double().numpy()          # [k, d_model]
    b = t["rank_bases"]
    pca = b[b["source"] == "pca"].sort_values("index")
    v = np.stack([np.asarray(x, float) for x in pca["vector"]])[:k]                # [k, d_model], orthonormal
    cosines = np.linalg.svd(v @ d.T, compute_uv=False)                              # cos of the principal angles
    angles = np.degrees(np.arccos(np.clip(cosines, -1, 1)))
    assert angles.max() < 1.0, angles
    assert (pca["explained_variance"].to_numpy()[:k].sum()) > 0.99
    cats = b[b["source"] == "category"].sort_values("index")
    assert len(cats) == k
    for _, row in cats.iterrows():
        c = int(row["category"].removeprefix("cat")) - 1
        r = np.asarray(row["vector"], float)
        assert r @ d[c] / np.linalg.norm(r) >= 0.99, (row["category"], r @ d[c] / np.linalg.norm(r))


def test_transfer_matrix_is_diagonal_on_the_planted_models(planted_run):
    from refusal_ray.stages.rank.read import transfer_matrix

    k, t = planted_run
    rank = t["rank"].assign(model=f"planted-k{k}")
    m, c = transfer_matrix(rank, f"planted-k{k}"), transfer_matrix(rank, f"planted-k{k}", control=True)
    assert m.shape == (k, k)
    np.testing.assert_array_equal(m.to_numpy(), 1.0 - np.eye(k))   # a's direction removes refusal on a only
    assert (c.to_numpy() >= 0.8).all(), c


def _recomputed_rank(comp: pd.DataFrame, cells: pd.DataFrame, source: str, margin: float, ctl_margin: float,
                     base_min: float, max_k: int) -> str:
    """The refusal rank from the stored completions alone: the substring judge re-applied to their text, rates
    per cell over the harmful test prompts, then the first k meeting both margins."""
    from refusal_ray.judges import SubstringJudge

    params = {r["cell_id"]: json.loads(r["params"]) for _, r in cells[cells["stage"] == "rank"].iterrows()}
    comp = comp[comp["cell_id"].isin(params)].copy()
    comp["refused"] = SubstringJudge()(list(comp["completion"]))
    rate = {}
    for cid, g in comp.groupby("cell_id"):
        p = params[cid]
        if p.get("transfer"):
            continue
        rate[(p["source"], p["k"], p["control"])] = g["refused"].mean()
    base = rate[("baseline", 0, False)]
    if base < base_min:
        return "n/a"
    for k in range(1, max_k + 1):
        if (source, k, False) in rate and base - rate[(source, k, False)] >= margin - 1e-9 \
                and rate[(source, k, True)] - rate[(source, k, False)] >= ctl_margin - 1e-9:
            return str(k)
    return f"> {max_k}"


def test_rank_recomputed_from_stored_completions(planted_run):
    from refusal_ray.stages.rank.read import ranks

    k, t = planted_run
    table = ranks(Ctx(t))
    for source in ("pca", "category"):
        want = _recomputed_rank(t["completions"], t["cells"], source, 0.8, 0.25, 0.5, 3)
        assert table.set_index("source").loc[source, "rank"] == want == str(k)
    # and under a margin no arm meets, or a baseline_min above the baseline: "> K" and "n/a"
    assert set(ranks(Ctx(t, margin=1.5))["rank"]) == {"> 3"}
    high = Ctx(t)
    high.rule = {**RULE, "control_margin": {**RULE["control_margin"], "baseline_min": 1.5}}
    assert set(ranks(high)["rank"]) == {"n/a"}


def test_batched_rows_equal_one_row_at_a_time(tmp_path):
    """batch_size is not part of the cell ids: the same cells at batch 1 and batch 64 give the same rates and
    the same completions (rows with different bases padded into one batch change nothing)."""
    one = _run(planted_spec(tmp_path, 2, {"batch_size": 1, "transfer": False}))
    many = _run(planted_spec(tmp_path, 2, {"batch_size": 64, "transfer": False}))
    key = ["cell_id", "category"]
    cols = ["cell_id", "category", "n", "refusals", "rate", "basis_rank"]
    a = one["rank"][cols].sort_values(key, na_position="first").reset_index(drop=True)
    b = many["rank"][cols].sort_values(key, na_position="first").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    c = ["cell_id", "prompt_id", "completion", "refusal"]
    pd.testing.assert_frame_equal(one["completions"][c].sort_values(c[:2]).reset_index(drop=True),
                                  many["completions"][c].sort_values(c[:2]).reset_index(drop=True))
    assert len(set(one["rank"]["basis_rank"])) > 2   # rows of ranks 0..3 shared the batches


# -- bad input -------------------------------------------------------------------------------------
def _validate(path: str):
    from refusal_ray.cli import app

    return CliRunner().invoke(app, ["validate", path])


@pytest.mark.parametrize("rank, field, msg", [
    ({"max_k": 0}, "stages.rank.max_k", "Input should be greater than or equal to 1"),
    ({"sources": ["pca", "pca"]}, "stages.rank.sources", "duplicate stages.rank.sources entry 'pca'"),
    ({"sources": ["svd"]}, "stages.rank.sources.0",
     "Input should be 'select', 'pca', 'category' or 'optimised'"),
    ({"typo": 1}, "stages.rank.typo", "unknown key"),
    ({"sources": ["select"]}, None, "stages.rank.sources 'select' needs a stages.select block"),
    ({"position": 0}, "stages.rank.position", "Input should be less than 0"),
])
def test_bad_rank_blocks_are_refused_naming_the_field(tmp_path, rank, field, msg):
    f = planted_spec(tmp_path, 1, rank)
    result = _validate(f)
    assert (result.exit_code, result.output.strip()) == (2, f"error: {f}: {field + ': ' if field else ''}{msg}")


def test_category_source_needs_a_category_column(tmp_path):
    from refusal_ray.errors import SpecError
    from refusal_ray.plan import make_plan

    f = planted_spec(tmp_path, 1)
    spec = json.loads(Path(f).read_text())
    del spec["data"]["harmful"]["category_column"]
    Path(f).write_text(json.dumps(spec))
    with pytest.raises(SpecError) as e:
        make_plan(f)
    assert str(e.value) == (f"{f}: data.harmful.category_column: stages.rank.sources 'category' needs a category "
                            "column in the harmful prompts (data.harmful.category_column)")
    spec["stages"]["rank"]["sources"] = ["pca"]     # without the category source the column is not needed
    Path(f).write_text(json.dumps(spec))
    assert sum(c.stage == "rank" for c in make_plan(f).cells) == 1 + 2 * 3


def test_explicit_layer_out_of_range_is_a_spec_error(tmp_path):
    from refusal_ray.errors import SpecError
    from refusal_ray.plan import make_plan

    f = planted_spec(tmp_path, 1, {"layer": 9})
    with pytest.raises(SpecError) as e:
        make_plan(f)
    assert str(e.value) == (f"{f}: stages.rank.layer: layer 9 out of range: model 'planted-k1' has 4 layers (0..3)")


def test_an_absent_block_adds_no_cells_and_no_dump_key(tmp_path):
    from refusal_ray.spec import load_spec

    f = planted_spec(tmp_path, 1)
    spec = json.loads(Path(f).read_text())
    del spec["stages"]["rank"]
    Path(f).write_text(json.dumps(spec))
    s = load_spec(f)
    assert s.stages.rank is None and "rank" not in s.model_dump(mode="json")["stages"]


# -- the select and optimised sources' inputs (no model) -------------------------------------------
def _inputs(candidates=None, optimised=None, d_model=8):
    from refusal_ray.stages.rank.run import RankInputs

    rng = np.random.default_rng(0)
    rows = {(layer, -1): {"vector": rng.standard_normal(d_model).tolist()} for layer in range(4)}
    return RankInputs(rows, 1, -1, candidates=candidates, n_candidates=4, optimised=optimised)


def _cell(source, k, control=False):
    from refusal_ray.core.cells import Cell

    return Cell(f"{source}{k}{control}", "rank", "m", 0, {"source": source, "k": k, "control": control})


def test_optimised_source_reads_the_cone_of_its_dimension_and_skips_without_one():
    from refusal_ray.stages.rank.run import Bases, skip_reason

    rng = np.random.default_rng(1)
    cone = [{"dim": 2, "index": i, "vector": rng.standard_normal(8).tolist()} for i in (1, 0)] + \
           [{"dim": 1, "index": 0, "vector": rng.standard_normal(8).tolist()}]
    d = _inputs(optimised=cone)
    assert skip_reason(_cell("optimised", 2), d) is None and skip_reason(_cell("optimised", 1), d) is None
    assert skip_reason(_cell("optimised", 3), d) == ("stages.rank.sources 'optimised': stage optimise stored 0 "
                                                     "directions of dimension 3 for this seed (table optimised, "
                                                     "dim == 3)")
    q = Bases(d).basis("optimised", 2)                                    # [2, d_model], orthonormal
    np.testing.assert_allclose(q @ q.T, np.eye(2), atol=1e-6)
    v = np.stack([np.asarray(r["vector"]) for r in sorted(cone[:2], key=lambda r: r["index"])])
    assert np.linalg.matrix_rank(np.vstack([q, v]), tol=1e-5) == 2      # the same span
    assert skip_reason(_cell("optimised", 1), _inputs()) == ("stages.rank.sources 'optimised': stage optimise did "
                                                             "not run for this seed")


def test_select_source_takes_the_top_k_passing_candidates():
    from refusal_ray.stages.rank.run import Bases, skip_reason

    passed = [{"layer": 2, "position": -1}, {"layer": 0, "position": -1}]
    d = _inputs(candidates=passed)
    q = Bases(d).basis("select", 1)
    u = np.asarray(d.rows[(2, -1)]["vector"])
    np.testing.assert_allclose(np.abs(q[0] @ u) / np.linalg.norm(u), 1.0, atol=1e-6)
    assert skip_reason(_cell("select", 3), d) == ("stages.rank.sources 'select': k = 3 asks for more candidates "
                                                  "than passed stage select's filters for this seed (2 of 4)")
    assert skip_reason(_cell("select", 1), _inputs()) == ("stages.rank.sources 'select': stage select did not run "
                                                          "for this seed")


def test_pca_basis_is_the_uncentred_svd_and_pc1_the_difference_of_means_for_one_direction():
    from refusal_ray.stages.rank.run import category_directions, pca_basis

    rng = np.random.default_rng(2)
    u = rng.standard_normal(16)
    u /= np.linalg.norm(u)
    harm = 3.0 * u[None] + 0.01 * rng.standard_normal((20, 16))
    safe = 0.01 * rng.standard_normal((20, 16))
    v, s, ev = pca_basis(harm, safe.mean(0), 3)
    diff = harm - safe.mean(0)
    np.testing.assert_allclose(s, np.linalg.svd(diff, compute_uv=False)[:3])
    mean = diff.mean(0)
    assert v[0] @ mean / np.linalg.norm(mean) > 0.999 and ev[0] > 0.99
    cats = category_directions(harm, ["b"] * 8 + ["a"] * 8 + [None] * 4, safe.mean(0))
    assert [(c, n) for c, n, _ in cats] == [("a", 8), ("b", 8)]              # size, then name; None left out
    np.testing.assert_allclose(cats[0][2], harm[8:16].mean(0) - safe.mean(0))


def test_a_mixed_direction_does_not_suppress_the_planted_models(tmp_path):
    """Within span{d_1..d_k} the planted rank is the least number of directions (one direction off the span
    still suppresses: test_planted_oracle's known limit): each category refuses with its own first token read from d_c alone (refusal_ray/toy/planted.py), so
    ablating the single mixed direction (d_1 + ... + d_k) / sqrt(k) at every layer keeps 1 - 1/k >= 1/2 of
    each category's coefficient, above the planted threshold (~0.2): every harmful prompt is still refused.
    (Before the per-category openers one shared opener read d_1 + ... + d_k, and this ablation removed all
    refusal.)"""
    from refusal_ray.core.cells import Cell
    from refusal_ray.data import PromptSet
    from refusal_ray.judges import SubstringJudge
    from refusal_ray.models.loading import load_model
    from refusal_ray.stages.rank.run import Row, generate_rows
    from refusal_ray.toy.planted import planted_directions

    for k in (2, 3):
        lm = load_model(str(MODELS / f"toy-planted-k{k}"))
        d = planted_directions(MODELS / f"toy-planted-k{k}").numpy()
        u = (d.sum(0) / np.sqrt(k)).astype(np.float32)[None]                       # [1, d_model]
        rows = [json.loads(x) for x in (PLANTED / f"k{k}" / "harmful.jsonl").read_text().splitlines()]
        test = PromptSet([r["id"] for r in rows], [r["instruction"] for r in rows], [None] * len(rows))
        cell = Cell("mixed", "rank", "m", 0, {})
        layers = list(range(lm.sites.n_layers))
        refused = SubstringJudge()(generate_rows(lm, [Row(cell, i, u) for i in range(len(test))], test, layers,
                                                 1.0, 8, 64))
        assert all(refused), (k, sum(refused), len(refused))
        kept = SubstringJudge()(generate_rows(lm, [Row(cell, i, None) for i in range(len(test))], test, layers,
                                              1.0, 8, 64))
        assert all(kept)


def test_site_activations_capture_one_layer_equal_to_the_all_layer_capture():
    """rank.site_activations hooks only its layer; its rows equal the all-layer capture's slice (batch 3 vs 1)."""
    from refusal_ray.data import PromptSet
    from refusal_ray.models.loading import load_model
    from refusal_ray.stages.directions.run import _activations
    from refusal_ray.stages.rank.run import site_activations

    lm = load_model(str(MODELS / "toy-planted-k2"))
    rows = [json.loads(line) for line in (PLANTED / "k2" / "harmful.jsonl").read_text().splitlines()][:5]
    prompts = PromptSet([r["id"] for r in rows], [r["instruction"] for r in rows], [None] * 5)
    every = _activations(lm, prompts, ["resid_pre"], [-1], 1)                  # [5, n_layers, 1, d_model]
    assert every.shape == (5, lm.sites.n_layers, 1, lm.sites.d_model)
    for layer in range(lm.sites.n_layers):
        one = site_activations(lm, prompts, layer, -1, 3)
        assert one.shape == (5, lm.sites.d_model)
        np.testing.assert_allclose(one, every[:, layer, 0], rtol=0, atol=1e-6)
    assert not np.allclose(every[:, 1, 0], every[:, 2, 0])         # the layers differ: the slice is not vacuous


def test_source_agreement_is_the_largest_principal_angle_per_k():
    """rank.read.source_agreement on hand-made bases: category's first vector is pca's first turned 30 deg out of
    pca's span; an optimised set (learned per k) is compared only at its own dimension; NaN beyond a source's
    vectors; other models and seeds are ignored."""
    from refusal_ray.stages.rank.read import source_agreement

    eye = np.eye(6)
    tilt = np.cos(np.radians(30)) * eye[0] + np.sin(np.radians(30)) * eye[4]

    def rows(source, vectors, model="m", seed=0):
        return [{"model": model, "seed": seed, "source": source, "index": j, "vector": list(v)}
                for j, v in enumerate(vectors)]

    bases = pd.DataFrame(rows("pca", eye[:3]) + rows("category", [2.0 * tilt, eye[1]])
                         + rows("optimised", [eye[1], eye[0]]) + rows("pca", eye[3:6], seed=1)
                         + rows("pca", eye[3:6], model="other"))
    t = source_agreement(bases, "m")
    assert list(t.index) == ["pca / category", "pca / optimised", "category / optimised"]
    assert list(t.columns) == ["k=1", "k=2", "k=3"]
    np.testing.assert_allclose(t.loc["pca / category"].to_numpy()[:2], [30.0, 30.0], atol=1e-6)
    np.testing.assert_allclose(t.loc["pca / optimised", "k=2"], 0.0, atol=1e-6)
    np.testing.assert_allclose(t.loc["category / optimised", "k=2"], 30.0, atol=1e-6)
    assert t.isna().to_numpy().tolist() == [[False, False, True], [True, False, True], [True, False, True]]
    assert source_agreement(bases, "m", seed=1).empty                   # one source only: nothing to compare
    assert source_agreement(bases.iloc[:0], "m").empty


def test_source_agreement_on_rerun_nonfinite_and_dependent_bases():
    """A re-run's rows (same seed, source and index, written later) replace the earlier ones; a basis whose first k
    vectors are non-finite or dependent (rank < k) gives NaN at that k; max_k caps the columns."""
    from refusal_ray.stages.rank.read import source_agreement

    eye = np.eye(5)

    def rows(source, vectors, cell="c1"):
        return [{"model": "m", "seed": 0, "cell_id": cell, "source": source, "index": j, "vector": list(v)}
                for j, v in enumerate(vectors)]

    stale = rows("pca", [eye[3], eye[4]], cell="old")
    bases = pd.DataFrame(stale + rows("pca", eye[:2]) + rows("select", [eye[0], 2.0 * eye[0], eye[1]])
                         + rows("category", [eye[1], np.full(5, np.nan)]))
    t = source_agreement(bases, "m", max_k=2)
    assert list(t.columns) == ["k=1", "k=2"]
    assert t.loc["select / pca", "k=1"] == pytest.approx(0.0, abs=1e-6)      # the re-run's pca, not the stale one
    assert np.isnan(t.loc["select / pca", "k=2"])                             # select's first two are dependent
    assert t.loc["pca / category", "k=1"] == pytest.approx(90.0, abs=1e-6)
    assert np.isnan(t.loc["pca / category", "k=2"])                           # a NaN vector
