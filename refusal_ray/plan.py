"""Plan a sweep without loading weights: check inputs, expand cells, estimate memory.

Everything here runs before the store is touched, so bad input exits 2 with nothing written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pandas as pd

from refusal_ray.data import (SPLITS, SourceUnreachable, data_fingerprint, load_source, prompt_fingerprint,
                              split_prompts)
from refusal_ray.data.sources import UNCHECKED_DATA
from refusal_ray.errors import SpecError
from refusal_ray.grid import Cell, expand
from refusal_ray.models.loading import bnb_4bit_cpu_problem, read_config, safetensors_problem
from refusal_ray.models.sites import UnsupportedFamilyError, layout_for
from refusal_ray.spec import Spec, load_spec
from refusal_ray.stages import STAGES

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
    positions: list[int] = field(default_factory=lambda: [-1])   # direction positions, resolved
    chat: dict = field(default_factory=dict)   # rendered example, stop tokens, generation settings
    chat_template: str | None = None   # the spec's chat_template as text (a file read), None: the tokenizer's
    refusal_tokens: dict = field(default_factory=dict)   # the refusal score's tokens and epsilon ({}: no stage reads them)


@dataclass
class Plan:
    spec: Spec
    spec_file: str
    models: dict[str, ModelPlan]
    frames: dict[str, tuple[pd.DataFrame, object]]   # class -> (rows, PromptFile or the canonical form's Columns)
    data_fingerprint: str
    prompts: dict = field(default_factory=dict)       # seed -> split -> class -> PromptSet (drawn once)
    cells: list[Cell] = field(default_factory=list)
    fingerprints: dict = field(default_factory=dict)  # model -> seed -> prompt fingerprint (files + rendered ids)
    unchecked: list[str] = field(default_factory=list)  # what an offline validate could not check
    data_sources: dict = field(default_factory=dict)  # class -> where its prompts came from (the manifest's record)

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
        cls = HubUnreachable if m.path is None and _unreachable(e) else SpecError
        raise cls(spec_file, f"{field_}.{'path' if m.path else 'hub_id'}",
                  f"cannot read config: {e}".splitlines()[0]) from None
    text = config.get("text_config") or config
    try:
        layout_for(text.get("model_type", "?"))
    except UnsupportedFamilyError as e:
        raise SpecError(spec_file, f"{field_}.path", str(e)) from None
    problem = m.quantization == "4bit" and m.device == "cpu" and bnb_4bit_cpu_problem(config)
    if problem:
        raise SpecError(spec_file, f"{field_}.quantization", problem)
    problem = m.path is not None and safetensors_problem(m.path)   # hub ids: checked when a worker loads them
    if problem:
        raise SpecError(spec_file, f"{field_}.path", problem)
    n_layers = text.get("num_hidden_layers") or text.get("n_layer")
    d_model = text.get("hidden_size") or text.get("n_embd")
    n_heads = text.get("num_attention_heads") or text.get("n_head") or 1
    params = count_params(config)
    bpp = BYTES_PER_PARAM[m.quantization or m.dtype]
    weight_bytes = int(params * bpp)
    return ModelPlan(m.name, n_layers, d_model, params, weight_bytes, int(weight_bytes * 1.2), text["model_type"],
                     n_heads)


class HubUnreachable(SpecError):
    """A hub model's config could not be fetched: no network, or HF_HUB_OFFLINE set."""


def _unreachable(e: Exception) -> bool:
    text = f"{type(e).__name__}: {e}".lower()
    return any(k in text for k in ("couldn't connect", "offline", "localentrynotfound", "connection",
                                   "name or service not known", "cached files"))


# What validate cannot check for a hub model whose config it cannot fetch
UNCHECKED_MODEL = "config, layer lists, tokenizer and chat template, weight format, placement"


