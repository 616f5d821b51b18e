"""Stage select against an independent re-implementation of Arditi et al.'s (2024) selection.

`arditi_reference` restates the paper's `select_direction` (refusal score with epsilon 1e-8, the
per-candidate hook loop, `kl_div_fn` with its epsilon 1e-6, `filter_fn`, lowest bypass wins) and
`filter_val`, with plain forward hooks and the paper's batching (left-padded batches, no
position_ids). Both sides get the same rendered prompts, refusal tokens and candidate vectors
(the reference's difference of means), and must agree per candidate to 1e-4, make the same filter
decisions and select the same candidate, under the paper's filters and with the KL filter off.

Where we differ from the paper on purpose:
- zero-norm candidates (layer 0 at a template token) are not scored by us; the paper scores them
  as no-ops, and the test checks that its own filters drop every one of them here;
- the KL: the paper's `kl_div_fn` adds 1e-6 inside both logs, which moves toy-llama-s's KL by up to
  0.03 (1.690 vs 1.660); ours is exact by default and follows the paper with `kl_epsilon: 1e-6` (the
  paper-compat switch; `reproduces: arditi2024` sets it), which is what the parity cases pass;
  `test_kl_epsilon_zero_is_the_exact_kl` checks the exact KL that `kl_epsilon: 0` gives.
- position ids: we derive them from the mask, the paper passes none (so positions start at the
  pad count); under RoPE this changes scores by ~3e-6 only (tests/arditi_reference.py).

Toy tier: toy-llama-s, every post-instruction position x 4 layers. Real tier: SmolLM2-135M-Instruct,
positions -1 and -2 x 6 of its 30 layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from refusal_ray import load_model
from refusal_ray.data import chat_prompts, prompt_tokens
from refusal_ray.models.chat import ChatOptions, post_instruction_positions
from refusal_ray.stages.select import Candidate, choose, score_candidates

import arditi_reference as ref
from conftest import TOY_MODELS, TOY_PROMPTS

TOL = 1e-4
N_TRAIN, N_VAL = 32, 8
REF_BATCH = 8                  # the reference's batches: left padded, as the paper's 32
PERMISSIVE_KL = None           # the KL filter off (the other filters as the paper's)
SMOL_LAYERS = [3, 9, 15, 21, 23, 24]   # of 30; 24 = int(30 * 0.8) is the first pruned layer
CHAT = ChatOptions()


@dataclass
class Case:
    name: str
    lm: object
    n_layers: int
    refusal_toks: list[int]
    harmful: list[str]            # rendered val prompts the reference's filter_val kept
    harmless: list[str]
    harmful_drawn: list[str]      # rendered val prompts before filter_val
    harmless_drawn: list[str]
    candidates: dict              # (position, layer) -> float32 vector [d_model]
    paper: list                   # ref.Scored per candidate, the paper's definitions (and the exact KL)


def _toy_prompts():
    h = pd.read_json(TOY_PROMPTS / "harmful.jsonl", lines=True)
    s = pd.read_json(TOY_PROMPTS / "harmless.jsonl", lines=True)
    return ([h[h.split == sp].instruction.tolist() for sp in ("train", "val")],
            [s[s.split == sp].instruction.tolist() for sp in ("train", "val")])


def _build(name: str, path: str, positions: list[int] | None, layers: list[int] | None = None,
           filter_val: bool = True) -> Case:
    lm = load_model(path)
    tok, model = lm.tokenizer, lm.model
    (h_train, h_val), (s_train, s_val) = _toy_prompts()
    h_train, s_train = h_train[:N_TRAIN], s_train[:N_TRAIN]
    positions = positions or post_instruction_positions(tok, CHAT, h_train + s_train)
    refusal_toks = tok("I", add_special_tokens=False)["input_ids"][:1]     # Llama-3's [40] / Qwen's "I", here
    render = lambda xs: chat_prompts(tok, xs, CHAT)                         # noqa: E731
    md = ref.mean_diff(model, tok, render(h_train), render(s_train), positions, batch_size=REF_BATCH * 4)
    layers = range(md.shape[1]) if layers is None else layers
    candidates = {(p, layer): md[i, layer].float() for i, p in enumerate(positions) for layer in layers}
    drawn_h, drawn_s = render(h_val[:N_VAL]), render(s_val[:N_VAL])
    harmful, harmless = drawn_h, drawn_s
    if filter_val:
        harmful, harmless = ref.filter_prompts(model, tok, drawn_h, drawn_s, refusal_toks, batch_size=REF_BATCH)
    assert len(harmful) >= 2 and len(harmless) >= 2, (len(harmful), len(harmless))
    paper = ref.score(model, tok, harmful, harmless, candidates, refusal_toks, batch_size=REF_BATCH)
    return Case(name, lm, md.shape[1], refusal_toks, harmful, harmless, drawn_h, drawn_s, candidates, paper)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: these batches are small, and a second thread on a busy 2-core machine
    spends its time spinning at OpenMP barriers (see tests/test_real_chat.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["toy-llama-s", pytest.param("smollm2", marks=pytest.mark.real)])
def case(request) -> Case:
    if request.param == "smollm2":
        # SmolLM2 refuses none of the toy prompts (every refusal score < 0), so filter_val would keep
        # no harmful prompt: scored unfiltered, as the paper's Config(filter_val=False)
        return _build("smollm2", str(request.getfixturevalue("smollm2_path")), [-2, -1], SMOL_LAYERS,
                      filter_val=False)
    return _build("toy-llama-s", str(TOY_MODELS / "toy-llama-s"), None)


def _tokens(case: Case, rendered: list[str]) -> list[list[int]]:
    return case.lm.tokenizer(rendered, add_special_tokens=False)["input_ids"]


def _nonzero(case: Case) -> list[tuple[int, int]]:
    return [k for k, v in case.candidates.items() if float(v.norm()) > 0]


@pytest.fixture(scope="module")
def ours(case: Case) -> dict:
    """Our stage's scores (paper definitions: refusal epsilon 1e-8, KL epsilon 1e-6) on the
    reference's filtered val prompts, for the nonzero candidates (ours never scores zero vectors)."""
    keys = _nonzero(case)
    cands = [Candidate(layer, pos, case.candidates[(pos, layer)].numpy()) for pos, layer in keys]
    s = score_candidates(case.lm, cands, _tokens(case, case.harmful), _tokens(case, case.harmless),
                         case.refusal_toks, batch_size=48, epsilon=ref.REFUSAL_EPSILON, kl_epsilon=ref.KL_EPSILON)
    return {k: {"bypass": float(s["bypass"][i]), "induce": float(s["induce"][i]), "kl": float(s["kl"][i])}
            for i, k in enumerate(keys)}


