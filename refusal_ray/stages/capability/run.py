"""Stage `capability`, run side: what each intervention arm costs, beside what it does to refusal (the
declaration and block: `refusal_ray.stages.capability`; the cost table and report: `.read`).

Arms (one cell each, with a norm-matched random control when `controls`), from the operators
(`refusal_ray.ops.OPS`; their `capability_arms`):
  baseline        the model as loaded
  <operator>      each operator's capability arm(s) as hooks, e.g. addition (x <- x + c v at resid_pre[L];
                  L and v from `addition_layer`), ablation (x <- x - alpha (x . u) u at the ablation sites),
                  subspace ablation (stages.steer.subspace's directions and layers), ...
  <weight arm>    an operator's `weight_arm`: its resolved tensor projected out of the weights that write
                  the residual stream (embedding, attention and MLP output projections), in memory only
                  (`refusal_ray.models.orthogonalize`), restored bit-identically afterwards:
                  `orthogonalized` (ablation's direction), `orthogonalized_subspace` (the subspace basis;
                  the Llama-3.2-1B study orthogonalised layers 7-10's span); control: its twin's random draw

Metrics per arm (table `capability`, one row per (cell, metric)):
  ce_loss            mean next-token cross-entropy on held-out text, nats/token (Arditi et al. 2024,
                     Sec. 4.2); `stages.capability.text` (the toy corpus by default)
  first_token_kl     KL(P_baseline || P_arm) of the first generated token on the harmless test
                     prompts, nats, mean over prompts (Arditi et al. 2024, Sec. 4.2); 0 for baseline
  task_exact_match   greedy completions of the harmless test prompts with a reference, exact match
  refusal_harmful    refusal rate (inline judge) on the harmful test prompts
  refusal_harmless   refusal rate (inline judge) on the harmless test prompts
  lm_eval/<task>/<metric>  lm-evaluation-harness with the arm active (`capability.harness`)
Arms whose operator defines `prefill` (conditional steering, CAST: a gate per prompt, Lee et al. 2025) are
gated per text on every pass (`GatedEdits`): per batch, the operator's prefill on the batch's unedited gate
tokens, then its edits for that batch's rows. The gate reads, for a CE document with an instruction
(`text.prompt_column`), its chat prompt (the scored completion is the reply, as a steering completion is);
for a plain-text document the whole (cut) document, it having no prompt part; for the first-token KL and the
generations, each prompt. Their rows carry the operator's `group_columns` (gate_rate, gate_n: the texts of
that metric gated on). lm-eval batches its own requests under one set of hooks, so no per-request gate can be
applied there: such arms get no lm-eval rows (`LM_EVAL_UNGATED`; the plan line says so), never ungated ones.
Every other arm keeps its one-row broadcast edits (`broadcast_edits`), unchanged.
Controls (`controls: true | false | K`): as stage steer's, K control cells per arm (draw j >= 1 with
`control_draw: j`; draw 0 is the cell of `controls: true`). A weight arm's control draws its hook twin's
directions: control draw j uses its operator's capability arm at alpha 1, control draw j (`weight_params`),
so each pair differs only in hooks vs weights (its params carry the twin as `draws_from`; the twin's cell id seeds the draw, whether or not
that arm is measured). Weight arms edit every layer: beside an ablation or subspace arm restricted to
some layers they are no twin, so the default arm list leaves them out and an explicit one is exit 2.

Each row carries value, n, a 95% interval where one is defined (Wilson for rates; mean +- 1.96
standard errors over prompts for the KL; lm-eval's stderr for its metrics) and the arm's settings.
The cost of an arm is its value minus the baseline's for the same (model, seed, metric); the
summary computes it (`refusal_ray.stages.capability.read.capability_cost`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace

import numpy as np

from refusal_ray.capability.measures import (cross_entropy, first_token_kl, next_token_logprobs, text_tokens)
from refusal_ray.data import left_pad, prompt_tokens
from refusal_ray.core.cells import Cell, layer_list
from refusal_ray.judges import exact_match
from refusal_ray.models.orthogonalize import UNSUPPORTED, orthogonalized
from refusal_ray.ops import OPS
from refusal_ray.ops.base import Chunk, SteerInputs, arm_columns, compose, control_arms, n_draws, owner
from refusal_ray.stages.capability import arm_kinds
from refusal_ray.stages.directions import directions_key
from refusal_ray.stages.steer import controls_text
from refusal_ray.stages.steer.run import Row, edits_on, generate_rows, steering_inputs
from refusal_ray.stats import wilson


def weight_arms() -> list[str]:
    """The operators' weight arms (orthogonalized, orthogonalized_subspace, ...), in OPS order."""
    return [op.weight_arm for op in OPS if op.weight_arm]


