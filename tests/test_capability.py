"""Stage capability: its measures, the lm-eval adapter, the stage end to end, bad input.

The measures against independent computations: the CE loss of one left-padded batch equals Hugging
Face's per-document loss (plain text, and completions after a chat prompt with the prompt masked),
batched equals unbatched with and without a broadcast edit, the first-token KL is 0 for the baseline
and >= 0 otherwise; the lm-eval adapter on a model whose answer is known by construction (accuracy
3/5 exactly, data files read against the task YAML's folder) and with a hook edit active inside
lm-eval (its log-likelihoods equal ours under the same hooks); the stage end to end on the toy
qwen-xs (in-memory orthogonalisation equals hook ablation, baseline KL 0, every metric per arm, the
cost table against a plain-pandas recomputation, weights unchanged afterwards); the cost's mean over
seeds and draws on synthetic rows of three seeds; bad input through `refusal-ray validate`; and four
regressions found while writing these tests (lm-eval re-tying the orthogonalised model's unembedding,
steer's explicit ablation position dropped, quantised models' default arms, missing prompts read as
"nan").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from refusal_ray import load_model
from refusal_ray.stages.capability.read import capability_cost
from refusal_ray.capability.harness import result_rows, run_tasks, ship_tasks
from refusal_ray.capability.measures import (cross_entropy, first_token_kl, load_texts, next_token_logprobs,
                                             text_tokens)
from refusal_ray.data import prompt_tokens, read_table
from refusal_ray.interventions import RowEdit, row_edits
from refusal_ray.models.chat import ChatOptions
from refusal_ray.ops.base import ABLATION_SITES

from conftest import REPO, TOY_MODELS, TOY_PROMPTS, make_tiny
from test_bad_input import base_spec

QWEN_XS = TOY_MODELS / "toy-qwen-xs"
LMEVAL = REPO / "tests" / "lmeval"
HELDOUT = TOY_PROMPTS / "heldout.jsonl"
CLI = Path(sys.executable).with_name("refusal-ray")   # the venv's console script
RULE = {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                           "addition_coefficient": 1.0, "ablation_alpha": 1.0},
        "steering_labels": {"strong": 0.5, "weak": 0.2}}


@pytest.fixture(scope="module")
def lm():
    out = load_model(str(QWEN_XS))                     # float32
    assert next(out.model.parameters()).dtype == torch.float32
    return out


def _plain_docs(n: int = 6) -> list[tuple[None, str]]:
    """Plain-text documents of increasing length (prefixes of the toy corpus' lines)."""
    lines = [ln for ln in (TOY_PROMPTS / "corpus.txt").read_text().splitlines() if ln.strip()][:n]
    return [(None, " ".join(line.split()[: 3 + 3 * i])) for i, line in enumerate(lines)]


def _chat_docs(n: int = 6) -> list[tuple[str, str]]:
    return load_texts(HELDOUT, "completion", "prompt", n)


def _edits(d_model: int, n_layers: int, seed: int = 0) -> dict:
    """Broadcast edits ([1, ...] rows): a random addition at resid_pre of layer 0 and a random
    directional ablation at every layer's resid_pre, attn_out and mlp_out."""
    g = torch.Generator().manual_seed(seed)
    add = torch.randn(1, d_model, generator=g)
    u = torch.randn(1, d_model, generator=g)
    u = u / u.norm()
    edits = {(kind, layer): RowEdit(u, torch.ones(1)) for layer in range(n_layers) for kind in ABLATION_SITES}
    edits[("resid_pre", 0)] = RowEdit(u, torch.ones(1), add)
    return edits


# -- 1. CE loss against Hugging Face's loss, document by document ----------------------------------

def test_cross_entropy_of_plain_text_equals_hf_loss_per_document(lm):
    tok = lm.tokenizer
    docs = _plain_docs()
    seqs = text_tokens(tok, docs, max_tokens=128)
    assert len(seqs) == len(docs)
    lengths = [len(ids) for ids, _ in seqs]
    assert len(set(lengths)) == len(lengths), lengths        # every row of the batch is padded differently
    total, count = 0.0, 0
    for (ids, first), (_, text) in zip(seqs, docs):
        assert ids == tok(text)["input_ids"] and first == 1
        x = torch.tensor([ids])
        with torch.no_grad():
            loss = lm.model(input_ids=x, labels=x).loss
        total += float(loss) * (len(ids) - 1)
        count += len(ids) - 1
    got, n = cross_entropy(lm, seqs, batch_size=len(seqs))    # one left-padded batch
    print(f"\nplain text: CE {got:.6f} over {n} tokens, per-document reference {total / count:.6f}")
    assert n == count
    assert abs(got - total / count) <= 1e-5


def test_cross_entropy_of_completions_masks_the_prompt(lm):
    tok = lm.tokenizer
    docs = _chat_docs()
    seqs = text_tokens(tok, docs, max_tokens=128, chat=ChatOptions())
    assert len(seqs) == len(docs)
    total, count = 0.0, 0
    for (ids, first), (instruction, text) in zip(seqs, docs):
        rendered = tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                           add_generation_prompt=True)
        prompt = tok(rendered, add_special_tokens=False)["input_ids"]
        completion = tok(text, add_special_tokens=False)["input_ids"]
        assert (ids, first) == (prompt + completion, len(prompt))
        x = torch.tensor([prompt + completion])
        labels = torch.tensor([[-100] * len(prompt) + completion])
        with torch.no_grad():
            loss = lm.model(input_ids=x, labels=labels).loss
        total += float(loss) * len(completion)
        count += len(completion)
    got, n = cross_entropy(lm, seqs, batch_size=len(seqs))
    print(f"\ncompletions: CE {got:.6f} over {n} tokens, per-document reference {total / count:.6f}")
    assert n == count
    assert abs(got - total / count) <= 1e-5
    # the prompt is not scored: scoring it too gives another number
    everything = [(ids, 1) for ids, _ in seqs]
    assert abs(cross_entropy(lm, everything, batch_size=len(seqs))[0] - got) > 1e-2


# -- 2. batched equals unbatched ---------------------------------------------------------------------

@pytest.mark.parametrize("edited", [False, True], ids=["unedited", "broadcast-edit"])
def test_cross_entropy_batched_equals_unbatched(lm, edited):
    seqs = (text_tokens(lm.tokenizer, _plain_docs(), 128)
            + text_tokens(lm.tokenizer, _chat_docs(8), 128, ChatOptions()))
    edits = _edits(lm.sites.d_model, lm.sites.n_layers) if edited else None
    one, n_one = cross_entropy(lm, seqs, batch_size=1, edits=edits)
    eight, n_eight = cross_entropy(lm, seqs, batch_size=8, edits=edits)
    assert n_one == n_eight
    assert abs(one - eight) <= 1e-6, (one, eight)
    if edited:   # the edit was active
        assert abs(one - cross_entropy(lm, seqs, batch_size=8)[0]) > 1e-2


