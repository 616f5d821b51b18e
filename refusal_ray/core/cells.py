"""A cell, the unit of work, status and resumption, and the pieces of its content-addressed id.

Below every stage (stages import `Cell` and `layer_list` from here), so the grid, which expands a
spec into cells by reading the stage declarations, can import the stages without a circle. The id
itself (`refusal_ray.grid.cell_id`) needs each stage's `id_key` and stays in the grid.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

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


def model_identity(spec, name: str) -> dict:
    """What of model `name`'s spec block determines results: source, revision, dtype, quantization.
    Raises StopIteration when the spec has no such model."""
    m = next(m for m in spec.models if m.name == name)
    return {"source": m.source, "revision": m.revision, "dtype": m.dtype, "quantization": m.quantization}


def key_digest(key: dict) -> str:
    """A cell id: the first 20 hex digits of sha256 over the key as sorted-key JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def layer_list(layers, n_layers: int) -> list[int]:
    """A spec's layer field as a list: 'all' -> 0..n_layers-1, else the listed layers in order."""
    return list(range(n_layers)) if layers == "all" else list(layers)