def _chat(plan: Plan, i: int, mp: ModelPlan, instructions: list[str]):
    """Resolve the model's prompts: tokenizer and template (the spec's `chat_template` replaces the
    tokenizer's own), post-instruction positions, stop tokens and generation settings (into
    `mp.positions`, `mp.chat` and `mp.chat_template`); then each enabled stage's `check_model`;
    returns the tokenizer. Raises SpecError naming the field."""
    from transformers import AutoTokenizer, GenerationConfig

    from refusal_ray.models.chat import (ChatOptions, NoTemplateError, TemplateError, default_system_prompt,
                                         effective_settings, end_of_turn_id, greedy_config, post_instruction_ids,
                                         post_instruction_positions, render, resolve_chat_template)

    spec, spec_file = plan.spec, plan.spec_file
    m, field_ = spec.models[i], f"models.{i}.{'path' if spec.models[i].path else 'hub_id'}"
    template_field = f"models.{i}.chat_template"
    options = ChatOptions(**spec.chat.model_dump())
    try:
        template = resolve_chat_template(m.chat_template)
    except TemplateError as e:   # a template file that does not exist
        raise SpecError(spec_file, template_field, str(e)) from None
    try:
        tok = AutoTokenizer.from_pretrained(m.source, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - missing or broken tokenizer files
        raise SpecError(spec_file, field_, f"cannot load the tokenizer: {e}".splitlines()[0]) from None
    if template is not None:
        tok.chat_template = template
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    try:
        gen = GenerationConfig.from_pretrained(m.source, revision=m.revision)
    except Exception:  # noqa: BLE001 - no generation_config.json: the tokenizer's EOS and the template's
        gen = None
    where = template_field if template is not None else field_   # whose template it is
    try:
        example = render(tok, instructions[:1], options)[0]
        post_instruction_ids(tok, options)   # raises when the template leaves out the user's message
        positions = next((p for st in STAGES if st.enabled(spec) and (p := st.positions(spec)) is not None), [-1])
        positions = (post_instruction_positions(tok, options, instructions) if positions == "post_instruction"
                     else list(positions))
    except NoTemplateError:
        raise SpecError(spec_file, field_, f"the tokenizer has no chat template (a base model?): set "
                                           f"{template_field} to the template text or a .jinja/.txt file "
                                           f"(model {m.name!r})") from None
    except TemplateError as e:
        raise SpecError(spec_file, "chat.system_prompt" if "system prompt" in str(e) else where,
                        f"{e} (model {m.name!r})") from None
    except Exception as e:  # noqa: BLE001 - Jinja syntax error, undefined variable, a type error in the template
        line = getattr(e, "lineno", None)
        raise SpecError(spec_file, where, f"the chat template does not render: {type(e).__name__}: "
                                          f"{str(e).splitlines()[0] if str(e) else ''}"
                                          f"{f' (template line {line})' if line else ''} (model {m.name!r})") from None
    mp.positions = positions
    for stage in STAGES:
        if stage.enabled(spec):
            stage.check_model(plan, mp)

    class _Shim:   # greedy_config reads only `generation_config` from the model
        generation_config = gen

    config = greedy_config(_Shim, tok, options, spec.generation.max_new_tokens)
    for stage in STAGES:   # what stages resolve from the tokenizer, e.g. refusal tokens (Stage.resolve_model)
        if stage.enabled(spec):
            for key, value in stage.resolve_model(plan, mp, tok).items():
                setattr(mp, key, value)
    mp.chat_template = template
    mp.chat = {"chat_template": _template_source(m.chat_template, template), "example_prompt": example,
               "default_system_prompt": default_system_prompt(tok, options),
               "end_of_turn_id": end_of_turn_id(tok, options),
               "stop_tokens": [tok.convert_ids_to_tokens(t) for t in config.eos_token_id],
               "generation": effective_settings(config), "options": options.as_dict()}
    return tok


def _template_source(value: str | None, text: str | None) -> str:
    """Where a model's chat template comes from, for the manifest and `plan`: 'tokenizer', or the
    spec's file name or 'spec text', with a hash of the text."""
    if text is None:
        return "tokenizer"
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{'spec text' if value == text else value} (sha256 {digest})"


def check_judges(judges: list, source: str, where: str = "judges") -> None:
    """Checks of local judge checkpoints that need the file system: a directory with config.json and
    safetensors weights, a chat template for chat and guard judges, a classifier's label map
    naming every label of its config. Hub ids are checked when the judge loads. Raises SpecError."""
    import json

    for i, j in enumerate(judges):
        path = getattr(j, "path", None)
        if path is None or not (Path(path).exists() or path.startswith((".", "/", "~"))):
            continue  # substring / openai, or a hub id ("org/name", "gpt2"): checked when the judge loads
        field_ = f"{where}.{i}.path"
        if not Path(path, "config.json").is_file():
            raise SpecError(source, field_, f"{'no config.json in' if Path(path).is_dir() else 'directory not found:'}"
                                            f" {path}")
        problem = safetensors_problem(path)
        if problem:
            raise SpecError(source, field_, problem)
        if j.kind in ("chat", "guard"):
            cfg = Path(path, "tokenizer_config.json")
            has = Path(path, "chat_template.jinja").is_file() or (
                cfg.is_file() and json.loads(cfg.read_text()).get("chat_template"))
            if not has:
                raise SpecError(source, field_, f"the judge's tokenizer has no chat template: {path}")
        if j.kind == "classifier":
            id2label = json.loads(Path(path, "config.json").read_text()).get("id2label") or {}
            unmapped = [n for n in id2label.values() if n not in j.labels]
            if unmapped:
                raise SpecError(source, f"{where}.{i}.labels", f"label {unmapped[0]!r} of the checkpoint is not "
                                f"mapped (its labels: {', '.join(id2label.values())})")


# query keys that carry a secret (MLflow behind a proxy, signed URLs): `token`, `api_key`, `sig`, `X-Amz-Signature`
_SECRET_KEY = re.compile(r"token|secret|passw|pwd|key|sig|auth|credential", re.IGNORECASE)


def uri_credentials(uri: str) -> str | None:
    """What in a tracking URI is a credential: its userinfo ('user@', 'user:pass@') or a query key that
    carries a secret (`_SECRET_KEY`: token, key, api_key, secret, password, access_token, sig, ...); None
    when it holds none."""
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        return "user@ before the host"
    keys = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_KEY.match(k) or _SECRET_KEY.findall(k)]
    return f"query key {keys[0]!r}" if keys else None


