"""Stage `patch`, the declaration: exact activation patching and the attribution-patching screen
(denoising: clean = harmful prompt, corrupted = its harmless twin; `run.py` has the method and its
sources, `read.py` the recovery table, its summary columns and its report section).

Torch-free at import: the spec block (`PatchStage`, `stages.patch`), its cross-field check
(`validate`), the plan-time hooks, and `STAGE`, whose run-side callable imports `run.py` on first
call (`refusal_ray.stages.base.lazy`). Old names (`RefusalScore`, `exact_patching`, `run_patch`, ...)
still import from here: module `__getattr__` forwards them to `run.py`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Literal

from pydantic import Field, model_validator

from refusal_ray.ops.base import LayerList, NegativePositions, Strict
from refusal_ray.stages.base import Stage, check_layers, draw_test_pairs, lazy

PatchSiteKind = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z"]


class PatchStage(Strict):
    """Activation patching, denoising: clean = harmful, corrupted = its harmless twin (by pair)."""

    sites: list[PatchSiteKind] = Field(["resid_pre", "attn_out", "mlp_out", "z"], min_length=1,
                                       description="Site kinds patched at every layer listed ('z' is patched "
                                                   "head by head).")
    layers: LayerList = Field("all", description="Layers ('all' or a list).")
    positions: NegativePositions = Field([-1], min_length=1, description="Positions patched together, negative from the "
                                                                 "end of the prompt (-1: last token).")
    n_pairs: int = Field(16, ge=1, description="Harmful/harmless pairs from the test split, per seed.")
    attribution: bool = Field(True, description="Screen every site with attribution patching (AtP: two forward "
                                                "passes and one backward pass).")
    confirm_top_k: int | None = Field(None, ge=1, description="Re-measure only the top k sites of the screen "
                                                              "exactly (None: every site exactly).")
    batch_size: int = Field(256, ge=1, description="Rows (pair x patch) per forward pass.")
    screen_batch_size: int = Field(16, ge=1, description="Pairs per attribution backward pass.")

    @model_validator(mode="after")
    def _screen(self):
        if self.confirm_top_k is not None and not self.attribution:
            raise ValueError("confirm_top_k needs attribution: true (it confirms the screen's top sites)")
        return self


def validate(spec) -> None:
    """Cross-field check of a spec with a `stages.patch` block: both prompt files name a pair column
    (clean and corrupted inputs are minimal pairs). Raises ValueError."""
    if spec.stages.patch is None:
        return
    for cls in ("harmful", "harmless"):
        if getattr(spec.data, cls).pair_column is None:
            raise ValueError(f"stages.patch needs data.{cls}.pair_column (clean and corrupted inputs are "
                             f"pairs)")


# -- the declaration ---------------------------------------------------------------------------
def _prepare(plan) -> None:
    draw_test_pairs(plan, "patch")      # clean = harmful, corrupted = its harmless twin


def _check(plan) -> None:
    check_layers(plan, "stages.patch.layers", plan.spec.stages.patch.layers)


def _id_key(spec) -> dict:   # the judge's phrases define the refusal score's tokens
    from refusal_ray.data.sources import pair_columns   # canonical names: a source and its merged file alike

    return {"patch": spec.stages.patch.model_dump(mode="json", exclude={"batch_size", "screen_batch_size"}),
            "judge": spec.judge.model_dump(mode="json"),
            "pairs": pair_columns(spec.data)}


def _describe(plan) -> list[str]:
    p = plan.spec.stages.patch
    return [f"patch: sites {p.sites} at layers {p.layers}, positions {p.positions}, {p.n_pairs} pairs; "
            f"attribution screen: {p.attribution}, exact: {'top ' + str(p.confirm_top_k) if p.confirm_top_k else 'every site'}"]


STAGE = Stage(name="patch", tables=("patching",), cells=lambda spec, mp: [{}], id_key=_id_key,
              run=lazy("refusal_ray.stages.patch.run", "run_task"), prepare=_prepare, check=_check,
              describe=_describe, block=PatchStage, validate=validate, read="refusal_ray.stages.patch.read")


def __getattr__(name: str):
    """PEP 562: the run side's names (`RefusalScore`, `exact_patching`, ...), importing `run.py` (torch)."""
    if name.startswith("__"):
        raise AttributeError(name)
    run = import_module(f"{__name__}.run")
    return run if name == "run" else getattr(run, name)
