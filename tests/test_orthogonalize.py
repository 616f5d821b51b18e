"""Weight orthogonalisation in memory: equal to hook ablation, restored bit-identically, never saved."""

from __future__ import annotations

import builtins
import inspect
import io
import os
import tempfile
from pathlib import Path

import pytest
import torch

from refusal_ray import load_model
from refusal_ray.data import encode
from refusal_ray.interventions import RowEdit, forward, hooks, row_edits
from refusal_ray.models import orthogonalize as orth
from refusal_ray.models.orthogonalize import (UNSUPPORTED, WRITERS, OrthogonalizationUnsupported,
                                              orthogonalized, orthonormal_basis)
from refusal_ray.models.sites import site_name
from refusal_ray.ops.base import ABLATION_SITES

from conftest import PROMPTS, TOY_MODELS

TOL = 1e-4


def _directions(d_model: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(k, d_model, generator=g)
    return v[0] if k == 1 else v


def _logits(model, ids, mask) -> torch.Tensor:
    """Logits at real tokens only (pad positions are not scored anywhere): [n_real, vocab]."""
    with torch.no_grad():
        out = forward(model, ids, mask).logits.float()
    assert torch.isfinite(out[mask.bool()]).all()
    return out[mask.bool()]


def _hook_ablated_logits(lm, ids, mask, directions: torch.Tensor) -> torch.Tensor:
    """Reference: x <- x - Q Q^T x at every layer's resid_pre, attn_out and mlp_out, with hooks."""
    sites, n = lm.sites, ids.shape[0]
    q = orthonormal_basis(directions, sites.d_model).float()      # [d_model, k]
    if q.shape[1] == 1:  # exactly how stages/steer.py builds ablation edits
        u = q[:, 0].expand(n, -1).clone()
        edits = {(kind, layer): RowEdit(u, torch.ones(n)) for layer in range(sites.n_layers)
                 for kind in ABLATION_SITES}
        with row_edits(sites, edits):
            return _logits(lm.model, ids, mask)

    def ablate(x: torch.Tensor) -> torch.Tensor:
        qx = q.to(x.device, x.dtype)
        return x - (x @ qx) @ qx.T

    transforms = {site_name(kind, layer): ablate for layer in range(sites.n_layers) for kind in ABLATION_SITES}
    with hooks(sites, transforms):
        return _logits(lm.model, ids, mask)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in after.items():
        b = before[k]
        assert v.dtype == b.dtype and v.shape == b.shape and v.device == b.device, k
        assert torch.equal(v.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), k


def _tie(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _family(lm) -> str:
    return orth.family(lm.model)


@pytest.mark.parametrize("k", [1, 3], ids=["direction", "rank3"])
def test_equals_hook_ablation(tiny_lm, k):
    fam = _family(tiny_lm)
    ids, mask = encode(tiny_lm.tokenizer, PROMPTS)
    dirs = _directions(tiny_lm.sites.d_model, k)
    if fam in UNSUPPORTED:
        before = _snapshot(tiny_lm.model)
        with pytest.raises(OrthogonalizationUnsupported, match=f"family '{fam}'.*norm sits after"):
            with orthogonalized(tiny_lm, dirs):
                pass
        _assert_bit_identical(tiny_lm.model, before)
        return
    assert fam in WRITERS
    plain = _logits(tiny_lm.model, ids, mask)
    want = _hook_ablated_logits(tiny_lm, ids, mask, dirs)
    with orthogonalized(tiny_lm, dirs) as info:
        got = _logits(tiny_lm.model, ids, mask)
    diff = (got - want).abs().max().item()
    print(f"\n{fam} k={k}: max |logit(orthogonalised) - logit(hook ablation)| = {diff:.2e}, "
          f"max |ablation effect| = {(want - plain).abs().max().item():.2e}, edited {len(info.edited)} tensors")
    assert (want - plain).abs().max() > 1e-2        # the ablation did something
    assert diff <= TOL
    assert info.untied == (fam == "gpt2")           # GPT-2 is the only tied tiny model
    if fam == "gpt2":
        assert "transformer.wpe.weight" in info.edited and "transformer.h.0.attn.c_proj.bias" in info.edited


def test_weights_bit_identical_after_exit_and_after_raise(tiny_lm):
    model = tiny_lm.model
    if _family(tiny_lm) in UNSUPPORTED:
        pytest.skip("refused family: covered by test_equals_hook_ablation")
    before = _snapshot(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = _tie(model)
    dirs = _directions(tiny_lm.sites.d_model, 3, seed=1)
    with orthogonalized(tiny_lm, dirs) as info:
        p = params[info.edited[-1]]
        assert not torch.equal(p, before[info.edited[-1]])          # really edited in place
        if tied:  # lm_head has its own unedited copy for the duration
            assert not _tie(model)
            assert torch.equal(model.get_output_embeddings().weight, before["lm_head.weight"])
    _assert_bit_identical(model, before)
    assert _tie(model) == tied
    assert all(p is params[n] for n, p in model.named_parameters(remove_duplicate=False))

    with pytest.raises(RuntimeError, match="body failed"):
        with orthogonalized(tiny_lm, dirs):
            raise RuntimeError("body failed")
    _assert_bit_identical(model, before)
    assert _tie(model) == tied


def test_failure_while_editing_restores(tiny_qwen_path, monkeypatch):
    lm = load_model(str(tiny_qwen_path), attn_implementation="eager")
    before = _snapshot(lm.model)
    real, calls = orth._project_out_, []

    def flaky(t, q, dim):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("edit failed")
        real(t, q, dim)

    monkeypatch.setattr(orth, "_project_out_", flaky)
    with pytest.raises(RuntimeError, match="edit failed"):
        with orthogonalized(lm, _directions(lm.sites.d_model, 1)):
            pytest.fail("body must not run")
    _assert_bit_identical(lm.model, before)


def test_inside_inference_mode(tiny_qwen_path):
    """Stages run under torch.inference_mode: the context must work (and restore) there too."""
    lm = load_model(str(tiny_qwen_path), attn_implementation="eager")
    ids, mask = encode(lm.tokenizer, PROMPTS)
    before = _snapshot(lm.model)
    dirs = _directions(lm.sites.d_model, 1)
    with torch.inference_mode():
        want = _hook_ablated_logits(lm, ids, mask, dirs)
        with orthogonalized(lm, dirs):
            got = _logits(lm.model, ids, mask)
    assert (got - want).abs().max() <= TOL
    _assert_bit_identical(lm.model, before)


def _biased_tied_llama(tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, bos_token_id=None, max_position_embeddings=128,
                               hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("k", [1, 3], ids=["direction", "rank3"])
def test_linear_biases_and_tied_embeddings(tokenizer_dir, tmp_path, k):
    """Llama with o_proj / down_proj biases and lm_head tied to embed_tokens."""
    lm = load_model(str(_biased_tied_llama(tokenizer_dir, tmp_path / "llama-bias-tied")), attn_implementation="eager")
    assert _tie(lm.model) and lm.model.model.layers[0].self_attn.o_proj.bias is not None
    ids, mask = encode(lm.tokenizer, PROMPTS)
    before = _snapshot(lm.model)
    dirs = _directions(lm.sites.d_model, k)
    want = _hook_ablated_logits(lm, ids, mask, dirs)
    with orthogonalized(lm, dirs) as info:
        got = _logits(lm.model, ids, mask)
        assert info.untied
        assert {"model.layers.2.self_attn.o_proj.bias", "model.layers.2.mlp.down_proj.bias"} <= set(info.edited)
    diff = (got - want).abs().max().item()
    print(f"\nllama (biases, tied) k={k}: max |logit difference| = {diff:.2e}")
    assert diff <= TOL
    _assert_bit_identical(lm.model, before)
    assert _tie(lm.model)

    # without untying, the shared matrix would change the unembedding and break the equivalence
    q = orthonormal_basis(dirs, lm.sites.d_model)
    emb = lm.model.get_input_embeddings().weight
    with torch.no_grad():
        orth._project_out_(emb.data, q, 1)
        with orthogonalized(lm, dirs):  # embedding already orthogonal; lm_head is the edited matrix now
            broken = _logits(lm.model, ids, mask)
        emb.data.copy_(before["model.embed_tokens.weight"])
    assert (broken - want).abs().max() > 1e-2
    _assert_bit_identical(lm.model, before)


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    if not root.exists():
        return {}
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_nothing_is_written(tiny_qwen_path, tmp_path, monkeypatch):
    import numpy as np
    import safetensors.torch
    from huggingface_hub import constants
    from transformers import PreTrainedModel

    lm = load_model(str(tiny_qwen_path), attn_implementation="eager")
    ids, mask = encode(lm.tokenizer, PROMPTS)
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir(), tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    roots = [cwd, tmp, Path(tiny_qwen_path), Path(constants.HF_HUB_CACHE)]
    before = {r: _listing(r) for r in roots}

    writes: list[str] = []

    def forbid(name):
        def call(*args, **kwargs):
            writes.append(name)
            raise AssertionError(f"{name} called")
        return call

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            writes.append(f"open({file!r}, {mode!r})")
            raise AssertionError(f"open for writing: {file}")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
            writes.append(f"os.open({path!r})")
            raise AssertionError(f"os.open for writing: {path}")
        return real_os_open(path, flags, *args, **kwargs)

    for target, name in [(torch, "save"), (safetensors.torch, "save_file"), (safetensors.torch, "save"),
                         (safetensors.torch, "save_model"), (PreTrainedModel, "save_pretrained"),
                         (np, "save"), (np, "savez")]:
        monkeypatch.setattr(target, name, forbid(f"{target.__name__}.{name}"))
    dirs = _directions(lm.sites.d_model, 3)
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", guarded_open)
        m.setattr(io, "open", guarded_open)
        m.setattr(os, "open", guarded_os_open)
        with orthogonalized(lm, dirs):
            _logits(lm.model, ids, mask)
        with pytest.raises(RuntimeError):
            with orthogonalized(lm, dirs):
                raise RuntimeError
    assert writes == []
    assert {r: _listing(r) for r in roots} == before
    assert list(inspect.signature(orthogonalized).parameters) == ["lm", "directions"]  # no save option


# --- refusals: offload and quantisation ---------------------------------------------------------

def test_refuses_disk_offload(tmp_path):
    lm = load_model(str(TOY_MODELS / "toy-qwen-m"), device_map="auto",
                    max_memory={"cpu": "2MB", "disk": "1GB"}, offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(lm.model.hf_device_map.values())
    with pytest.raises(OrthogonalizationUnsupported, match="offloaded .*'disk'.*hook ablation"):
        with orthogonalized(lm, _directions(lm.sites.d_model, 1)):
            pytest.fail("body must not run")


def test_refuses_simulated_offload(tiny_qwen_path):
    lm = load_model(str(tiny_qwen_path), attn_implementation="eager")
    model, dirs = lm.model, _directions(lm.sites.d_model, 1)
    before = _snapshot(model)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers": "cpu", "model.norm": 0, "lm_head": 0}
    with pytest.raises(OrthogonalizationUnsupported, match="offloaded .*'cpu' next to accelerators"):
        with orthogonalized(lm, dirs):
            pass
    model.hf_device_map = {"": "cpu"}  # all on CPU is not offload
    with orthogonalized(lm, dirs):
        pass
    del model.hf_device_map

    class Hook:  # what accelerate's AlignDevicesHook(offload=True) looks like to the check
        offload = True

    layer = model.model.layers[1]
    layer._hf_hook = Hook()
    with pytest.raises(OrthogonalizationUnsupported, match=r"model\.layers\.1 has an accelerate hook with offload"):
        with orthogonalized(lm, dirs):
            pass
    del layer._hf_hook
    _assert_bit_identical(model, before)


def test_refuses_8bit(tiny_qwen_path):
    pytest.importorskip("bitsandbytes")
    lm = load_model(str(tiny_qwen_path), quantization="8bit")
    with pytest.raises(OrthogonalizationUnsupported, match="quantised .*hook ablation"):
        with orthogonalized(lm, _directions(lm.sites.d_model, 1)):
            pytest.fail("body must not run")


def test_refuses_simulated_quantisation(tiny_qwen_path):
    lm = load_model(str(tiny_qwen_path), attn_implementation="eager")
    lm.model.hf_quantizer = object()
    with pytest.raises(OrthogonalizationUnsupported, match="quantised \\(hf_quantizer"):
        with orthogonalized(lm, _directions(lm.sites.d_model, 1)):
            pass
    del lm.model.hf_quantizer
    lm.model.model.layers[0].mlp.down_proj.weight.data = torch.zeros(32, 64, dtype=torch.int8)
    with pytest.raises(OrthogonalizationUnsupported, match="down_proj.weight is Parameter of torch.int8"):
        with orthogonalized(lm, _directions(lm.sites.d_model, 1)):
            pass


def test_refuses_unknown_family(tiny_qwen_path):
    lm = load_model(str(tiny_qwen_path), attn_implementation="eager")
    lm.model.config.model_type = "mamba"
    with pytest.raises(OrthogonalizationUnsupported, match="family 'mamba' .*supported: gpt2, llama"):
        with orthogonalized(lm, _directions(lm.sites.d_model, 1)):
            pass


def test_bad_directions(tiny_qwen_path):
    lm = load_model(str(tiny_qwen_path), attn_implementation="eager")
    d = lm.sites.d_model
    before = _snapshot(lm.model)
    v = _directions(d, 1)
    for bad, msg in [(torch.randn(d + 1), "must be"), (torch.stack([v, 2 * v]), "dependent"),
                     (torch.zeros(d), "zero"), (torch.full((d,), float("nan")), "non-finite")]:
        with pytest.raises(ValueError, match=msg):
            with orthogonalized(lm, bad):
                pass
    _assert_bit_identical(lm.model, before)
    q = orthonormal_basis(_directions(d, 3).numpy(), d)
    assert q.dtype == torch.float64 and torch.allclose(q.T @ q, torch.eye(3, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_post_norm_families_really_differ(family, tokenizer_dir, tmp_path, monkeypatch):
    """Why Gemma-2/3 and OLMo-2 are refused: the Llama-style edit (embedding, o_proj, down_proj) there
    leaves the direction in what the post-norms add to the residual, so it is not hook ablation."""
    from conftest import make_tiny

    lm = load_model(str(make_tiny(family, tokenizer_dir, tmp_path / family)), attn_implementation="eager")
    ids, mask = encode(lm.tokenizer, PROMPTS)
    dirs = _directions(lm.sites.d_model, 1)
    want = _hook_ablated_logits(lm, ids, mask, dirs)
    monkeypatch.delitem(UNSUPPORTED, family)
    monkeypatch.setitem(WRITERS, family, WRITERS["llama"])
    with orthogonalized(lm, dirs):
        got = _logits(lm.model, ids, mask)
    diff = (got - want).abs().max().item()
    print(f"\n{family} (forced, not supported): max |logit difference| = {diff:.2e}")
    assert diff > 1e-2
