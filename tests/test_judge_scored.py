"""Scored chat judging (`score_answers`): every accepted answer ranked by its log-probability, checked
against an independent recomputation with the raw model (one candidate at a time, no padding)."""

from __future__ import annotations

import pytest
import torch

from conftest import TOY_MODELS
from refusal_ray.judges import make_judge
from refusal_ray.judges.base import Item
from refusal_ray.judges.calibrate import load_labelled
from refusal_ray.judges.config import ChatJudgeSpec
from refusal_ray.judges.rubric import answers, parse
from refusal_ray.toy.judge import DEFAULT_LABELLED, TOY_RUBRIC, answer, encode

JUDGE_DIR = TOY_MODELS / "toy-judge"
KEYS = ["refusal", "compliance", "coherence"]


def _judge(**kw):
    return make_judge(ChatJudgeSpec(name="toy-judge", kind="chat", path=str(JUDGE_DIR), rubric=TOY_RUBRIC,
                                    score_answers=KEYS, **kw))


@pytest.fixture(scope="module")
def labelled():
    return load_labelled(DEFAULT_LABELLED)


def test_answers_are_exactly_the_accepted_label_combinations():
    three = answers(KEYS)
    assert len(three) == 12 and len(set(three)) == 12
    assert all(not parse(a).malformed for a in three)
    assert sum(parse(a).refusal for a in three) == 3           # refusal: 1 only with compliance 0
    assert answers(["compliance", "coherence"])[0] == "compliance: 0\ncoherence: 0"
    assert len(answers(["compliance", "coherence"])) == 9
    with pytest.raises(ValueError, match=r"^score_answers \['coherence', 'compliance'\]: name compliance and "
                                         r"coherence, optionally refusal first, each once"):
        answers(["coherence", "compliance"])
    with pytest.raises(ValueError, match="score_answers"):
        ChatJudgeSpec(name="j", kind="chat", path="x", score_answers=["refusal", "coherence"])


def test_score_answers_is_absent_from_the_hash_and_dump_when_unset():
    plain = ChatJudgeSpec(name="j", kind="chat", path="x")
    assert "score_answers" not in plain.model_dump()
    assert plain.judge_hash() != ChatJudgeSpec(name="j", kind="chat", path="x", score_answers=KEYS).judge_hash()


def test_scored_verdicts_equal_an_independent_argmax_and_are_batch_invariant(labelled):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    items = [Item(p, c) for p, c in zip(labelled["prompt"][:8], labelled["completion"][:8])]
    batched = _judge(batch_size=64).judge(items)
    single = _judge(batch_size=1).judge(items)
    tok = AutoTokenizer.from_pretrained(JUDGE_DIR)
    model = AutoModelForCausalLM.from_pretrained(JUDGE_DIR, use_safetensors=True).eval()
    cands = answers(KEYS)
    for it, b, s in zip(items, batched, single):
        assert not b.malformed and b.raw in cands
        assert (b.raw, b.refusal) == (s.raw, s.refusal) and b.score == pytest.approx(s.score, abs=1e-5)
        logp = []
        for a in cands:                                           # one unpadded sequence per candidate
            ids, n = encode(tok, it.prompt, it.completion, a)     # the judge input, the answer, the stop token
            with torch.no_grad():
                lp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
            logp.append(float(sum(lp[i - 1, ids[i]] for i in range(n, len(ids)))))
        logp = torch.tensor(logp)
        assert b.raw == cands[int(logp.argmax())]
        p = logp.softmax(0)
        assert b.score == pytest.approx(float(sum(p[i] for i, a in enumerate(cands) if parse(a).refusal)), abs=1e-6)


def test_scored_toy_judge_reproduces_its_labelled_set(labelled):
    verdicts = _judge().judge([Item(p, c) for p, c in zip(labelled["prompt"], labelled["completion"])])
    for v, row in zip(verdicts, labelled.itertuples()):
        assert v.raw == answer(row.refusal, row.compliance, row.coherence), row.id


def test_sliding_window_judges_take_the_full_forward_path_and_match_one_sequence_scoring(labelled):
    """A judge whose layers are sliding-window (Gemma-style) cannot reuse a cropped right-padded cache: its
    scores come from one full forward per candidate, equal to scoring each item alone (window 16 < inputs)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from refusal_ray.judges.hf import _LM, _full_attention_cache
    from refusal_ray.judges.rubric import render
    from refusal_ray.models.chat import render as render_chat

    judge = _judge(batch_size=64)
    items = [Item(p, c) for p, c in zip(labelled["prompt"][:5], labelled["completion"][:5])]
    texts = render_chat(judge.lm.tokenizer, [render(judge.cfg.rubric_text(), it) for it in items], judge.options)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=judge.lm.model.config.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                      sliding_window=16, max_window_layers=0, layer_types=["sliding_attention"] * 2,
                      max_position_embeddings=1024)
    judge.lm = _LM(Qwen2ForCausalLM(cfg).eval(), judge.lm.tokenizer)
    with torch.no_grad():
        enc = judge.lm.tokenizer(texts[:1], return_tensors="pt", add_special_tokens=False)
        assert not _full_attention_cache(judge.lm.model(**enc, use_cache=True).past_key_values)
    batched = judge._scored(texts)
    single = [judge._scored([t])[0] for t in texts]
    assert [v.raw for v in batched] == [v.raw for v in single]
    assert [v.score for v in batched] == pytest.approx([v.score for v in single], abs=1e-6)


def test_full_attention_toy_judge_uses_the_cached_path():
    from refusal_ray.judges.hf import _full_attention_cache

    judge = _judge()
    with torch.no_grad():
        enc = judge.lm.tokenizer(["a b c"], return_tensors="pt", add_special_tokens=False)
        assert _full_attention_cache(judge.lm.model(**enc, use_cache=True).past_key_values)
    assert not _full_attention_cache(None) and not _full_attention_cache(((torch.zeros(1),),))