# -- 3. first-token KL and next-token log-probabilities ----------------------------------------------

@pytest.fixture(scope="module")
def harmless_prompts(lm):
    df = read_table(TOY_PROMPTS / "harmless.jsonl")
    instructions = list(df[df["split"] == "test"]["instruction"][:10])
    seqs = prompt_tokens(lm.tokenizer, instructions, ChatOptions())
    assert len({len(s) for s in seqs}) > 1                   # padded batches
    return seqs


def test_first_token_kl_of_baseline_is_zero_and_of_an_edit_positive(lm, harmless_prompts):
    base = next_token_logprobs(lm, harmless_prompts, batch_size=4)
    again = next_token_logprobs(lm, harmless_prompts, batch_size=4, edits={})
    assert base.dtype == torch.float64 and base.shape == (len(harmless_prompts), lm.model.config.vocab_size)
    assert torch.equal(first_token_kl(base, again), torch.zeros(len(harmless_prompts), dtype=torch.float64))
    edited = next_token_logprobs(lm, harmless_prompts, batch_size=4,
                                 edits=_edits(lm.sites.d_model, lm.sites.n_layers))
    kl = first_token_kl(base, edited)
    print(f"\nfirst-token KL of the random edit: mean {float(kl.mean()):.4f}, min {float(kl.min()):.2e}")
    assert (kl >= 0).all() and float(kl.mean()) > 1e-2


@pytest.mark.parametrize("edited", [False, True], ids=["unedited", "broadcast-edit"])
def test_next_token_logprobs_batched_equals_one_prompt_at_a_time(lm, harmless_prompts, edited):
    edits = _edits(lm.sites.d_model, lm.sites.n_layers, seed=1) if edited else None
    batched = next_token_logprobs(lm, harmless_prompts, batch_size=8, edits=edits)
    alone = next_token_logprobs(lm, harmless_prompts, batch_size=1, edits=edits)
    # probabilities to 1e-6; log-probabilities (about -12 for most tokens) to float32 rounding of the
    # logits, whose spacing there is 1e-6: a padded batch and a single row round differently
    print(f"\nbatched vs alone: max |d log p| {float((batched - alone).abs().max()):.2e}, "
          f"max |d p| {float((batched.exp() - alone.exp()).abs().max()):.2e}")
    assert (batched.exp() - alone.exp()).abs().max() <= 1e-6
    assert (batched - alone).abs().max() <= 1e-5
    assert first_token_kl(alone, batched).abs().max() <= 1e-9
    # rows come back in the prompts' order (the batches are sorted by length internally)
    for i, seq in enumerate(harmless_prompts):
        with row_edits(lm.sites, edits or {}), torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([seq])).logits[0, -1]
        assert (torch.log_softmax(logits.double(), -1) - batched[i]).abs().max() <= 1e-5, i
    np.testing.assert_allclose(batched.exp().sum(-1).numpy(), 1.0, atol=1e-9)


# -- 4. lm-eval on a model whose answer is known by construction -------------------------------------

