"""Pydantic models of a sweep spec (YAML), and loading with one-line errors.

Every model forbids unknown keys; every default is documented in the JSON Schema
(`refusal-ray schema`). Checks that need the file system (prompt files, model configs, layer
ranges) live in `refusal_ray.validate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import (BaseModel, Discriminator, Field, Tag, ValidationError, field_validator, model_serializer,
                      model_validator)

from refusal_ray import ops
from refusal_ray.errors import SpecError
from refusal_ray.judges.base import content_hash
from refusal_ray.judges.config import INLINE, QUESTION_TEXT, REFUSED, JudgeSpec, check_names, question
# the spec building blocks the stage blocks share live below the stages (re-exported here: old imports work)
from refusal_ray.ops.base import CONTROLS_HELP, Controls, LayerList, NegativePositions, Strict, n_draws  # noqa: F401
from refusal_ray.ops.base import _controls  # noqa: F401
from refusal_ray.ops.base import negative as _negative  # noqa: F401
from refusal_ray.ops.base import no_duplicates as _no_duplicates
from refusal_ray.stages import STAGES


class ModelResources(Strict):
    """Per-model override of the placement rule (refusal_ray/pipeline/placement.py)."""

    num_cpus: float | None = Field(None, gt=0, description="CPUs for this model's worker.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs (fractions share one GPU; 0: CPU only).")
    highmem: bool | None = Field(None, description="Ask for the `highmem` custom resource (None: by size).")


class ModelSpec(Strict):
    """One model of the sweep. Exactly one of `path` (local directory) or `hub_id`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Short unique name; the store's partition key.")
    path: str | None = Field(None, description="Local directory with config.json and safetensors weights "
                                               "(relative paths are resolved against the working directory).")
    hub_id: str | None = Field(None, description="Hugging Face hub id (needs network).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights and compute dtype.")
    device: str = Field("auto", description="'auto' (a GPU when the worker has one, else CPU), 'cpu', 'cuda'.")
    quantization: Literal["8bit", "4bit"] | None = Field(None, description="bitsandbytes loading.")
    device_map: str | dict[str, str | int] | None = Field(None, description="accelerate device_map.")
    max_memory: dict[str, str] | None = Field(None, description="accelerate max_memory per device.")
    offload_folder: str | None = Field(None, description="Folder for accelerate disk offload.")
    trust_remote_code: bool = Field(False, description="Run the model repository's own code (off by default).")
    chat_template: str | None = Field(None, description="Jinja chat template replacing the tokenizer's own: the "
                                                        "template text, or a .jinja/.txt file. Needed for base models "
                                                        "(no template); the study specs use the studies' templates.")
    attn_implementation: Literal["eager", "sdpa"] | None = Field(None, description="Attention kernel.")
    resources: ModelResources | None = Field(None, description="Override the automatic placement.")
    offload: Literal["auto", "off"] | None = Field(
        None, description="accelerate offloading: 'auto' (device_map auto, spilling to a temporary disk folder), "
                          "'off', or None: 'auto' for models of resources.highmem_params or more parameters "
                          "placed on CPU, else 'off'. An explicit device_map wins.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("give exactly one of 'path' or 'hub_id'")
        return self

    @property
    def source(self) -> str:
        return self.path if self.path is not None else self.hub_id


_Where = str | bool | int | float   # a `where` value; refusal_ray.data.files.where_text compares them as text


class PromptFile(Strict):
    """A prompt set file: JSONL, JSON array, CSV or Parquet (by extension)."""

    path: str = Field(description="File path (relative paths: against the working directory).")
    instruction_column: str = Field("instruction", description="Column holding the user instruction.")
    id_column: str | None = Field("id", description="Row id column (None: row number).")
    split_column: str | None = Field("split", description="Column with train/val/test; None: split at random per seed.")
    reference_column: str | None = Field(None, description="Correct answer column (harmless tasks), for exact-match accuracy.")
    pair_column: str | None = Field(None, description="Column pairing each harmful row with its harmless twin "
                                                      "(needed by stage `patch`: clean and corrupted inputs).")
    category_column: str | None = Field(None, description="Column with each row's category (e.g. the paper's "
                                                          "`category`), carried into the completions table. Absent "
                                                          "from the spec's dump and hash when None.")
    where: dict[str, _Where | list[_Where]] | None = Field(None, description="Keep only the rows whose column holds "
                                                                      "one of these values (text, number or boolean, "
                                                                      "compared as text), e.g. XSTest's "
                                                                      "{label: unsafe}. Absent from the dump when "
                                                                      "None.")

    @model_serializer(mode="wrap")
    def _absent_when_unset(self, handler):
        out = handler(self)
        for key in ("category_column", "where"):   # specs written before the fields keep their dump and hash
            if getattr(self, key) is None:
                out.pop(key, None)
        return out


_HF_DATASET = ("A Hugging Face `datasets` source (needs `pip install 'refusal-ray[datasets]'`): a folder written by "
               "`save_to_disk`, a local data file or folder (.parquet, .arrow, .csv, .json/.jsonl), a builder name "
               "with `data_files` (e.g. `parquet`), or a hub dataset name (read when the hub is reachable).")


class _SplitColumns(Strict):
    """The columns of one split's source (its split is the key it is given under: no split column)."""

    instruction_column: str = Field("instruction", description="Column holding the user instruction.")
    id_column: str | None = Field(None, description="Row id column (None: the row number in the canonical merged "
                                                    "form, train then val then test rows).")
    reference_column: str | None = Field(None, description="Correct answer column (harmless tasks).")
    pair_column: str | None = Field(None, description="Column pairing each harmful row with its harmless twin.")
    category_column: str | None = Field(None, description="Column with each row's category, carried into the "
                                                          "completions table.")
    where: dict[str, _Where | list[_Where]] | None = Field(None, description="Keep only the rows whose column holds "
                                                                      "one of these values (text, number or boolean, "
                                                                      "compared as text), e.g. XSTest's "
                                                                      "{label: unsafe}.")
    split_column: str | None = Field(None, exclude=True, description="Not allowed: the split is the key.")

    @field_validator("split_column")
    @classmethod
    def _no_split_column(cls, v):
        if v is not None:
            raise ValueError("a per-split source takes its split from its key (train/val/test); drop split_column, "
                             "or give one file with a split column as data.<class>: {path: ..., split_column: ...}")
        return v


class SplitFile(_SplitColumns):
    """One split of a per-split prompt set, as a file (JSONL, JSON array, CSV or Parquet, by extension)."""

    path: str = Field(description="File path (relative paths: against the working directory).")


class _DatasetFields(Strict):
    dataset: str = Field(description=_HF_DATASET)
    config: str | None = Field(None, description="Dataset configuration (hub datasets; `name` in load_dataset).")
    split: str | None = Field(None, description="The dataset's own split to read (None: its only split, else "
                                                "'train'). Not the prompt set's train/val/test split.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); the resolved commit is "
                                                   "stored in the manifest.")
    data_files: str | list[str] | None = Field(None, description="Local data files for a builder name such as "
                                                                 "`parquet` (load_dataset's data_files).")


class SplitDataset(_SplitColumns, _DatasetFields):
    """One split of a per-split prompt set, as a Hugging Face `datasets` source."""


class DatasetSource(_DatasetFields):
    """A whole prompt set (all splits) as one Hugging Face `datasets` source."""

    instruction_column: str = Field("instruction", description="Column holding the user instruction.")
    id_column: str | None = Field(None, description="Row id column (None: row number).")
    split_column: str | None = Field(None, description="Column with train/val/test; None: split at random per seed.")
    reference_column: str | None = Field(None, description="Correct answer column (harmless tasks).")
    pair_column: str | None = Field(None, description="Column pairing each harmful row with its harmless twin.")
    category_column: str | None = Field(None, description="Column with each row's category.")
    where: dict[str, _Where | list[_Where]] | None = Field(None, description="Keep only the rows whose column holds "
                                                                      "one of these values (text, number or boolean, "
                                                                      "compared as text), e.g. XSTest's "
                                                                      "{label: unsafe}.")


def _split_kind(v) -> str:
    if isinstance(v, dict):
        return "dataset" if "dataset" in v else "file"
    return "dataset" if isinstance(v, SplitDataset) else "file"


SplitSource = Annotated[Union[Annotated[SplitFile, Tag("file")], Annotated[SplitDataset, Tag("dataset")]],
                        Discriminator(_split_kind)]


class SplitSources(Strict):
    """A prompt set given per split, each split its own source with its own columns (Arditi et al.'s
    `dataset/splits/harmful_{train,val,test}.json`). A plain string is a file path. Its rows, fingerprint
    and row ids are those of its canonical merged form (`refusal_ray.data.sources`), so the merged file
    (`refusal-ray prompts merge`) used as one file gives the same draws and cell ids."""

    train: SplitSource
    val: SplitSource
    test: SplitSource

    @model_validator(mode="before")
    @classmethod
    def _paths(cls, data):
        if isinstance(data, dict):
            return {k: {"path": v} if isinstance(v, str) else v for k, v in data.items()}
        return data

    # the columns of the canonical merged form (what the stages' cross-field checks read, as of a PromptFile)
    def _has(self, key: str) -> bool:
        return any(getattr(getattr(self, s), key) is not None for s in SPLIT_KEYS)

    @property
    def instruction_column(self) -> str:
        return "instruction"

    @property
    def split_column(self) -> str:
        return "split"

    @property
    def id_column(self) -> str | None:
        return "id" if self._has("id_column") else None

    @property
    def reference_column(self) -> str | None:
        return "reference" if self._has("reference_column") else None

    @property
    def pair_column(self) -> str | None:
        return "pair" if self._has("pair_column") else None

    @property
    def category_column(self) -> str | None:
        return "category" if self._has("category_column") else None


def _source_kind(v) -> str:
    if isinstance(v, dict):
        return "splits" if any(k in v for k in SPLIT_KEYS) else "dataset" if "dataset" in v else "file"
    return {SplitSources: "splits", DatasetSource: "dataset"}.get(type(v), "file")


SPLIT_KEYS = ("train", "val", "test")
SOURCE_TAGS = ("file", "dataset", "splits")
PromptSource = Annotated[Union[Annotated[PromptFile, Tag("file")], Annotated[DatasetSource, Tag("dataset")],
                               Annotated[SplitSources, Tag("splits")]], Discriminator(_source_kind)]


class DataSpec(Strict):
    harmful: PromptSource = Field(description="The harmful prompt set: one file (`path`, with a split column or "
                                              "split at random), a `datasets` source (`dataset`), or one source "
                                              "per split (`train`, `val`, `test`).")
    harmless: PromptSource = Field(description="The harmless prompt set, in any of the harmful set's forms.")
    n_train: int = Field(64, ge=2, description="Prompts per class sampled for fitting directions, per seed.")
    n_val: int = Field(32, ge=2, description="Prompts per class for separation (Cohen's d), per seed.")
    n_test: int = Field(32, ge=1, description="Prompts per class for steering evaluation, per seed.")


# The `stages:` blocks: one field per registered stage (`refusal_ray.stages.STAGES`, its `Stage.block`), in
# `STAGES.by_block_order()`, set by `_sync_stage_fields`. A stage with `block_default` (directions) always
# has its block (its defaults when the spec omits it); every other block defaults to None (the stage is off).
# (No docstring: the JSON schema of `Stages` stays as it was.)
class Stages(Strict):
    @model_serializer(mode="wrap")
    def _absent_when_unset(self, handler):
        # a stage newer than the stored specs (not in BLOCK_ORDER) is absent from the dump when off, so the
        # spec hashes of before stay
        from refusal_ray.stages import BLOCK_ORDER

        out = handler(self)
        for name in [n for n, v in out.items() if v is None and n not in BLOCK_ORDER]:
            out.pop(name)
        return out


class Generation(Strict):
    max_new_tokens: int = Field(32, ge=1, le=4096)
    greedy: Literal[True] = Field(True, description="Greedy decoding (sampling is not supported).")


class ChatSpec(Strict):
    """How instructions become prompts (refusal_ray/models/chat.py)."""

    system_prompt: str = Field("none", description="'none' (no system text; a template that always emits a "
                                                    "system turn gets an empty one), 'default' (the template's own "
                                                    "default, e.g. Qwen2.5's), or the system message itself.")
    date: str = Field("26 Jul 2024", description="Fixed `date_string` for templates that print a date "
                                                 "(Llama-3.x), so prompts do not change with the day.")


class Judge(Strict):
    """The inline judge: labels every completion as it is generated (completions.refusal, the steering
    rates); named "substring" in judgements, the summary and `decision_rule.judge`."""

    kind: Literal["substring"] = "substring"
    phrases: list[str] | None = Field(None, description="Refusal phrases; None: the documented default list.")


class ControlMarginRule(Strict):
    """Pre-registered replication rule (DESIGN.md)."""

    baseline_min: float = Field(description="Baseline harmful refusal below this: NO-BASELINE-REFUSAL.")
    baseline_margin: float = Field(description="Required shift from baseline.")
    control_margin: float = Field(description="Required shift beyond the random control.")
    addition_coefficient: float = Field(description="Addition arm judged (at the best layer).")
    ablation_alpha: float = Field(description="Ablation arm judged.")
    control_statistic: Literal["mean", "quantile"] | None = Field(
        None, description="What an arm's shift is compared with when its random control has several draws "
                          "(`controls: K`): 'mean' of the draws' shifts, or their 'quantile' (the 0.95 quantile, "
                          "numpy's linear interpolation; the draws' max for K <= 20 is close to it). None: the "
                          "mean (with one draw, that draw: the rule's meaning before K existed). Absent from the "
                          "rule's frozen form and hash when None.")

    @model_serializer(mode="wrap")
    def _absent_when_unset(self, handler):
        out = handler(self)
        if self.control_statistic is None:   # rules written before the field keep their frozen form and hash
            out.pop("control_statistic", None)
        return out


class SteeringLabelsRule(Strict):
    """Audit labels from the refusal-rate curve over coefficients at the best layer."""

    strong: float = Field(description="Shift counted as working fully.")
    weak: float = Field(description="Shift counted as working at all.")


class DecisionRule(Strict):
    """Pre-registered: every threshold is stated in the spec (no defaults) and frozen in the store."""

    control_margin: ControlMarginRule
    steering_labels: SteeringLabelsRule
    judge: str = Field(INLINE, description="The judge whose labels the verdicts read: 'substring' (the inline "
                                           "`judge:` block) or the name of one of `judges`.")


class TrackingSpec(Strict):
    """Optional experiment tracking (refusal_ray/tracking.py): after a run, the spec, the decision rule's hash,
    the summary metrics per model and arm, and the figures are logged. Nothing is imported without it."""

    mlflow: str | None = Field(None, description="MLflow tracking URI: a local file store ('file:./mlruns', "
                                                 "'./mlruns'), a sqlite URI or a tracking server "
                                                 "('http://127.0.0.1:5000'). Needs `pip install mlflow-skinny`.")
    experiment: str | None = Field(None, description="MLflow experiment name (None: the sweep's name).")
    wandb: str | None = Field(None, description="Weights & Biases project. Needs `pip install wandb`; "
                                                "WANDB_MODE=offline keeps the run on this machine.")

    @field_validator("mlflow")
    @classmethod
    def _mlflow_uri(cls, v: str | None) -> str | None:
        import importlib.util
        from urllib.parse import urlsplit

        if v is not None and urlsplit(v).password is not None:
            raise ValueError("credentials in the URI would be stored in the manifest; set "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
        if v is not None and importlib.util.find_spec("mlflow") is None:
            raise ValueError("mlflow is not installed: pip install mlflow-skinny (or 'refusal-ray[tracking]')")
        return v

    @field_validator("wandb")
    @classmethod
    def _wandb_installed(cls, v: str | None) -> str | None:
        import importlib.util

        if v is not None and importlib.util.find_spec("wandb") is None:
            raise ValueError("wandb is not installed: pip install wandb (WANDB_MODE=offline keeps runs local)")
        return v


class Resources(Strict):
    num_cpus: float = Field(1, gt=0, description="CPUs per model worker.")
    num_gpus: float | Literal["auto"] = Field("auto", description="GPUs per worker; 'auto': 1 when the cluster has GPUs.")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per worker (None: num_cpus).")
    highmem_params: float = Field(3e9, gt=0, description="CPU workers of models this big ask for `highmem`.")


class Spec(Strict):
    """A sweep: models x seeds x stages, with a pre-registered decision rule."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    reproduces: Literal["arditi2024"] | None = Field(None, description=(
        "A published pipeline this spec says it reproduces; its defaults apply where the spec is silent. "
        "'arditi2024' (Arditi et al. 2024, run_pipeline.py / config.py): stages.directions.filter_train and "
        "stages.select.filter_val default to true, and stages.select.kl_epsilon to the paper's 1e-6."))
    models: list[ModelSpec] = Field(min_length=1)
    data: DataSpec
    seeds: list[int] = Field([0], min_length=1)
    stages: Stages = Field(default_factory=Stages)
    generation: Generation = Field(default_factory=Generation)
    chat: ChatSpec = Field(default_factory=ChatSpec)
    judge: Judge = Field(default_factory=Judge)
    judges: list[JudgeSpec] = Field([], description="Named judges that label every completion after the stages "
                                                    "(table `judgements`); kinds substring, chat, classifier, "
                                                    "guard, openai.")
    decision_rule: DecisionRule
    resources: Resources = Field(default_factory=Resources)
    tracking: TrackingSpec | None = Field(None, description="Log the run to MLflow and/or Weights & Biases "
                                                            "(None: no tracking, nothing imported).")

    @model_validator(mode="before")
    @classmethod
    def _paper_defaults(cls, data):
        """`reproduces: arditi2024`: the paper's filter_train / filter_val where the spec does not set them."""
        if not isinstance(data, dict) or data.get("reproduces") != "arditi2024":
            return data
        stages = dict(data.get("stages") or {})
        for stage, key, value in (("directions", "filter_train", True), ("select", "filter_val", True),
                                  ("select", "kl_epsilon", 1e-6)):
            block = stages.get(stage, {} if stage == "directions" else None)
            if isinstance(block, dict) and key not in block:
                stages[stage] = block = {**block, key: value}
        return {**data, "stages": stages}

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v):
        _no_duplicates([m.name for m in v], "model name")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @field_validator("judges")
    @classmethod
    def _judge_names(cls, v):
        check_names(v)
        return v

    @model_validator(mode="after")
    def _rule_judge(self):
        names = [INLINE, *(j.name for j in self.judges)]
        name = self.decision_rule.judge
        if name not in names:
            raise ValueError(f"decision_rule.judge {name!r} names no judge "
                             f"(known: {', '.join(names)})")
        kind = {j.name: j.kind for j in self.judges}.get(name)
        rule = self.decision_rule
        if question(kind, "harmless") != REFUSED and (rule.control_margin or rule.steering_labels):
            raise ValueError(f"decision_rule.judge {name!r} is a {kind} judge: its labels on harmless prompts "
                             f"answer {QUESTION_TEXT[question(kind, 'harmless')]!r}, not 'did the model refuse?', "
                             f"and the rule's addition arm and induction curve are judged there")
        return self

    @model_validator(mode="after")
    def _stage_checks(self):
        """Each stage's cross-field checks (`Stage.validate(spec)`, in STAGES order; a ValueError is a spec error)."""
        for stage in STAGES:
            stage.validate(self)
        return self

    def rule_hash(self) -> str:
        """Hash of the decision rule (a rule read under the inline judge hashes as before judges existed)."""
        rule = self.decision_rule
        return _hash(rule.model_dump(mode="json", exclude={"judge"} if rule.judge == INLINE else None))

    def spec_hash(self) -> str:
        """Hash of the spec's dump; fields added later are absent at their default (`_LATER_FIELDS`), so the
        specs written before them keep their hash (and Ray submission id)."""
        dump = self.model_dump(mode="json")
        for key, default in _LATER_FIELDS.items():
            if dump.get(key, default) == default:
                dump.pop(key, None)
        return _hash(dump)


# Top-level spec fields added after specs were hashed: {field: default}; absent from the hashed dump at the default.
_LATER_FIELDS = {"tracking": None}


def _hash(obj) -> str:
    return content_hash(obj)


JUDGE_KINDS = ("substring", "chat", "classifier", "guard", "openai")


def _loc(loc: tuple) -> str:
    """A pydantic error location as a dotted field path (union branches, judge kind and prompt source tags
    dropped)."""
    parts = [p for i, p in enumerate(loc) if not str(p).startswith(("function-after", "literal["))
             and not (p in JUDGE_KINDS and i > 0 and isinstance(loc[i - 1], int))
             and not (p in SOURCE_TAGS and i > 0 and loc[i - 1] in ("harmful", "harmless", *SPLIT_KEYS))]
    return ".".join(str(p) for p in parts)


def load_spec(path: str | Path) -> Spec:
    """Parse and validate a spec file. Raises SpecError('<file>: <field>: <problem>')."""
    return load_yaml(path, Spec, "a spec")


def load_judges(path: str | Path) -> list:
    """The judges of a `refusal-ray judge --judges FILE` (a YAML mapping with a `judges:` list).
    Raises SpecError('<file>: <field>: <problem>')."""
    from refusal_ray.judges.config import JudgesFile

    return list(load_yaml(path, JudgesFile, "a judges file").judges)


def load_yaml(path: str | Path, model: type[BaseModel], what: str):
    """Parse a YAML file into `model` with one-line errors naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), "", f"{what.removeprefix('a ').removesuffix(' file')} file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise SpecError(str(path), where, f"YAML syntax error: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise SpecError(str(path), "", f"{what} must be a YAML mapping")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        loc = _loc(err["loc"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "union_tag_not_found":
            loc, msg = f"{loc}.kind", f"missing; one of {', '.join(JUDGE_KINDS)}"
        elif err["type"] == "union_tag_invalid":
            ctx = err.get("ctx", {})
            loc, msg = f"{loc}.{ctx.get('discriminator', 'kind').strip(chr(39))}", \
                f"unknown kind {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
        raise SpecError(str(path), loc, msg) from None


# -- the stages' blocks ------------------------------------------------------------------------------------
def _sync_stage_fields() -> None:
    """Give `Stages` one field per registered stage (`STAGES.by_block_order()`): `<name>: block` with the
    block's defaults for a stage with `block_default`, else `<name>: block | None = None`; then rebuild
    `Stages` and `Spec`. Called at import and after every change of the stages (`STAGES.register`) or of
    the operators (`ops.register`: stage steer rebuilds its block's operator fields first)."""
    from pydantic.fields import FieldInfo

    fields, notes = {}, {}
    for stage in STAGES.by_block_order():
        if stage.block is None:
            raise RuntimeError(f"stage {stage.name!r} declares no spec block (Stage.block)")
        ann = stage.block if stage.block_default else stage.block | None
        fields[stage.name] = FieldInfo.from_annotated_attribute(
            ann, Field(default_factory=stage.block) if stage.block_default else None)
        notes[stage.name] = ann
    Stages.__pydantic_fields__ = fields
    Stages.__annotations__ = notes
    for model in (Stages, Spec):
        model.model_rebuild(force=True)


_sync_stage_fields()
ops.on_change(_sync_stage_fields)
STAGES.on_change(_sync_stage_fields)


def __getattr__(name: str):
    """Old import paths of the stages' block classes (`from refusal_ray.spec import SteerStage`): a name
    defined by a registered stage's declaration module (the module of its `Stage.block`)."""
    import sys

    for stage in STAGES:
        module = sys.modules.get(getattr(stage.block, "__module__", ""))
        if module is not None and name in vars(module):
            return vars(module)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