def _block(spec, op):
    return None if spec.stages.steer is None else getattr(spec.stages.steer, op.name, None)


def not_orthogonalizable(model, family: str) -> str | None:
    """Why a model's weights cannot be orthogonalised, as far as its spec block and config tell before
    loading (post-norm family, quantised, placed on CPU/disk by an explicit device_map), or None.
    Automatic offload (`offload: auto` for large models on CPU workers) is known only at load time:
    `orthogonalized` refuses it then, with the reason, in the cell's error."""
    if family in UNSUPPORTED:
        return UNSUPPORTED[family]
    if model.quantization:
        return f"{model.quantization} quantised weights"
    placed = model.device_map.values() if isinstance(model.device_map, dict) else ()
    if any(str(v) in ("cpu", "disk") for v in placed):
        return "layers placed on CPU/disk by its device_map (offloaded)"
    return None


def partial_twins(spec, n_layers: int) -> dict[str, tuple[str, list[int]]]:
    """Weight arms whose hook twin ablates only some of a model's `n_layers` layers: {arm: (the field
    restricting the twin, its layers)} (`Operator.weight_partial`). Orthogonalisation edits every layer's
    weights, so such an arm is not the twin's weight version (issue 18, item 8)."""
    out = {}
    for op in OPS:
        if op.weight_arm:
            part = op.weight_partial(spec, _block(spec, op), n_layers)
            if part is not None:
                out[op.weight_arm] = part
    return out


def arms(spec, blocked: str | None = None, partial=()) -> list[str]:
    """The arms measured on a model: the block's list, or by default baseline, every operator whose
    `in_default_capability` says so (addition, ablation; subspace with stages.steer.subspace), then their
    weight arms unless `blocked` (the reason from `not_orthogonalizable`), and each unless it is in
    `partial` (`partial_twins`: its hook twin ablates only some layers)."""
    cap = spec.stages.capability
    if cap.arms is not None:
        return list(dict.fromkeys(cap.arms))
    chosen = [op for op in OPS if op.in_default_capability(spec, _block(spec, op))]
    out = ["baseline", *(op.name for op in chosen), *(op.weight_arm for op in chosen if op.weight_arm)]
    return [a for a in out if not (blocked and a in weight_arms()) and a not in partial]


def _blocked(spec, mp) -> str | None:
    return not_orthogonalizable(next(m for m in spec.models if m.name == mp.name), mp.family)


def twin_controls(arm: dict, twin: dict, draws: int) -> list[dict]:
    """A weight arm and its `draws` control arms, each control carrying its hook twin's control params
    of the same draw (`draws_from`), whose cell id seeds its random direction or subspace."""
    out = control_arms(arm, draws)
    return out[:1] + [{**a, "draws_from": t} for a, t in zip(out[1:], control_arms(twin, draws)[1:])]


