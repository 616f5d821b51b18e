"""Weight orthogonalisation ("abliteration"), in memory only.

Method: Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction",
Sec. 4 ("Jailbreaking via weight orthogonalization") and App. E (its equivalence with directional
ablation). Every matrix that writes into the residual stream loses its component along the unit
direction r (or the subspace with orthonormal basis Q, d_model x k, found by QR in float64):

    W_out <- W_out - Q Q^T W_out        (each output a matrix writes into the residual)
    b_out <- b_out - Q Q^T b_out        (a bias is written into the residual too)
    e     <- e - Q Q^T e                (every row of an embedding matrix)

so nothing written to the residual stream has a component in span(Q), which is what directional
ablation `x <- x - Q Q^T x` at every layer's resid_pre, attn_out and mlp_out does with hooks.

What is edited, per family (`config.model_type`):

    llama, qwen2, qwen3, mistral, phi3   model.embed_tokens, every layer's self_attn.o_proj and
                                         mlp.down_proj (weight, and bias where the config has one:
                                         llama/mistral `attention_bias` / `mlp_bias`)
    gpt2                                 transformer.wte, transformer.wpe (the learned positions are
                                         added to resid_pre[0] as well), every layer's attn.c_proj
                                         and mlp.c_proj, weight and bias (Conv1D: weight is
                                         [in, out], so its columns are orthogonalised)
    gemma2, gemma3_text, olmo2           refused (OrthogonalizationUnsupported), see below

Where the equivalence with hook ablation holds, and what this module does where it does not:

- Biases: an output projection with a bias adds b to the residual at every position, so b is
  orthogonalised too; with that, the equivalence is exact (up to rounding).
- Tied embeddings (lm_head shares the embedding matrix: GPT-2, Gemma, Llama-3.2, Qwen2.5-0.5B,
  ...): the unembedding reads the *final-normed* residual, which is not orthogonal to r (the norm's
  gain and GPT-2's ln_f bias put r back), so editing the shared matrix would also change every
  logit, which hook ablation does not. The context unties them for its duration: lm_head gets its
  own parameter holding the original (unedited) matrix, the embedding is edited, and on exit the
  embedding is restored and lm_head points at the embedding parameter again (the tie is back, the
  same Parameter object as before). This costs one extra copy of the vocab x d_model matrix.
  Arditi et al.'s released code (andyrdt/refusal_direction, pipeline/model_utils/gemma_model.py)
  assigns the edited matrix to the shared parameter, so there the unembedding changed as well;
  here it does not, to stay equal to hook ablation.
- Post-norm families (Gemma-2, Gemma-3: post_attention_layernorm / post_feedforward_layernorm
  after o_proj / down_proj; OLMo-2: post_attention_layernorm / post_feedforward_layernorm after
  self_attn / mlp): what reaches the residual is RMSNorm(y) = g * y / rms(y), not y. Removing r
  from y leaves g * y / rms(y) with a component along r (the per-coordinate gain g turns r into
  g * r), so orthogonalising o_proj / down_proj does *not* remove the direction from the stream,
  and no edit of o_proj / down_proj alone reproduces hook ablation (rms(y) changes too). These
  families are refused with OrthogonalizationUnsupported; use hook ablation (stage steer) there.
  (The same released code applies the Llama-style edit to Gemma-2 anyway, in gemma2_model.py.)
- GPT-2 token_type_ids (rarely used) reuse wte, which is orthogonalised, so they stay covered.
- Dropout, sliding windows, rotary embeddings, q/k norms and fused qkv / gate_up projections read
  the residual and write nothing to it: untouched.

Refused as well: offloaded models (accelerate hooks with `offload=True`, parameters on the meta
device, `hf_device_map` with a 'disk' entry, or 'cpu' entries next to GPU ones): their weights live
in accelerate's weights map (CPU memory or files in the offload folder) and are moved into the
modules only for each forward, so an in-place edit of the modules would not reach the forward
pass (and editing the weights map is out of scope); and quantised models (bitsandbytes
Linear8bitLt / Linear4bit, any `hf_quantizer`, non-floating parameters): their weights are packed
integers that cannot be edited in float and restored exactly.

Nothing is written to disk: there is no save option. Edits are in place under torch.no_grad on
the model's devices, computed in float32 (float64 for float64 weights) in row chunks and cast
back to each weight's dtype; the original tensors are cloned to CPU first and copied back on exit,
also when the body (or the edit itself) raises, so every parameter is bit-identical afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from refusal_ray.models.sites import FAMILIES

_CHUNK_ELEMENTS = 1 << 24  # rows are orthogonalised in chunks of about this many elements


class OrthogonalizationUnsupported(ValueError):
    """The model's family, placement or quantisation rules out weight orthogonalisation."""