TASK_YAML = """\
task: always_apple
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/docs.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _constant_model(out, token: int, scale: float = 50.0):
    """A one-layer llama (untied embeddings) with the toy tokenizer whose next token is `token` after any
    context: attention and MLP write nothing (o_proj = down_proj = 0), so the final residual is the token's
    embedding; every embedding row is the same vector e, and lm_head has one non-zero row, `token`'s,
    scale * e / |e| (logit scale * sqrt(d_model) after the final RMSNorm; every other logit 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (QWEN_XS / f).exists():
            shutil.copy(QWEN_XS / f, out / f)
    vocab = json.loads((QWEN_XS / "config.json").read_text())["vocab_size"]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        e = torch.randn(cfg.hidden_size)
        model.model.embed_tokens.weight.copy_(e.expand(vocab, -1))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = scale * e / e.norm()
    model.save_pretrained(out)
    assert (out / "model.safetensors").is_file()
    return out


def test_lm_eval_accuracy_known_by_construction(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(QWEN_XS)
    # lm-eval scores " " + choice (target_delimiter " ") after the context; both are one token here
    (T,), (U,) = tok(" apple", add_special_tokens=False)["input_ids"], tok(" rope", add_special_tokens=False)["input_ids"]
    lm = load_model(str(_constant_model(tmp_path / "constant", T)))
    assert lm.model.get_output_embeddings().weight is not lm.model.get_input_embeddings().weight
    probe = [tok(t, add_special_tokens=False)["input_ids"] for t in
             ("Repeat these words: apple, rope. Sure:", "rope rope rope", "How many words are here?")]
    probe.append(list(range(3, 60)))
    for ids in probe:
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        assert (lp.argmax(-1) == T).all()
        assert (lp[:, T] > -1e-6).all() and (lp[:, U] < -100).all()

    # gold is apple (T) in docs 0, 3, 4: accuracy 3/5 by hand
    docs = [{"question": "Pick a word: apple or rope?", "choices": ["apple", "rope"], "answer": 0},
            {"question": "Which one is tied in knots?", "choices": ["apple", "rope"], "answer": 1},
            {"question": "Name a thing to climb with.", "choices": ["rope", "apple"], "answer": 0},
            {"question": "Name a fruit.", "choices": ["rope", "apple"], "answer": 1},
            {"question": "What grows on a tree?", "choices": ["apple", "rope"], "answer": 0}]
    expected = sum(d["choices"][d["answer"]] == "apple" for d in docs) / len(docs)
    assert expected == 0.6
    tasks = tmp_path / "tasks"
    (tasks / "data").mkdir(parents=True)
    (tasks / "data" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "always_apple.yaml").write_text(TASK_YAML)
    elsewhere = tmp_path / "elsewhere"          # relative data_files must not be read against the cwd
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    shipped = ship_tasks(["always_apple"], str(tasks))
    assert shipped["tasks"] == [{"name": "always_apple", "yaml": "always_apple.yaml"}]
    assert set(shipped["files"]) == {"always_apple.yaml", os.path.join("data", "docs.jsonl")}
    results = run_tasks(lm, shipped, batch_size=3, log_samples=True)
    rows = result_rows(results)
    assert [(r["metric"], r["value"], r["n"]) for r in rows] == [("lm_eval/always_apple/acc", expected, 5)]
    samples = sorted(results["samples"]["always_apple"], key=lambda s: s["doc_id"])
    for s, d in zip(samples, docs):
        assert [cont for _, cont in s["arguments"]] == [" " + c for c in d["choices"]]
        for ctx, cont in s["arguments"]:   # lm-eval's continuation tokens: those of ctx + cont after ctx's
            whole, head = tok(ctx + cont, add_special_tokens=False)["input_ids"], tok(ctx, add_special_tokens=False)["input_ids"]
            assert whole[len(head):] == ([T] if cont == " apple" else [U])
        lls = [ll for ll, _ in s["filtered_resps"]]
        for choice, ll in zip(d["choices"], lls):
            assert (ll > -1e-5) if choice == "apple" else (ll < -100), (choice, ll)
        assert s["acc"] == float(d["choices"][d["answer"]] == "apple")
    assert list(elsewhere.iterdir()) == []


# -- 5. lm-eval with a hook edit active ----------------------------------------------------------------

def _loglikelihood(lm, context: str, continuation: str, edits: dict) -> float:
    """log P(continuation | context), tokenised as lm-eval's HF wrapper does (the continuation's tokens
    are those of context + continuation after the context's), one sequence, no padding."""
    tok = lm.tokenizer
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    assert whole[:len(ctx)] == ctx and len(whole) > len(ctx)
    with row_edits(lm.sites, edits), torch.no_grad():
        lp = torch.log_softmax(lm.model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
    return float(sum(lp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def _sample_lls(results: dict, task: str = "toy_choice") -> list[tuple[str, str, float]]:
    out = []
    for s in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        for (ctx, cont), (ll, _) in zip(s["arguments"], s["filtered_resps"]):
            out.append((ctx, cont, float(ll)))
    return out


def test_lm_eval_runs_with_the_arms_hooks_active(lm):
    shipped = ship_tasks(["toy_choice"], str(LMEVAL))
    g = torch.Generator().manual_seed(0)
    edits = {("resid_pre", 0): RowEdit(add=2.0 * torch.randn(1, lm.sites.d_model, generator=g))}
    plain = _sample_lls(run_tasks(lm, shipped, batch_size=4, log_samples=True))
    with row_edits(lm.sites, edits):
        edited = _sample_lls(run_tasks(lm, shipped, batch_size=4, log_samples=True))
    assert len(plain) == len(edited) == 10
    worst = 0.0
    for (ctx, cont, ll), (ctx2, cont2, ll_edit) in zip(plain, edited):
        assert (ctx, cont) == (ctx2, cont2)
        worst = max(worst, abs(ll - _loglikelihood(lm, ctx, cont, {})),
                    abs(ll_edit - _loglikelihood(lm, ctx, cont, edits)))
    print(f"\nlm-eval vs own log-likelihoods: max diff {worst:.2e}; "
          f"edit moved them by up to {max(abs(a[2] - b[2]) for a, b in zip(plain, edited)):.2f}")
    assert worst <= 1e-4
    assert max(abs(a[2] - b[2]) for a, b in zip(plain, edited)) > 0.1       # the edit was active inside lm-eval


def test_lm_eval_under_orthogonalized_weights_equals_hook_ablation(lm):
    from refusal_ray.models.orthogonalize import orthogonalized

    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight   # tied
    shipped = ship_tasks(["toy_choice"], str(LMEVAL))
    v = torch.randn(lm.sites.d_model, generator=torch.Generator().manual_seed(3))
    u = (v / v.norm())[None]
    edits = {(kind, layer): RowEdit(u, torch.ones(1)) for layer in range(lm.sites.n_layers)
             for kind in ABLATION_SITES}
    with row_edits(lm.sites, edits):
        hooked = _sample_lls(run_tasks(lm, shipped, batch_size=4, log_samples=True))
    with orthogonalized(lm, v.numpy()):
        weights = _sample_lls(run_tasks(lm, shipped, batch_size=4, log_samples=True))
    assert max(abs(a[2] - b[2]) for a, b in zip(hooked, weights)) <= 1e-4


# -- 6. the stage end to end ---------------------------------------------------------------------------

def _toy_spec(name: str, stages: dict, n_test: int = 8, max_new_tokens: int = 16) -> dict:
    return {
        "name": name,
        "models": [{"name": "qwen-xs", "path": str(QWEN_XS)}],
        "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl"), "split_column": "split"},
                 "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl"), "split_column": "split",
                              "reference_column": "reference"},
                 "n_train": 16, "n_val": 8, "n_test": n_test},
        "seeds": [0],
        "stages": stages,
        "generation": {"max_new_tokens": max_new_tokens},
        "decision_rule": RULE,
    }


def _run_local(spec: dict, folder):
    """run_local on `spec` (written into `folder`); returns (plan, {table: DataFrame}, the ModelSession)."""
    from refusal_ray.cluster import local
    from refusal_ray.plan import make_plan

    f = folder / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    plan = make_plan(str(f))
    sessions = []

    class Recorded(local.ModelSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sessions.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local, "ModelSession", Recorded)
        out = local.run_local(plan, log=lambda m: None)
    assert len(sessions) == 1
    return plan, {k: pd.DataFrame(v) for k, v in out.items()}, sessions[0]


REQUIRED = {"ce_loss", "first_token_kl", "refusal_harmful", "refusal_harmless", "task_exact_match",
            "lm_eval/toy_choice/acc"}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    stages = {"directions": {"sites": ["resid_pre"]},
              # the paper's layer filter int(0.8 L) keeps only layer 0 of the 2-layer qwen-xs, whose template-position
              # directions are zero (every prompt has the same embedding there): nothing to select
              "select": {"kl_max": None, "max_layer_fraction": None},
              "steer": {"addition": None, "ablation": {"alphas": [1.0], "direction_layer": "selected"},
                        "subspace": {"top_k": 2, "alphas": [1.0]}},
              "capability": {"text": {"path": str(HELDOUT)},
                             "lm_eval": {"tasks": ["toy_choice"], "include_path": str(LMEVAL)}}}
    return _run_local(_toy_spec("capability-e2e", stages), tmp_path_factory.mktemp("capability-e2e"))


def _arm(cap: pd.DataFrame, arm: str, control: bool = False) -> pd.DataFrame:
    rows = cap[(cap["arm"] == arm) & (cap["control"] == control)]
    assert rows["cell_id"].nunique() == 1, (arm, control)
    return rows.set_index("metric")


def test_toy_run_every_cell_done_and_every_arm_has_every_metric(toy_run):
    _, out, _ = toy_run
    assert set(out["cells"]["status"]) == {"done"}, out["cells"][["stage", "status", "error"]]
    cap = out["capability"]
    assert set(cap["arm"]) == {"baseline", "addition", "ablation", "subspace", "orthogonalized",
                               "orthogonalized_subspace"}
    for (arm, control), rows in cap.groupby(["arm", "control"]):
        assert REQUIRED <= set(rows["metric"]), (arm, control, sorted(rows["metric"]))
        assert rows["metric"].is_unique
    assert set(cap.loc[cap["arm"] == "subspace", "subspace_rank"]) == {2}


