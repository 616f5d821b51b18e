"""Angular steering (refusal_ray/ops/angular.py; Vu & Nguyen 2025, lone17/angular-steering).

Against independent implementations written here (float64 numpy, not the module's math): the paper's
formula x - Px + |Px| (cos t b1 + sin t b2) with its projection matrix (target rotation, adaptive gate
x . first_direction > 0), and a full d x d rotation matrix (relative rotation). Invariants: relative
theta = 0 is the identity, the norm is preserved to 1e-6 (float32, d_model 64 and 896), rotation to 90
degrees removes the refusal component exactly as directional ablation's projection does (equal to it up to
the norm restored, in the plane of the activation and the direction, as the paper casts ablation), the
adaptive gate leaves non-aligned positions bit-identical, batched == unbatched, other operators' rows
bit-identical in a mixed chunk; the PCA axis against scikit-learn's PCA; the random plane; skip reasons;
bad-config messages.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from refusal_ray.core.cells import Cell
from refusal_ray.ops import OPS
from refusal_ray.ops.angular import (AngularArm, Plane, cos_sin, orthonormal_plane, pca_axis, random_plane,
                                     rotate)
from refusal_ray.ops.base import Chunk, SteerInputs, compose, control_arms

ANG = OPS["angular"]


# -- independent references (float64 numpy) ------------------------------------------------------------

def paper_steer(h: np.ndarray, first: np.ndarray, second: np.ndarray, degree: float, adaptive_mode: int):
    """The paper's hook (generate_responses.get_angular_steering_output_hook): b1, b2 Gram-Schmidt, P = b1 b1^T
    + b2 b2^T, v = R(theta) [1, 0] in the (b1, b2) basis, h' = h - Ph + |Ph| v; adaptive_mode 1 steers only
    where h . first_direction > 0. h: [..., d]."""
    b1 = first / np.linalg.norm(first)
    b2 = second - (second @ b1) * b1
    b2 = b2 / np.linalg.norm(b2)
    P = np.outer(b1, b1) + np.outer(b2, b2)
    t = np.deg2rad(degree)
    R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    rot = R @ np.array([1.0, 0.0])
    v = rot[0] * b1 + rot[1] * b2
    Ph = h @ P
    steered = h - Ph + np.linalg.norm(Ph, axis=-1, keepdims=True) * v
    if adaptive_mode == 0:
        return steered
    return np.where((h @ first > 0)[..., None], steered, h)


def rotation_matrix(b1: np.ndarray, b2: np.ndarray, degree: float) -> np.ndarray:
    """The d x d rotation by `degree` in the plane (b1, b2) (b1 towards b2), identity off the plane."""
    t = np.deg2rad(degree)
    B = np.stack([b1, b2], axis=1)                                           # [d, 2]
    R2 = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return np.eye(len(b1)) - B @ B.T + B @ R2 @ B.T


def ablate(h: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Directional ablation x - (x . u) u (Arditi et al. 2024), u unit."""
    return h - (h @ u)[..., None] * u


def _plane(d: int, seed: int):
    g = np.random.default_rng(seed).standard_normal((2, d))
    return g[0], g[1]                                                        # raw (not orthonormal)


def _rows(x: np.ndarray, first, second, theta, relative=False, adaptive=False, active=True):
    """Call the module's `rotate` on float32 x [batch, pos, d] with one plane and angle for every row."""
    b1, b2 = orthonormal_plane(first, second)
    n = x.shape[0]
    c, s = cos_sin(theta)
    out = rotate(torch.from_numpy(x.astype(np.float32)),
                 torch.from_numpy(np.tile(b1, (n, 1)).astype(np.float32)),
                 torch.from_numpy(np.tile(b2, (n, 1)).astype(np.float32)),
                 torch.full((n,), c), torch.full((n,), s), torch.full((n,), relative),
                 torch.full((n,), adaptive), torch.full((n,), active))
    return out.numpy()


# -- the edit against the paper's formula -------------------------------------------------------------

