"""Stage capability's measures on a real chat checkpoint (SmolLM2-135M-Instruct): its own chat template
(with a default system turn), float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

from refusal_ray import load_model
from refusal_ray.capability.measures import cross_entropy, first_token_kl, load_texts, next_token_logprobs, text_tokens
from refusal_ray.data import prompt_tokens

from conftest import TOY_PROMPTS

pytestmark = pytest.mark.real


def _hf_loss(lm, seqs) -> float:
    """The independent computation: HF's own loss per document with the prompt masked (-100), pooled."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, first in seqs:
            t = torch.tensor([ids])
            labels = t.clone()
            labels[:, :first] = -100
            n = len(ids) - first
            total += float(lm.model(input_ids=t, labels=labels).loss) * n
            count += n
    return total / count


def test_completion_ce_after_the_real_template_equals_hf_loss(smollm2_path):
    lm = load_model(str(smollm2_path))
    docs = load_texts(TOY_PROMPTS / "heldout.jsonl", "completion", "prompt", 6)
    seqs = text_tokens(lm.tokenizer, docs, 96)
    assert len(seqs) == 6
    for (ids, first), (instruction, _) in zip(seqs, docs):   # the scored part starts after the real template
        assert ids[:first] == prompt_tokens(lm.tokenizer, [instruction])[0]
        assert "<|im_start|>assistant" in lm.tokenizer.decode(ids[:first])
    ours, n = cross_entropy(lm, seqs, 4)
    assert n == sum(len(ids) - first for ids, first in seqs)
    assert ours == pytest.approx(_hf_loss(lm, seqs), abs=1e-5)


def test_bfloat16_measures_track_float32(smollm2_path):
    """bfloat16 weights and activations, log-softmax in float32: CE within 2% of the float32 model's, and
    the first-token KL between the two precisions small next to a real edit's (none here: both unedited)."""
    f32, bf16 = load_model(str(smollm2_path)), load_model(str(smollm2_path), dtype="bfloat16")
    seqs = text_tokens(f32.tokenizer, load_texts(TOY_PROMPTS / "heldout.jsonl", "completion", "prompt", 6), 96)
    ce32, _ = cross_entropy(f32, seqs, 6)
    ce16, _ = cross_entropy(bf16, seqs, 6)
    assert abs(ce16 - ce32) <= 0.02 * ce32, (ce32, ce16)
    prompts = [ids[:first] for ids, first in seqs]
    kl = first_token_kl(next_token_logprobs(f32, prompts, 6), next_token_logprobs(bf16, prompts, 6))
    assert torch.isfinite(kl).all() and float(kl.max()) < 0.05, kl
