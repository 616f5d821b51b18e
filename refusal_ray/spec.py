"""Pydantic models of a sweep spec (YAML), and loading with one-line errors.

Every model forbids unknown keys; every default is documented in the JSON Schema
(`refusal-ray schema`). Checks that need the file system (prompt files, model configs, layer
ranges) live in `refusal_ray.validate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_serializer, model_validator)

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
    """Per-model override of the placement rule (refusal_ray/cluster/placement.py)."""

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


class PromptFile(Strict):
    """A prompt set file: JSONL, CSV or Parquet (by extension)."""

    path: str = Field(description="File path (relative paths: against the working directory).")
    instruction_column: str = Field("instruction", description="Column holding the user instruction.")
    id_column: str | None = Field("id", description="Row id column (None: row number).")
    split_column: str | None = Field("split", description="Column with train/val/test; None: split at random per seed.")
    reference_column: str | None = Field(None, description="Correct answer column (harmless tasks), for exact-match accuracy.")
    pair_column: str | None = Field(None, description="Column pairing each harmful row with its harmless twin "
                                                      "(needed by stage `patch`: clean and corrupted inputs).")


class DataSpec(Strict):
    harmful: PromptFile
    harmless: PromptFile
    n_train: int = Field(64, ge=2, description="Prompts per class sampled for fitting directions, per seed.")
    n_val: int = Field(32, ge=2, description="Prompts per class for separation (Cohen's d), per seed.")
    n_test: int = Field(32, ge=1, description="Prompts per class for steering evaluation, per seed.")


SiteKind = Literal["resid_pre", "resid_post"]


class DirectionsStage(Strict):
    """Difference of means (Arditi et al. 2024, Sec. 2.1) at every layer x position."""

    sites: list[SiteKind] = Field(["resid_pre"], min_length=1, description="Residual sites to fit at.")
    positions: Literal["post_instruction"] | Annotated[NegativePositions, Field(min_length=1)] = Field(
        "post_instruction", description="'post_instruction': every token the chat template puts after the "
                                        "instruction (found by rendering the template); or negative offsets "
                                        "from the end (-1: last token of the chat template).")
    filter_train: bool = Field(False, description="Arditi's train filtering: drop harmful train prompts the model "
                                                  "does not refuse and harmless ones it does (refusal score > 0 "
                                                  "counts as refusing); the counts are stored.")
    pairing: Literal["paired", "random"] | None = Field(
        None, description="Which harmless prompts a seed fits on. None: each class drawn from its train split with "
                          "the seed (on row-aligned files such as the toy data this draws the harmful prompts' "
                          "twins); 'paired': the minimal-pair twins of the harmful train prompts (data.*.pair_column); "
                          "'random': a draw independent of the harmful one (seeded), as in the Qwen-1.8B study's "
                          "paired vs random comparison.")
    compare_sequential: bool = Field(False, description="Also refit every direction one prompt at a time (no "
                                                        "padding) and store its cosine to the batched fit "
                                                        "(`sequential_cosine`).")
    batch_size: int = Field(64, ge=1, description="Prompts per forward pass.")

    @field_validator("positions", mode="before")
    @classmethod
    def _positions(cls, v):
        if isinstance(v, list) and v and all(isinstance(p, int) for p in v):
            return _negative(v)
        if v != "post_instruction":
            raise ValueError("positions: 'post_instruction' or a list of negative offsets (e.g. [-1])")
        return v


class SelectStage(Strict):
    """Causal direction selection (Arditi et al. 2024, Sec. 2.3 and App. C), every candidate as batch rows.

    Candidates: every layer x position of stages.directions at resid_pre. Scores on the val split:
    bypass (mean refusal score of harmful prompts with the unit direction ablated at every layer),
    induce (mean refusal score of harmless prompts with the direction added at its own layer),
    KL (mean first-token KL(baseline || ablated) on harmless prompts).
    """

    layers: LayerList = Field("all", description="Candidate layers ('all', Arditi's choice, or a list: fewer "
                                                    "candidates on big models).")
    criterion: Literal["bypass", "swing", "separation"] = Field(
        "bypass", description="'bypass': lowest bypass score (Arditi); 'swing': largest validation refusal-rate "
                              "swing (the pre-registered replication's; rates by refusal score > 0); "
                              "'separation': highest Cohen's d (the old 'best').")
    max_layer_fraction: float | None = Field(0.8, gt=0, le=1, description=(
        "Drop candidates at layers >= int(max_layer_fraction * n_layers), as Arditi et al.'s code prunes "
        "layer >= int(n_layers * (1 - 0.2)) (e.g. 16 layers: 0..11 kept; None: keep all)."))
    kl_max: float | None = Field(0.1, ge=0, description="Drop candidates whose ablation KL is above this (None: keep).")
    induce_min: float | None = Field(0.0, description="Drop candidates whose induce score is below this (None: keep).")
    fallback: Literal["bypass", "swing", "separation"] | None = Field(
        None, description="When no candidate passes the filters: None selects nothing (ablation arms that need "
                          "the selected direction are skipped and the verdict says NO-SELECTION); a criterion "
                          "picks among the scored candidates by it (never a NaN or zero-norm one), marked as a "
                          "fallback in the table and summary.")
    filter_val: bool = Field(False, description=(
        "Arditi et al.'s validation filtering (their default): score candidates only on the harmful val "
        "prompts the model refuses and the harmless ones it does not (refusal score > 0 / < 0, unedited); "
        "the kept counts are stored. Default true on specs with `reproduces: arditi2024`."))
    refusal_tokens: Literal["family", "judge_phrases"] | Annotated[list[str | int], Field(min_length=1)] = Field(
        "family", description=(
            "The refusal first tokens the refusal score reads. 'family': Arditi et al.'s per-family tokens "
            "(Llama 'I', Qwen 'I'/'As', Gemma 'I'; 'I' for families the paper has no file for; "
            "refusal_ray/models/refusal_tokens.py); 'judge_phrases': the first token of each substring-judge "
            "phrase (this tool's definition before v0.2); or a list of one-token strings and/or token ids."))
    refusal_score_epsilon: float = Field(1e-8, ge=0, description=(
        "epsilon of the refusal score log(p + eps) - log(1 - p + eps) (Arditi et al.'s code: 1e-8, which "
        "caps a prompt's score near +-18.4); 0: the unbounded log p - log(1 - p)."))
    kl_epsilon: float = Field(0.0, ge=0, description=(
        "0: the exact first-token KL. 1e-6: Arditi et al.'s kl_div_fn smoothing, sum P_base (log(P_base + eps) - "
        "log(P_abl + eps)), which reads 1-3% lower (the paper-compat switch; default with reproduces: arditi2024)."))
    batch_size: int = Field(256, ge=1, description="Rows (candidate x prompt) per forward pass.")


class SteerStage(Strict):
    """Stage steer: one optional block per registered operator (`refusal_ray.ops.OPS`; `stages.steer.<name>`,
    added by `_sync_operator_fields`), and the settings every arm shares."""

    controls: "Controls" = Field(True, description=CONTROLS_HELP)
    position: int = Field(-1, description="Direction position used for steering (one of directions.positions).")
    batch_size: int = Field(256, ge=1, description="Rows (arm x prompt) per generate call.")

    @model_serializer(mode="wrap")
    def _absent_when_unset(self, handler):
        out = handler(self)
        for op in ops.OPS:   # a block of an operator newer than the stored specs is absent when None
            if not op.dump_when_none and out.get(op.name, 0) is None:
                out.pop(op.name)
        return out


STEER_SETTINGS = ("controls", "position", "batch_size")


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


def _check_patterns(patterns: list[str]) -> list[str]:
    from refusal_ray.models.patterns import check_syntax

    for p in patterns:
        check_syntax(p)  # PatternError is a ValueError: pydantic reports it with the field
    return patterns


class Hypothesis(Strict):
    """A circuit hypothesis: the sites it says carry the behaviour (kept at their harmful-run values)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    protected: list[str] = Field(description="Site patterns, e.g. 'blocks.{9,10}.attn.hook_z', "
                                             "'blocks.3.attn.hook_z[0,2]' (heads), 'blocks.*.hook_mlp_out'; "
                                             "an empty list protects nothing.")

    @field_validator("protected")
    @classmethod
    def _syntax(cls, v):
        return _check_patterns(v)