@pytest.mark.parametrize("d", [64, 896])
@pytest.mark.parametrize("theta", [0.0, 37.5, 90.0, 180.0, 250.0])
@pytest.mark.parametrize("adaptive", [False, True])
def test_target_rotation_is_the_papers_formula(d, theta, adaptive):
    first, second = _plane(d, 1)
    x = np.random.default_rng(2).standard_normal((3, 7, d)) * 5
    x[:, :, :] += 3 * first / np.linalg.norm(first) * np.sign(np.random.default_rng(3).standard_normal((3, 7, 1)))
    want = paper_steer(x, first, second, theta, int(adaptive))
    got = _rows(x, first, second, theta, adaptive=adaptive)
    scale = np.linalg.norm(x, axis=-1, keepdims=True)
    assert np.abs(got - want).max() / scale.max() <= 1e-6
    if adaptive:   # some positions gated off, some on (the offset above sets the sign of x . b1)
        gated = (x @ first) <= 0
        assert gated.any() and (~gated).any()


@pytest.mark.parametrize("d", [64, 896])
@pytest.mark.parametrize("theta", [10.0, 90.0, 200.0, -45.0])
def test_relative_rotation_is_the_rotation_matrix(d, theta):
    first, second = _plane(d, 4)
    b1, b2 = orthonormal_plane(first, second)
    x = np.random.default_rng(5).standard_normal((2, 5, d))
    want = x @ rotation_matrix(b1, b2, theta).T
    got = _rows(x, first, second, theta, relative=True)
    assert np.abs(got - want).max() <= 1e-5 * np.linalg.norm(x, axis=-1).max()


def test_relative_theta_zero_is_the_identity():
    first, second = _plane(64, 6)
    x = np.random.default_rng(7).standard_normal((4, 6, 64)).astype(np.float32)
    for theta in (0.0, 360.0, -360.0):
        got = _rows(x, first, second, theta, relative=True)
        assert np.array_equal(got, x), theta


@pytest.mark.parametrize("d", [64, 896])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
def test_norm_is_preserved_to_1e_6(d, relative, adaptive):
    first, second = _plane(d, 8)
    x = (np.random.default_rng(9).standard_normal((4, 9, d)) * np.array([0.1, 1, 10, 100])[:, None, None])
    x = x.astype(np.float32)
    for theta in (0.0, 30.0, 90.0, 135.0, 180.0, 271.3):
        got = _rows(x, first, second, theta, relative=relative, adaptive=adaptive)
        n0, n1 = np.linalg.norm(x.astype(np.float64), axis=-1), np.linalg.norm(got.astype(np.float64), axis=-1)
        assert np.abs(n1 / n0 - 1).max() <= 1e-6, theta


def test_target_leaves_an_activation_at_its_angle_and_is_idempotent():
    first, second = _plane(64, 10)
    b1, b2 = orthonormal_plane(first, second)
    rest = np.random.default_rng(11).standard_normal(64)
    rest -= (rest @ b1) * b1 + (rest @ b2) * b2
    theta = 123.0
    t = np.deg2rad(theta)
    x = (rest + 4.0 * (np.cos(t) * b1 + np.sin(t) * b2))[None, None, :]
    assert np.abs(_rows(x, first, second, theta) - x).max() <= 1e-5
    y = np.random.default_rng(12).standard_normal((2, 3, 64)).astype(np.float32)
    once = _rows(y, first, second, 200.0)
    assert np.abs(_rows(once, first, second, 200.0) - once).max() <= 1e-5


def test_target_is_relative_by_the_angle_difference():
    """Rotating TO theta = rotating BY theta minus the activation's own in-plane angle atan2(x.b2, x.b1)."""
    first, second = _plane(64, 13)
    b1, b2 = orthonormal_plane(first, second)
    x = np.random.default_rng(14).standard_normal((5, 64))
    for theta in (0.0, 60.0, 180.0):
        for row in x:
            phi = np.rad2deg(np.arctan2(row @ b2, row @ b1))
            want = row @ rotation_matrix(b1, b2, theta - phi).T
            got = _rows(row[None, None], first, second, theta)[0, 0]
            assert np.abs(got - want).max() <= 1e-5 * np.linalg.norm(row)