def test_same_prompt_tokens_as_our_renderer(case: Case):
    """The reference tokenizes the rendered text; the stage gets `prompt_tokens`: the same ids."""
    (_, h_val), (_, s_val) = _toy_prompts()
    assert prompt_tokens(case.lm.tokenizer, h_val[:N_VAL], CHAT) == _tokens(case, case.harmful_drawn)
    assert prompt_tokens(case.lm.tokenizer, s_val[:N_VAL], CHAT) == _tokens(case, case.harmless_drawn)


def test_filter_val_keeps_the_papers_prompts(case: Case):
    """filter_val: ours keeps exactly the harmful val prompts with score > 0 and harmless < 0; when
    that leaves no harmful prompt (SmolLM2 on the toy prompts) ours says so."""
    lm, tok, model = case.lm, case.lm.tokenizer, case.lm.model
    harmful, harmless = ref.filter_prompts(model, tok, case.harmful_drawn, case.harmless_drawn, case.refusal_toks,
                                           batch_size=REF_BATCH)
    one = [Candidate(3, -1, case.candidates[(-1, 3)].numpy())]
    args = (lm, one, _tokens(case, case.harmful_drawn), _tokens(case, case.harmless_drawn), case.refusal_toks)
    if not harmful:
        with pytest.raises(ValueError, match=f"filter_val kept 0 harmful val prompts the model refuses \\(of {N_VAL}\\)"):
            score_candidates(*args, batch_size=48, epsilon=ref.REFUSAL_EPSILON, filter_val=True)
        return
    s = score_candidates(*args, batch_size=48, epsilon=ref.REFUSAL_EPSILON, filter_val=True)
    assert [case.harmful_drawn[i] for i in s["kept_harmful"]] == harmful
    assert [case.harmless_drawn[i] for i in s["kept_harmless"]] == harmless
    assert len(harmful) + len(harmless) < 2 * N_VAL     # it dropped some (toy-llama-s: 2 harmless it refuses)


def test_every_candidates_scores_match_the_paper(case: Case, ours: dict):
    paper = {(s.position, s.layer): s for s in case.paper}
    worst = {k: 0.0 for k in ("bypass", "induce", "kl")}
    for key, mine in ours.items():
        for k in worst:
            worst[k] = max(worst[k], abs(mine[k] - getattr(paper[key], k)))
    assert all(v <= TOL for v in worst.values()), worst
    # the candidates differ, so agreement is not between constants
    assert np.ptp([paper[k].bypass for k in ours]) > 0.1 and np.ptp([paper[k].kl for k in ours]) > 1e-3


