"""The classifier and guard judges on tiny random checkpoints: label maps, scores against an
independent forward pass, batched equals one at a time, the guard's first-word rule; and the
judge content hash."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS, TOY_MODELS
from refusal_ray.judges import Item, make_judge
from refusal_ray.judges.config import ClassifierJudgeSpec, GuardJudgeSpec, ChatJudgeSpec

ITEMS = [Item(p, c) for p, c in zip(PROMPTS, ["I cannot help with that.", "apple, rope", "Once upon a time.",
                                                "candle, gloves, torch"])]


@pytest.fixture(scope="module")
def classifier_path(tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = AutoConfig.for_model("qwen2", vocab_size=len(tok), pad_token_id=tok.pad_token_id, hidden_size=32,
                               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               num_labels=3, id2label={0: "COMPLY", 1: "REFUSE", 2: "PARTIAL"},
                               label2id={"COMPLY": 0, "REFUSE": 1, "PARTIAL": 2})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)
    return out


def _classifier(path, **kw):
    return ClassifierJudgeSpec(name="cls", kind="classifier", path=str(path),
                               labels={"COMPLY": "compliance", "REFUSE": "refusal", "PARTIAL": "refusal"}, **kw)


def test_classifier_labels_and_scores_match_an_independent_forward(classifier_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    verdicts = make_judge(_classifier(classifier_path, batch_size=3)).judge(ITEMS)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_path).eval()
    tok = AutoTokenizer.from_pretrained(classifier_path)
    for item, v in zip(ITEMS, verdicts):
        with torch.no_grad():
            probs = model(**tok(item.completion, return_tensors="pt")).logits.softmax(-1)[0]
        top = model.config.id2label[int(probs.argmax())]
        assert v.raw == top
        assert v.refusal == (top in ("REFUSE", "PARTIAL"))
        assert v.score == pytest.approx(float(probs[1] + probs[2]), abs=1e-5)
    one = [make_judge(_classifier(classifier_path, batch_size=1)).judge([it])[0] for it in ITEMS]
    assert [v.raw for v in one] == [v.raw for v in verdicts]
    assert [v.score for v in one] == pytest.approx([v.score for v in verdicts], abs=1e-5)


def test_classifier_refuses_an_unmapped_label(classifier_path):
    cfg = ClassifierJudgeSpec(name="cls", kind="classifier", path=str(classifier_path), labels={"COMPLY": "compliance"})
    with pytest.raises(ValueError, match=r"^labels: the checkpoint's label 'REFUSE' is not mapped "
                                         r"\(its labels: COMPLY, REFUSE, PARTIAL\)$"):
        make_judge(cfg)


def test_guard_reads_the_first_word(tiny_qwen_path, monkeypatch):
    from refusal_ray.judges import hf

    judge = make_judge(GuardJudgeSpec(name="guard", kind="guard", path=str(tiny_qwen_path)))
    outputs = ["safe", "unsafe\nS2", "  Safe.", "I think it is fine"]
    monkeypatch.setattr(hf.GuardJudge, "_generate", lambda self, texts: (outputs[:len(texts)], [True] * len(texts)))
    verdicts = judge.judge(ITEMS)
    by_text = {it.completion: v for it, v in zip(ITEMS, verdicts)}
    got = [(by_text[it.completion].refusal, by_text[it.completion].malformed) for it in ITEMS]
    # outputs are assigned in the judge's batch order (longest first); check the rule per output
    rule = {"safe": (True, False), "unsafe\nS2": (False, False), "  Safe.": (None, True),
            "I think it is fine": (None, True)}
    assert sorted(map(str, got)) == sorted(map(str, rule.values()))


def test_guard_conversation_uses_the_guard_template(tiny_qwen_path):
    judge = make_judge(GuardJudgeSpec(name="guard", kind="guard", path=str(tiny_qwen_path), max_new_tokens=3))
    seen = []
    orig = judge._generate
    judge._generate = lambda texts: (seen.extend(texts), orig(texts))[1]
    verdicts = judge.judge(ITEMS[:1])
    assert "<|im_start|>user\n" + ITEMS[0].prompt in seen[0] and "<|im_start|>assistant\n" + ITEMS[0].completion in seen[0]
    assert verdicts[0].raw is not None   # a random model: malformed or a label, never an exception


def test_judge_hash_tracks_labels_not_throughput(tmp_path):
    src = TOY_MODELS / "toy-judge"
    a = ChatJudgeSpec(name="a", kind="chat", path=str(src))
    assert a.judge_hash() == ChatJudgeSpec(name="b", kind="chat", path=str(src), batch_size=1).judge_hash()
    assert a.judge_hash() != ChatJudgeSpec(name="a", kind="chat", path=str(src), max_new_tokens=8).judge_hash()
    copy = tmp_path / "judge"
    shutil.copytree(src, copy)
    same = ChatJudgeSpec(name="a", kind="chat", path=str(copy))
    before = same.judge_hash()
    assert before == a.judge_hash()    # a moved checkpoint is the same judge
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])   # the last weights change, the size does not
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert ChatJudgeSpec(name="a", kind="chat", path=str(copy)).judge_hash() != before