# -- rotation onto the orthogonal axis and directional ablation -----------------------------------------

def test_rotation_to_90_degrees_in_the_activations_plane_is_ablation_with_its_norm_restored():
    """The paper casts ablation as an edit in the plane of the activation h and the feature direction: there,
    rotating to 90 degrees gives ablation's projection h - (h.u)u, rescaled to |h|."""
    d = 64
    u = np.random.default_rng(15).standard_normal(d)
    u /= np.linalg.norm(u)
    for seed in range(5):
        h = np.random.default_rng(100 + seed).standard_normal(d) * 3
        abl = ablate(h, u)
        got = _rows(h[None, None], u, abl, 90.0)[0, 0]                      # b2 = h's part orthogonal to u
        assert np.abs(got - abl * np.linalg.norm(h) / np.linalg.norm(abl)).max() <= 1e-5 * np.linalg.norm(h)


def test_rotation_to_90_degrees_in_a_fixed_plane_removes_the_refusal_component_as_ablation():
    """In the fixed (b1, PCA axis) plane: at 90 degrees the component along b1 is 0 and everything off b2 equals
    directional ablation's projection; the two differ only along b2, by |Px| - x.b2 >= 0 (the norm restored)."""
    d = 896
    first, second = _plane(d, 16)
    b1, b2 = orthonormal_plane(first, second)
    x = np.random.default_rng(17).standard_normal((3, 4, d))
    got = _rows(x, first, second, 90.0).astype(np.float64)
    abl = ablate(x, b1)
    scale = np.linalg.norm(x, axis=-1).max()
    assert np.abs(got @ b1).max() <= 1e-6 * scale
    off_b2 = lambda y: y - (y @ b2)[..., None] * b2                          # noqa: E731
    assert np.abs(off_b2(got) - off_b2(abl)).max() <= 1e-5 * scale
    gap = (got - abl) @ b2
    r = np.sqrt((x @ b1) ** 2 + (x @ b2) ** 2)
    assert np.abs(gap - (r - x @ b2)).max() <= 1e-5 * scale and (gap >= -1e-5 * scale).all()


# -- the gate, inactive rows, batching -----------------------------------------------------------------

def test_adaptive_gate_leaves_non_aligned_positions_bit_identical():
    first, second = _plane(64, 18)
    b1, _ = orthonormal_plane(first, second)
    x = np.random.default_rng(19).standard_normal((4, 10, 64)).astype(np.float32)
    got = _rows(x, first, second, 180.0, adaptive=True)
    aligned = (torch.from_numpy(x) @ torch.from_numpy(b1.astype(np.float32))).numpy() > 0
    assert aligned.any() and (~aligned).any()
    assert np.array_equal(got[~aligned], x[~aligned])
    assert (np.abs(got[aligned] - x[aligned]).max(axis=-1) > 1e-3).all()
    assert np.array_equal(_rows(x, first, second, 180.0, active=False), x)  # an inactive row: untouched


def _resolved(d: int, seed: int, theta: float, rotation="target", adaptive=False, layers=(0, 1),
              sites=("resid_pre", "resid_mid")):
    first, second = _plane(d, seed)
    b1, b2 = orthonormal_plane(first, second)
    cell = Cell(f"c{seed}-{theta}", "steer", "m", 0, {
        "mode": "angular", "theta": theta, "rotation": rotation, "adaptive": adaptive,
        "angular_layers": list(layers), "sites": list(sites), "control": False})
    return cell, Plane(b1.astype(np.float32), b2.astype(np.float32), 0, -1, 1.0, "pca0")


