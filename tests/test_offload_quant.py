"""Interventions under accelerate disk offload and bitsandbytes quantisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refusal_ray import capture, load_model
from refusal_ray.data import encode
from refusal_ray.interventions import Patch, RowEdit, forward, hooks, row_edits
from refusal_ray.models.sites import site_name

from conftest import PROMPTS, TOY_MODELS


def _edited_logits(lm, ids, mask, kind: str) -> torch.Tensor:
    """Last-position logits under one intervention: addition, ablation or patching."""
    model, _, sites = lm
    n, d = ids.shape[0], sites.d_model
    g = torch.Generator().manual_seed(0)
    v = torch.randn(d, generator=g)
    with torch.no_grad():
        if kind == "addition":
            with row_edits(sites, {("resid_pre", 1): RowEdit(add=2.0 * v.expand(n, -1).clone())}):
                return forward(model, ids, mask).logits[:, -1].float().cpu()
        if kind == "ablation":
            u = (v / v.norm()).expand(n, -1).clone()
            edits = {(k, layer): RowEdit(u, torch.ones(n)) for layer in range(sites.n_layers)
                     for k in ("resid_pre", "attn_out", "mlp_out")}
            with row_edits(sites, edits):
                return forward(model, ids, mask).logits[:, -1].float().cpu()
        # patching: resid_pre[2] and head 1 of z[1] at the last 3 positions, from the reversed batch
        names = [site_name("resid_pre", 2), site_name("z", 1)]
        src = capture(model, ids.flip(0), mask.flip(0), names, sites)
        pos = torch.arange(-3, 0)
        patches = {names[0]: Patch(src[names[0]][:, -3:], pos),
                   names[1]: Patch(src[names[1]][:, -3:], pos, heads=torch.tensor([1]))}
        with hooks(sites, patches):
            return forward(model, ids, mask).logits[:, -1].float().cpu()


@pytest.fixture(scope="module")
def in_memory():
    return load_model(str(TOY_MODELS / "toy-qwen-m"))


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    # ~1.3M float32 parameters = 5.2 MB: 2 MB of "cpu" forces the later layers to disk
    lm = load_model(str(TOY_MODELS / "toy-qwen-m"), device_map="auto",
                    max_memory={"cpu": "2MB", "disk": "1GB"}, offload_folder=str(folder))
    return lm


def test_model_really_is_offloaded(offloaded):
    assert "disk" in set(offloaded.model.hf_device_map.values())


@pytest.mark.parametrize("kind", ["addition", "ablation", "patching"])
def test_interventions_equal_under_disk_offload(in_memory, offloaded, kind):
    ids, mask = encode(in_memory.tokenizer, PROMPTS)
    want = _edited_logits(in_memory, ids, mask, kind)
    got = _edited_logits(offloaded, ids, mask, kind)
    plain = forward(in_memory.model, ids, mask).logits[:, -1]
    assert (want - plain).abs().max() > 1e-3          # the intervention did something
    assert (got - want).abs().max() <= 1e-4


def test_patching_clean_into_clean_is_identity(in_memory):
    ids, mask = encode(in_memory.tokenizer, PROMPTS)
    name = site_name("resid_post", 2)
    src = capture(in_memory.model, ids, mask, [name], in_memory.sites)
    with torch.no_grad():
        plain = forward(in_memory.model, ids, mask).logits
        with hooks(in_memory.sites, {name: Patch(src[name], torch.arange(ids.shape[1]))}):
            patched = forward(in_memory.model, ids, mask).logits
    assert torch.equal(plain, patched)


# Documented tolerances of quantised runs against float32 (README, "Quantisation"), measured on
# toy-qwen-s: 8-bit min cos 1.000, max |d sep| 0.003, max |d rate| 0.03; 4-bit 0.9986, 0.06, 0.16.
TOLERANCE = {"8bit": {"cos": 0.999, "sep": 0.05, "max_rate": 0.1, "mean_rate": 0.02},
             "4bit": {"cos": 0.99, "sep": 0.25, "max_rate": 0.25, "mean_rate": 0.03}}


@pytest.fixture(scope="module")
def quickstart_seed0():
    from refusal_ray.cluster.driver import settings_payload
    from refusal_ray.plan import make_plan

    from conftest import REPO

    with pytest.MonkeyPatch.context() as mp:  # the quickstart's paths are relative to the repository
        mp.chdir(REPO)
        plan = make_plan("sweeps/quickstart.yaml", ["qwen-s"])
    prompts = {0: plan.prompts[0]}
    settings = settings_payload(plan)   # what the driver sends a worker
    cells = [c for c in plan.cells if c.seed == 0]
    return prompts, settings, cells, plan.models["qwen-s"].positions


def _run_stages(quantization, quickstart_seed0):
    from refusal_ray.session import ModelSession
    from refusal_ray.stages import STAGE_BY_NAME

    prompts, settings, cells, positions = quickstart_seed0
    model = {"path": str(TOY_MODELS / "toy-qwen-s"), "dtype": "float32", "device": "cpu",
             "quantization": quantization, "positions": positions}
    session = ModelSession(model, prompts, settings)
    results = {}
    for stage in ("directions", "select", "steer"):   # the quickstart's stages, in dependency order
        declared = STAGE_BY_NAME[stage]
        payload = declared.inputs(settings, {n: results[n] for n in declared.needs if n in results})
        todo = [c for c in cells if c.stage == stage and declared.skip(c, payload) is None]
        out = session.run(stage, todo, payload)
        assert out["ok"], out.get("traceback")
        results[stage] = out["tables"]
    best = STAGE_BY_NAME["steer"].inputs(settings, results).best
    rates = {(a["cell_id"], a["prompt_set"]): a["rate"] for a in results["steer"]["steering"]}
    return results["directions"]["directions"], best, rates


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantised_models_run_every_quickstart_stage(quantization, quickstart_seed0):
    ref_dirs, ref_best, ref_rates = _run_stages(None, quickstart_seed0)
    dirs, best, rates = _run_stages(quantization, quickstart_seed0)
    tol = TOLERANCE[quantization]
    for a, b in zip(ref_dirs, dirs):
        va, vb = np.asarray(a["vector"]), np.asarray(b["vector"])
        if np.linalg.norm(va) > 0:
            assert va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)) >= tol["cos"]
        assert abs(a["separation"] - b["separation"]) <= tol["sep"]
    assert best == ref_best
    diffs = np.array([abs(rates[k] - ref_rates[k]) for k in ref_rates])
    assert diffs.max() <= tol["max_rate"] and diffs.mean() <= tol["mean_rate"]


def test_4bit_on_cpu_refuses_unpackable_widths():
    with pytest.raises(ValueError, match="4-bit quantisation on CPU needs layer widths divisible by 64 "
                                         r"\(bitsandbytes' CPU kernel\); this model has 160: use 8bit or a GPU"):
        load_model(str(TOY_MODELS / "toy-qwen-m"), quantization="4bit")
