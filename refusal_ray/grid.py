"""Grid expansion: a spec becomes cells with content-addressed ids.

A cell is the unit of work, status and resumption. Its id hashes everything that determines
its result (model identity, seed, stage parameters, the stage's settings, and the prompts as the
model sees them: the files' bytes and the rendered prompts' token ids) and nothing that does not
(batch sizes, resources, the decision rule), so a rerun skips done cells and the store never
holds a cell twice. Which settings count is each stage's declaration (`Stage.id_key`).
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
    stage: str                  # a stage name (refusal_ray.stages.STAGES)
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


def cell_id(spec: Spec, stage: str, model: str, seed: int, params: dict, prompt_fingerprint: str) -> str:
    """Content hash of one cell (20 hex digits).

    Args:
        prompt_fingerprint: the prompts as this model sees them (`refusal_ray.plan.prompt_fingerprint`).
    """
    from refusal_ray.stages import STAGE_BY_NAME

    key = {"v": SCHEMA_VERSION, "stage": stage, "model": _model_identity(spec, model), "seed": seed,
           "params": params, "data": prompt_fingerprint, **STAGE_BY_NAME[stage].id_key(spec)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def layer_list(layers, n_layers: int) -> list[int]:
    return list(range(n_layers)) if layers == "all" else list(layers)


def expand(spec: Spec, model_plans: dict, fingerprints: dict[str, str]) -> list[Cell]:
    """All cells of a spec, per (model, seed) in stage order (directions, select, steer, patch, scrub).

    Args:
        model_plans: {model name: ModelPlan} (n_layers, resolved positions, ...).
        fingerprints: {model name: {seed: prompt fingerprint}} (or one fingerprint for every seed).
    """
    from refusal_ray.stages import STAGES

    cells = []
    for m in spec.models:
        if m.name not in model_plans:   # validate offline: a hub model it could not read
            continue
        for seed in spec.seeds:
            for stage in STAGES:
                if not stage.enabled(spec):
                    continue
                fp = fingerprints[m.name]
                fp = fp[seed] if isinstance(fp, dict) else fp
                for p in stage.cells(spec, model_plans[m.name]):
                    cells.append(Cell(cell_id(spec, stage.name, m.name, seed, p, fp), stage.name, m.name, seed, p))
    return cells