def test_mixed_rows_in_one_chunk_equal_each_row_alone():
    d, n = 64, 5
    specs = [(1, 30.0, "target", False), (2, 180.0, "target", True), (3, 45.0, "relative", False),
             (4, 0.0, "relative", True)]
    rows = [(i, *_resolved(d, s, t, r, a)) for i, (s, t, r, a) in enumerate(specs)]   # row 4: not angular
    chunk = Chunk(n=n, d_model=d, n_layers=2)
    edits = ANG.edits(rows, chunk, SteerInputs({}, 0))
    assert set(edits) == {(k, layer) for k in ("resid_pre", "resid_mid") for layer in (0, 1)}
    x = torch.from_numpy(np.random.default_rng(20).standard_normal((n, 6, d)).astype(np.float32))
    mixed = edits[("resid_pre", 0)](x)
    for i, cell, plane in rows:
        alone = ANG.edits([(0, cell, plane)], Chunk(n=1, d_model=d, n_layers=2), SteerInputs({}, 0))
        assert torch.equal(mixed[i], alone[("resid_pre", 0)](x[i:i + 1])[0]), i
    assert torch.equal(mixed[4], x[4])


def test_sites_and_layers_come_from_the_arm():
    d = 16
    rows = [(0, *_resolved(d, 1, 90.0, layers=(2,), sites=("resid_mid",))),
            (1, *_resolved(d, 2, 90.0, layers=(0, 2), sites=("resid_pre",)))]
    edits = ANG.edits(rows, Chunk(n=3, d_model=d, n_layers=3), SteerInputs({}, 0))
    assert set(edits) == {("resid_mid", 2), ("resid_pre", 0), ("resid_pre", 2)}
    assert edits[("resid_mid", 2)].active.tolist() == [True, False, False]
    assert edits[("resid_pre", 2)].active.tolist() == [False, True, False]


@pytest.fixture(scope="module")
def lm(tiny_qwen_path):
    from refusal_ray import load_model

    return load_model(str(tiny_qwen_path), attn_implementation="eager")


def test_other_operators_rows_are_bit_identical_in_a_mixed_chunk(lm):
    """A chunk of baseline, ablation, addition and angular rows through the tiny model's forward pass: every
    non-angular row's logits are bit-identical to the same chunk with the angular row left unedited, and the
    angular row matches that row run alone."""
    from refusal_ray.data import encode
    from refusal_ray.interventions import forward, row_edits

    from conftest import PROMPTS

    d, L = lm.sites.d_model, lm.sites.n_layers
    rng = np.random.default_rng(21)
    v = rng.standard_normal(d).astype(np.float32)
    d_in = SteerInputs({layer: v for layer in range(L)}, best=0)
    abl = Cell("abl", "steer", "m", 0, {"mode": "ablation", "layer": None, "coefficient": 0.0, "alpha": 1.0,
                                        "direction_layer": "best", "control": False})
    add = Cell("add", "steer", "m", 0, {"mode": "addition", "layer": 1, "coefficient": 2.0, "alpha": 0.0,
                                        "direction_layer": 1, "control": False})
    ang_cell, ang_plane = _resolved(d, 22, 180.0, layers=range(L))
    chunk = Chunk(n=4, d_model=d, n_layers=L)
    others = [(OPS["ablation"].rank, OPS["ablation"].edits([(1, abl, OPS["ablation"].resolve(abl, d_in))], chunk, d_in)),
              (OPS["addition"].rank, OPS["addition"].edits([(2, add, OPS["addition"].resolve(add, d_in))], chunk, d_in))]
    mine = (ANG.rank, ANG.edits([(3, ang_cell, ang_plane)], chunk, d_in))
    ids, mask = encode(lm.tokenizer, PROMPTS)

    def logits(edits, ids=ids, mask=mask):
        with row_edits(lm.sites, edits), torch.no_grad():
            return forward(lm.model, ids, mask).logits

    with_me, without = logits(compose(others + [mine])), logits(compose(others))
    assert torch.equal(with_me[:3], without[:3])
    assert (with_me[3] - without[3]).abs().max() > 1e-3                       # the rotation did something
    one_ids, one_mask = encode(lm.tokenizer, [PROMPTS[3]])
    alone = logits(ANG.edits([(0, ang_cell, ang_plane)], Chunk(n=1, d_model=d, n_layers=L), d_in),
                   one_ids, one_mask)
    n = one_ids.shape[1]
    assert (with_me[3, -n:] - alone[0]).abs().max() <= 1e-5