def capability_params(spec, mp) -> list[dict]:
    """Every capability arm of one (model, seed), in steer's parameter schema (so the operators' resolve and
    edits serve both): baseline, each operator's `capability_arms` (addition arms leave `layer` None until
    their direction resolves), then the weight arms (`weight_params`). `controls: K` gives each arm K control
    arms; weight arms' controls name their hook twin (`twin_controls`)."""
    draws = n_draws(spec.stages.capability.controls)
    which = arms(spec, _blocked(spec, mp), partial_twins(spec, mp.n_layers))
    out: list[dict] = []
    if "baseline" in which:
        out.append({"mode": "baseline", "layer": None, "coefficient": 0.0, "alpha": 0.0, "direction_layer": None,
                    "control": False})
    for op in OPS:
        if op.name in which:
            out += [arm for a in op.capability_arms(spec, _block(spec, op), mp.n_layers)
                    for arm in control_arms(a, draws)]
    for op in OPS:
        if op.weight_arm and op.weight_arm in which:
            out += twin_controls(*op.weight_params(spec, _block(spec, op), mp.n_layers), draws)
    return out


def _cell_hash(key: dict, params: dict) -> str:
    """`refusal_ray.grid.cell_id`'s content hash of `params` under the rest of a cell's key."""
    return hashlib.sha256(json.dumps({**key, "params": params}, sort_keys=True).encode()).hexdigest()[:20]


def twin_draw_ids(session, cells: list[Cell], extra: dict) -> dict[str, str]:
    """{weight-arm control cell id: its hook twin's cell id} for the cells whose params carry `draws_from`.

    The twin's id is `grid.cell_id` of the twin's params under this cell's key (the plan's stage key and
    model identity from `extra["ids"]`, the prompt fingerprint recomputed from the session's prompts and
    tokenizer). Raises RuntimeError when this cell's own id does not recompute so (the twin's would be
    wrong too): never a silent other draw."""
    wanted = [c for c in cells if "draws_from" in c.params]
    if not wanted:
        return {}
    from refusal_ray.data import prompt_fingerprint

    ids, out, fps = extra["ids"], {}, {}
    for c in wanted:
        if c.seed not in fps:
            fps[c.seed] = prompt_fingerprint(ids["data"], session.lm.tokenizer, session.prompts[c.seed], session.chat)
        key = {**ids["key"], "model": ids["models"][c.model], "seed": c.seed, "data": fps[c.seed]}
        if _cell_hash(key, c.params) != c.id:
            raise RuntimeError(f"cannot derive the hook twin of {c.params['mode']} control cell {c.id}: its id "
                               f"does not recompute on this worker (prompts or tokenizer differ from the plan's)")
        out[c.id] = _cell_hash(key, c.params["draws_from"])
    return out


def broadcast_edits(cell: Cell, d: SteerInputs, ablation_layers: list[int], sites) -> dict:
    """The arm's hook edits as one-row tensors ([1, d_model]), which broadcast over any batch (the CE
    loss, KL and lm-eval batches): its operator's `edits` for one row (chunk.n == 1, no prefill); {} for
    baseline and weight arms (they edit weights). `sites`: has d_model and n_layers (`lm.sites`)."""
    mode = cell.params["mode"]
    if mode not in OPS:
        return {}
    op = OPS[mode]
    chunk = Chunk(1, sites.d_model, sites.n_layers, ablation_layers)
    return compose([(op.rank, op.edits([(0, cell, op.resolve(cell, d))], chunk, d))])


def gate_tokens(seq) -> list[int]:
    """The tokens a CE document's gate reads (`GatedEdits`): with an instruction, its chat prompt (the scored
    completion is the reply to it, as a steering prompt's completion is); a plain text has no prompt part, so
    the whole (cut) document. seq: (token ids, first scored index), a `capability.measures.Scored` whose
    `prompt` is its chat prompt's length (0: plain text)."""
    ids, n_prompt = seq[0], getattr(seq, "prompt", 0)
    return list(ids[:n_prompt]) if n_prompt else list(ids)