def test_toy_run_orthogonalized_arm_equals_hook_ablation(toy_run):
    _, out, _ = toy_run
    cap = out["capability"]
    orth, abl = _arm(cap, "orthogonalized"), _arm(cap, "ablation")
    assert abl["alpha"].eq(1.0).all() and abl["direction"].eq("selected").all()
    for col in ("direction", "direction_layer", "direction_position", "vector_norm"):
        assert orth[col].iloc[0] == abl[col].iloc[0], col
    assert set(orth.index) == set(abl.index)
    diffs = {}
    for metric in orth.index:
        assert orth.loc[metric, "n"] == abl.loc[metric, "n"], metric
        a, b = orth.loc[metric, "value"], abl.loc[metric, "value"]
        if metric in ("ce_loss", "first_token_kl"):
            diffs[metric] = abs(a - b)
            assert abs(a - b) <= 1e-4, (metric, a, b)
        else:                                                    # rates and lm-eval accuracy: exactly
            assert a == b, (metric, a, b)
    base = _arm(cap, "baseline")
    print(f"\nbaseline CE {base.loc['ce_loss', 'value']:.6f} ({int(base.loc['ce_loss', 'n'])} tokens); ablation CE "
          f"{abl.loc['ce_loss', 'value']:.6f}, KL {abl.loc['first_token_kl', 'value']:.6f}; |orthogonalized - "
          f"ablation|: CE {diffs['ce_loss']:.2e}, KL {diffs['first_token_kl']:.2e}")
    # the arm did something (else equality proves nothing)
    assert abs(abl.loc["ce_loss", "value"] - base.loc["ce_loss", "value"]) > 1e-2
    assert abl.loc["first_token_kl", "value"] > 1e-2


def test_toy_run_baseline_equals_a_fresh_measurement(toy_run):
    plan, out, _ = toy_run
    base = _arm(out["capability"], "baseline")
    assert base.loc["first_token_kl", "value"] == 0
    fresh = load_model(str(QWEN_XS))
    cfg = plan.spec.stages.capability
    texts = text_tokens(fresh.tokenizer, load_texts(HELDOUT, "completion", "prompt", cfg.text.n), cfg.text.max_tokens,
                        ChatOptions(**plan.spec.chat.model_dump()))
    ce, n = cross_entropy(fresh, texts, batch_size=cfg.batch_size)
    assert base.loc["ce_loss", "n"] == n
    assert abs(base.loc["ce_loss", "value"] - ce) <= 1e-6
    assert base.loc["lm_eval/toy_choice/acc", "n"] == 5


COST_KEYS = ["model", "arm", "control", "coefficient", "alpha", "direction", "metric"]


def cost_by_hand(cap: pd.DataFrame) -> pd.DataFrame:
    """The capability cost recomputed with plain pandas from the capability rows, by its definition
    (refusal_ray/stages/capability/read.py): per (model, seed, metric) an arm's value minus the baseline arm's
    (first_token_kl: the value itself, already against the baseline), averaged over the seeds the arm
    was measured on, then over its control draws; `baseline` is the baseline's mean over the same
    seeds. Indexed by COST_KEYS, columns value, baseline, cost, seeds, draws."""
    df = cap.copy()
    df["direction"] = df["direction"].fillna("-")
    df["control"] = df["control"].astype(bool)
    df["draw"] = df["control_draw"].fillna(0).astype(int) if "control_draw" in df else 0
    base = df[df["arm"] == "baseline"].set_index(["model", "seed", "metric"])["value"]
    assert base.index.is_unique
    df["baseline"] = [base.get((m, s, k), np.nan) for m, s, k in zip(df["model"], df["seed"], df["metric"])]
    df["cost"] = np.where(df["metric"] == "first_token_kl", df["value"], df["value"] - df["baseline"])
    per_draw = df.groupby([*COST_KEYS, "draw"]).agg(value=("value", "mean"), baseline=("baseline", "mean"),
                                                    cost=("cost", "mean"), seeds=("seed", "nunique"))
    out = per_draw.groupby(COST_KEYS).agg(value=("value", "mean"), baseline=("baseline", "mean"),
                                          cost=("cost", "mean"), seeds=("seeds", "max"))
    out["draws"] = per_draw.reset_index().groupby(COST_KEYS)["draw"].nunique()
    return out


def assert_cost_equals_by_hand(cost: pd.DataFrame, cap: pd.DataFrame) -> pd.DataFrame:
    """capability_cost's table row for row against `cost_by_hand` (same settings, same values)."""
    want = cost_by_hand(cap)
    got = cost.assign(control=cost["control"].astype(bool)).set_index(COST_KEYS)
    assert got.index.is_unique and set(got.index) == set(want.index), set(got.index) ^ set(want.index)
    got = got.loc[want.index]
    for col in ("value", "baseline", "cost"):
        np.testing.assert_allclose(got[col].to_numpy(float), want[col].to_numpy(float), rtol=0, atol=1e-12,
                                   err_msg=col)
    assert (got["seeds"].to_numpy() == want["seeds"].to_numpy()).all()
    assert (got["draws"].to_numpy() == want["draws"].to_numpy()).all()
    return want


def test_toy_run_capability_cost(toy_run):
    _, out, _ = toy_run
    cap = out["capability"]
    want = assert_cost_equals_by_hand(capability_cost(cap), cap)
    assert set(want.index.get_level_values("arm")) == {"baseline", "addition", "ablation", "subspace",
                                                       "orthogonalized", "orthogonalized_subspace"}
    base = want.xs("baseline", level="arm")
    assert set(base.index.get_level_values("metric")) >= REQUIRED and (base["cost"] == 0).all()
    # the arms did something: a cost of 0 everywhere would equal any wrong pairing with itself
    ce = want.xs("ce_loss", level="metric")
    abl = ce.xs("ablation", level="arm")["cost"]
    real, ctl = abl.xs(False, level="control"), abl.xs(True, level="control")
    assert (real.abs() > 1e-2).all() and (real.abs().to_numpy() > ctl.abs().to_numpy()).all(), abl