def test_edited_activations_keep_their_norm_in_the_model(lm):
    """Readers after the edit at resid_pre see activations of the norm the unedited site had there."""
    from refusal_ray.data import encode
    from refusal_ray.interventions import forward, hooks, row_edits
    from refusal_ray.models.sites import site_name

    from conftest import PROMPTS

    d, L = lm.sites.d_model, lm.sites.n_layers
    cell, plane = _resolved(d, 23, 150.0, layers=[1], sites=["resid_pre"])
    ids, mask = encode(lm.tokenizer, PROMPTS)
    n = ids.shape[0]
    edits = ANG.edits([(i, cell, plane) for i in range(n)], Chunk(n=n, d_model=d, n_layers=L), SteerInputs({}, 0))
    seen = {}
    before = {}

    def read(store):
        return lambda x: store.__setitem__("x", x.clone())

    name = site_name("resid_pre", 1)
    with hooks(lm.sites, {name: read(before)}), torch.no_grad():
        forward(lm.model, ids, mask)
    with row_edits(lm.sites, edits), hooks(lm.sites, {name: read(seen)}), torch.no_grad():
        forward(lm.model, ids, mask)
    real = mask.bool()
    x0, x1 = before["x"][real], seen["x"][real]
    assert (x1 - x0).abs().max() > 1e-3
    assert ((x1.norm(dim=-1) / x0.norm(dim=-1) - 1).abs().max()) <= 1e-6
    b1 = torch.from_numpy(plane.b1)
    b2 = torch.from_numpy(plane.b2)
    r = torch.sqrt((x0 @ b1) ** 2 + (x0 @ b2) ** 2)                          # turned to 150 degrees from b1
    c, s = np.cos(np.deg2rad(150.0)), np.sin(np.deg2rad(150.0))
    assert torch.allclose(x1 @ b1, c * r, atol=1e-5) and torch.allclose(x1 @ b2, s * r, atol=1e-5)


# -- the plane: PCA axis, random control, resolve ------------------------------------------------------

@pytest.mark.parametrize("component", [0, 1, 2])
def test_pca_axis_is_scikit_learns_pca_of_the_unit_directions(component):
    sklearn = pytest.importorskip("sklearn.decomposition")
    rng = np.random.default_rng(24)
    vecs = [rng.standard_normal(64) * (10 ** (i / 3)) + 5 for i in range(8)] + [np.zeros(64)]
    axis, evr, n = pca_axis(vecs, component)
    unit = np.stack([v / np.linalg.norm(v) for v in vecs[:8]])
    pca = sklearn.PCA().fit(unit)
    assert n == 8
    assert np.abs(axis - pca.components_[component]).max() <= 1e-10        # sign included
    assert evr == pytest.approx(pca.explained_variance_ratio_[component], abs=1e-12)


def test_pca_axis_needs_enough_directions():
    vecs = [np.ones(8), np.zeros(8), np.arange(8.0)]
    with pytest.raises(LookupError, match="the second axis pca1 needs at least 3 nonzero per-layer directions at "
                                          "this position; this seed has 2"):
        pca_axis(vecs, 1)


def test_random_plane_is_orthonormal_and_seeded_by_the_cell():
    b1, b2 = random_plane("cell-a", 896)
    assert abs(b1 @ b1 - 1) < 1e-12 and abs(b2 @ b2 - 1) < 1e-12 and abs(b1 @ b2) < 1e-12
    again = random_plane("cell-a", 896)
    other = random_plane("cell-b", 896)
    assert np.array_equal(b1, again[0]) and np.array_equal(b2, again[1])
    assert abs(b1 @ other[0]) < 0.2