class GatedEdits:
    """Per-batch edits of an operator with a `prefill` (conditional steering: a gate per text): for each batch
    of a pass, its `prefill` on the batch's gate tokens (left padded, unedited, one row per text, all of them
    this one cell), then its `edits` for that batch's rows (`Chunk(n=batch)`), so each text is gated on its own
    tokens whatever else shares its batch. A `capability.measures.EditsFor`.

    tokens: item of the pass (a CE document, a prompt's ids) -> the token ids its gate reads.
    columns: every item's `completion_columns`, in the order the batches came (reset with `take`).
    """

    def __init__(self, lm, cell: Cell, d: SteerInputs, ablation_layers: list[int], tokens=lambda item: item):
        self.lm, self.cell, self.d, self.layers, self.tokens = lm, cell, d, ablation_layers, tokens
        self.op = OPS[cell.params["mode"]]
        self.resolved = self.op.resolve(cell, d)
        self.columns: list[dict] = []

    def __call__(self, batch: list) -> dict:
        lm, op = self.lm, self.op
        ids, mask = left_pad([self.tokens(item) for item in batch], lm.tokenizer.pad_token_id or 0)
        rows = [(i, self.cell, self.resolved) for i in range(len(batch))]
        chunk = Chunk(len(batch), lm.sites.d_model, lm.sites.n_layers, self.layers)
        chunk.prefill[op.name] = state = op.prefill(lm, ids.to(lm.device), mask.to(lm.device), rows, self.d)
        self.columns += [op.completion_columns(state, i) for i in range(len(batch))]
        return edits_on(compose([(op.rank, op.edits(rows, chunk, self.d))]), lm.device)

    def take(self) -> dict:
        """The operator's `group_columns` of the items seen since the last take (e.g. gate_rate, gate_n)."""
        out, self.columns = self.op.group_columns(self.columns), []
        return out


def per_text(cell: Cell) -> bool:
    """Whether an arm's hooks are decided per text (its operator defines `prefill`): `GatedEdits` on every
    pass, no lm-eval metrics (`LM_EVAL_UNGATED`). Every other arm keeps `broadcast_edits` exactly."""
    mode = cell.params["mode"]
    return mode in OPS and OPS[mode].has_prefill()


# why a per-text arm has no lm-eval rows: the harness batches its requests itself under one set of hooks for the
# whole run, so a gate decided per request on its own tokens cannot be applied there (the plan line says so)
LM_EVAL_UNGATED = "lm-eval batches its requests itself: no per-request gate"


def _rate_row(metric: str, k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"metric": metric, "value": k / n if n else None, "n": n, "ci_low": lo, "ci_high": hi, "stderr": None}