@dataclass(frozen=True)
class Writers:
    """Modules that write into the residual stream, paths relative to the CausalLM / a block."""

    embeddings: tuple[str, ...]  # embedding modules whose rows are added to resid_pre[0]
    attn: str                    # attention output projection (output: attn_out)
    mlp: str                     # MLP output projection (output: mlp_out)


_LLAMA_LIKE = Writers(("model.embed_tokens",), "self_attn.o_proj", "mlp.down_proj")
WRITERS: dict[str, Writers] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt2": Writers(("transformer.wte", "transformer.wpe"), "attn.c_proj", "mlp.c_proj"),
}
_POST_NORM = ("a norm sits after the output projections ({}): what is added to the residual is "
              "RMSNorm(W_out x), whose per-coordinate gain puts a component along the direction back, "
              "so orthogonalising the weights is not directional ablation; use hook ablation instead")
_GEMMA_NORMS = "post_attention_layernorm after o_proj, post_feedforward_layernorm after down_proj"
UNSUPPORTED: dict[str, str] = {
    "gemma2": _POST_NORM.format(_GEMMA_NORMS),
    "gemma3_text": _POST_NORM.format(_GEMMA_NORMS),
    "olmo2": _POST_NORM.format("post_attention_layernorm after self_attn, post_feedforward_layernorm after mlp"),
}


@dataclass
class Orthogonalized:
    """What the context edited: yielded by `orthogonalized`."""

    basis: Tensor                         # [d_model, k] orthonormal, float64, CPU
    edited: list[str] = field(default_factory=list)  # parameter names, as in named_parameters()
    untied: bool = False                  # lm_head was given its own copy for the duration


RANK_RTOL = 1e-6   # a direction whose part outside the earlier ones' span is below this x the largest norm is dropped


def span_basis(vectors, rtol: float = RANK_RTOL) -> np.ndarray:
    """Orthonormal basis of the span of `vectors` (each [d_model]), by QR in float64. [rank, d_model] float64.

    Columns are taken in order; a vector whose component orthogonal to the span of the kept ones
    (|R_ii|) is <= rtol x the largest vector norm is dropped (zero vectors, duplicates), so rank <=
    len(vectors) and the rows always span exactly the kept vectors. Norms do not matter.
    """
    a = np.stack([np.asarray(v, np.float64) for v in vectors], axis=1)          # [d_model, m]
    scale = float(np.linalg.norm(a, axis=0).max()) if a.size else 0.0
    keep = list(range(a.shape[1])) if scale > 0 else []
    q = np.zeros((a.shape[0], 0))
    while keep:
        q, r = np.linalg.qr(a[:, keep])                                         # q: [d_model, len(keep)]
        small = np.flatnonzero(np.abs(np.diag(r)) <= rtol * scale)
        if not len(small):
            break
        del keep[int(small[0])]        # in the span of the columns before it: drop it and redo
        q = np.zeros((a.shape[0], 0))
    return np.ascontiguousarray(q.T)


def family(model: nn.Module) -> str:
    cfg = model.config
    return (getattr(cfg, "text_config", None) or cfg).model_type


def orthonormal_basis(directions, d_model: int) -> Tensor:
    """Orthonormal basis Q [d_model, k] (float64, CPU) of `directions` ([k, d_model] or [d_model]).

    Raises ValueError for a wrong width, non-finite values, or directions that are (numerically)
    linearly dependent or zero.
    """
    d = torch.as_tensor(directions).detach().to("cpu", torch.float64)
    if d.ndim == 1:
        d = d[None]
    if d.ndim != 2 or d.shape[1] != d_model:
        raise ValueError(f"directions must be [k, {d_model}] or [{d_model}], got {tuple(d.shape)}")
    if not torch.isfinite(d).all():
        raise ValueError("directions contain non-finite values")
    if d.shape[0] > d_model:
        raise ValueError(f"{d.shape[0]} directions in {d_model} dimensions cannot be independent")
    rows = span_basis(list(d.numpy()))             # [rank, d_model], dependent directions dropped
    if rows.shape[0] < d.shape[0]:
        raise ValueError("directions are zero or linearly dependent; give independent directions")
    return torch.from_numpy(rows.T.copy())         # [d_model, k]


def check_orthogonalizable(model: nn.Module) -> Writers:
    """The family's writers; raises OrthogonalizationUnsupported (family, offload, quantisation)."""
    fam = family(model)
    if fam in UNSUPPORTED:
        raise OrthogonalizationUnsupported(f"weight orthogonalisation is not supported for family {fam!r}: "
                                           f"{UNSUPPORTED[fam]}")
    if fam not in WRITERS:
        known = ", ".join(sorted(WRITERS))
        raise OrthogonalizationUnsupported(
            f"weight orthogonalisation is not supported for family {fam!r} (supported: {known}; "
            f"site-table families: {', '.join(sorted(FAMILIES))})")
    quant = _quantised(model)
    if quant:
        raise OrthogonalizationUnsupported(
            f"weight orthogonalisation needs float weights in memory; this model is quantised ({quant}): "
            f"load it without `quantization` (or use hook ablation, which works on quantised models)")
    off = _offloaded(model)
    if off:
        raise OrthogonalizationUnsupported(
            f"weight orthogonalisation needs every weight in the modules; this model is offloaded ({off}): "
            f"load it without cpu/disk offload (or use hook ablation, which works under offload)")
    return WRITERS[fam]