def _inputs(d=32, n_layers=6, seed=25) -> SteerInputs:
    rng = np.random.default_rng(seed)
    vecs = {layer: (rng.standard_normal(d) * (layer + 1)).astype(np.float32) for layer in range(n_layers)}
    rows = {(layer, -1): {"vector": v.tolist(), "layer": layer, "position": -1} for layer, v in vecs.items()}
    return SteerInputs(vecs, best=3, position=-1, rows=rows)


def _cell(control=False, **p):
    params = {"mode": "angular", "layer": None, "coefficient": 0.0, "alpha": 0.0, "direction_layer": "best",
              "rotation": "target", "angular_layers": [0, 1], "sites": ["resid_pre", "resid_mid"],
              "pca_component": 0, "theta": 180.0, "adaptive": False, "control": control, **p}
    return Cell("id-" + str(sorted(params.items())), "steer", "m", 0, params)


def test_resolve_builds_the_plane_from_the_direction_and_the_pca_axis():
    d = _inputs()
    plane = ANG.resolve(_cell(), d)
    v = d.vectors[3]
    assert (plane.layer, plane.position, plane.axis, plane.n_stacked) == (3, -1, "pca0", 6)
    assert np.abs(plane.b1 - v / np.linalg.norm(v)).max() <= 1e-6
    axis, evr, _ = pca_axis([np.asarray(r["vector"], np.float64) for _, r in sorted(d.rows.items())], 0)
    b2 = axis - (axis @ plane.b1.astype(np.float64)) * plane.b1
    assert np.abs(plane.b2 - b2 / np.linalg.norm(b2)).max() <= 1e-6
    assert plane.evr == pytest.approx(evr) and plane.cos == pytest.approx(float(axis @ (v / np.linalg.norm(v))), abs=1e-6)
    cols = ANG.columns(_cell(), plane)
    assert cols["axis"] == "pca0" and cols["theta"] == 180.0 and cols["direction_layer"] == 3
    assert cols["vector_norm"] == pytest.approx(float(np.linalg.norm(v)))


def test_a_control_rotates_in_a_random_plane_seeded_by_its_cell():
    d = _inputs()
    ctl = _cell(control=True)
    plane = ANG.resolve(ctl, d)
    b1, b2 = random_plane(ctl.id, 32)
    assert plane.axis == "random" and plane.evr is None
    assert np.array_equal(plane.b1, b1.astype(np.float32)) and np.array_equal(plane.b2, b2.astype(np.float32))
    cols = ANG.columns(ctl, plane)
    assert cols["axis"] == "random" and np.isnan(cols["axis_evr"]) and np.isnan(cols["axis_cos"])


def test_skip_reasons():
    d = _inputs()
    with pytest.raises(LookupError, match="no direction selected for this seed"):
        ANG.resolve(_cell(direction_layer="selected"), d)
    with pytest.raises(LookupError, match="the second axis pca5 needs at least 7 nonzero per-layer directions"):
        ANG.resolve(_cell(pca_component=5), d)
    flat = SteerInputs({layer: np.ones(8, np.float32) * (layer + 1) for layer in range(4)}, best=1)
    with pytest.raises(LookupError, match="the second axis pca0 has no variance"):
        ANG.resolve(_cell(), flat)


# -- arms, config, summary ------------------------------------------------------------------------------

def test_arms_are_thetas_by_adaptive_with_the_resolved_layers():
    block = AngularArm(thetas=[0, 180], adaptive=[False, True], layers=[1, 2], direction_layer="best")

    class _Spec:
        class stages:
            select = None

    arms = ANG.arms(_Spec, block, 4)
    assert [(a["theta"], a["adaptive"]) for a in arms] == [(0.0, False), (0.0, True), (180.0, False), (180.0, True)]
    assert all(a["mode"] == "angular" and a["angular_layers"] == [1, 2] and a["sites"] == ["resid_pre", "resid_mid"]
               and a["rotation"] == "target" and a["pca_component"] == 0 and "control" not in a for a in arms)
    assert ANG.arms(_Spec, AngularArm(direction_layer="best"), 3)[0]["angular_layers"] == [0, 1, 2]
    assert len(control_arms(arms[0], 2)) == 3