def test_capability_cost_is_the_mean_over_seeds_of_arm_minus_baseline():
    """Synthetic rows, 3 seeds, 2 arms, a random control of 2 draws and an arm measured on 2 of the
    3 seeds: each cost equals the by-hand recomputation, and differs from any one seed's difference
    (so the mean over seeds, and the pairing per seed, are what is checked)."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in (0, 1, 2):
        for metric in ("ce_loss", "first_token_kl", "refusal_harmful"):
            base = float(rng.uniform(1, 2)) if metric != "first_token_kl" else 0.0
            rows.append({"model": "m", "seed": seed, "arm": "baseline", "control": False, "coefficient": 0.0,
                         "alpha": 0.0, "direction": None, "metric": metric, "value": base})
            for arm, c, a, control, draw in (("ablation", 0.0, 1.0, False, None), ("ablation", 0.0, 1.0, True, None),
                                             ("ablation", 0.0, 1.0, True, 1), ("addition", 1.0, 0.0, False, None)):
                if arm == "addition" and seed == 2:
                    continue                      # measured on seeds 0 and 1 only
                rows.append({"model": "m", "seed": seed, "arm": arm, "control": control, "coefficient": c, "alpha": a,
                             "direction": "L1/p-1", "metric": metric, "value": base + float(rng.uniform(0, 3)),
                             "control_draw": draw})
    cap = pd.DataFrame(rows)
    cost = capability_cost(cap)
    want = assert_cost_equals_by_hand(cost, cap)
    key = ("m", "ablation", False, 0.0, 1.0, "L1/p-1", "ce_loss")
    assert want.loc[key, "seeds"] == 3 and want.loc[key, "draws"] == 1
    ctl = ("m", "ablation", True, 0.0, 1.0, "L1/p-1", "ce_loss")
    assert want.loc[ctl, "draws"] == 2
    add = ("m", "addition", False, 1.0, 0.0, "L1/p-1", "ce_loss")
    assert want.loc[add, "seeds"] == 2
    # the addition arm's baseline is the baseline's mean over seeds 0 and 1, not over all three
    b = cap[(cap["arm"] == "baseline") & (cap["metric"] == "ce_loss")].set_index("seed")["value"]
    assert want.loc[add, "baseline"] == pytest.approx(b[[0, 1]].mean(), abs=1e-12)
    assert b[[0, 1]].mean() != pytest.approx(b.mean(), abs=1e-6)
    # a mean over seeds, not one seed's difference
    per_seed = cap[(cap["arm"] == "ablation") & ~cap["control"] & (cap["metric"] == "ce_loss")].set_index("seed")["value"] - b
    assert want.loc[key, "cost"] == pytest.approx(per_seed.mean(), abs=1e-12)
    assert all(abs(want.loc[key, "cost"] - d) > 1e-3 for d in per_seed)
    # first_token_kl: the value, not minus the baseline row's 0
    kl = ("m", "ablation", False, 0.0, 1.0, "L1/p-1", "first_token_kl")
    assert want.loc[kl, "cost"] == pytest.approx(cap[(cap["arm"] == "ablation") & ~cap["control"] &
                                                     (cap["metric"] == "first_token_kl")]["value"].mean(), abs=1e-12)


def test_toy_run_leaves_the_weights_bit_identical(toy_run):
    _, _, session = toy_run
    model, fresh = session.lm.model, load_model(str(QWEN_XS)).model
    after, want = model.state_dict(), fresh.state_dict()
    assert list(after) == list(want)
    for k, v in want.items():
        assert after[k].dtype == v.dtype and after[k].shape == v.shape, k
        assert torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (fresh.get_output_embeddings().weight is fresh.get_input_embeddings().weight)


def test_capability_ablation_uses_steers_explicit_direction(tmp_path):
    stages = {"directions": {"sites": ["resid_pre"], "positions": [-1, -3]},
              "steer": {"addition": None, "position": -1, "controls": False,
                        "ablation": {"alphas": [1.0], "direction_layer": 1, "direction_position": -3}},
              "capability": {"arms": ["baseline", "ablation"], "controls": False, "generate": False,
                             "text": {"path": str(HELDOUT), "n": 4}}}
    _, out, _ = _run_local(_toy_spec("dirpos", stages, n_test=2, max_new_tokens=2), tmp_path)
    steering = out["steering"]
    steer_abl = steering[steering["mode"] == "ablation"].iloc[0]
    assert (steer_abl["direction_layer"], steer_abl["direction_position"]) == (1, -3)
    cap_abl = _arm(out["capability"], "ablation").iloc[0]
    assert (cap_abl["direction_layer"], cap_abl["direction_position"]) == (1, -3)
    assert cap_abl["vector_norm"] == pytest.approx(steer_abl["vector_norm"])


def test_default_arms_leave_orthogonalized_out_for_quantised_models(tmp_path):
    from refusal_ray.plan import make_plan

    spec = base_spec(QWEN_XS)
    spec["models"][0]["quantization"] = "8bit"
    spec["stages"]["capability"] = {"controls": False}
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    modes = {c.params["mode"] for c in make_plan(str(f)).cells if c.stage == "capability"}
    assert "baseline" in modes and "orthogonalized" not in modes


def test_load_texts_refuses_a_row_without_its_instruction(tmp_path):
    """Scored completions and plain text are different quantities: a row of a prompt/completion file
    without its prompt is refused (it was once read as the instruction 'nan')."""
    for bad in ({"completion": "no prompt here"}, {"prompt": None, "completion": "null prompt"},
                {"prompt": "  ", "completion": "blank prompt"}):
        f = tmp_path / "mixed.jsonl"
        f.write_text(json.dumps({"prompt": "Say hi.", "completion": "hi"}) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=r"^row 1: empty 'prompt' \(every scored text needs its instruction; "
                                             r"set prompt_column: null to score plain text\)$"):
            load_texts(f, "completion", "prompt")
    assert load_texts(f, "completion", None) == [(None, "hi"), (None, "blank prompt")]


def test_first_token_kl_ignores_tokens_the_baseline_rules_out():
    base = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    other = torch.log(torch.tensor([[0.25, 0.75, 0.0]], dtype=torch.float64))
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    assert float(first_token_kl(base, other)[0]) == pytest.approx(expected, abs=1e-15)
    assert float(first_token_kl(base, base)[0]) == 0.0


def test_cross_entropy_with_nothing_to_score_says_why(lm):
    seqs = text_tokens(lm.tokenizer, [("A long instruction that fills the budget entirely.", "ok")], 4)
    assert seqs == []
    with pytest.raises(ValueError, match="no token to score: every document was dropped"):
        cross_entropy(lm, seqs, 4)


def _plan_cells(tmp_path, spec) -> list:
    from refusal_ray.plan import make_plan

    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    return [c for c in make_plan(str(f)).cells if c.stage == "capability"]


def test_capability_ids_move_only_with_what_an_arm_measures(tmp_path):
    """Adding an alpha or the controls adds cells and leaves every other arm's id (and stored result) alone;
    a different text, generation length or lm-eval setting changes every id; batch sizes change none."""
    spec = base_spec(QWEN_XS)
    spec["stages"]["capability"] = {"controls": False, "alphas": [1.0]}
    before = {(c.params["mode"], c.params["alpha"], c.params["control"]): c.id for c in _plan_cells(tmp_path, spec)}
    spec["stages"]["capability"] = {"controls": True, "alphas": [1.0, 0.5], "batch_size": 7}
    after = {(c.params["mode"], c.params["alpha"], c.params["control"]): c.id for c in _plan_cells(tmp_path, spec)}
    assert set(before) < set(after)
    assert all(after[k] == v for k, v in before.items())
    spec["stages"]["capability"]["text"] = {"n": 5}
    moved = {(c.params["mode"], c.params["alpha"], c.params["control"]): c.id for c in _plan_cells(tmp_path, spec)}
    assert not set(moved.values()) & set(after.values())


def test_default_arms_leave_orthogonalized_out_for_a_device_map_on_cpu(tmp_path):
    spec = base_spec(QWEN_XS)
    spec["models"][0]["device_map"] = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                                       "lm_head": "disk"}
    spec["models"][0]["offload_folder"] = str(tmp_path / "offload")
    spec["stages"]["capability"] = {"controls": False}
    modes = {c.params["mode"] for c in _plan_cells(tmp_path, spec)}
    assert "ablation" in modes and "orthogonalized" not in modes


def test_summary_costs_read_the_rules_setting():
    from refusal_ray.stages.capability.read import summary_columns

    rows = [{"model": "m", "seed": 0, "arm": arm, "control": False, "coefficient": c, "alpha": a, "direction": "d",
             "metric": "ce_loss", "value": v}
            for arm, c, a, v in [("baseline", 0.0, 0.0, 1.0), ("ablation", 0.0, 0.75, 1.5), ("ablation", 0.0, 1.0, 2.0),
                                 ("ablation", 0.0, 1.25, 3.0), ("addition", -1.0, 0.0, 4.0),
                                 ("addition", 1.0, 0.0, 5.0)]]
    cost = capability_cost(pd.DataFrame(rows))
    rule = {"control_margin": {"ablation_alpha": 1.0, "addition_coefficient": 1.0}}
    out = summary_columns(cost, "m", rule)
    assert out["cost_ce[ablation]"] == 1.0 and out["cost_setting[ablation]"] == "alpha=1"
    assert out["cost_ce[addition]"] == 4.0 and out["cost_setting[addition]"] == "c=1"
    first = summary_columns(cost, "m", {"control_margin": {"ablation_alpha": 2.0}})   # not measured: the first
    assert first["cost_ce[ablation]"] == 0.5 and first["cost_setting[ablation]"] == "alpha=0.75"


# -- 7. bad input through the CLI ----------------------------------------------------------------------

CLI_CASES = ["text-path-missing", "text-column-missing", "include-path-missing", "task-unknown",
             "subspace-without-steer-subspace", "orthogonalized-on-gemma2"]


@pytest.fixture(scope="module")
def gemma2_path(tmp_path_factory, tokenizer_dir):
    return make_tiny("gemma2", tokenizer_dir, tmp_path_factory.mktemp("tiny-gemma2"))


def _bad_case(case: str, folder, gemma2) -> tuple:
    """(spec file, the one line `validate` must print) of a broken capability block."""
    from refusal_ray.models.orthogonalize import UNSUPPORTED

    spec = base_spec(gemma2 if case == "orthogonalized-on-gemma2" else QWEN_XS)
    spec["name"] = f"capability-bad-{case}"
    f = folder / "spec.yaml"
    if case == "text-path-missing":
        cap = {"text": {"path": "no/such/heldout.jsonl"}}
        line = f"error: {f}: stages.capability.text.path: file not found: no/such/heldout.jsonl"
    elif case == "text-column-missing":
        texts = folder / "texts.jsonl"
        texts.write_text(json.dumps({"prompt": "Say hi.", "completion": "hi"}) + "\n")
        cap = {"text": {"path": str(texts), "text_column": "answer"}}
        line = f"error: {f}: stages.capability.text: {texts}: no column 'answer' (columns: prompt, completion)"
    elif case == "include-path-missing":
        cap = {"lm_eval": {"tasks": ["toy_choice"], "include_path": "no/such/lmeval-tasks"}}
        line = f"error: {f}: stages.capability.lm_eval.include_path: folder not found: no/such/lmeval-tasks"
    elif case == "task-unknown":   # a local task first: the unknown one is found beside it
        cap = {"lm_eval": {"tasks": ["toy_choice", "no_such_task_anywhere"], "include_path": str(LMEVAL)}}
        line = (f"error: {f}: stages.capability.lm_eval.tasks: task 'no_such_task_anywhere' is neither an "
                f"lm-eval registry task nor a task YAML in {LMEVAL}")
    elif case == "subspace-without-steer-subspace":
        cap = {"arms": ["baseline", "subspace"]}
        line = f"error: {f}: stages.capability.arms 'subspace' needs a stages.steer.subspace block (its directions)"
    else:
        cap = {"arms": ["baseline", "orthogonalized"]}
        line = (f"error: {f}: stages.capability.arms: 'orthogonalized' cannot run on model 'tiny' "
                f"({UNSUPPORTED['gemma2']}); drop it from the list (the default list leaves it out for such "
                f"models) or measure hook ablation")
        assert UNSUPPORTED["gemma2"].startswith("a norm sits after the output projections")
    spec["stages"]["capability"] = cap
    f.write_text(yaml.safe_dump(spec))
    return f, line


@pytest.mark.parametrize("case", CLI_CASES)
def test_validate_bad_capability_block_exits_2_naming_file_and_field(case, tmp_path, gemma2_path):
    f, line = _bad_case(case, tmp_path, gemma2_path)
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    assert not (REPO / "outputs" / f"capability-bad-{case}").exists()
    result = subprocess.run([str(CLI), "validate", str(f)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines == [line], result.stderr
    # nothing was written: the spec's folder holds what the test wrote, no outputs folder appeared
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing
    assert not (REPO / "outputs" / f"capability-bad-{case}").exists()


def test_orthogonalized_default_list_leaves_gemma2_out(tmp_path, gemma2_path):
    """The other side of the gemma2 case above: without an explicit list the spec is valid, without the arm."""
    from refusal_ray.plan import make_plan

    spec = base_spec(gemma2_path)
    spec["stages"]["capability"] = {"controls": False}
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    modes = {c.params["mode"] for c in make_plan(str(f)).cells if c.stage == "capability"}
    assert modes == {"baseline", "addition", "ablation"}


def test_capability_without_steer_needs_position_minus_one(tmp_path):
    from refusal_ray.errors import SpecError
    from refusal_ray.spec import load_spec

    spec = base_spec(QWEN_XS)
    spec["stages"] = {"directions": {"positions": [-2]}, "capability": {}}
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as e:
        load_spec(f)
    assert str(e.value) == (f"{f}: stages.capability without a stages.steer block uses the directions at position "
                            f"-1: add -1 to stages.directions.positions (or add a stages.steer block with its position)")
    spec["stages"]["directions"]["positions"] = [-2, -1]
    f.write_text(yaml.safe_dump(spec))
    assert load_spec(f).stages.capability is not None


def test_cost_pairs_each_arm_with_the_baseline_of_its_own_settings():
    """A store rerun under other capability settings holds rows of both: the manifest's key picks the
    current ones, and without it each arm is still paired with its own settings' baseline."""
    rows = [{"model": "m", "seed": 0, "arm": arm, "control": False, "coefficient": 0.0, "alpha": a, "direction": "d",
             "metric": "ce_loss", "value": v, "measure_key": k}
            for k, arm, a, v in [("old", "baseline", 0.0, 0.5), ("old", "ablation", 1.0, 1.5),
                                 ("new", "baseline", 0.0, 0.01), ("new", "ablation", 1.0, 0.02)]]
    df = pd.DataFrame(rows)
    current = capability_cost(df, "new")
    assert current[current["arm"] == "ablation"]["cost"].tolist() == pytest.approx([0.01])
    both = capability_cost(df)
    assert sorted(both[both["arm"] == "ablation"]["cost"]) == pytest.approx([0.01, 1.0])


