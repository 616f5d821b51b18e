"""The site table: TransformerLens site names mapped onto Hugging Face modules, per family.

A family is data, not code: one `FamilyLayout` row says where each site lives. Adding a family
is one entry in `FAMILIES` plus a test (see README, "Adding a model family").

Sites (TransformerLens names and meanings; shapes as captured):
  blocks.{L}.hook_resid_pre   input of block L                          [batch, pos, d_model]
  blocks.{L}.hook_resid_mid   residual after attention, before the MLP   [batch, pos, d_model]
  blocks.{L}.hook_resid_post  output of block L                          [batch, pos, d_model]
  blocks.{L}.hook_attn_out    what attention adds to the residual        [batch, pos, d_model]
  blocks.{L}.hook_mlp_out     what the MLP adds to the residual          [batch, pos, d_model]
  blocks.{L}.attn.hook_z      per-head attention output, pre-projection  [batch, pos, n_heads, d_head]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

SITE_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")
_SITE_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out|attn\.hook_z)$")


@dataclass(frozen=True)
class FamilyLayout:
    """Where each site lives in one architecture family (paths relative to the block)."""

    layers: str       # dotted path from the CausalLM to the ModuleList of blocks
    resid_mid: str    # module whose *input* is resid_mid (the pre-MLP norm)
    attn_out: str     # module whose *output* (or output[0]) is what attention adds
    mlp_out: str      # module whose output is what the MLP adds
    z: str            # module whose *input* is z, flattened to [batch, pos, n_heads * d_head]
    final_norm: str   # dotted path from the CausalLM to the final norm


_LLAMA_LIKE = FamilyLayout("model.layers", "post_attention_layernorm", "self_attn", "mlp",
                           "self_attn.o_proj", "model.norm")
_GEMMA = FamilyLayout("model.layers", "pre_feedforward_layernorm", "post_attention_layernorm",
                      "post_feedforward_layernorm", "self_attn.o_proj", "model.norm")
_GPT2 = FamilyLayout("transformer.h", "ln_2", "attn", "mlp", "attn.c_proj", "transformer.ln_f")

FAMILIES: dict[str, FamilyLayout] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo2": FamilyLayout("model.layers", "mlp", "post_attention_layernorm",
                          "post_feedforward_layernorm", "self_attn.o_proj", "model.norm"),
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gpt2": _GPT2,
}


class UnsupportedFamilyError(ValueError):
    pass


def site_name(kind: str, layer: int) -> str:
    """TransformerLens name of a site: `site_name("z", 3) == "blocks.3.attn.hook_z"`."""
    return f"blocks.{layer}.attn.hook_z" if kind == "z" else f"blocks.{layer}.hook_{kind}"


def parse_site(name: str) -> tuple[str, int]:
    """Inverse of `site_name`. Raises ValueError naming the bad site."""
    m = _SITE_RE.match(name)
    if not m:
        raise ValueError(f"unknown site {name!r}; expected e.g. 'blocks.0.hook_resid_pre' "
                         f"or 'blocks.0.attn.hook_z'")
    kind = m.group(2).removeprefix("hook_").removeprefix("attn.hook_")
    return kind, int(m.group(1))


def layout_for(model_type: str) -> FamilyLayout:
    """Layout of a `config.model_type`. Raises UnsupportedFamilyError listing the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedFamilyError(
            f"unsupported model family {model_type!r}; supported: {', '.join(sorted(FAMILIES))}") from None


@dataclass
class SiteAdapter:
    """Resolves sites of one loaded model to modules. Shapes come from its config."""

    model: nn.Module
    layout: FamilyLayout
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int

    @classmethod
    def for_model(cls, model: nn.Module) -> "SiteAdapter":
        cfg = model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        layout = layout_for(cfg.model_type)
        n_heads = cfg.num_attention_heads
        d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        return cls(model, layout, cfg.num_hidden_layers, cfg.hidden_size, n_heads, d_head)

    def block(self, layer: int) -> nn.Module:
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for a model with {self.n_layers} layers")
        return self.model.get_submodule(self.layout.layers)[layer]

    def module(self, kind: str, layer: int) -> nn.Module:
        """The module a hook for site (kind, layer) attaches to."""
        block = self.block(layer)
        rel = {"resid_pre": "", "resid_post": "", "resid_mid": self.layout.resid_mid,
               "attn_out": self.layout.attn_out, "mlp_out": self.layout.mlp_out, "z": self.layout.z}[kind]
        return block.get_submodule(rel) if rel else block

    @staticmethod
    def reads_input(kind: str) -> bool:
        """True when the site is a module's input (forward pre-hook), False for an output."""
        return kind in ("resid_pre", "resid_mid", "z")
