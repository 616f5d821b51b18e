"""The operator registry (refusal_ray/ops/base.py) and the migration's bit-identity: the edits built through
the operators equal a frozen copy of the pre-operator `build_edits` / RowEdit formula, bit for bit, on a
chunk mixing addition, directional ablation and subspace ablation rows (controls included)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from refusal_ray.grid import Cell
from refusal_ray.interventions import RowEdit
from refusal_ray.ops import OPS, register, unregister
from refusal_ray.ops.base import ABLATION_SITES, Operator, SteerInputs, control_direction
from refusal_ray.ops.subspace import control_subspace, orthonormal_basis
from refusal_ray.stages.steer import Row, build_edits, edits_on


def _frozen_build_edits(rows, d: SteerInputs, ablation_layers, d_model):
    """The build_edits of commit a65c37d (before the operators), with its direction and subspace rules inlined."""
    n = len(rows)
    add, dirs, alpha, beta = {}, {}, {}, {}

    def direction(cell):
        p = cell.params
        layer = d.best if p["direction_layer"] == "best" else int(p["direction_layer"])
        v = d.vectors[layer]
        return control_direction(cell.id, v) if p["control"] else v

    def basis(cell):
        q = orthonormal_basis([d.vectors[int(x)] for x in cell.params["subspace"]["layers"]])
        return control_subspace(cell.id, q.shape[0], q.shape[1]) if cell.params["control"] else q

    bases = {r.cell.id: basis(r.cell) for r in rows if r.cell.params["mode"] == "subspace"}
    k = max((q.shape[0] for q in bases.values()), default=0)
    b = torch.zeros(n, k, d_model) if bases else None
    for i, row in enumerate(rows):
        p = row.cell.params
        if p["mode"] == "subspace":
            q = torch.from_numpy(bases[row.cell.id])
            b[i, :q.shape[0]] = q
            for layer in p["ablation_layers"]:
                for kind in ABLATION_SITES:
                    beta.setdefault((kind, layer), torch.zeros(n))[i] = p["alpha"]
            continue
        if p["mode"] == "baseline":
            continue
        v = direction(row.cell)
        if p["mode"] == "addition":
            add.setdefault(p["layer"], torch.zeros(n, d_model))[i] = torch.from_numpy(v) * p["coefficient"]
        elif p["mode"] == "ablation":
            u = torch.from_numpy(v) / max(float(np.linalg.norm(v)), 1e-30)
            for layer in ablation_layers:
                for kind in ABLATION_SITES:
                    dirs.setdefault((kind, layer), torch.zeros(n, d_model))[i] = u
                    alpha.setdefault((kind, layer), torch.zeros(n))[i] = p["alpha"]
    edits = {key: RowEdit(dirs[key], alpha[key]) for key in dirs}
    for key in beta:
        e = edits.get(key, RowEdit())
        edits[key] = RowEdit(e.ablate_dirs, e.ablate_alpha, None, b, beta[key])
    for layer, t in add.items():
        key = ("resid_pre", layer)
        e = edits.get(key, RowEdit())
        edits[key] = RowEdit(e.ablate_dirs, e.ablate_alpha, t, e.ablate_basis, e.basis_alpha)
    return edits


def _cell(cid, **params) -> Cell:
    base = {"layer": None, "coefficient": 0.0, "alpha": 0.0, "direction_layer": None, "control": False}
    return Cell(id=cid, stage="steer", model="m", seed=0, params={**base, **params})


def _mixed_cells() -> list[Cell]:
    return [_cell("b", mode="baseline"),
            _cell("a1", mode="addition", layer=1, coefficient=2.0, direction_layer=1),
            _cell("a1c", mode="addition", layer=1, coefficient=2.0, direction_layer=1, control=True),
            _cell("a2", mode="addition", layer=2, coefficient=-1.5, direction_layer=2),
            _cell("ab", mode="ablation", alpha=1.0, direction_layer="best"),
            _cell("abc", mode="ablation", alpha=0.5, direction_layer=0, control=True),
            _cell("s", mode="subspace", alpha=1.0, subspace={"layers": [0, 1, 2]}, ablation_layers=[1, 2]),
            _cell("s1", mode="subspace", alpha=0.5, subspace={"layers": [1]}, ablation_layers=[0, 1]),
            _cell("sc", mode="subspace", alpha=1.0, subspace={"layers": [0, 2]}, ablation_layers=[1, 2], control=True)]


def test_mixed_chunk_edits_are_bit_identical_to_the_frozen_formula():
    rng = np.random.default_rng(7)
    d_model, n_layers = 24, 3
    d = SteerInputs({layer: (rng.standard_normal(d_model) * 5).astype(np.float32) for layer in range(n_layers)},
                    best=2)
    cells = _mixed_cells()
    rows = [Row(c, "harmful", i) for i in range(2) for c in cells]
    rng.shuffle(rows)
    new = edits_on(build_edits(rows, d, [0, 2], d_model, n_layers), torch.device("cpu"))
    old = _frozen_build_edits(rows, d, [0, 2], d_model)
    assert set(new) == set(old)
    x = torch.from_numpy(rng.standard_normal((len(rows), 5, d_model)).astype(np.float32))
    for key in old:
        assert torch.equal(new[key](x.clone()), old[key](x.clone())), key
        assert isinstance(new[key], RowEdit)     # one merged edit per site, as before


def test_registry_order_discovery_and_errors():
    names = OPS.names()
    assert names[:3] == ["addition", "ablation", "subspace"]
    assert [op.order for op in OPS] == sorted(op.order for op in OPS)
    assert [op.name for op in OPS.by_apply_order()][:2] == ["ablation", "subspace"]
    assert OPS.by_apply_order()[-1].name == "addition"
    with pytest.raises(ValueError, match="operator 'ablation' is already registered"):
        register(type("Again", (Operator,), {"name": "ablation", "order": 99}))
    with pytest.raises(KeyError, match="operator 'nope' is not registered"):
        unregister("nope")
    with pytest.raises(ValueError, match="reserved"):
        register(type("Base", (Operator,), {"name": "baseline", "order": 99}))
    assert OPS.names() == names


def test_ops_and_analysis_load_no_torch():
    import subprocess

    code = ("import sys, refusal_ray.ops, refusal_ray.analysis.summary, refusal_ray.analysis.report; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