# -- conditional steering (CAST): a gate per text in capability's passes -----------------------------

CAST_LAYER = 1   # condition and behaviour layer (qwen-xs has 2)


def _cast_inputs(lm, seed: int = 0):
    from refusal_ray.ops.base import SteerInputs

    rng = np.random.default_rng(seed)
    vecs = {layer: (rng.standard_normal(lm.sites.d_model) * 2).astype(np.float32) for layer in range(lm.sites.n_layers)}
    return SteerInputs(vecs, best=CAST_LAYER)


def _cast_cell(threshold: float, coefficient: float = 4.0):
    from refusal_ray.core.cells import Cell

    return Cell("cast-cap", "capability", "qwen-xs", 0, {
        "mode": "conditional", "behavior": "addition", "layer": CAST_LAYER, "coefficient": coefficient, "alpha": 0.0,
        "direction_layer": CAST_LAYER, "condition_layer": CAST_LAYER, "threshold": float(threshold),
        "comparator": "above", "aggregation": "mean", "control": False})


def _plain_addition(lm, d, coefficient: float = 4.0) -> dict:
    """The plain addition arm's broadcast edits at the CAST cells' layer, coefficient and direction."""
    from refusal_ray.core.cells import Cell
    from refusal_ray.stages.capability import broadcast_edits

    cell = Cell("add-cap", "capability", "qwen-xs", 0, {"mode": "addition", "layer": CAST_LAYER,
                                                        "coefficient": coefficient, "alpha": 0.0,
                                                        "direction_layer": CAST_LAYER, "control": False})
    return broadcast_edits(cell, d, list(range(lm.sites.n_layers)), lm.sites)