def check_tracking(spec: Spec, spec_file: str) -> None:
    """The tracking URI holds no credential (it is logged, and stored in the manifest's spec). Raises
    SpecError naming `tracking.mlflow`."""
    uri = spec.tracking.mlflow if spec.tracking is not None else None
    what = uri_credentials(uri) if uri else None
    if what:
        raise SpecError(spec_file, "tracking.mlflow", f"credentials in the URI ({what}) would be stored in the "
                        f"manifest; set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
                        f"MLFLOW_TRACKING_TOKEN) instead")


def check_calibration(judges: list, source: str, where: str = "judges") -> None:
    """Each judge's `calibration:` file exists (from the driver's working directory, where the run calibrates;
    workers never read it). Raises SpecError naming `<where>.N.calibration`."""
    for i, j in enumerate(judges):
        path = getattr(j, "calibration", None)
        if path is not None and not Path(path).is_file():
            raise SpecError(source, f"{where}.{i}.calibration", f"calibration file not found: {path}")


def _model_plans(spec: Spec, spec_file: str, offline_ok: bool, unchecked: list[str]) -> dict[str, ModelPlan]:
    """Every model's plan (config, layers, parameters), then the judges' checks. offline_ok: a hub model
    whose config cannot be fetched is left out and listed in `unchecked` instead of failing."""
    models = {}
    for i, m in enumerate(spec.models):
        try:
            models[m.name] = _model_plan(spec, spec_file, i)
        except HubUnreachable:
            if not offline_ok:
                raise
            unchecked.append(f"models.{i} ({m.hub_id}): {UNCHECKED_MODEL}")
    check_judges(spec.judges, spec_file)
    check_calibration(spec.judges, spec_file)
    return models