class ScrubStage(Strict):
    """Causal scrubbing as the audits define it: resample ablation of the hypothesis' complement."""

    hypotheses: list[Hypothesis] = Field(min_length=1)
    scrubbed: list[str] = Field(["blocks.*.attn.hook_z", "blocks.*.hook_resid_post"], min_length=1,
                                description="Site patterns resampled unless protected (default: the audit's).")
    n_pairs: int = Field(8, ge=1, description="Harmful examples (from the test split), per seed.")
    answer_tokens: int = Field(8, ge=1, description="Greedy answer prefix scored after the prompt.")
    resamples: int = Field(1, ge=1, description="Resampled harmless inputs per example (seeded).")
    threshold: float = Field(0.5, gt=0, le=1, description="Faithfulness exp(-mean KL) at or above this: FAITHFUL.")
    batch_size: int = Field(48, ge=1, description="Rows per forward pass.")

    @field_validator("scrubbed")
    @classmethod
    def _syntax(cls, v):
        return _check_patterns(v)

    @field_validator("hypotheses")
    @classmethod
    def _unique(cls, v):
        _no_duplicates([h.name for h in v], "hypothesis name")
        return v


def capability_arm_kinds() -> list[str]:
    """The arm kinds `stages.capability.arms` accepts: baseline, every operator, their weight arms."""
    return ["baseline", *ops.OPS.modes()]