def _alone_sims(lm, d, token_lists: list[list[int]]) -> list[float]:
    """The CAST similarity of each text's gate tokens, each run by itself (one unpadded row)."""
    from refusal_ray.ops import OPS

    op, probe = OPS["conditional"], _cast_cell(0.0)
    out = []
    for toks in token_lists:
        ids = torch.tensor([toks])
        out.append(float(op.prefill(lm, ids, torch.ones_like(ids), [(0, probe, op.resolve(probe, d))], d)["sim"][0]))
    return out


def _split(sims: list[float]) -> float:
    s = sorted(sims)
    gap, t = max((s[i + 1] - s[i], (s[i] + s[i + 1]) / 2) for i in range(len(s) - 1))
    assert gap > 1e-4, s
    return t


def test_conditional_ce_gate_reads_the_chat_prompt_or_the_whole_plain_text(lm):
    import pickle

    from refusal_ray.stages.capability import gate_tokens

    chat = ChatOptions()
    docs = _chat_docs(4)
    for (instruction, _), seq in zip(docs, text_tokens(lm.tokenizer, docs, 128, chat)):
        assert gate_tokens(seq) == prompt_tokens(lm.tokenizer, [instruction], chat)[0]
        assert pickle.loads(pickle.dumps(seq)) == seq and pickle.loads(pickle.dumps(seq)).prompt == seq.prompt
    for (_, text), seq in zip(_plain_docs(4), text_tokens(lm.tokenizer, _plain_docs(4), 128)):
        assert gate_tokens(seq) == lm.tokenizer(text)["input_ids"] == seq[0]


def test_conditional_ce_in_a_mixed_batch_gates_each_document_on_its_own_prompt(lm):
    """CE with a CAST arm over one padded batch of chat documents, some gated and some not: each document's gate
    equals the gate of its chat prompt run alone, and the pooled CE equals the documents scored one at a time,
    each with the plain addition edit if its gate fired, else unedited."""
    from refusal_ray.stages.capability import GatedEdits, gate_tokens

    d = _cast_inputs(lm)
    seqs = text_tokens(lm.tokenizer, _chat_docs(8), 128, ChatOptions())
    sims = _alone_sims(lm, d, [gate_tokens(s) for s in seqs])
    t = _split(sims)
    fired = [s > t for s in sims]
    assert any(fired) and not all(fired)
    gated = GatedEdits(lm, _cast_cell(t), d, list(range(lm.sites.n_layers)), gate_tokens)
    got, n = cross_entropy(lm, seqs, batch_size=len(seqs), edits=gated)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))     # the batch's row order
    cols = gated.columns
    assert [c["gate"] for c in cols] == [fired[i] for i in order]
    assert np.allclose([c["condition_similarity"] for c in cols], [sims[i] for i in order], atol=1e-6)
    assert gated.take() == {"gate_rate": sum(fired) / len(fired), "gate_n": sum(fired)} and gated.columns == []
    add = _plain_addition(lm, d)
    total, count = 0.0, 0
    for s, f in zip(seqs, fired):
        loss, k = cross_entropy(lm, [s], batch_size=1, edits=add if f else None)
        total, count = total + loss * k, count + k
    print(f"\nCAST CE, mixed batch: {got:.6f} ({sum(fired)}/{len(fired)} documents gated); "
          f"one at a time: {total / count:.6f}; unedited {cross_entropy(lm, seqs, len(seqs))[0]:.6f}")
    assert n == count and abs(got - total / count) <= 1e-6
    assert abs(got - cross_entropy(lm, seqs, len(seqs))[0]) > 1e-3      # the gated edit did something


def test_conditional_next_token_logprobs_gate_each_prompt_alone(lm, harmless_prompts):
    """First-token log-probabilities under a CAST arm over padded batches equal each prompt run alone, with the
    plain addition edit where its own gate fired and none elsewhere."""
    from refusal_ray.stages.capability import GatedEdits

    d = _cast_inputs(lm)
    sims = _alone_sims(lm, d, harmless_prompts)
    t = _split(sims)
    fired = [s > t for s in sims]
    assert any(fired) and not all(fired)
    gated = GatedEdits(lm, _cast_cell(t), d, list(range(lm.sites.n_layers)))
    batched = next_token_logprobs(lm, harmless_prompts, batch_size=4, edits=gated)
    assert gated.take()["gate_n"] == sum(fired)
    add = _plain_addition(lm, d)
    for i, (seq, f) in enumerate(zip(harmless_prompts, fired)):
        alone = next_token_logprobs(lm, [seq], batch_size=1, edits=add if f else None)[0]
        assert (batched[i].exp() - alone.exp()).abs().max() <= 1e-6, i
    base = next_token_logprobs(lm, harmless_prompts, batch_size=4)
    kl = first_token_kl(base, batched)
    assert all((float(k) == 0.0) != f for k, f in zip(kl, fired)), (kl, fired)   # 0 exactly where not gated