@pytest.mark.parametrize("fields, words", [
    ({"thetas": []}, "List should have at least 1 item"),
    ({"thetas": [0, 0]}, "thetas has a repeated angle"),
    ({"thetas": [float("inf")]}, "thetas must be finite angles in degrees"),
    ({"adaptive": [True, True]}, "adaptive lists a value twice"),
    ({"sites": ["attn_out"]}, "Input should be 'resid_pre' or 'resid_mid'"),
    ({"rotation": "absolute"}, "Input should be 'target' or 'relative'"),
    ({"pca_component": -1}, "Input should be greater than or equal to 0"),
    ({"direction_position": -2}, "direction_position needs an integer direction_layer"),
    ({"bogus": 1}, "Extra inputs are not permitted"),
])
def test_bad_config_is_refused_with_its_message(fields, words):
    with pytest.raises(ValidationError, match=words):
        AngularArm(**fields)


def test_selected_direction_needs_a_select_block():
    class _Spec:
        class stages:
            select = None

    with pytest.raises(ValueError, match="stages.steer.angular.direction_layer 'selected' needs a stages.select block"):
        ANG.validate(_Spec, AngularArm())
    ANG.validate(_Spec, AngularArm(direction_layer="best"))


def test_summary_reads_suppression_near_180_and_induction_near_0():
    import pandas as pd

    rows = [("baseline", None, None, "", False, "harmful", 0.8), ("baseline", None, None, "", False, "harmless", 0.1)]
    for theta in ("0.0", "170.0", "270.0"):
        for ctl in (False, True):
            rate_h = {"0.0": 0.9, "170.0": 0.2, "270.0": 0.5}[theta] if not ctl else 0.7
            rate_l = {"0.0": 0.6, "170.0": 0.0, "270.0": 0.1}[theta] if not ctl else 0.15
            rows += [("angular", theta, "False", "target", ctl, "harmful", rate_h),
                     ("angular", theta, "False", "target", ctl, "harmless", rate_l)]
    a = pd.DataFrame(rows, columns=["mode", "theta", "adaptive", "rotation", "control", "prompt_set", "rate"])
    cols = ANG.summary_columns(a, {}, None)
    assert cols["angular_suppression"] == pytest.approx(0.8 - 0.2)
    assert cols["angular_suppression_vs_control"] == pytest.approx(0.7 - 0.2)
    assert cols["angular_induction"] == pytest.approx(0.6 - 0.1)
    assert cols["angular_induction_vs_control"] == pytest.approx(0.6 - 0.15)
    assert "bypass: theta=170.0" in cols["angular_setting"] and "induce: theta=0.0" in cols["angular_setting"]


# -- end to end ---------------------------------------------------------------------------------------

def _steer_has_angular() -> bool:
    from refusal_ray.spec import SteerStage

    return "angular" in SteerStage.model_fields


