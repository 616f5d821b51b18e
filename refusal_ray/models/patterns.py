"""Site patterns: many TransformerLens sites (and heads) in one string.

    blocks.{9,10}.attn.hook_z       z at layers 9 and 10, every head
    blocks.{0..3}.hook_mlp_out      layers 0 to 3 inclusive
    blocks.*.hook_resid_post        every layer
    blocks.7.attn.hook_z[0,5]       heads 0 and 5 of layer 7 (heads: z only; ranges `[0..3]` too)

A pattern set expands to `{site name: heads}` where `heads` is None for the whole site or a
frozenset of head indices.
"""

from __future__ import annotations

import re

_HOOKS = r"hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out|attn\.hook_z"
_PATTERN_RE = re.compile(rf"^blocks\.(\*|\d+|\{{[0-9., ]+\}})\.({_HOOKS})(\[[0-9., ]+\])?$")

Selection = dict[str, frozenset[int] | None]


class PatternError(ValueError):
    pass


def _numbers(text: str, limit: int, what: str, pattern: str) -> list[int]:
    """'3' | '*' | '{1,2}' | '{0..3}' | '[0,2]' -> indices, each checked against `limit`."""
    text = text.strip("{}[]")
    if text == "*":
        return list(range(limit))
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if ".." in part:
            lo, _, hi = part.partition("..")
            if not (lo.strip().isdigit() and hi.strip().isdigit()) or int(lo) > int(hi):
                raise PatternError(f"bad range {part!r} in site pattern {pattern!r}")
            out += range(int(lo), int(hi) + 1)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise PatternError(f"bad {what} list in site pattern {pattern!r}")
    bad = [i for i in out if i >= limit]
    if bad:
        raise PatternError(f"{what} {bad[0]} out of range in site pattern {pattern!r} (the model has {limit})")
    return out


def check_syntax(pattern: str) -> None:
    """Raise PatternError when `pattern` is not a site pattern (no model needed)."""
    m = _PATTERN_RE.match(pattern)
    if not m:
        raise PatternError(f"bad site pattern {pattern!r}; expected e.g. 'blocks.{{9,10}}.attn.hook_z', "
                           f"'blocks.*.hook_resid_post' or 'blocks.3.attn.hook_z[0,2]'")
    if m.group(3) and m.group(2) != "attn.hook_z":
        raise PatternError(f"head selection needs attn.hook_z in site pattern {pattern!r}")


def expand(patterns: list[str], n_layers: int, n_heads: int) -> Selection:
    """`{site name: heads or None}` for patterns on a model with `n_layers` and `n_heads`.

    Raises PatternError for bad syntax or a layer/head out of range. Head selections of one site
    are merged; a whole-site selection absorbs them.
    """
    out: Selection = {}
    for pattern in patterns:
        check_syntax(pattern)
        m = _PATTERN_RE.match(pattern)
        layers = _numbers(m.group(1), n_layers, "layer", pattern)
        heads = frozenset(_numbers(m.group(3), n_heads, "head", pattern)) if m.group(3) else None
        for layer in layers:
            name = f"blocks.{layer}.{m.group(2)}"
            if name in out and (out[name] is None or heads is None):
                out[name] = None
            else:
                out[name] = (out.get(name) or frozenset()) | heads if heads is not None else None
    return out