def test_kl_epsilon_zero_is_the_exact_kl(case: Case):
    """kl_epsilon 0: our KL is sum p_base (log p_base - log p_abl), exactly (the candidates at
    position -1, to keep it cheap)."""
    keys = [k for k in _nonzero(case) if k[0] == -1]
    exact = {(s.position, s.layer): s.kl_exact for s in case.paper}
    cands = [Candidate(layer, pos, case.candidates[(pos, layer)].numpy()) for pos, layer in keys]
    s = score_candidates(case.lm, cands, _tokens(case, case.harmful), _tokens(case, case.harmless),
                         case.refusal_toks, batch_size=48, epsilon=ref.REFUSAL_EPSILON, kl_epsilon=0.0)
    diff = max(abs(float(s["kl"][i]) - exact[k]) for i, k in enumerate(keys))
    assert diff <= TOL, diff
    assert max(exact[k] for k in keys) > 1e-3


@pytest.mark.parametrize("kl_max, max_layer_fraction, induce_min", [
    (0.1, 0.8, 0.0), (PERMISSIVE_KL, 0.8, 0.0), (PERMISSIVE_KL, None, None)],
    ids=["paper-filters", "kl-off", "all-off"])
def test_same_filter_decisions_and_selection(case: Case, ours: dict, kl_max, max_layer_fraction, induce_min):
    """filter_fn's decisions and the lowest-bypass choice. The paper's prune_layer_percentage 0.2 is
    our max_layer_fraction 0.8 (both prune layer >= int(0.8 n_layers)).

    Zero-norm candidates: ours never passes them; the paper scores them as no-ops (bypass and induce
    at the baselines, KL 0), and its own filters drop them under its defaults (the unedited harmless
    mean is < 0), so there the decisions are identical; with every filter off it may keep them, and
    then it must still select the same candidate as ours."""
    filters = {"kl_threshold": kl_max, "induce_refusal_threshold": induce_min,
               "prune_layer_percentage": {0.8: 0.2, None: None}[max_layer_fraction]}
    rows = [{"layer": layer, "position": pos, **v, "swing": math.nan, "separation": math.nan, "zero_norm": False}
            for (pos, layer), v in ours.items()]
    rows += [{"layer": layer, "position": pos, "bypass": math.nan, "induce": math.nan, "kl": math.nan,
              "swing": math.nan, "separation": math.nan, "zero_norm": True}
             for (pos, layer) in case.candidates if (pos, layer) not in ours]
    choose(rows, case.n_layers, {"criterion": "bypass", "max_layer_fraction": max_layer_fraction, "kl_max": kl_max,
                                 "induce_min": induce_min, "fallback": None})
    mine = {(r["position"], r["layer"]): r["passed"] for r in rows}
    paper = {(s.position, s.layer): not ref.discard(s, case.n_layers, **filters) for s in case.paper}
    zero = set(case.candidates) - set(ours)
    assert not any(mine[k] for k in zero)
    if induce_min is not None:
        assert not any(paper[k] for k in zero)
    differ = {k: (mine[k], paper[k]) for k in ours if mine[k] != paper[k]}
    assert not differ, differ
    chosen = [(r["position"], r["layer"]) for r in rows if r["selected"]]
    best = ref.select(case.paper, case.n_layers, **filters)
    assert chosen == ([] if best is None else [(best.position, best.layer)])
    # not None == None: toy-llama-s selects under every setting; SmolLM2 on the toy prompts raises no
    # harmless prompt's refusal score to >= 0 by addition, so there only "all-off" selects
    if case.name == "toy-llama-s" or induce_min is None:
        assert best is not None


