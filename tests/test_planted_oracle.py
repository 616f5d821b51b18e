"""The planted-rank oracle (issue 20): data/models/toy-planted-k{1,2,3} refuse through exactly k directions.

Checked with the tool's own pieces: models.load_model, models.chat (template, post-instruction
positions, greedy generate), interventions (capture, subspace ablation at every layer's resid_pre,
attn_out and mlp_out, Arditi et al. 2024 Sec. 2.4) and the substring judge.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from refusal_ray.interventions import RowEdit, capture, row_edits
from refusal_ray.judges.substring import SubstringJudge
from refusal_ray.models.chat import ChatOptions, generate, post_instruction_positions, render
from refusal_ray.models.loading import load_model
from refusal_ray.toy.planted import planted_directions

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "data" / "models"
PROMPTS = ROOT / "data" / "prompts" / "planted"
OPTS = ChatOptions()


def _rows(k: int, name: str) -> list[dict]:
    return [json.loads(line) for line in (PROMPTS / f"k{k}" / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=[1, 2, 3])
def planted(request):
    k = request.param
    lm = load_model(str(MODELS / f"toy-planted-k{k}"))
    return k, lm, _rows(k, "harmful"), _rows(k, "harmless")


def _batch(lm, instructions):
    enc = lm.tokenizer(render(lm.tokenizer, instructions, OPTS), return_tensors="pt", padding=True,
                       add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def _completions(lm, instructions, basis: torch.Tensor | None = None) -> list[str]:
    """Greedy completions; with `basis` [r, d_model] (orthonormal rows) projected out at every layer and position."""
    ids, mask = _batch(lm, instructions)
    if basis is None:
        return generate(lm, ids, mask, OPTS, max_new_tokens=12)
    edit = RowEdit(ablate_basis=basis[None].expand(len(instructions), -1, -1).contiguous(),
                   basis_alpha=torch.ones(len(instructions)))
    n_layers = lm.model.config.num_hidden_layers
    edits = {(kind, layer): edit for layer in range(n_layers) for kind in ("resid_pre", "attn_out", "mlp_out")}
    with row_edits(lm.sites, edits):
        return generate(lm, ids, mask, OPTS, max_new_tokens=12)


def _rate(completions) -> float:
    return sum(SubstringJudge()(completions)) / len(completions)


def _by_category(harmful):
    cats = sorted({r["category"] for r in harmful})
    return {c: [r["instruction"] for r in harmful if r["category"] == c] for c in cats}


def test_files_and_directions(planted):
    k, lm, harmful, harmless = planted
    d = planted_directions(MODELS / f"toy-planted-k{k}")
    assert d.shape == (k, lm.model.config.hidden_size)
    torch.testing.assert_close(d @ d.T, torch.eye(k), atol=1e-6, rtol=0)
    assert len({r["category"] for r in harmful}) == k and len(harmful) == len(harmless)
    assert {r["split"] for r in harmful} == {"train", "val", "test"}
    assert lm.model.config.num_hidden_layers >= 4


def test_unablated_refuses_harmful_only(planted):
    k, lm, harmful, harmless = planted
    for cat, instr in _by_category(harmful).items():
        outs = _completions(lm, instr)
        assert _rate(outs) == 1.0, (cat, outs[:3])
    outs = _completions(lm, [r["instruction"] for r in harmless])
    assert _rate(outs) == 0.0 and all(o == "Sure, here is your plan!" for o in outs), outs[:3]


def test_ablating_the_span_removes_refusal_and_k_minus_1_do_not(planted):
    k, lm, harmful, _ = planted
    d = planted_directions(MODELS / f"toy-planted-k{k}")
    cats = _by_category(harmful)
    everything = [x for v in cats.values() for x in v]
    assert _rate(_completions(lm, everything, d)) == 0.0
    for kept in range(k):   # ablate all but d_kept: category kept still refused, the others not
        others = [j for j in range(k) if j != kept]
        if not others:
            continue
        for c, (cat, instr) in enumerate(cats.items()):
            rate = _rate(_completions(lm, instr, d[others]))
            assert rate == (1.0 if c == kept else 0.0), (kept, cat, rate)


def test_random_subspace_keeps_refusal(planted):
    """Random k-dim subspaces of the whole residual stream (seed 7, 10 draws) leave refusal at 1.0 (measured:
    every draw; overlaps ||P d_c||^2 up to 0.2)."""
    k, lm, harmful, _ = planted
    gen = torch.Generator().manual_seed(7)
    rates = []
    for _ in range(10):
        q, _ = torch.linalg.qr(torch.randn(lm.model.config.hidden_size, k, generator=gen))
        rates.append(_rate(_completions(lm, [r["instruction"] for r in harmful], q.T.contiguous())))
    assert rates == [1.0] * 10, rates


def _k_minus_1_subspaces(d: torch.Tensor, n: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """(k - 1)-dim subspaces of span{d_1..d_k} ([k - 1, d_model] orthonormal rows): the top-(k - 1) planted
    directions, the mixed direction (d_1 + ... + d_k)/sqrt(k) (with k - 2 random span vectors orthogonal to it)
    and `n` uniformly random ones."""
    k = d.shape[0]
    gen = torch.Generator().manual_seed(seed)
    out = [("top", d[: k - 1])]
    mixed = torch.ones(k, 1) / k ** 0.5
    rest = torch.randn(k, k - 2, generator=gen) if k > 2 else torch.zeros(k, 0)
    out.append(("mixed", torch.linalg.qr(torch.cat([mixed, rest], 1))[0].T @ d))
    for i in range(n):
        out.append((f"random{i}", torch.linalg.qr(torch.randn(k, k - 1, generator=gen))[0].T @ d))
    return out


def test_no_k_minus_1_subspace_of_the_span_removes_refusal(planted):
    """The rank is k over all directions, not only within the planted coordinates: for any (k - 1)-dim subspace
    S of the span, some category keeps r_c = 1 - ||P_S d_c||^2 >= 1/k (sum_c ||P_S d_c||^2 = k - 1), and that
    whole category still refuses (every prompt). Category c's prompts keep the coefficients m_c = D (I - P_S) d_c
    on d_1..d_k (m_cc = r_c; m_cj = -(P_S d_c) . d_j, read by category j's opener), and refuse (every prompt)
    when max_j m_cj >= 1/3, none when <= 0.15 (the planted threshold lies between). The single mixed direction
    in particular suppresses nothing."""
    k, lm, harmful, _ = planted
    if k == 1:
        pytest.skip("k = 1: the only 0-dim subspace ablates nothing")
    d = planted_directions(MODELS / f"toy-planted-k{k}")
    cats = _by_category(harmful)
    for name, s in _k_minus_1_subspaces(d, 6, 11):
        torch.testing.assert_close(s @ s.T, torch.eye(k - 1), atol=1e-5, rtol=0)
        m = torch.eye(k) - (d @ s.T) @ (s @ d.T)                                 # [k, k] rows m_c
        assert float(m.diagonal().max()) >= 1 / k - 1e-5
        rates = {c: _rate(_completions(lm, instr, s)) for c, instr in cats.items()}
        assert max(rates.values()) == 1.0, (name, m, rates)
        for c, (cat, rate) in enumerate(rates.items()):
            top = float(m[c].max())
            if top >= 1 / 3 - 1e-6:
                assert rate == 1.0, (name, cat, top, rate)
            elif top <= 0.15:
                assert rate == 0.0, (name, cat, top, rate)
    mixed = (d.sum(0) / k ** 0.5)[None]
    assert _rate(_completions(lm, [x for v in cats.values() for x in v], mixed)) == 1.0


def _post_instruction_acts(lm, instructions, layer: int) -> torch.Tensor:
    """[n, n_post, d_model] resid_pre of `layer` at the post-instruction positions."""
    ids, mask = _batch(lm, instructions)
    pos = post_instruction_positions(lm.tokenizer, OPTS, instructions)
    site = f"blocks.{layer}.hook_resid_pre"
    return capture(lm.model, ids, mask, [site], lm.sites)[site][:, pos].float()


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_difference_of_means_and_pca_recover_the_planted_directions(planted, layer):
    k, lm, harmful, harmless = planted
    d = planted_directions(MODELS / f"toy-planted-k{k}")
    base = _post_instruction_acts(lm, [r["instruction"] for r in harmless], layer)
    assert _post_instruction_acts(lm, [r["instruction"] for r in harmless], layer).shape[1] == 5
    for c, (cat, instr) in enumerate(_by_category(harmful).items()):
        diff = (_post_instruction_acts(lm, instr, layer).mean(0) - base.mean(0))    # [n_post, d_model]
        for p in range(diff.shape[0]):
            cos = torch.nn.functional.cosine_similarity(diff[p], d[c], dim=0)
            assert cos >= 0.99, (cat, p, float(cos))
    # paired per-prompt differences at the last position: exactly k components
    acts = _post_instruction_acts(lm, [r["instruction"] for r in harmful], layer)[:, -1]
    pairs = acts - base[:, -1]                                                      # [n, d_model]
    s = torch.linalg.svdvals(pairs.double()) ** 2
    assert s[k - 1] / s[0] > 0.01 and (k == len(s) or s[k] / s[0] < 0.01), s[: k + 1]
    # the top-k right singular vectors span the planted subspace (principal angles ~ 0)
    v = torch.linalg.svd(pairs.double(), full_matrices=False).Vh[:k]
    cosines = torch.linalg.svdvals(v @ d.double().T)
    assert cosines.min() > 0.999, cosines


def test_batched_equals_unbatched(planted):
    k, lm, harmful, harmless = planted
    xs = [r["instruction"] for r in itertools.islice(harmful, 3)] + [harmless[0]["instruction"]]
    assert _completions(lm, xs) == [_completions(lm, [x])[0] for x in xs]


def test_validate_and_plan_accept_a_spec(tmp_path, planted):
    import yaml
    from typer.testing import CliRunner

    from refusal_ray.cli import app
    from refusal_ray.plan import make_plan

    k = planted[0]
    pdir = PROMPTS / f"k{k}"
    spec = {"name": f"planted-k{k}",
            "models": [{"name": f"planted-k{k}", "path": str(MODELS / f"toy-planted-k{k}")}],
            "data": {"harmful": {"path": str(pdir / "harmful.jsonl"), "instruction_column": "instruction",
                                 "split_column": "split", "category_column": "category"},
                     "harmless": {"path": str(pdir / "harmless.jsonl"), "instruction_column": "instruction",
                                  "split_column": "split"},
                     "n_train": 8, "n_val": 4, "n_test": 4},
            "seeds": [0],
            "stages": {"directions": {"sites": ["resid_pre"], "positions": "post_instruction"},
                       "steer": {"addition": {"coefficients": [1.0]}, "ablation": {"direction_layer": "best"}}},
            "generation": {"max_new_tokens": 12},
            "decision_rule": {   # as tests/test_bad_input.base_spec
                "control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                                   "addition_coefficient": 1.0, "ablation_alpha": 1.0},
                "steering_labels": {"strong": 0.5, "weak": 0.2}}}
    f = tmp_path / "planted.yaml"
    f.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["validate", str(f)])
    assert result.exit_code == 0, result.output
    plan = make_plan(f)
    assert list(plan.models) == [f"planted-k{k}"]


@pytest.mark.parametrize("k", [2, 3])
def test_known_limit_one_off_span_direction_removes_refusal(k):
    """Known limit (measured; what stage optimise's dim-1 sets find on k = 2, 3): directional ablation of
    v = 0.5 e + sqrt(0.75) m, e the unit embedding of "\\n" (the constant identity at the last position, read by
    layer 1's gate and by the compliant opener) and m = (d_1 + ... + d_k)/sqrt(k), removes every category's
    refusal while harmless prompts still comply. x <- x - (x.v) v subtracts 0.5 * sqrt(0.75) * m at the "\\n"
    positions (x.e = 1 there), a negative planted feature that cancels the trigger's (10 f_p ~ 0.5-1.7 before
    the layer-1 amplification). So the planted rank k holds over subspaces of span{d_1..d_k}
    (test_no_k_minus_1_subspace_of_the_span_removes_refusal) and for the sources that stay in it (pca,
    category), not over every direction of the residual stream; and optimised sets need not span it."""
    lm = load_model(str(MODELS / f"toy-planted-k{k}"))
    d = planted_directions(MODELS / f"toy-planted-k{k}")
    e = lm.model.model.embed_tokens.weight[lm.tokenizer.get_vocab()["\u010a"]].detach()
    v = (0.5 * e / e.norm() + 0.75 ** 0.5 * d.sum(0) / k ** 0.5)[None]
    assert _rate(_completions(lm, [r["instruction"] for r in _rows(k, "harmful")], v)) == 0.0
    outs = _completions(lm, [r["instruction"] for r in _rows(k, "harmless")], v)
    assert all(o == "Sure, here is your plan!" for o in outs), outs[:3]