def measure(session, cell: Cell, d: SteerInputs, extra: dict, cfg: dict, batch_size: int) -> list[dict]:
    """Every metric of one arm on a loaded model: rows of table `capability` (metric, value, n, ci_low,
    ci_high, stderr, the arm's columns (`ops.base.arm_columns`), arm, measure_key). `batch_size` bounds every
    forward pass and generate call (and lm-eval's batch)."""
    lm, chat = session.lm, session.chat
    test = session.prompts[cell.seed]["test"]
    steer = session.settings.get("steer") or {}
    ablation_layers = layer_list((steer.get("ablation") or {}).get("layers", "all"), lm.sites.n_layers)
    texts = text_tokens(lm.tokenizer, extra["text"], cfg["text"]["max_tokens"], chat)
    harmless = prompt_tokens(lm.tokenizer, test["harmless"].instructions, chat)
    base_lp = next_token_logprobs(lm, harmless, batch_size)                 # [n_harmless, vocab], unedited
    gated = per_text(cell)
    if gated:   # each CE document gated on its chat prompt (plain text: itself), each KL prompt on itself
        edits = GatedEdits(lm, cell, d, ablation_layers, gate_tokens)
        kl_edits = GatedEdits(lm, cell, d, ablation_layers)
    else:
        edits = kl_edits = broadcast_edits(cell, d, ablation_layers, lm.sites)
    own = (lambda e: e.take()) if gated else (lambda e: {})
    weights = contextlib.nullcontext()
    op = owner(cell.params["mode"])
    if op is not None and cell.params["mode"] == op.weight_arm:   # [d_model] or [rank, d_model] orthonormal rows
        weights = orthogonalized(lm, op.weight_tensor(cell, op.resolve(cell, d)))
    rows = []
    with weights:
        loss, n_tokens = cross_entropy(lm, texts, batch_size, edits)
        rows.append({"metric": "ce_loss", "value": loss, "n": n_tokens, "ci_low": None, "ci_high": None,
                     "stderr": None, **own(edits)})
        kl = first_token_kl(base_lp, next_token_logprobs(lm, harmless, batch_size, kl_edits)).numpy()
        se = float(kl.std(ddof=1) / np.sqrt(len(kl))) if len(kl) > 1 else None
        mean = float(kl.mean())
        rows.append({"metric": "first_token_kl", "value": mean, "n": len(kl), "stderr": se,
                     "ci_low": None if se is None else mean - 1.96 * se,
                     "ci_high": None if se is None else mean + 1.96 * se, **own(kl_edits)})
        if cfg["generate"]:   # generate_rows makes each chunk's prefill: a gate per prompt
            gen = [Row(cell, s, i) for s in ("harmful", "harmless") for i in range(len(test[s]))]
            extras: list[dict] = []
            completions = generate_rows(lm, gen, test, d, ablation_layers,
                                        session.settings["generation"]["max_new_tokens"], batch_size, chat=chat,
                                        extras=extras)
            extras += [{} for _ in range(len(gen) - len(extras))]
            refused = session.judge(completions)

            def group(idx: list[int]) -> dict:
                return OPS[cell.params["mode"]].group_columns([extras[i] for i in idx]) if gated else {}

            for pset in ("harmful", "harmless"):
                idx = [i for i, r in enumerate(gen) if r.prompt_set == pset]
                rows.append({**_rate_row(f"refusal_{pset}", sum(bool(refused[i]) for i in idx), len(idx)),
                             **group(idx)})
            idx = [i for i, r in enumerate(gen) if r.prompt_set == "harmless"]
            scored = [(i, c) for i, c in zip(idx, exact_match([completions[i] for i in idx],
                                                              test["harmless"].references)) if c is not None]
            correct = [c for _, c in scored]
            if correct:
                rows.append({**_rate_row("task_exact_match", sum(correct), len(correct)),
                             **group([i for i, _ in scored])})
        if extra.get("lm_eval") is not None and not gated:   # gated: LM_EVAL_UNGATED
            from refusal_ray.capability.harness import result_rows, run_tasks
            from refusal_ray.interventions import row_edits

            le = cfg["lm_eval"]
            with row_edits(lm.sites, edits):   # halved with the stage's batch after an out-of-memory error
                results = run_tasks(lm, extra["lm_eval"], batch_size=min(le["batch_size"], batch_size),
                                    num_fewshot=le["num_fewshot"], limit=le["limit"])
            for r in result_rows(results):
                se = r["stderr"]
                rows.append({**r, "ci_low": None if se is None else r["value"] - 1.96 * se,
                             "ci_high": None if se is None else r["value"] + 1.96 * se})
    return [{**r, **arm_columns(cell, d), "arm": cell.params["mode"], "measure_key": extra["key"]} for r in rows]


# -- the stage's hooks (its declaration: refusal_ray/stages/capability/__init__.py) ---------------------------------------------------------------------------
def inputs(settings: dict, needs: dict) -> SteerInputs:
    """Steer's inputs, read with steer's settings (or defaults: position -1, no operator blocks, when the
    spec has no steer block); an explicit direction (layer, position) is read from `SteerInputs.rows`."""
    return steering_inputs({**settings, "steer": settings.get("steer") or {"position": -1}}, needs)