def test_run_select_under_reproduces_arditi_matches_the_paper(case: Case):
    """The stage end to end with the settings `reproduces: arditi2024` gives (filter_val on, refusal
    epsilon 1e-8, KL epsilon 1e-6, the family's refusal tokens, the paper's filters): run_select, not the
    scoring function with hand-passed settings, picks the paper's candidate with the paper's scores on the
    prompts the paper's filter_val keeps (toy-llama-s; SmolLM2 refuses none of the toy prompts, so there
    filter_val keeps nothing and the stage says so)."""
    from refusal_ray.data import PromptSet
    from refusal_ray.spec import SelectStage, Spec
    from refusal_ray.stages.select import run_select

    base = {"name": "p", "reproduces": "arditi2024", "models": [{"name": "m", "path": "x"}],
            "data": {"harmful": {"path": "h"}, "harmless": {"path": "s"}}, "stages": {"select": {}},
            "decision_rule": {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                                                 "addition_coefficient": 1.0, "ablation_alpha": 1.0},
                              "steering_labels": {"strong": 0.5, "weak": 0.2}}}
    cfg = Spec.model_validate(base).stages.select.model_dump(mode="json")
    assert cfg["filter_val"] and cfg["kl_epsilon"] == 1e-6 and cfg["refusal_score_epsilon"] == 1e-8
    assert SelectStage().kl_epsilon == 0.0          # without `reproduces` the KL is exact
    (_, h_val), (_, s_val) = _toy_prompts()
    val = {"harmful": PromptSet([f"h{i}" for i in range(N_VAL)], h_val[:N_VAL], [None] * N_VAL),
           "harmless": PromptSet([f"s{i}" for i in range(N_VAL)], s_val[:N_VAL], [None] * N_VAL)}
    cands = [Candidate(layer, pos, v.numpy()) for (pos, layer), v in sorted(case.candidates.items())]

    class Cell:
        id, seed = "parity", 0

    run = lambda: run_select(case.lm, Cell, val, cands, {}, {**cfg, "batch_size": 48}, phrases=[], chat=CHAT)  # noqa: E731
    if case.name == "smollm2":
        with pytest.raises(ValueError, match="^filter_val kept 0 harmful val prompts the model refuses"):
            run()
        return
    rows = run()
    assert json_ids(rows) == case.refusal_toks      # the family table's 'I' is the token the reference used
    assert rows[0]["n_val"] == len(case.harmful) and rows[0]["n_val_harmless"] == len(case.harmless)
    paper = {(s.position, s.layer): s for s in case.paper}
    scored = [r for r in rows if not r["zero_norm"]]
    assert scored and all(abs(r[k] - getattr(paper[(r["position"], r["layer"])], k)) <= TOL
                          for r in scored for k in ("bypass", "induce", "kl"))
    best = ref.select(case.paper, case.n_layers, kl_threshold=0.1, induce_refusal_threshold=0.0,
                      prune_layer_percentage=0.2)
    assert best is not None
    assert [(r["position"], r["layer"]) for r in rows if r["selected"]] == [(best.position, best.layer)]


def json_ids(rows) -> list[int]:
    import json

    ids = {r["refusal_tokens"] for r in rows}
    assert len(ids) == 1
    return json.loads(ids.pop())


def test_position_ids_under_left_padding_do_not_move_the_scores(case: Case):
    """Item 6's suspect, measured: the paper passes no position_ids (a left-padded prompt's tokens start
    at n_pad), ours derives them from the mask. Batch size 1 has no padding, so it is the reference value
    for both. On these rotary models a constant shift of positions changes nothing but rounding: the
    refusal scores and the first-token KL of one ablated candidate move by < 5e-5 (measured up to 3e-6
    on toy-llama-s, 1.1e-5 on SmolLM2's scores), far below the 1e-3 at which a paper_compat switch would
    be warranted."""
    tok, model = case.lm.tokenizer, case.lm.model
    prompts = case.harmful_drawn + case.harmless_drawn
    key = sorted(_nonzero(case))[len(_nonzero(case)) // 2]
    hooks = ref.ablation_hooks(model, case.candidates[key])
    runs = {}
    for name, kw in (("paper", {"batch_size": REF_BATCH}), ("mask", {"batch_size": REF_BATCH, "position_ids_from_mask": True}),
                     ("unpadded", {"batch_size": 1})):
        base = ref.last_logits(model, tok, prompts, **kw)
        abl = ref.last_logits(model, tok, prompts, hooks, **kw)
        runs[name] = (ref.refusal_score(base, case.refusal_toks), ref.kl_div(base, abl, 0.0))
    lengths = {len(ids) for ids in _tokens(case, prompts)}
    assert len(lengths) > 1                          # the batches are padded, so the question is real
    for name in ("paper", "mask"):
        for a, b in zip(runs[name], runs["unpadded"]):
            assert float((a - b).abs().max()) < 5e-5, name
    # ours (mask-derived positions, left padding, rows sorted by length) equals the unpadded run too
    s = score_candidates(case.lm, [Candidate(key[1], key[0], case.candidates[key].numpy())],
                         _tokens(case, case.harmful_drawn), _tokens(case, case.harmless_drawn), case.refusal_toks,
                         batch_size=REF_BATCH, epsilon=ref.REFUSAL_EPSILON)
    unpadded = runs["unpadded"][0].numpy()
    assert np.abs(np.concatenate([s["baseline_harmful"], s["baseline_harmless"]]) - unpadded).max() < 5e-5