def _quantised(model: nn.Module) -> str | None:
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False) is True:
        return "hf_quantizer / is_quantized is set"
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__module__.startswith("bitsandbytes") or cls.__name__ in ("Linear8bitLt", "Linear4bit"):
            return f"{name} is a bitsandbytes {cls.__name__}"
    for name, p in model.named_parameters():
        if not p.is_floating_point() or type(p).__module__.startswith("bitsandbytes"):
            return f"{name} is {type(p).__name__} of {p.dtype}"
    return None


def _offloaded(model: nn.Module) -> str | None:
    placement = getattr(model, "hf_device_map", None) or {}
    where = {str(v) for v in placement.values()}
    if "disk" in where:
        return "hf_device_map has 'disk' entries"
    if "cpu" in where and where - {"cpu"}:
        return "hf_device_map puts some modules on 'cpu' next to accelerators"
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        for h in [hook, *getattr(hook, "hooks", ())] if hook is not None else ():
            if getattr(h, "offload", False):
                return f"{name or 'model'} has an accelerate hook with offload=True"
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            return f"{name} is on the meta device"
    return None


def _project_out_(t: Tensor, q: Tensor, dim: int) -> None:
    """In place: t <- t with its component in span(q) removed along axis `dim` (the d_model axis)."""
    x = t[None] if t.ndim == 1 else (t if dim == t.ndim - 1 else t.transpose(dim, -1))  # [rows, d_model]
    compute = torch.float64 if t.dtype == torch.float64 else torch.float32
    qc = q.to(t.device, compute)
    step = max(1, _CHUNK_ELEMENTS // x.shape[-1])
    for i in range(0, x.shape[0], step):
        rows = x[i:i + step]
        r = rows.to(compute)
        rows.copy_(r - (r @ qc) @ qc.T)


def _targets(model: nn.Module, writers: Writers, n_layers: int, layers_path: str) -> list[tuple[str, Tensor, int]]:
    """(parameter name, parameter, d_model axis) of every residual write."""
    out = []
    for path in writers.embeddings:
        out.append((f"{path}.weight", model.get_submodule(path).weight, 1))
    for layer in range(n_layers):
        for rel in (writers.attn, writers.mlp):
            path = f"{layers_path}.{layer}.{rel}"
            module = model.get_submodule(path)
            conv1d = type(module).__name__ == "Conv1D"  # GPT-2: weight [in, out], y = x W + b
            if not (conv1d or isinstance(module, nn.Linear)):
                raise OrthogonalizationUnsupported(f"{path} is a {type(module).__name__}, not a Linear or Conv1D")
            out.append((f"{path}.weight", module.weight, 1 if conv1d else 0))
            if module.bias is not None:
                out.append((f"{path}.bias", module.bias, 0))
    return out


@contextmanager
def orthogonalized(lm, directions) -> Iterator[Orthogonalized]:
    """Orthogonalise the model's residual writes against `directions` for the duration of the block.

    Args:
        lm: a `LoadedModel` (refusal_ray.models.loading).
        directions: [k, d_model] or [d_model] (tensor or array); orthonormalised with QR in float64.
    Yields:
        Orthogonalized(basis, edited parameter names, untied).
    Raises:
        OrthogonalizationUnsupported: post-norm or unknown family, offloaded or quantised model.
        ValueError: directions of the wrong width, non-finite, zero or dependent.
    On exit (normal or by an exception), every edited parameter is copied back from a clone taken
    before any edit, and a tie lm_head <-> embedding is restored: the state_dict is bit-identical.
    """
    model, sites = lm.model, lm.sites
    writers = check_orthogonalizable(model)
    q = orthonormal_basis(directions, sites.d_model)
    targets = _targets(model, writers, sites.n_layers, sites.layout.layers)
    info = Orthogonalized(basis=q)
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    saved: list[tuple[Tensor, Tensor]] = []
    head_param = None
    try:
        with torch.no_grad():
            for name, p, _ in targets:
                saved.append((p, p.detach().to("cpu", copy=True)))
            if head is not None and (head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()):
                head_param = head.weight
                head.weight = nn.Parameter(head_param.detach().clone(), requires_grad=False)
                info.untied = True
            for name, p, dim in targets:
                _project_out_(p.data, q, dim)
                info.edited.append(name)
        yield info
    finally:
        with torch.no_grad():
            for p, original in saved:
                p.data.copy_(original)
            if head_param is not None:
                head.weight = head_param