def run(session, cells, payload) -> dict:
    cfg = session.settings["capability"]
    extra = session.prompts[cells[0].seed]["capability"]
    twins = twin_draw_ids(session, cells, extra)
    if twins:
        payload = replace(payload, draw_ids={**(payload.draw_ids or {}), **twins})
    rows = []
    for cell in cells:
        rows += session.halving(lambda bs, cell=cell: measure(session, cell, payload, extra, cfg, bs),
                                cfg["batch_size"])
    return {"capability": rows}


def id_key(spec) -> dict:
    from refusal_ray.data import fingerprint, files_fingerprint

    cap = spec.stages.capability
    steer = spec.stages.steer
    # what every arm's measurements read: the text, generation, lm-eval; the arm's own settings (kind,
    # coefficient, alpha, direction, control, its ablation layers) are its params, so adding an alpha
    # or a control leaves the other arms' ids (and stored results) alone
    key = directions_key(spec) | {"text": cap.text.model_dump(mode="json") | {"bytes": fingerprint(cap.text.path)},
                                  "position": steer.position if steer is not None else -1}
    if cap.generate:
        key |= {"generation": spec.generation.model_dump(mode="json"), "judge": spec.judge.model_dump(mode="json")}
    if cap.lm_eval is not None:
        import importlib.metadata as md
        from pathlib import Path

        key["lm_eval"] = cap.lm_eval.model_dump(mode="json", exclude={"batch_size"}) | {
            "version": md.version("lm-eval")}      # registry tasks' definitions come with the package
        if cap.lm_eval.include_path:
            key["lm_eval"]["files"] = files_fingerprint(sorted(p for p in Path(cap.lm_eval.include_path).rglob("*")
                                                               if p.is_file()))
    return key


def measure_key(plan) -> str:
    """What the capability rows of this plan were measured under (its cell ids' stage settings and the
    prompt files), stored on every row (`measure_key`) and in the manifest (`capability_key`), so the cost
    table never pairs an arm with a baseline measured under other settings in the same store."""
    from refusal_ray.judges.base import content_hash

    return content_hash({**id_key(plan.spec), "data": plan.data_fingerprint})


def prepare(plan) -> None:
    """Read the held-out text and the lm-eval task folder once, into every seed's payload
    (`plan.prompts[seed]["capability"]`). Raises SpecError naming the field."""
    from pathlib import Path

    from refusal_ray.capability.harness import ship_tasks
    from refusal_ray.capability.measures import load_texts
    from refusal_ray.errors import SpecError

    cap = plan.spec.stages.capability
    if not Path(cap.text.path).is_file():
        raise SpecError(plan.spec_file, "stages.capability.text.path", f"file not found: {cap.text.path}")
    try:
        texts = load_texts(cap.text.path, cap.text.text_column, cap.text.prompt_column, cap.text.n)
    except ValueError as e:
        raise SpecError(plan.spec_file, "stages.capability.text", f"{cap.text.path}: {e}") from None
    shipped = None
    if cap.lm_eval is not None:
        folder = cap.lm_eval.include_path
        if folder is not None and not Path(folder).is_dir():
            raise SpecError(plan.spec_file, "stages.capability.lm_eval.include_path", f"folder not found: {folder}")
        try:
            shipped = ship_tasks(cap.lm_eval.tasks, folder)
        except ValueError as e:   # an unreadable task YAML is the folder's problem, an unknown name the list's
            where = "include_path" if folder and str(e).startswith(str(Path(folder))) else "tasks"
            raise SpecError(plan.spec_file, f"stages.capability.lm_eval.{where}", str(e)) from None
    registry = [t["name"] for t in (shipped or {}).get("tasks", []) if t["yaml"] is None]
    if registry:
        plan.unchecked.append(f"stages.capability.lm_eval.tasks ({', '.join(registry)}): the registry tasks' "
                              f"data (lm-eval downloads it from the hub at run time)")
    from refusal_ray.core.cells import SCHEMA_VERSION, model_identity as _model_identity

    ids = {"key": {"v": SCHEMA_VERSION, "stage": "capability", **id_key(plan.spec)}, "data": plan.data_fingerprint,
           "models": {m.name: _model_identity(plan.spec, m.name) for m in plan.spec.models}}   # `twin_draw_ids`
    extra = {"text": texts, "lm_eval": shipped, "key": measure_key(plan), "ids": ids}
    for seed in plan.spec.seeds:
        plan.prompts[seed]["capability"] = extra