def make_plan(spec_file: str | Path, only_models: list[str] | None = None, offline_ok: bool = False) -> Plan:
    """Load, check and expand a spec. Raises SpecError (exit 2) on any bad input.

    offline_ok (`refusal-ray validate`): a hub model whose config cannot be fetched (no network) is
    left out instead of failing, and `plan.unchecked` lists what could not be checked for it
    ("models.N (hub id): ..."); the plan then holds the cells of the other models only."""
    spec_file = str(spec_file)
    spec = load_spec(spec_file)
    check_tracking(spec, spec_file)
    if only_models:
        unknown = [n for n in only_models if n not in {m.name for m in spec.models}]
        if unknown:
            raise SpecError("--models", "", f"unknown model {unknown[0]!r}; the spec has "
                                            f"{', '.join(m.name for m in spec.models)}")
    loaded, unchecked = {}, []
    for cls in ("harmful", "harmless"):
        try:
            loaded[cls] = load_source(getattr(spec.data, cls), f"data.{cls}", spec_file)
        except SourceUnreachable as e:
            if not offline_ok:
                raise
            unchecked.append(f"{e.field} ({e.problem.split(':')[0]}): {UNCHECKED_DATA}")
    if unchecked:   # a hub dataset offline (validate): check the models and judges, draw nothing
        return _undrawn(spec, spec_file, offline_ok, unchecked)
    frames = {cls: (x.frame, x.columns) for cls, x in loaded.items()}
    drawn: dict = {}
    for cls, (df, pf) in frames.items():
        for seed in spec.seeds:
            try:
                drawn[(cls, seed)] = split_prompts(df, pf, spec.data, seed)
            except ValueError as e:
                raise SpecError(spec_file, f"data.{cls}", str(e)) from None
    prompts = {seed: {split: {cls: drawn[(cls, seed)][split] for cls in frames} for split in SPLITS}
               for seed in spec.seeds}
    models = _model_plans(spec, spec_file, offline_ok, unchecked)
    instructions = sorted({x for seed in prompts.values() for split in seed.values() for ps in split.values()
                           for x in ps.instructions})
    fp = data_fingerprint(x.fingerprint for x in loaded.values())   # two single files: as before
    plan = Plan(spec, spec_file, models, frames, fp, prompts, unchecked=unchecked,
                data_sources={cls: x.provenance for cls, x in loaded.items()})
    tokenizers = {m.name: _chat(plan, i, models[m.name], instructions) for i, m in enumerate(spec.models)
                  if m.name in models}
    for stage in STAGES:
        if stage.enabled(spec):
            stage.prepare(plan)
            stage.check(plan)
    from refusal_ray.models.chat import ChatOptions

    options = ChatOptions(**spec.chat.model_dump())
    plan.fingerprints = {n: {seed: prompt_fingerprint(fp, tokenizers[n], prompts[seed], options) for seed in prompts}
                         for n in models}
    cells = expand(spec, models, plan.fingerprints) if models else []
    plan.cells = [c for c in cells if not only_models or c.model in only_models]
    return plan


def _undrawn(spec: Spec, spec_file: str, offline_ok: bool, unchecked: list[str]) -> Plan:
    """The plan of a validate whose prompt sets include a hub dataset it cannot reach: no prompts drawn, no
    cells; the models (those it can read) and judges checked, and each enabled stage's `check` (layers,
    operator blocks: what needs the models, not the prompts). The draws (`prepare`) and the tokenizer
    checks need the rows: listed in `unchecked`."""
    models = _model_plans(spec, spec_file, offline_ok, unchecked)
    plan = Plan(spec, spec_file, models, {}, "", unchecked=unchecked)
    for stage in STAGES:
        if stage.enabled(spec):
            stage.check(plan)
    return plan


