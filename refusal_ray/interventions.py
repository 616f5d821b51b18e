"""Forward hooks that read and edit sites, with a separate edit for every batch row.

One hook per (site, layer) applies, to every row b of the batch, directional ablation, subspace
ablation, then activation addition:

    x[b] <- x[b] - alpha[b] * (x[b] . u[b]) u[b]                    x: [batch, pos, d_model]
    x[b] <- x[b] - beta[b] * (x[b] Q[b]^T) Q[b]                     Q[b]: [k, d_model], orthonormal rows
    x[b] <- x[b] + add[b]

Rows that should be untouched carry alpha = beta = 0 and add = 0 (a zero row of Q projects
nothing, so rows of different rank share one basis tensor, zero-padded), so one forward pass (or one
`generate` call) carries many (prompt x intervention) rows, and row b of a mixed batch equals
the same row run alone. Hooks never read module weights, so accelerate offloading and
bitsandbytes modules keep working; injected tensors move to the activation's device and dtype.

Methods: directional ablation and activation addition as in Arditi et al. 2024,
"Refusal in Language Models Is Mediated by a Single Direction", Sec. 2.3-2.4; subspace ablation
removes the projection onto several directions' span at once (x <- x - beta Q Q^T x).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from refusal_ray.models.sites import SiteAdapter, parse_site, site_name

Transform = Callable[[Tensor], Tensor | None]


@dataclass
class RowEdit:
    """Per-row edit at one site. Any field may be None (no such edit).

    ablate_dirs: [batch, d_model] unit directions (zero rows: no ablation)
    ablate_alpha: [batch] ablation strengths (1.0 = Arditi's full projection removal)
    add: [batch, d_model] vectors added at every position (already scaled by the coefficient)
    ablate_basis: [batch, k, d_model] per row an orthonormal basis Q of the subspace to project
        out, as rows; rows of lower rank (and unedited rows) are padded with zero vectors
    basis_alpha: [batch] subspace ablation strengths: x <- x - basis_alpha * (x Q^T) Q
    Applied in this order: directional ablation, subspace ablation, addition.
    """

    ablate_dirs: Tensor | None = None
    ablate_alpha: Tensor | None = None
    add: Tensor | None = None
    ablate_basis: Tensor | None = None
    basis_alpha: Tensor | None = None

    def on_device(self, device, moved: dict) -> None:
        """Move the subspace basis (one tensor shared by every site of a chunk) to `device` once (memo
        `moved`, keyed by id()), not at every hook call of every generated token; the other tensors move
        at the hook (`_like`), as before."""
        if self.ablate_basis is not None:
            if id(self.ablate_basis) not in moved:
                moved[id(self.ablate_basis)] = self.ablate_basis.to(device)
            self.ablate_basis = moved[id(self.ablate_basis)]

    def __call__(self, x: Tensor) -> Tensor:  # x: [batch, pos, d_model]
        if self.ablate_dirs is not None:
            u = _like(self.ablate_dirs, x)                      # [batch, d_model]
            alpha = _like(self.ablate_alpha, x)                 # [batch]
            proj = torch.einsum("bpd,bd->bp", x, u)             # [batch, pos]
            x = x - (alpha[:, None] * proj)[..., None] * u[:, None, :]
        if self.ablate_basis is not None:
            q = _like(self.ablate_basis, x)                     # [batch, k, d_model]
            beta = _like(self.basis_alpha, x)                   # [batch]
            coef = torch.einsum("bpd,bkd->bpk", x, q)           # [batch, pos, k]
            x = x - beta[:, None, None] * torch.einsum("bpk,bkd->bpd", coef, q)
        if self.add is not None:
            x = x + _like(self.add, x)[:, None, :]
        return x


@dataclass
class Patch:
    """Activation patching: overwrite a site at some positions with values from another run.

    values: [batch, n_pos, d_model], or for z [batch, n_pos, n_heads, d_head]
    positions: [n_pos] position indices into the forward pass (negative: from the end)
    heads: optional [k] head indices (z only): only these heads are overwritten
    Meant for single forward passes (not `generate`, where later steps see one position).
    Writes in place, so every consumer of the site sees the patch: `hook_resid_mid` is both the
    pre-MLP norm's input and the residual the MLP output is added to.
    Method: activation patching (Vig et al. 2020; Meng et al. 2022), as TransformerLens' patching.
    """

    values: Tensor
    positions: Tensor
    heads: Tensor | None = None

    def __call__(self, x: Tensor) -> None:
        v = _like(self.values, x)
        pos = self.positions.to(x.device)
        if self.heads is None:
            x[:, pos] = v
        else:
            heads = self.heads.to(x.device)
            x[:, pos[:, None], heads[None, :]] = v[:, :, heads]


def _like(t: Tensor, x: Tensor) -> Tensor:
    return t if (t.device == x.device and t.dtype == x.dtype) else t.to(x.device, x.dtype)


def _hook(sites: SiteAdapter, kind: str, fn: Transform):
    """Wrap `fn` (on [batch, pos, d_model], or z as [batch, pos, n_heads, d_head]) as a hook."""

    def apply(x: Tensor) -> Tensor | None:
        if kind == "z":
            b, p, _ = x.shape
            out = fn(x.view(b, p, sites.n_heads, sites.d_head))  # [batch, pos, n_heads, d_head]
            return None if out is None else out.reshape(b, p, -1)
        return fn(x)

    if sites.reads_input(kind):
        def pre_hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            out = apply(x)
            if out is None or out is x:
                return None
            if kind == "resid_mid":  # the norm's input is also the residual the MLP adds to: change both
                x.copy_(out)
                return None
            return ((out, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": out})
        return pre_hook, True

    def post_hook(module, args, output):
        if isinstance(output, tuple):
            out = apply(output[0])
            return None if out is None else (out, *output[1:])
        return apply(output)
    return post_hook, False


@contextmanager
def hooks(sites: SiteAdapter, transforms: dict[str, Transform]) -> Iterator[None]:
    """Attach `{site name: fn}` for the duration of the block; always removed on exit.

    `fn(act)` returns a replacement tensor, or None (read only, or edited in place). A replaced
    `hook_resid_mid` is written into the tensor in place: it is both the pre-MLP norm's input and
    the residual the MLP output is added to, and both must see it.
    """
    handles = []
    try:
        for name, fn in transforms.items():
            kind, layer = parse_site(name)
            module = sites.module(kind, layer)
            hook, is_pre = _hook(sites, kind, fn)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True) if is_pre
                           else module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions of left-padded rows: cumsum(mask) - 1, pads clamped to 0. [batch, pos]"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(model, input_ids: Tensor, attention_mask: Tensor, **kwargs):
    """A forward pass with positions derived from the mask (padding never changes a result)."""
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids(attention_mask), use_cache=False, **kwargs)


@torch.inference_mode()
def capture(model, input_ids: Tensor, attention_mask: Tensor, sites: list[str],
            adapter: SiteAdapter | None = None, positions: Tensor | None = None) -> dict[str, Tensor]:
    """Activations at `sites` for one batch.

    Args:
        input_ids, attention_mask: [batch, pos], left padded.
        sites: TransformerLens names, e.g. ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"].
        positions: optional 1-D index of positions to keep (e.g. tensor([-1]) for the last token).
    Returns:
        {site: tensor}; z as [batch, pos, n_heads, d_head], others [batch, pos, d_model], on CPU,
        in the model's dtype. Pad positions hold whatever the model computed there: read real
        tokens only.
    """
    adapter = adapter or SiteAdapter.for_model(model)
    store: dict[str, Tensor] = {}

    def reader(name: str) -> Transform:
        def read(x: Tensor) -> None:
            kept = x if positions is None else x[:, positions.to(x.device)]
            store[name] = kept.detach().to("cpu", copy=True)
        return read

    device = model.get_input_embeddings().weight.device
    with hooks(adapter, {s: reader(s) for s in sites}):
        forward(model, input_ids.to(device), attention_mask.to(device), logits_to_keep=1)
    return store


@contextmanager
def row_edits(sites: SiteAdapter, edits: dict[tuple[str, int], Transform]) -> Iterator[None]:
    """Apply per-row edits `{(site kind, layer): RowEdit or any SiteEdit}` (x [batch, pos, d_model] -> x;
    `refusal_ray.ops.base`) for the duration of the block."""
    with hooks(sites, {site_name(kind, layer): edit for (kind, layer), edit in edits.items()}):
        yield