def check(plan) -> None:
    """Explicit layers exist; an explicitly listed weight arm ('orthogonalized', 'orthogonalized_subspace')
    on a model whose weights cannot be orthogonalised (post-norm family, quantised), or beside a hook twin
    that ablates only some layers (`partial_twins`), is exit 2 here, not an error per cell later."""
    from refusal_ray.errors import SpecError

    from refusal_ray.stages.base import check_layers

    cap = plan.spec.stages.capability
    for name in ("direction_layer", "addition_layer"):
        if isinstance(getattr(cap, name), int):
            check_layers(plan, f"stages.capability.{name}", [getattr(cap, name)])
    listed = [a for a in (cap.arms or []) if a in weight_arms()]
    if not listed:
        return
    for m in plan.spec.models:
        if m.name not in plan.models:
            continue
        partial = partial_twins(plan.spec, plan.models[m.name].n_layers)
        for arm in listed:
            if arm in partial:
                field_, layers = partial[arm]
                raise SpecError(plan.spec_file, "stages.capability.arms",
                                f"'{arm}' edits the weights of every layer, but {field_} ablates layers {layers} "
                                f"only (model {m.name!r} has {plan.models[m.name].n_layers}): it is not that "
                                f"arm's weight twin; drop it from the list (the default list leaves it out) "
                                f"or ablate every layer")
    for m in plan.spec.models:
        if m.name not in plan.models:   # validate offline: a hub model it could not read
            continue
        why = not_orthogonalizable(m, plan.models[m.name].family)
        if why:
            raise SpecError(plan.spec_file, "stages.capability.arms",
                            f"'{listed[0]}' cannot run on model {m.name!r} ({why}); drop it from the list "
                            f"(the default list leaves it out for such models) or measure hook ablation")


def describe(plan) -> list[str]:
    cap = plan.spec.stages.capability
    listed = sorted({a for mp in plan.models.values()
                     for a in arms(plan.spec, _blocked(plan.spec, mp), partial_twins(plan.spec, mp.n_layers))},
                    key=arm_kinds().index)
    lines = [f"capability: arms {', '.join(listed)} (controls: {controls_text(cap.controls)}); "
             f"CE on {cap.text.path} "
             f"(first {cap.text.n} documents, <= {cap.text.max_tokens} tokens), first-token KL on the harmless "
             f"test prompts" + ("; exact match and refusal on the test prompts" if cap.generate else "")]
    if cap.lm_eval is not None:
        lines.append(f"lm-eval tasks: {', '.join(cap.lm_eval.tasks)}"
                     + (f" (limit {cap.lm_eval.limit})" if cap.lm_eval.limit else ""))
    gated = [a for a in listed if a in OPS and OPS[a].has_prefill()]
    if gated:
        lines.append(f"capability, {', '.join(gated)}: gate decided per text on the unedited tokens: each CE document "
                     f"on its chat prompt (a plain text: on the whole document), each first-token KL prompt and "
                     f"each generated prompt on itself"
                     + (f"; no lm-eval metrics ({LM_EVAL_UNGATED})" if cap.lm_eval is not None else ""))
    return lines