def settings_payload(plan: Plan) -> dict:
    """What every worker needs of the spec: each stage's settings block (None when disabled), and
    the generation / judge / chat blocks, as plain dicts."""
    s = plan.spec
    return {**{st.name: st.settings(s) for st in STAGES}, "generation": s.generation.model_dump(mode="json"),
            "judge": s.judge.model_dump(mode="json"), "chat": s.chat.model_dump(mode="json")}


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
    """Human-readable plan: cells per stage and model, layers, positions, memory estimates, prompts."""
    done = done or set()
    counts = plan.counts()
    stages = [s for s in STAGES if s.enabled(plan.spec)]
    lines = [f"sweep {plan.spec.name} (submission id {plan.submission_id()}): {len(plan.cells)} cells "
             f"({sum(c.id in done for c in plan.cells)} already done), seeds {plan.spec.seeds}"]
    lines.append(f"{'model':<14}{'family':<10}{'params':>12}{'layers':>8}{'memory':>10}"
                 + "".join(f"{s.name:>12}" for s in stages))
    for name, mp in sorted(plan.models.items(), key=lambda kv: kv[1].params):
        if not any(c.model == name for c in plan.cells):
            continue
        lines.append(f"{name:<14}{mp.family:<10}{mp.params:>12,}{mp.n_layers:>8}{_human(mp.estimate_bytes):>10}"
                     + "".join(f"{counts.get((name, s.name), 0):>12}" for s in stages))
    for s in stages:
        lines += s.describe(plan)
    lines.append("prompts and generation (refusal_ray/models/chat.py):")
    for name, mp in plan.models.items():
        c = mp.chat
        lines.append(f"  {name}: chat template {c.get('chat_template', 'tokenizer')}; "
                     f"direction positions {mp.positions}; stop tokens {c.get('stop_tokens')}; "
                     f"system prompt {plan.spec.chat.system_prompt!r} (template default: "
                     f"{c.get('default_system_prompt')!r}); example {c.get('example_prompt')!r}")
    if plan.spec.judges:
        lines.append(f"judges (table judgements; the pre-registered verdict judge is "
                     f"{plan.spec.decision_rule.judge!r}):")
        for j in plan.spec.judges:
            lines.append(f"  {j.name}: {j.kind}" + (f" {j.path}" if getattr(j, "path", None) else "")
                         + (f" {j.model} at {j.base_url}" if j.kind == "openai" else "") + f" (hash {j.judge_hash()})")
    lines.append("placement (refusal_ray/pipeline/placement.py):")
    for line in placement_lines(plan):
        lines.append(f"  {line}")
    lines += memory_warnings(plan)
    lines += [f"not checked before the run: {line}" for line in plan.unchecked]
    return "\n".join(lines)


def placement_lines(plan: Plan) -> list[str]:
    """Each model's placement on a cluster with GPUs and on a CPU-only one (no feasibility check)."""
    from refusal_ray.pipeline.placement import place

    res = plan.spec.resources
    out = []
    for m in plan.spec.models:
        mp = plan.models[m.name]
        on_gpus, cpu_only = (place(m, mp.params, mp.estimate_bytes, res, cluster, res.highmem_params, check=False)
                             for cluster in ({"GPU": 1}, {}))
        offload = ("offload auto" if offload_mode(m, mp.params, res.highmem_params) == "auto" else "no offload")
        out.append(f"{m.name}: with GPUs {on_gpus.describe()}; CPU-only {cpu_only.describe()}; {offload}")
    return out


def model_payload(plan: Plan, name: str, placement=None) -> dict:
    """What a worker needs to load model `name` (its spec block, resolved paths, positions, template
    text); `placement` resolves `device: auto` (None: the session decides, as `run_local` does)."""
    m = next(m for m in plan.spec.models if m.name == name)
    payload = m.model_dump(mode="json")
    if m.path is not None:
        payload["abs_path"] = os.path.abspath(m.path)
    if m.device == "auto" and placement is not None:
        payload["device"] = placement.device
    payload["offload"] = offload_mode(m, plan.models[name].params, plan.spec.resources.highmem_params)
    payload["positions"] = plan.models[name].positions
    if plan.models[name].chat_template is not None:   # the text, so no worker needs the template file
        payload["chat_template"] = plan.models[name].chat_template
    return payload


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

