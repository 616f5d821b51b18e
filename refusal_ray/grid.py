"""Grid expansion: a spec becomes cells with content-addressed ids.

A cell is the unit of work, status and resumption. Its id hashes everything that determines
its result (model identity, seed, stage parameters, the stage's settings, and the prompts as the
model sees them: the files' bytes and the rendered prompts' token ids) and nothing that does not
(batch sizes, resources, the decision rule), so a rerun skips done cells and the store never
holds a cell twice. Which settings count is each stage's declaration (`Stage.id_key`).

`Cell`, `layer_list`, `SCHEMA_VERSION` and the model identity live in `refusal_ray.core.cells`
(below the stages, which import them); they are re-exported here for old import paths.
"""

from __future__ import annotations

from refusal_ray.core.cells import SCHEMA_VERSION, Cell, key_digest, layer_list, model_identity
from refusal_ray.spec import Spec

__all__ = ["SCHEMA_VERSION", "Cell", "cell_id", "expand", "layer_list"]

_model_identity = model_identity   # old name (stages/capability.py reads it)


def cell_id(spec: Spec, stage: str, model: str, seed: int, params: dict, prompt_fingerprint: str) -> str:
    """Content hash of one cell (20 hex digits).

    Args:
        prompt_fingerprint: the prompts as this model sees them (`refusal_ray.plan.prompt_fingerprint`).
    """
    from refusal_ray.stages import STAGE_BY_NAME   # here, not at the top: stages/steer.py and capability.py
    #                                                still import Cell from this module (old path)
    key = {"v": SCHEMA_VERSION, "stage": stage, "model": model_identity(spec, model), "seed": seed,
           "params": params, "data": prompt_fingerprint, **STAGE_BY_NAME[stage].id_key(spec)}
    return key_digest(key)


def expand(spec: Spec, model_plans: dict, fingerprints: dict[str, str]) -> list[Cell]:
    """All cells of a spec, per (model, seed) in stage order (`refusal_ray.stages.STAGES`).

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