def test_end_to_end_through_the_steer_stage(tmp_path):
    """A tiny toy sweep with angular arms (two thetas x adaptive off/on, a control each) through `run_local`:
    its steering rows carry theta, adaptive, rotation and the axis; the real arms' axis_cos is the stored
    directions' PCA axis against the stored direction (recomputed here with scikit-learn); controls say
    `random`; the addition arm's rows are unchanged beside them."""
    if not _steer_has_angular():
        pytest.skip("stage steer does not loop over OPS yet (the operator seam's steer half)")
    import yaml

    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan

    from conftest import TOY_MODELS, TOY_PROMPTS

    def spec(steer: dict) -> dict:
        return {"name": "angular", "models": [{"name": "qwen-s", "path": str(TOY_MODELS / "toy-qwen-s")}],
                "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                         "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")},
                         "n_train": 6, "n_val": 4, "n_test": 2},
                "seeds": [0],
                "stages": {"directions": {}, "steer": {"ablation": None,
                                                       "addition": {"layers": [1], "coefficients": [2.0]},
                                                       **steer}},
                "generation": {"max_new_tokens": 4},
                "decision_rule": {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                                                     "addition_coefficient": 2.0, "ablation_alpha": 1.0},
                                  "steering_labels": {"strong": 0.5, "weak": 0.2}}}

    def run(name: str, steer: dict) -> dict:
        f = tmp_path / f"{name}.yaml"
        f.write_text(yaml.safe_dump(spec(steer)))
        return run_local(make_plan(str(f)), log=lambda *a: None)

    out = run("with", {"angular": {"thetas": [0.0, 180.0], "adaptive": [False, True], "direction_layer": "best"}})
    rows = [r for r in out["steering"] if r["mode"] == "angular"]
    assert sorted((r["theta"], r["adaptive"], bool(r["control"]), r["prompt_set"]) for r in rows) == sorted(
        (t, a, c, s) for t in (0.0, 180.0) for a in (False, True) for c in (False, True) for s in ("harmful", "harmless"))
    assert {r["rotation"] for r in rows} == {"target"}
    assert {r["axis"] for r in rows if r["control"]} == {"random"}
    dirs = {r["layer"]: np.asarray(r["vector"], np.float64) for r in out["directions"]
            if r["site"] == "resid_pre" and r["position"] == -1}
    sklearn = pytest.importorskip("sklearn.decomposition")
    unit = np.stack([v / np.linalg.norm(v) for _, v in sorted(dirs.items()) if np.linalg.norm(v) > 1e-6 * max(
        np.linalg.norm(w) for w in dirs.values())])
    pca = sklearn.PCA().fit(unit)
    for r in rows:
        if r["control"]:
            assert np.isnan(r["axis_evr"]) and np.isnan(r["axis_cos"])
            continue
        v = dirs[r["direction_layer"]]
        assert r["axis"] == "pca0" and r["axis_evr"] == pytest.approx(pca.explained_variance_ratio_[0], abs=1e-6)
        assert r["axis_cos"] == pytest.approx(float(pca.components_[0] @ (v / np.linalg.norm(v))), abs=1e-5)
        assert r["vector_norm"] == pytest.approx(np.linalg.norm(v), rel=1e-6)
    cells = {c["cell_id"]: c["status"] for c in out["cells"]}
    assert all(cells[r["cell_id"]] == "done" for r in rows)
    # the addition rows (ids and rates) are the same in a sweep without the angular block
    without = run("without", {})
    key = lambda rs: sorted((r["cell_id"], r["prompt_set"], r["rate"]) for r in rs if r["mode"] != "angular")  # noqa: E731
    assert key(out["steering"]) == key(without["steering"])


@pytest.mark.parametrize("block, field, words", [
    ({"thetas": [0, 0], "direction_layer": "best"}, "stages.steer.angular", "thetas has a repeated angle"),
    ({"sites": ["mlp_out"], "direction_layer": "best"}, "stages.steer.angular.sites.0",
     "Input should be 'resid_pre' or 'resid_mid'"),
    ({"thetas": [90]}, "stages.steer", "stages.steer.angular.direction_layer 'selected' needs a stages.select block"),
    ({"layers": [9], "direction_layer": "best"}, "stages.steer.angular.layers", "layer 9 out of range"),
    ({"direction_layer": 7}, "stages.steer.angular.direction_layer", "layer 7 out of range"),
    ({"pca_component": 50, "direction_layer": "best"}, "stages.steer.angular.pca_component",
     "50 is out of range: the PCA of model"),
])
def test_bad_angular_block_is_a_spec_error_naming_the_field(tmp_path, tiny_qwen_path, block, field, words):
    import yaml

    from refusal_ray.errors import SpecError
    from refusal_ray.plan import make_plan

    from test_bad_input import base_spec

    if not _steer_has_angular():
        pytest.skip("the spec does not build its steer blocks from OPS yet")
    spec = base_spec(tiny_qwen_path)
    spec["stages"]["steer"]["angular"] = block
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as e:
        make_plan(str(f))
    msg = str(e.value)
    assert str(f) in msg and f": {field}" in msg and words in msg, msg