def _arm_kinds(v: list[str] | None) -> list[str] | None:
    known = capability_arm_kinds()
    for a in v or []:
        if a not in known:
            listed = ", ".join(repr(k) for k in known[:-1]) + f" or {known[-1]!r}"
            raise ValueError(f"Input should be {listed}")
    return v


CapabilityArmKind = str


class TextSet(Strict):
    """Held-out text for the cross-entropy loss (Arditi et al. 2024, Sec. 4.2 and App. G: CE on held-out
    text, and on chat completions after their instruction)."""

    path: str = Field("data/prompts/toy/heldout.jsonl", description="A .txt file (one document per line) or a "
                                                                    "JSONL/CSV/Parquet file (default: the toy "
                                                                    "family's held-out harmless test "
                                                                    "conversations).")
    text_column: str = Field("completion", description="Column holding the scored text (tabular files only).")
    prompt_column: str | None = Field("prompt", description="Column holding an instruction the text answers: the "
                                                            "instruction is rendered with the chat template and "
                                                            "only the text's tokens after it are scored. None "
                                                            "(and .txt files): plain text, every token after "
                                                            "the first scored.")
    n: int = Field(64, ge=1, description="Documents scored (the first n).")
    max_tokens: int = Field(128, ge=2, description="Tokens per document, prompt included (longer ones are cut).")


