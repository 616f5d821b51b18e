"""Plan a sweep without loading weights: check inputs, expand cells, estimate memory.

Everything here runs before the store is touched, so bad input exits 2 with nothing written.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from refusal_ray.data import SPLITS, draw_pairs, fingerprint, load_prompts, split_prompts
from refusal_ray.errors import SpecError
from refusal_ray.grid import Cell, expand
from refusal_ray.models.loading import bnb_4bit_cpu_problem, read_config
from refusal_ray.models.patterns import PatternError, expand as expand_patterns
from refusal_ray.models.sites import UnsupportedFamilyError, layout_for
from refusal_ray.spec import Spec, load_spec

BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2, "8bit": 1, "4bit": 0.5}


@dataclass
class ModelPlan:
    name: str
    n_layers: int
    d_model: int
    params: int
    weight_bytes: int
    estimate_bytes: int   # weights x 1.2 headroom for activations and the KV cache
    family: str
    n_heads: int = 1


@dataclass
class Plan:
    spec: Spec
    spec_file: str
    models: dict[str, ModelPlan]
    frames: dict[str, tuple[pd.DataFrame, object]]   # class -> (rows, PromptFile)
    data_fingerprint: str
    prompts: dict = field(default_factory=dict)       # seed -> split -> class -> PromptSet (drawn once)
    cells: list[Cell] = field(default_factory=list)

    def submission_id(self) -> str:
        """A stable Ray job submission id: the same spec gives the same id, so Ray refuses a double submit."""
        return f"refusal-ray-{self.spec.name}-{self.spec.spec_hash()[:12]}"

    def counts(self) -> dict[tuple[str, str], int]:
        return dict(Counter((c.model, c.stage) for c in self.cells))


def count_params(config: dict) -> int:
    """Exact parameter count from a config, on the meta device (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):  # ties embeddings as a real load does; no memory is allocated
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def _model_plan(spec: Spec, spec_file: str, i: int) -> ModelPlan:
    m = spec.models[i]
    field_ = f"models.{i}"
    if m.path is not None and not Path(m.path, "config.json").is_file():
        what = "directory not found" if not Path(m.path).is_dir() else "no config.json in"
        raise SpecError(spec_file, f"{field_}.path", f"{what}: {m.path}")
    wants_disk = "disk" in (m.max_memory or {}) or "disk" in (m.device_map.values() if isinstance(m.device_map, dict) else ())
    if wants_disk and m.offload_folder is None:
        raise SpecError(spec_file, f"{field_}.offload_folder", "disk offload needs an offload_folder")
    try:
        config = read_config(m.source, m.revision, m.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - unreachable hub id, bad json, ...
        raise SpecError(spec_file, f"{field_}.{'path' if m.path else 'hub_id'}",
                        f"cannot read config: {e}".splitlines()[0]) from None
    text = config.get("text_config") or config
    try:
        layout_for(text.get("model_type", "?"))
    except UnsupportedFamilyError as e:
        raise SpecError(spec_file, f"{field_}.path", str(e)) from None
    problem = m.quantization == "4bit" and m.device == "cpu" and bnb_4bit_cpu_problem(config)
    if problem:
        raise SpecError(spec_file, f"{field_}.quantization", problem)
    n_layers = text.get("num_hidden_layers") or text.get("n_layer")
    d_model = text.get("hidden_size") or text.get("n_embd")
    n_heads = text.get("num_attention_heads") or text.get("n_head") or 1
    params = count_params(config)
    bpp = BYTES_PER_PARAM[m.quantization or m.dtype]
    weight_bytes = int(params * bpp)
    return ModelPlan(m.name, n_layers, d_model, params, weight_bytes, int(weight_bytes * 1.2), text["model_type"],
                     n_heads)


def _check_layers(spec: Spec, spec_file: str, models: dict[str, ModelPlan]) -> None:
    steer, patch = spec.stages.steer, spec.stages.patch
    depth = min(mp.n_layers for mp in models.values())
    checks = []
    if patch is not None and patch.layers != "all":
        checks += [("stages.patch.layers", layer) for layer in patch.layers]
    if steer is not None and steer.addition is not None and steer.addition.layers != "all":
        checks += [("stages.steer.addition.layers", layer) for layer in steer.addition.layers]
    if steer is not None and steer.ablation is not None:
        if steer.ablation.layers != "all":
            checks += [("stages.steer.ablation.layers", layer) for layer in steer.ablation.layers]
        if isinstance(steer.ablation.direction_layer, int):
            checks.append(("stages.steer.ablation.direction_layer", steer.ablation.direction_layer))
    for where, layer in checks:
        if not 0 <= layer < depth:
            shallow = min(models.values(), key=lambda mp: mp.n_layers)
            raise SpecError(spec_file, where, f"layer {layer} out of range: model {shallow.name!r} "
                                              f"has {shallow.n_layers} layers (0..{shallow.n_layers - 1})")


def _check_patterns(spec: Spec, spec_file: str, models: dict[str, ModelPlan]) -> None:
    """Every scrub pattern must fit every model (layers and heads)."""
    scrub = spec.stages.scrub
    if scrub is None:
        return
    fields = [("stages.scrub.scrubbed", scrub.scrubbed)] + [
        (f"stages.scrub.hypotheses.{i}.protected", h.protected) for i, h in enumerate(scrub.hypotheses)]
    for mp in models.values():
        for where, patterns in fields:
            try:
                expand_patterns(patterns, mp.n_layers, mp.n_heads)
            except PatternError as e:
                raise SpecError(spec_file, where, f"{e} (model {mp.name!r})") from None


def scrub_warnings(plan: "Plan") -> list[str]:
    """Hypotheses whose protected sites are overwritten by a scrubbed residual stream after them.

    Scrubbing `blocks.L.hook_resid_post` replaces the whole stream, so what a protected site at a
    layer <= L wrote is lost: the hypothesis then scores the resampled run's KL whatever it protects.
    """
    scrub, out = plan.spec.stages.scrub, []
    if scrub is None:
        return out
    for mp in plan.models.values():
        scrubbed = expand_patterns(scrub.scrubbed, mp.n_layers, mp.n_heads)
        for h in scrub.hypotheses:
            prot = expand_patterns(h.protected, mp.n_layers, mp.n_heads)
            cut = [int(s.split(".")[1]) for s in scrubbed if s.endswith("hook_resid_post") and s not in prot]
            lost = sorted(s for s in prot if cut and int(s.split(".")[1]) <= max(cut))
            if lost:
                out.append(f"warning: hypothesis {h.name!r} on {mp.name}: blocks.{max(cut)}.hook_resid_post is "
                           f"scrubbed, which overwrites protected {lost[0]}" + (f" and {len(lost) - 1} more" if
                                                                               len(lost) > 1 else ""))
    return out


def make_plan(spec_file: str | Path, only_models: list[str] | None = None) -> Plan:
    """Load, check and expand a spec. Raises SpecError (exit 2) on any bad input."""
    spec_file = str(spec_file)
    spec = load_spec(spec_file)
    if only_models:
        unknown = [n for n in only_models if n not in {m.name for m in spec.models}]
        if unknown:
            raise SpecError("--models", "", f"unknown model {unknown[0]!r}; the spec has "
                                            f"{', '.join(m.name for m in spec.models)}")
    frames = {}
    for cls in ("harmful", "harmless"):
        pf = getattr(spec.data, cls)
        frames[cls] = (load_prompts(pf, f"data.{cls}", spec_file), pf)
    drawn: dict = {}
    for cls, (df, pf) in frames.items():
        for seed in spec.seeds:
            try:
                drawn[(cls, seed)] = split_prompts(df, pf, spec.data, seed)
            except ValueError as e:
                raise SpecError(spec_file, f"data.{cls}", str(e)) from None
    prompts = {seed: {split: {cls: drawn[(cls, seed)][split] for cls in frames} for split in SPLITS}
               for seed in spec.seeds}
    for stage in ("patch", "scrub"):
        cfg = getattr(spec.stages, stage)
        if cfg is None:
            continue
        for seed in spec.seeds:
            try:
                prompts[seed][stage] = draw_pairs(frames["harmful"][0], frames["harmless"][0], spec.data.harmful,
                                                  spec.data.harmless, cfg.n_pairs, seed)
            except ValueError as e:
                raise SpecError(spec_file, f"stages.{stage}.n_pairs", str(e)) from None
    models = {m.name: _model_plan(spec, spec_file, i) for i, m in enumerate(spec.models)}
    _check_layers(spec, spec_file, models)
    _check_patterns(spec, spec_file, models)
    fp = hashlib.sha256("".join(fingerprint(pf.path) for _, pf in frames.values()).encode()).hexdigest()[:16]
    plan = Plan(spec, spec_file, models, frames, fp, prompts)
    cells = expand(spec, {n: mp.n_layers for n, mp in models.items()}, fp)
    plan.cells = [c for c in cells if not only_models or c.model in only_models]
    return plan


def machine_memory_bytes() -> int:
    """Physical memory of this machine (the node a local run uses)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_warnings(plan: Plan, available: int | None = None) -> list[str]:
    """Models whose estimate exceeds `available` bytes without offloading configured."""
    available = available or machine_memory_bytes()
    out = []
    for m in plan.spec.models:
        mp = plan.models[m.name]
        offloaded = (m.device_map is not None or m.quantization is not None
                     or offload_mode(m, mp.params, plan.spec.resources.highmem_params) == "auto")
        if mp.estimate_bytes > available and not offloaded:
            out.append(f"warning: model {m.name!r} needs about {_human(mp.estimate_bytes)} but this machine has "
                       f"{_human(available)}; set device_map/max_memory/offload_folder or quantization, "
                       f"or run it on a bigger node")
    return out


def describe(plan: Plan, done: set[str] | None = None) -> str:
    """Human-readable plan: cells per stage and model, layers, memory estimates."""
    done = done or set()
    counts = plan.counts()
    lines = [f"sweep {plan.spec.name} (submission id {plan.submission_id()}): {len(plan.cells)} cells "
             f"({sum(c.id in done for c in plan.cells)} already done), seeds {plan.spec.seeds}"]
    lines.append(f"{'model':<14}{'family':<10}{'params':>12}{'layers':>8}{'memory':>10}"
                 f"{'directions':>12}{'steer':>8}{'patch':>7}{'scrub':>7}")
    for name, mp in sorted(plan.models.items(), key=lambda kv: kv[1].params):
        if not any(c.model == name for c in plan.cells):
            continue
        lines.append(f"{name:<14}{mp.family:<10}{mp.params:>12,}{mp.n_layers:>8}"
                     f"{_human(mp.estimate_bytes):>10}{counts.get((name, 'directions'), 0):>12}"
                     f"{counts.get((name, 'steer'), 0):>8}{counts.get((name, 'patch'), 0):>7}"
                     f"{counts.get((name, 'scrub'), 0):>7}")
    steer = plan.spec.stages.steer
    if steer is not None:
        add = steer.addition
        lines.append(f"addition: layers {add.layers if add else '-'}, coefficients {add.coefficients if add else '-'}; "
                     f"ablation: alphas {steer.ablation.alphas if steer.ablation else '-'}; "
                     f"controls: {steer.controls}")
    patch, scrub = plan.spec.stages.patch, plan.spec.stages.scrub
    if patch is not None:
        lines.append(f"patch: sites {patch.sites} at layers {patch.layers}, positions {patch.positions}, "
                     f"{patch.n_pairs} pairs; attribution screen: {patch.attribution}, exact: "
                     f"{'top ' + str(patch.confirm_top_k) if patch.confirm_top_k else 'every site'}")
    if scrub is not None:
        lines.append(f"scrub: {len(scrub.hypotheses)} hypotheses against {scrub.scrubbed}, {scrub.n_pairs} examples x "
                     f"{scrub.resamples} resamples, threshold {scrub.threshold}")
    lines.append("placement (refusal_ray/cluster/placement.py):")
    for line in placement_lines(plan):
        lines.append(f"  {line}")
    lines += memory_warnings(plan)
    lines += scrub_warnings(plan)
    return "\n".join(lines)


def placement_lines(plan: Plan) -> list[str]:
    """Each model's placement on a cluster with GPUs and on a CPU-only one (no feasibility check)."""
    from refusal_ray.cluster.placement import place

    res = plan.spec.resources
    out = []
    for m in plan.spec.models:
        mp = plan.models[m.name]
        on_gpus, cpu_only = (place(m, mp.params, mp.estimate_bytes, res, cluster, res.highmem_params, check=False)
                             for cluster in ({"GPU": 1}, {}))
        offload = ("offload auto" if offload_mode(m, mp.params, res.highmem_params) == "auto" else "no offload")
        out.append(f"{m.name}: with GPUs {on_gpus.describe()}; CPU-only {cpu_only.describe()}; {offload}")
    return out


def offload_mode(model, params: int, threshold: float) -> str:
    """'auto' or 'off': the spec's `offload`, else 'auto' for models of `threshold` parameters or
    more (accelerate device_map auto with a disk folder); an explicit device_map means 'off'."""
    if model.device_map is not None:
        return "off"
    if model.offload is not None:
        return model.offload
    return "auto" if params >= threshold else "off"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}PiB"
