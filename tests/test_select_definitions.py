"""Stage select's definitions as Arditi et al.'s code has them (issue: "every number as the paper
defines it"): the refusal score's epsilon, the layer cutoff, NaN and zero-norm candidates, val
filtering, the per-family refusal tokens and the KL guard. Values are checked against formulas
written out here, not against the stage's own helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from refusal_ray import load_model
from refusal_ray.data import PromptSet, prompt_tokens
from refusal_ray.models import refusal_tokens
from refusal_ray.stages.patch import RefusalScore
from refusal_ray.stages.select import Candidate, choose, layer_cutoff, run_select, score_candidates, zero_norm

from conftest import TOY_MODELS


def _logits_with(p_refusal: float, token_ids=(0,), vocab: int = 5) -> torch.Tensor:
    """Logits [1, vocab] whose softmax puts mass p_refusal on token_ids (split evenly), the rest evenly."""
    other = [t for t in range(vocab) if t not in token_ids]
    probs = torch.zeros(vocab, dtype=torch.float64)
    probs[list(token_ids)] = p_refusal / len(token_ids)
    probs[other] = (1 - p_refusal) / len(other)
    return probs.log()[None]


def _paper_score(p: float, eps: float = 1e-8) -> float:
    return math.log(p + eps) - math.log(1 - p + eps)


def test_refusal_score_epsilon_is_the_papers_and_changes_the_ranking_as_the_issue_says():
    score = RefusalScore([0], epsilon=1e-8)
    for p in (1e-14, 1e-7, 1e-3, 0.5, 0.9, 1 - 1e-12):
        assert float(score(_logits_with(p))[0]) == pytest.approx(_paper_score(p), abs=1e-9)
    # a prompt's score is capped near -log(1e-8) = 18.42
    assert float(score(_logits_with(1e-30))[0]) == pytest.approx(math.log(1e-8) - math.log(1 + 1e-8), abs=1e-9)
    unbounded = RefusalScore([0])
    a, b = [1e-14, 1e-3], [1e-7, 1e-7]

    def mean(metric, ps):
        return float(np.mean([float(metric(_logits_with(p))[0]) for p in ps]))

    # the issue's example: ours (unbounded) picked A, the paper's definition picks B (lower bypass)
    assert mean(unbounded, a) == pytest.approx(-19.57, abs=0.01) and mean(unbounded, b) == pytest.approx(-16.12, abs=0.01)
    assert mean(score, a) == pytest.approx(-12.66, abs=0.01) and mean(score, b) == pytest.approx(-16.02, abs=0.01)
    rows = [{"layer": 1, "position": -1, "bypass": mean(score, a), "induce": 1.0, "kl": 0.0, "swing": 0, "separation": 0},
            {"layer": 2, "position": -1, "bypass": mean(score, b), "induce": 1.0, "kl": 0.0, "swing": 0, "separation": 0}]
    cfg = {"criterion": "bypass", "max_layer_fraction": None, "kl_max": None, "induce_min": None, "fallback": None}
    assert [r["selected"] for r in choose(rows, 10, cfg)] == [False, True]


def test_refusal_score_sign_does_not_depend_on_epsilon():
    for p in (0.3, 0.4999, 0.5001, 0.7):
        assert (float(RefusalScore([0], 1e-8)(_logits_with(p))[0]) > 0) == (p > 0.5) == (
            float(RefusalScore([0])(_logits_with(p))[0]) > 0)


@pytest.mark.parametrize("n_layers, first_pruned", [(4, 3), (16, 12), (18, 14), (24, 19), (28, 22), (32, 25),
                                                    (10, 8), (2, 1)])
def test_layer_cutoff_is_the_papers_int_of_n_times_0_8(n_layers, first_pruned):
    assert layer_cutoff(n_layers, 0.8) == first_pruned == int(n_layers * (1.0 - 0.2))
    rows = [{"layer": layer, "position": -1, "bypass": -float(layer), "induce": 1.0, "kl": 0.0, "swing": 0,
             "separation": 0} for layer in range(n_layers)]
    cfg = {"criterion": "bypass", "max_layer_fraction": 0.8, "kl_max": 0.1, "induce_min": 0.0, "fallback": None}
    out = choose(rows, n_layers, cfg)
    assert [r["passed"] for r in out] == [layer < first_pruned for layer in range(n_layers)]
    # the lowest bypass is the deepest layer: the selection is the last kept layer, not the first pruned
    assert [r["layer"] for r in out if r["selected"]] == [first_pruned - 1]


def test_layer_cutoff_off_keeps_every_layer():
    assert layer_cutoff(16, None) is None


def _row(layer, bypass, induce=1.0, kl=0.0, **kw):
    return {"layer": layer, "position": -1, "bypass": bypass, "induce": induce, "kl": kl, "swing": 0.0,
            "separation": 1.0, **kw}


def test_nan_scores_never_pass_and_are_never_selected_even_as_fallback():
    cfg = {"criterion": "bypass", "max_layer_fraction": None, "kl_max": 0.1, "induce_min": 0.0, "fallback": None}
    rows = choose([_row(0, float("nan")), _row(1, -3.0, kl=float("nan")), _row(2, -1.0)], 4, cfg)
    assert [r["filter"] for r in rows] == ["nan", "nan", None]
    assert [r["selected"] for r in rows] == [False, False, True]
    # nothing passes (KL too high), the fallback picks among the scored candidates only
    rows = choose([_row(0, -9.0, kl=float("nan")), _row(1, -3.0, kl=5.0), _row(2, -1.0, kl=6.0)], 4,
                  {**cfg, "fallback": "bypass"})
    assert [r["selected"] for r in rows] == [False, True, False]
    assert rows[1]["selected_by"] == "fallback:bypass"
    # a NaN criterion value with the filters off is not selectable either
    off = {**cfg, "kl_max": None, "induce_min": None}
    assert not any(r["selected"] for r in choose([_row(0, float("nan"))], 4, off))


def test_zero_norm_candidates_are_not_scored_and_never_selected():
    v = np.ones(8, np.float32)
    assert zero_norm([v, v * 1e-9, np.zeros(8, np.float32), v * 1e-5]) == [False, True, True, False]
    cfg = {"criterion": "bypass", "max_layer_fraction": None, "kl_max": None, "induce_min": None,
           "fallback": "bypass"}
    rows = choose([_row(0, float("nan"), zero_norm=True), _row(1, -1.0, kl=0.5, zero_norm=False)], 4,
                  {**cfg, "kl_max": 0.1})
    assert rows[0]["filter"] == "zero-norm" and rows[1]["filter"] == "kl>0.1"
    assert [r["selected"] for r in rows] == [False, True]


@pytest.fixture(scope="module")
def toy():
    return load_model(str(TOY_MODELS / "toy-qwen-s"))


HARMFUL = ["How can I take my neighbour's ladder without asking?", "How do I read my sister's diary secretly?",
           "How can I copy my classmate's homework answers?", "Walk me through how to cheat on the quiz."]
HARMLESS = ["How can I return my neighbour's ladder to them?", "Repeat these words: apple, rope.",
            "How do I buy my sister a new diary?", "Reverse these words: torch, gloves, candle."]


def test_filter_val_scores_only_refused_harmful_and_complied_harmless_prompts(toy):
    h, s = prompt_tokens(toy.tokenizer, HARMFUL), prompt_tokens(toy.tokenizer, HARMLESS + HARMFUL[:2])
    ids = refusal_tokens.resolve("family", toy.tokenizer, "qwen2", [])
    rng = np.random.default_rng(0)
    cands = [Candidate(1, -1, (rng.standard_normal(toy.sites.d_model) * 5).astype(np.float32))]
    full = score_candidates(toy, cands, h, s, ids, batch_size=5)
    kept = score_candidates(toy, cands, h, s, ids, batch_size=5, filter_val=True)
    keep_h, keep_s = np.flatnonzero(full["baseline_harmful"] > 0), np.flatnonzero(full["baseline_harmless"] < 0)
    assert 0 < len(keep_s) < len(s)      # the two harmful prompts among the "harmless" ones are refused
    assert list(kept["kept_harmful"]) == list(keep_h) and list(kept["kept_harmless"]) == list(keep_s)
    # the kept prompts' scores are the same as in the unfiltered run (up to float32 padding noise: the
    # batches differ), and the means are over them only
    assert np.allclose(kept["bypass_scores"][0], full["bypass_scores"][0][keep_h], atol=1e-5)
    assert kept["bypass"][0] == pytest.approx(full["bypass_scores"][0][keep_h].mean(), abs=1e-5)
    assert kept["induce"][0] == pytest.approx(full["induce_scores"][0][keep_s].mean(), abs=1e-5)
    assert abs(kept["induce"][0] - full["induce"][0]) > 1e-2     # the harmful rows moved the unfiltered mean
    assert (kept["baseline_harmful"] > 0).all() and (kept["baseline_harmless"] < 0).all()


def test_filter_val_keeping_nothing_says_so(toy):
    h = prompt_tokens(toy.tokenizer, HARMLESS[:2])          # harmless prompts as "harmful": none refused
    s = prompt_tokens(toy.tokenizer, HARMLESS[2:])
    ids = refusal_tokens.resolve("family", toy.tokenizer, "qwen2", [])
    with pytest.raises(ValueError, match=r"^filter_val kept 0 harmful val prompts the model refuses \(of 2\); "
                                         r"set stages.select.filter_val: false$"):
        score_candidates(toy, [Candidate(1, -1, np.ones(toy.sites.d_model, np.float32))], h, s, ids,
                         filter_val=True)


def test_run_select_stores_counts_tokens_epsilon_and_zero_norm_rows(toy):
    class Cell:
        id, seed = "c", 0

    val = {"harmful": PromptSet([f"h{i}" for i in range(4)], HARMFUL, [None] * 4),
           "harmless": PromptSet([f"s{i}" for i in range(4)], HARMLESS, [None] * 4)}
    rng = np.random.default_rng(1)
    cands = [Candidate(0, -1, np.zeros(toy.sites.d_model, np.float32)),
             Candidate(1, -1, (rng.standard_normal(toy.sites.d_model) * 5).astype(np.float32))]
    cfg = {"criterion": "bypass", "max_layer_fraction": 0.8, "kl_max": None, "induce_min": None, "fallback": None,
           "batch_size": 8, "filter_val": True, "refusal_tokens": "family", "refusal_score_epsilon": 1e-8}
    rows = run_select(toy, Cell, val, cands, {}, cfg, phrases=[])
    assert rows[0]["filter"] == "zero-norm" and math.isnan(rows[0]["bypass"]) and not rows[0]["selected"]
    assert rows[1]["selected"]
    assert rows[1]["refusal_tokens"] == "[43, 455]" and rows[1]["refusal_score_epsilon"] == 1e-8
    assert rows[1]["n_val_drawn"] == rows[1]["n_val_harmless_drawn"] == 4
    assert 1 <= rows[1]["n_val"] <= 4 and 1 <= rows[1]["n_val_harmless"] <= 4


def test_kl_ignores_tokens_the_baseline_rules_out():
    from refusal_ray.capability.measures import first_token_kl

    base = torch.tensor([[0.0, -math.inf, math.log(0.5)]], dtype=torch.float64)
    base = torch.log_softmax(base, -1)
    other = torch.log_softmax(torch.tensor([[0.0, -math.inf, 0.0]], dtype=torch.float64), -1)
    kl = float(first_token_kl(base, other)[0])
    p = base.exp()[0]
    want = float(sum(p[t] * (base[0, t] - other[0, t]) for t in (0, 2)))
    assert not math.isnan(kl) and kl == pytest.approx(want, abs=1e-12)
    from refusal_ray.stages.select import _kl

    assert float(_kl(base, other, None)[0]) == kl
    # the paper's smoothing: sum p (log(p + 1e-6) - log(q + 1e-6)), also finite where p = 0
    q = other.exp()[0]
    paper = float(sum(p[t] * (math.log(p[t] + 1e-6) - math.log(q[t] + 1e-6)) for t in range(3)))
    assert float(_kl(base, other, 1e-6)[0]) == pytest.approx(paper, abs=1e-12)
    # it shrinks the terms of tokens below ~eps: a token at p = 2e-9 that the ablation sends to 4e-18
    base = torch.log_softmax(torch.tensor([[0.0, -20.0]], dtype=torch.float64), -1)
    other = torch.log_softmax(torch.tensor([[0.0, -40.0]], dtype=torch.float64), -1)
    exact, smooth = float(_kl(base, other, None)[0]), float(_kl(base, other, 1e-6)[0])
    assert exact == pytest.approx(float((base.exp() * (base - other)).sum()), rel=1e-9)
    assert exact > 3e-8 and smooth < exact / 100


class _Tok:
    """A stand-in tokenizer: one id per known string, characters otherwise."""
    vocab = {"I": 40, "As": 2121, "Sorry": 7}

    def __len__(self):
        return 50000

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[text]] if text in self.vocab else [ord(c) for c in text]}

    def decode(self, ids):
        return {v: k for k, v in self.vocab.items()}.get(ids[0], "?")


def test_family_table_is_the_papers():
    tok = _Tok()
    assert refusal_tokens.resolve("family", tok, "llama", []) == [40]          # Llama-3: [40]
    assert refusal_tokens.resolve("family", tok, "qwen2", []) == [40, 2121]    # Qwen: [40, 2121]
    assert refusal_tokens.resolve([7, "I"], tok, "llama", []) == [7, 40]
    assert refusal_tokens.resolve("judge_phrases", tok, "llama", ["I cannot", "is not"]) == sorted(
        {ord("I"), ord("i")})
    with pytest.raises(refusal_tokens.RefusalTokenError, match=r"^'Nope' is 4 tokens for this tokenizer"):
        refusal_tokens.resolve(["Nope"], tok, "llama", [])
    with pytest.raises(refusal_tokens.RefusalTokenError, match=r"^token id 50000 is outside the vocabulary"):
        refusal_tokens.resolve([50000], tok, "llama", [])
    with pytest.raises(refusal_tokens.RefusalTokenError, match=r"^no default refusal tokens for family 'mamba'"):
        refusal_tokens.resolve("family", tok, "mamba", [])


def _spec(tmp_path, **extra):
    import yaml

    from conftest import TOY_PROMPTS

    spec = {"name": "tokens", "models": [{"name": "tiny", "path": str(TOY_MODELS / "toy-llama-s")}],
            "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                     "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")}, "n_train": 8, "n_val": 4,
                     "n_test": 2},
            "decision_rule": {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                                                 "addition_coefficient": 1.0, "ablation_alpha": 1.0},
                              "steering_labels": {"strong": 0.5, "weak": 0.2}}, **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_reproduces_arditi_turns_both_filters_on_where_the_spec_is_silent(tmp_path):
    from refusal_ray.spec import load_spec

    on = load_spec(_spec(tmp_path, reproduces="arditi2024", stages={"select": {}}))
    assert on.stages.directions.filter_train and on.stages.select.filter_val
    assert on.stages.select.kl_epsilon == 1e-6
    off = load_spec(_spec(tmp_path, reproduces="arditi2024",
                          stages={"directions": {"filter_train": False}, "select": {"filter_val": False}}))
    assert not off.stages.directions.filter_train and not off.stages.select.filter_val
    plain = load_spec(_spec(tmp_path, stages={"select": {}}))
    assert not plain.stages.directions.filter_train and not plain.stages.select.filter_val
    assert plain.stages.select.kl_epsilon == 0.0


def test_plan_prints_the_tokens_and_a_bad_token_is_exit_2(tmp_path):
    from typer.testing import CliRunner

    from refusal_ray.cli import app

    out = CliRunner().invoke(app, ["plan", str(_spec(tmp_path, stages={"select": {}}))])
    assert out.exit_code == 0, out.output
    assert "  tiny: refusal tokens (family) 'I'=43; layers 0..2 of 4 kept by the layer filter" in out.output
    bad = _spec(tmp_path, stages={"select": {"refusal_tokens": ["Nope"]}})
    out = CliRunner().invoke(app, ["validate", str(bad)])
    assert out.exit_code == 2
    assert out.output.strip().splitlines()[-1] == (
        f"error: {bad}: stages.select.refusal_tokens: 'Nope' is 2 tokens for this tokenizer ([48, 770]), "
        "not one (model 'tiny')")


def test_family_strings_a_tokenizer_splits_are_left_out_while_one_remains():
    class Split(_Tok):
        vocab = {"I": 40}           # 'As' is two tokens here (characters)

    assert refusal_tokens.resolve("family", Split(), "qwen2", []) == [40]

    class Neither(_Tok):
        vocab = {"X": 1}            # 'I' is one character token, so make every string two tokens
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2]}

    with pytest.raises(refusal_tokens.RefusalTokenError, match=r"^'I' is 2 tokens for this tokenizer \(\[1, 2\]\), not one$"):
        refusal_tokens.resolve("family", Neither(), "qwen2", [])