class LmEvalTasks(Strict):
    """lm-evaluation-harness tasks run on the loaded model with each arm's intervention active."""

    tasks: list[str] = Field(min_length=1, description="Task names: a YAML task in include_path, or a registry "
                                                       "task of lm-eval (registry tasks download their data "
                                                       "from the hub at run time).")
    include_path: str | None = Field(None, description="Folder of local YAML tasks (their relative data_files "
                                                       "are read against the YAML's folder).")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (None: the task's default).")
    limit: int | None = Field(None, ge=1, description="Documents per task (None: all).")
    batch_size: int = Field(16, ge=1, description="lm-eval batch size.")


class CapabilityStage(Strict):
    """What each intervention costs: CE loss on held-out text, first-token KL on harmless prompts, task
    exact match and refusal on the test prompts, and lm-evaluation-harness tasks, per arm."""

    arms: Annotated[list[CapabilityArmKind], AfterValidator(_arm_kinds)] | None = Field(
        None, min_length=1, description="Arms measured (baseline, an operator's name or its weight arm). None: "
                                        "baseline, every operator its default includes (addition, ablation, and "
                                        "an operator whose stages.steer block is set) and their weight arms "
                                        "(orthogonalized, orthogonalized_subspace: only where the weights can be "
                                        "orthogonalised).")
    direction_layer: Literal["selected", "best"] | int | None = Field(
        None, description="Direction of the ablation and orthogonalized arms. None: stages.steer.ablation's, "
                          "else 'selected' with a stages.select block, else 'best'.")
    addition_layer: Literal["best", "selected"] | int = Field(
        "best", description="Layer (and direction) of the addition arms: 'best' separation (the decision "
                            "rule's), 'selected' (stage select's), or a layer.")
    coefficients: list[float] = Field([1.0], min_length=1, description="Addition coefficients.")
    alphas: list[float] = Field([1.0], min_length=1, description="Ablation strengths (orthogonalized weights: "
                                                                "always 1).")
    controls: "Controls" = Field(True, description=CONTROLS_HELP)
    text: TextSet = Field(default_factory=TextSet)
    generate: bool = Field(True, description="Generate on the test prompts: task exact match and refusal rates "
                                             "(inline judge) per arm.")
    lm_eval: LmEvalTasks | None = Field(None, description="lm-evaluation-harness tasks (None: none).")
    batch_size: int = Field(32, ge=1, description="Rows per forward pass / generate call.")


# The `stages:` blocks: one field per registered stage (`refusal_ray.stages.STAGES`, its `Stage.block`), in
# `STAGES.by_block_order()`, set by `_sync_stage_fields`. A stage with `block_default` (directions) always
# has its block (its defaults when the spec omits it); every other block defaults to None (the stage is off).
# (No docstring: the JSON schema of `Stages` stays as it was.)
class Stages(Strict):
    pass


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
        """Each stage's cross-field checks (`Stage.validate(spec)`, in STAGES order; ValueError: a spec error).
        A stage that does not declare its checks yet gets spec.py's own (`_LEGACY_CHECKS`)."""
        from refusal_ray.stages.base import _no_validation

        for stage in STAGES:
            if stage.validate is not _no_validation:
                stage.validate(self)
            else:
                for check in _LEGACY_CHECKS.get(stage.name, ()):
                    check(self)
        return self

    def rule_hash(self) -> str:
        """Hash of the decision rule (a rule read under the inline judge hashes as before judges existed)."""
        rule = self.decision_rule
        return _hash(rule.model_dump(mode="json", exclude={"judge"} if rule.judge == INLINE else None))

    def spec_hash(self) -> str:
        return _hash(self.model_dump(mode="json"))


# -- the checks of stages whose packages do not declare them yet (`Stage.validate`); each goes once its
#    stage's package has it -------------------------------------------------------------------------------
def _steer_position(self) -> None:
    steer = self.stages.steer
    if steer is not None and "resid_pre" not in self.stages.directions.sites:
        raise ValueError("stages.steer needs 'resid_pre' in stages.directions.sites (steering uses those directions)")
    positions = self.stages.directions.positions
    if steer is not None and positions != "post_instruction" and steer.position not in positions:
        raise ValueError(f"stages.steer.position {steer.position} is not among "
                         f"stages.directions.positions {positions}")
    return None


def _operators(self):
    """Each operator's cross-field checks on its `stages.steer.<name>` block (None when unset)."""
    steer = self.stages.steer
    for op in ops.OPS:
        op.validate(self, None if steer is None else getattr(steer, op.name, None))
    return None


def _selected_needs_select(self):
    if self.stages.select is not None and "resid_pre" not in self.stages.directions.sites:
        raise ValueError("stages.select needs 'resid_pre' in stages.directions.sites (candidates are "
                         "resid_pre directions)")
    return None


def _paired_needs_pairs(self):
    if self.stages.directions.pairing == "paired":
        for cls in ("harmful", "harmless"):
            if getattr(self.data, cls).pair_column is None:
                raise ValueError(f"stages.directions.pairing 'paired' needs data.{cls}.pair_column")
    return None


def _capability_arms(self):
    cap = self.stages.capability
    if cap is None:
        return None
    steer = self.stages.steer
    for arm in cap.arms or []:
        op = ops.base.owner(arm)
        if op is not None and op.capability_needs_block and (steer is None or getattr(steer, op.name) is None):
            raise ValueError(f"stages.capability.arms '{arm}' needs a stages.steer.{op.name} block (its "
                             f"directions)")
    if "selected" in (cap.direction_layer, cap.addition_layer) and self.stages.select is None:
        raise ValueError("stages.capability: a 'selected' direction needs a stages.select block")
    if "resid_pre" not in self.stages.directions.sites:
        raise ValueError("stages.capability needs 'resid_pre' in stages.directions.sites (its arms use those "
                         "directions)")
    positions = self.stages.directions.positions
    if steer is None and positions != "post_instruction" and -1 not in positions:
        raise ValueError("stages.capability without a stages.steer block uses the directions at position -1: "
                         "add -1 to stages.directions.positions (or add a stages.steer block with its position)")
    return None


def _patch_needs_pairs(self):
    if self.stages.patch is not None:
        for cls in ("harmful", "harmless"):
            if getattr(self.data, cls).pair_column is None:
                raise ValueError(f"stages.patch needs data.{cls}.pair_column (clean and corrupted inputs are "
                                 f"pairs)")
    return None


_LEGACY_CHECKS = {"directions": (_paired_needs_pairs,), "select": (_selected_needs_select,),
                  "steer": (_steer_position, _operators), "capability": (_capability_arms,),
                  "patch": (_patch_needs_pairs,)}


def _hash(obj) -> str:
    return content_hash(obj)


JUDGE_KINDS = ("substring", "chat", "classifier", "guard", "openai")


def _loc(loc: tuple) -> str:
    """A pydantic error location as a dotted field path (union branches and judge kind tags dropped)."""
    parts = [p for i, p in enumerate(loc) if not str(p).startswith(("function-after", "literal["))
             and not (p in JUDGE_KINDS and i > 0 and isinstance(loc[i - 1], int))]
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
# spec.py's own classes of the stages whose packages do not declare `block` yet: (class, always present)
_OWN_BLOCKS = {"directions": (DirectionsStage, True), "select": (SelectStage, False), "steer": (SteerStage, False),
               "patch": (PatchStage, False), "scrub": (ScrubStage, False), "capability": (CapabilityStage, False)}


def _sync_operator_fields() -> None:
    """Give spec.py's SteerStage (while stage steer does not declare its block) one optional field per
    registered operator (`stages.steer.<name>`: its `config` class; default `config()` when `default_block`,
    else None), in OPS order before the shared settings."""
    from pydantic.fields import FieldInfo

    fields = {}
    notes = {}
    for op in ops.OPS:
        ann = op.config | None
        info = (FieldInfo.from_annotated_attribute(ann, Field(default_factory=op.config)) if op.default_block
                else FieldInfo.from_annotated_attribute(ann, Field(None, description=op.field_description)))
        fields[op.name], notes[op.name] = info, ann
    own = {k: v for k, v in SteerStage.__pydantic_fields__.items() if k in STEER_SETTINGS}
    SteerStage.__pydantic_fields__ = {**fields, **own}
    SteerStage.__annotations__ = {**notes, **{k: v for k, v in SteerStage.__annotations__.items()
                                                if k in STEER_SETTINGS}}
    SteerStage.model_rebuild(force=True)


def _sync_stage_fields() -> None:
    """Give `Stages` one field per registered stage (`STAGES.by_block_order()`): `<name>: block` with the
    block's defaults for a stage with `block_default`, else `<name>: block | None = None`; then rebuild
    `Stages` and `Spec`. Called at import and after every change of the stages (`STAGES.register`) or of
    the operators (`ops.register`: stage steer's block has one field per operator)."""
    from pydantic.fields import FieldInfo

    if any(s.name == "steer" and s.block is None for s in STAGES):   # spec.py's SteerStage is in use
        _sync_operator_fields()
    fields, notes = {}, {}
    for stage in STAGES.by_block_order():
        cls, always = (stage.block, stage.block_default) if stage.block is not None else _OWN_BLOCKS[stage.name]
        ann = cls if always else cls | None
        fields[stage.name] = FieldInfo.from_annotated_attribute(ann, Field(default_factory=cls) if always else None)
        notes[stage.name] = ann
    Stages.__pydantic_fields__ = fields
    Stages.__annotations__ = notes
    for model in (Stages, Spec):
        model.model_rebuild(force=True)


_sync_stage_fields()
ops.on_change(_sync_stage_fields)
STAGES.on_change(_sync_stage_fields)