@pytest.fixture(scope="module")
def cast_run(tmp_path_factory):
    """A toy run: capability's baseline, plain addition (layer 1, c = 4) and CAST arms of the same layer and
    coefficient at thresholds -1 (every text gated) and 1 (none), with controls and lm-eval."""
    stages = {"directions": {"sites": ["resid_pre"]},
              "steer": {"addition": None, "ablation": None,
                        "conditional": {"condition_layers": [CAST_LAYER], "thresholds": [-1.0, 1.0],
                                        "layers": [CAST_LAYER], "coefficients": [4.0]}},
              "capability": {"arms": ["baseline", "addition", "conditional"], "addition_layer": CAST_LAYER,
                             "coefficients": [4.0], "text": {"path": str(HELDOUT)},
                             "lm_eval": {"tasks": ["toy_choice"], "include_path": str(LMEVAL)}}}
    return _run_local(_toy_spec("capability-cast", stages, max_new_tokens=8),
                      tmp_path_factory.mktemp("capability-cast"))


def _cast_arm(cap: pd.DataFrame, threshold: float, control: bool = False) -> pd.DataFrame:
    rows = cap[(cap["arm"] == "conditional") & (cap["threshold"] == threshold) & (cap["control"] == control)]
    assert rows["cell_id"].nunique() == 1, (threshold, control)
    return rows.set_index("metric")


def test_toy_run_conditional_capability_cost(cast_run):
    """Gating nothing is the baseline exactly (KL exactly 0); gating everything is the plain addition arm (CE and
    KL to 1e-6, rates exactly); the rows say how many texts were gated; no lm-eval rows for CAST arms."""
    plan, out, session = cast_run
    assert set(out["cells"]["status"]) == {"done"}, out["cells"][["stage", "status", "error"]]
    cap = out["capability"]
    base, add = _arm(cap, "baseline"), _arm(cap, "addition")
    never, always = _cast_arm(cap, 1.0), _cast_arm(cap, -1.0)
    gen_metrics = {"ce_loss", "first_token_kl", "refusal_harmful", "refusal_harmless", "task_exact_match"}
    assert "lm_eval/toy_choice/acc" in add.index and "lm_eval/toy_choice/acc" in base.index
    for control in (False, True):
        for t in (-1.0, 1.0):
            arm = _cast_arm(cap, t, control)
            assert set(arm.index) == gen_metrics, sorted(arm.index)            # LM_EVAL_UNGATED: none
            assert (arm["gate_rate"] == (1.0 if t == -1.0 else 0.0)).all(), arm["gate_rate"]
            texts = arm.drop(index="ce_loss")      # n counts prompts there (CE: tokens)
            assert (texts["gate_n"] == (texts["n"] if t == -1.0 else 0)).all(), arm[["n", "gate_n"]]
    cfg = plan.spec.stages.capability
    docs = text_tokens(session.lm.tokenizer, load_texts(HELDOUT, "completion", "prompt", cfg.text.n),
                       cfg.text.max_tokens, ChatOptions(**plan.spec.chat.model_dump()))
    assert (never.loc["ce_loss", "gate_n"], always.loc["ce_loss", "gate_n"]) == (0, len(docs))
    for arm in (never, _cast_arm(cap, 1.0, True)):
        assert arm.loc["first_token_kl", "value"] == 0.0
        for m in gen_metrics:
            assert arm.loc[m, "value"] == base.loc[m, "value"] and arm.loc[m, "n"] == base.loc[m, "n"], m
    for m in gen_metrics:
        a, b = always.loc[m, "value"], add.loc[m, "value"]
        if m in ("ce_loss", "first_token_kl"):
            assert abs(a - b) <= 1e-6, (m, a, b)
        else:
            assert a == b, (m, a, b)
    print(f"\nCE: baseline {base.loc['ce_loss', 'value']:.6f}, addition {add.loc['ce_loss', 'value']:.6f}, CAST "
          f"gate-all {always.loc['ce_loss', 'value']:.6f}, gate-none {never.loc['ce_loss', 'value']:.6f}; KL: "
          f"addition {add.loc['first_token_kl', 'value']:.6f}, gate-all {always.loc['first_token_kl', 'value']:.6f}")
    assert abs(add.loc["ce_loss", "value"] - base.loc["ce_loss", "value"]) > 1e-3   # the addition does something
    assert add.loc["first_token_kl", "value"] > 1e-3
    cost = capability_cost(cap)
    ce = cost[(cost["arm"] == "conditional") & (cost["metric"] == "ce_loss") & ~cost["control"].astype(bool)]
    assert len(ce) == 2, ce        # the two thresholds are two cost rows
    assert sorted(np.round(ce["cost"], 9)) == sorted(np.round(
        [0.0, always.loc["ce_loss", "value"] - base.loc["ce_loss", "value"]], 9))


def test_conditional_capability_plan_line_and_needs_its_block(tmp_path):
    """The plan says how CAST arms are gated and that lm-eval is not measured for them; listing 'conditional' in
    stages.capability.arms without stages.steer.conditional is exit 2 naming file and field."""
    from typer.testing import CliRunner

    from refusal_ray.cli import app

    stages = {"directions": {"sites": ["resid_pre"]},
              "steer": {"addition": None, "ablation": None,
                        "conditional": {"condition_layers": [1], "thresholds": [0.1]}},
              "capability": {"text": {"path": str(HELDOUT)},
                             "lm_eval": {"tasks": ["toy_choice"], "include_path": str(LMEVAL)}}}
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(_toy_spec("cast-plan", stages)))
    result = CliRunner().invoke(app, ["plan", str(f)])
    assert result.exit_code == 0, result.output
    assert "capability: arms baseline, addition, ablation, conditional, orthogonalized (" in result.output   # default
    assert ("capability, conditional: gate decided per text on the unedited tokens: each CE document on its chat "
            "prompt (a plain text: on the whole document), each first-token KL prompt and each generated prompt on "
            "itself; no lm-eval metrics (lm-eval batches its requests itself: no per-request gate)") in result.output
    stages["steer"]["conditional"] = None
    stages["capability"]["arms"] = ["baseline", "conditional"]
    f.write_text(yaml.safe_dump(_toy_spec("cast-plan", stages)))
    result = CliRunner().invoke(app, ["validate", str(f)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: {f}: stages.capability.arms 'conditional' needs a "
                                     f"stages.steer.conditional block (its directions)")
