"""Grid expansion: a spec becomes cells with content-addressed ids.

A cell is the unit of work, status and resumption. Its id hashes everything that determines
its result (model identity, seed, stage parameters, data fingerprints and sizes, generation
and judge settings) and nothing that does not (batch sizes, resources, the decision rule), so
a rerun skips done cells and the store never holds a cell twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from refusal_ray.spec import Spec

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Cell:
    id: str
    stage: str                  # "directions" | "steer" | "patch" | "scrub"
    model: str                  # model name in the spec
    seed: int
    params: dict = field(default_factory=dict, hash=False)

    def row(self) -> dict:
        """The cell's columns in the cells table (the model is the table's partition key)."""
        return {"cell_id": self.id, "stage": self.stage, "seed": self.seed,
                "params": json.dumps(self.params, sort_keys=True)}


def _model_identity(spec: Spec, name: str) -> dict:
    m = next(m for m in spec.models if m.name == name)
    return {"source": m.source, "revision": m.revision, "dtype": m.dtype, "quantization": m.quantization}


def cell_id(spec: Spec, stage: str, model: str, seed: int, params: dict, data_fingerprint: str) -> str:
    key = {"v": SCHEMA_VERSION, "stage": stage, "model": _model_identity(spec, model), "seed": seed,
           "params": params, "data": data_fingerprint}
    if stage in ("directions", "steer"):
        key |= {"n": [spec.data.n_train, spec.data.n_val, spec.data.n_test],
                "directions": spec.stages.directions.model_dump(mode="json", exclude={"batch_size"})}
    if stage == "steer":
        key |= {"generation": spec.generation.model_dump(mode="json"),
                "judge": spec.judge.model_dump(mode="json"),
                "position": spec.stages.steer.position}
    elif stage == "patch":   # the judge's phrases define the refusal score's tokens
        key |= {"patch": spec.stages.patch.model_dump(mode="json", exclude={"batch_size", "screen_batch_size"}),
                "judge": spec.judge.model_dump(mode="json"),
                "pairs": [spec.data.harmful.pair_column, spec.data.harmless.pair_column]}
    elif stage == "scrub":
        key |= {"scrub": spec.stages.scrub.model_dump(mode="json", exclude={"batch_size", "hypotheses"}),
                "pairs": [spec.data.harmful.pair_column, spec.data.harmless.pair_column]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def layer_list(layers, n_layers: int) -> list[int]:
    return list(range(n_layers)) if layers == "all" else list(layers)


def steer_params(spec: Spec, n_layers: int) -> list[dict]:
    """Every steering arm of one (model, seed): baseline, addition and ablation, with controls."""
    steer = spec.stages.steer
    controls = [False, True] if steer.controls else [False]
    arms: list[dict] = [{"mode": "baseline", "layer": None, "coefficient": 0.0, "alpha": 0.0,
                         "direction_layer": None, "control": False}]
    if steer.addition is not None:
        for layer in layer_list(steer.addition.layers, n_layers):
            for c in steer.addition.coefficients:
                if c == 0:
                    continue  # c = 0 is the shared baseline arm
                arms += [{"mode": "addition", "layer": layer, "coefficient": float(c), "alpha": 0.0,
                          "direction_layer": layer, "control": ctl} for ctl in controls]
    if steer.ablation is not None:
        for a in steer.ablation.alphas:
            arms += [{"mode": "ablation", "layer": None, "coefficient": 0.0, "alpha": float(a),
                      "direction_layer": steer.ablation.direction_layer, "control": ctl} for ctl in controls]
    return arms


def expand(spec: Spec, n_layers: dict[str, int], data_fingerprint: str) -> list[Cell]:
    """All cells of a spec, directions first within each (model, seed); then steering arms, the
    patch cell and one scrub cell per hypothesis.

    Args:
        n_layers: {model name: number of layers}, from each model's config.json.
        data_fingerprint: hash of the prompt files (see `refusal_ray.data.fingerprint`).
    """
    cells = []
    for m in spec.models:
        for seed in spec.seeds:
            cells.append(Cell(cell_id(spec, "directions", m.name, seed, {}, data_fingerprint),
                              "directions", m.name, seed, {}))
            if spec.stages.steer is not None:
                for p in steer_params(spec, n_layers[m.name]):
                    cells.append(Cell(cell_id(spec, "steer", m.name, seed, p, data_fingerprint),
                                      "steer", m.name, seed, p))
            if spec.stages.patch is not None:
                cells.append(Cell(cell_id(spec, "patch", m.name, seed, {}, data_fingerprint), "patch", m.name, seed, {}))
            if spec.stages.scrub is not None:
                for h in spec.stages.scrub.hypotheses:
                    p = {"hypothesis": h.name, "protected": list(h.protected)}
                    cells.append(Cell(cell_id(spec, "scrub", m.name, seed, p, data_fingerprint), "scrub", m.name, seed, p))
    return cells
