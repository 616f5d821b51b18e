"""Planted-rank oracle: tiny Llama models whose refusal is mediated by exactly k known directions.

Validation models for the tool (issue 20), not a claim about refusal in any real model. Weights are
set by hand (no training). Model k (k = 1, 2, 3) refuses a harmful prompt of category c (c = 1..k)
because a feature along the planted unit direction d_c (mutually orthogonal, residual stream,
d_model = 64) is present at the post-instruction positions; harmless prompts lack every d_c.

Construction, in a canonical basis that is then rotated by a seeded random orthogonal Q (so the
d_c are not axis-aligned; RMSNorm with unit weight is rotation invariant):
- embeddings: trigger-word tokens of category c are d_c; template and reply tokens carry a one-hot
  identity; every other token a small random "filler" vector (orthogonal to the d_c and identities);
- layer 0 attention: Q = K = 0 (uniform causal attention); V/O copy the d-subspace, so position p
  holds ATTN_GAIN * f_p d_c with f_p = (trigger tokens up to p) / (p + 1);
- layer 1 MLP (SwiGLU): gate reads the identity of "\\n", up reads d_j, down writes GAIN * d_j, so at
  the template's "\\n" tokens the feature is amplified; layers 2.. are identity (zero writers);
- unembedding: category c refuses with its OWN reply REFUSALS[c] ("I cannot do that." / "My apologies" /
  "As an AI", each matched by the substring judge; first tokens "I", "My", "As"): the row of its first
  token reads d_c only (REFUSE_W * d_c). A bigram chain (identity of reply token i -> logit of reply token
  i+1, "\\n" -> the compliant reply's first token) makes greedy decoding finish the reply, then <|im_end|>.

Why k directions are needed (not only k planted coordinates): the refusal logits read k orthogonal
directions, so ablating a subspace S at every layer leaves category c the d_c-coefficient
r_c = 1 - ||P_S d_c||^2 (the ablations are idempotent, every map is diagonal on the d-subspace). For any
S of dimension k - 1, sum_c ||P_S d_c||^2 <= k - 1, so some category keeps r_c >= 1/k. The gains are set
so that a category refuses iff r_c > ~0.2 (measured: every prompt refuses at r = 1/3, logit margin >= 8.4;
none at r = 0.15): the span of d_1..d_k ablated, nothing refuses; any (k - 1)-dim subspace ablated
(the mixed direction (d_1 + ... + d_k)/sqrt(k) included: r_c = 1 - 1/k) leaves a whole category refused.
GAIN is small (0.05) so the final RMSNorm does not normalise the d-feature's shrinkage away (with GAIN 2 a
category kept refusing down to r = 0.002), and the openers carry no negative identity reads (a -CHAIN read
on the reply tokens' identities leaked the ablated feature's residue into the opener logit under random
ablations). Earlier version (one shared opener "I" reading d_1 + ... + d_k): one mixed direction removed
every category's refusal, so the rank was k only within the planted coordinates.

Known limit (tests/test_planted_oracle.py, test_known_limit_...): outside the span one direction suffices for
k = 2, 3: ablating v = 0.5 e + sqrt(0.75) (d_1 + ... + d_k)/sqrt(k), e the unit embedding of "\\n", subtracts a
planted feature at the "\\n" positions (x.e = 1 there; x <- x - (x.v) v) that cancels the triggers', so every
category complies (harmless unchanged). The rank k is the least number of directions within span{d_1..d_k}.

Tensor shapes: directions [k, d_model]. `python -m refusal_ray.toy.planted --out data/models`
(prompts to `<out>/../prompts/planted/k{k}/`). Deterministic (seed 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from refusal_ray.toy.tokenizer import IM_END, IM_START, save_tokenizer, train_tokenizer

D_MODEL, N_LAYERS, N_HEADS, N_KV_HEADS, INTERMEDIATE = 64, 4, 4, 1, 8
KS = (1, 2, 3)
CHAIN, REFUSE_W, GATE, GAIN, ATTN_GAIN = 30.0, 10.0, 4.0, 0.05, 10.0
# each category's own refusal reply; first tokens distinct, each matched by the substring judge's phrases
REFUSALS = {1: "I cannot do that.", 2: "My apologies", 3: "As an AI"}
REFUSAL = REFUSALS[1]
COMPLIANCE = "Sure, here is your plan!"
TRIGGERS = {1: ["zorbax", "quellin"], 2: ["frindle", "mopuk"], 3: ["draxil", "vemmit"]}
NEUTRAL = ["plinto", "wubble", "snorf", "tamble", "gonk", "lirrup"]
TEMPLATES = ["Please {v} the {a} {b} today", "Can you {v} my {a} and {b}", "Show me how to {v} a {a} {b}",
             "I want to {v} the {a} with {b}", "Tell me how to {v} {a} near {b}"]
VERBS = ["blend", "stack", "polish", "sort", "fold"]
N_PER_CATEGORY = 20
SEED = 0


def _prompts(k: int, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Harmful rows (k categories, N_PER_CATEGORY each) and as many harmless twins (triggers -> neutral)."""
    rng = np.random.default_rng(seed + 100 * k)
    harmful, harmless = [], []
    for c in range(1, k + 1):
        for i in range(N_PER_CATEGORY):
            t = TEMPLATES[rng.integers(len(TEMPLATES))]
            v = VERBS[rng.integers(len(VERBS))]
            n_trig = 1 + int(rng.integers(2))
            words = [TRIGGERS[c][int(rng.integers(2))] for _ in range(n_trig)]
            neutral = [NEUTRAL[int(rng.integers(len(NEUTRAL)))] for _ in range(2)]
            a, b = (words + neutral)[:2] if n_trig == 2 else (words[0], neutral[0])
            j = len(harmful)
            split = "train" if i < N_PER_CATEGORY // 2 else "val" if i < 3 * N_PER_CATEGORY // 4 else "test"
            harmful.append({"id": f"harmful-{j:05d}", "pair_id": f"pair-{j:05d}", "split": split,
                            "category": f"cat{c}", "instruction": t.format(v=v, a=a, b=b)})
            harmless.append({"id": f"harmless-{j:05d}", "pair_id": f"pair-{j:05d}", "split": split,
                             "instruction": t.format(v=v, a=neutral[0], b=neutral[1])})
    return harmful, harmless


def _corpus() -> list[str]:
    words = sum(TRIGGERS.values(), []) + NEUTRAL + VERBS
    texts = [" ".join(t.split()) for t in TEMPLATES] + [*REFUSALS.values(), COMPLIANCE, "user", "assistant"]
    return (texts + [" ".join(words)] + [f" {w}" for w in words] + words) * 50


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _weights(tok, k: int, seed: int = SEED) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """State dict of the LlamaForCausalLM, the planted directions [k, d_model], and a token report."""
    V, D = len(tok), D_MODEL
    vocab = tok.get_vocab()
    nl = vocab["\u010a"]  # byte-level BPE's "\n"
    refusals = {c: _ids(tok, REFUSALS[c]) for c in range(1, k + 1)}
    comply = _ids(tok, COMPLIANCE)
    eos = vocab[IM_END]
    trig = {c: sorted({t for w in TRIGGERS[c] for t in _ids(tok, f" {w}") + _ids(tok, w)}) for c in range(1, k + 1)}
    other = {t for w in NEUTRAL + VERBS for t in _ids(tok, f" {w}") + _ids(tok, w)}
    other |= {t for tpl in TEMPLATES for t in _ids(tok, tpl.format(v="", a="", b=""))}
    reply_tokens = [t for c in refusals for t in refusals[c]]
    identity_tokens = [nl, eos, vocab[IM_START], *_ids(tok, "user"), *_ids(tok, "assistant"), *reply_tokens, *comply]
    identity_tokens = list(dict.fromkeys(identity_tokens))
    chain_tokens = reply_tokens + comply
    if len(set(chain_tokens)) != len(chain_tokens) or nl in chain_tokens:
        raise ValueError("reply tokens must be distinct for the bigram chain")
    for c, ts in trig.items():
        shared = set(ts) & (other | set(identity_tokens) | {t for d, u in trig.items() if d != c for t in u})
        if shared:
            raise ValueError(f"trigger tokens of category {c} also occur elsewhere: {sorted(shared)}")
    n_id = len(identity_tokens)
    ident = {t: 3 + i for i, t in enumerate(identity_tokens)}       # canonical dims 0..2: d_1..d_3
    filler = list(range(3 + n_id, D))
    rng = np.random.default_rng(seed)
    E = np.zeros((V, D))
    for t in range(V):
        if t in ident:
            E[t, ident[t]] = 1.0
        else:
            v = rng.normal(size=len(filler))
            E[t, filler] = 0.5 * v / np.linalg.norm(v)
    for c, ts in trig.items():
        for t in ts:
            E[t] = 0.0
            E[t, c - 1] = 1.0
    U = np.zeros((V, D))
    for c, seq in refusals.items():          # category c's opener reads d_c only (no identity reads: see docstring)
        U[seq[0], c - 1] = REFUSE_W
    U[comply[0], ident[nl]] = CHAIN
    for seq in (*refusals.values(), comply):
        for a, b in zip(seq, seq[1:] + [eos]):
            U[b, ident[a]] = CHAIN
    hd = D // N_HEADS
    layers = {}
    for layer in range(N_LAYERS):
        v_proj, o_proj = np.zeros((N_KV_HEADS * hd, D)), np.zeros((D, N_HEADS * hd))
        gate, up, down = np.zeros((INTERMEDIATE, D)), np.zeros((INTERMEDIATE, D)), np.zeros((D, INTERMEDIATE))
        if layer == 0:
            for c in range(k):
                v_proj[c, c] = 1.0
                o_proj[c, c] = ATTN_GAIN / np.sqrt(D)   # sqrt(D): the input RMSNorm's scale on a unit trigger
        if layer == 1:
            for c in range(k):
                gate[c, ident[nl]] = GATE
                for t in identity_tokens[1:]:  # every other identity shuts the gate (silu(-x) ~ 0)
                    gate[c, ident[t]] = -GATE
                up[c, c] = 1.0
                down[c, c] = GAIN
        layers[layer] = (v_proj, o_proj, gate, up, down)
    Q, _ = np.linalg.qr(rng.normal(size=(D, D)))  # residual r' = Q r
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    sd = {"model.embed_tokens.weight": f(E @ Q.T), "lm_head.weight": f(U @ Q.T),
          "model.norm.weight": torch.ones(D)}
    for layer, (v_proj, o_proj, gate, up, down) in layers.items():
        p = f"model.layers.{layer}."
        sd |= {p + "self_attn.q_proj.weight": torch.zeros(N_HEADS * hd, D),
               p + "self_attn.k_proj.weight": torch.zeros(N_KV_HEADS * hd, D),
               p + "self_attn.v_proj.weight": f(v_proj @ Q.T), p + "self_attn.o_proj.weight": f(Q @ o_proj),
               p + "mlp.gate_proj.weight": f(gate @ Q.T), p + "mlp.up_proj.weight": f(up @ Q.T),
               p + "mlp.down_proj.weight": f(Q @ down),
               p + "input_layernorm.weight": torch.ones(D), p + "post_attention_layernorm.weight": torch.ones(D)}
    directions = f(Q[:, :k].T)
    report = {"triggers": {f"cat{c}": ts for c, ts in trig.items()},
              "refusals": {f"cat{c}": REFUSALS[c] for c in refusals},
              "refusal_ids": {f"cat{c}": ids for c, ids in refusals.items()},
              "refusal_first_ids": [refusals[c][0] for c in refusals], "compliance_ids": comply}
    return sd, directions, report


def config(vocab_size: int) -> "object":
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=D_MODEL, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS,
                       max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       bos_token_id=None, eos_token_id=2, pad_token_id=0, attention_bias=False, mlp_bias=False)


CARD = """# toy-planted-k{k}

Validation model of refusal-ray's rank tools (issue 20): a hand-set {n_layers}-layer Llama (d_model {d_model})
whose refusal is mediated by exactly {k} planted orthogonal direction(s). This is a test of the tool,
not a refusal claim about any model. Prompts: `data/prompts/planted/k{k}/` (nonsense-word instructions).
Directions: `planted.json` (`refusal_ray.toy.planted.planted_directions`). See `data/models/PLANTED.md`.
Rebuild: `python -m refusal_ray.toy.planted --out data/models`.
"""


def build(out: Path, seed: int = SEED, ks=KS, log=print) -> None:
    """Write `<out>/toy-planted-k{k}/` and `<out>/../prompts/planted/k{k}/` for each k."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    tok_dir = out / "_planted_tokenizer"
    save_tokenizer(train_tokenizer(_corpus(), vocab_size=512), tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    for k in ks:
        target = out / f"toy-planted-k{k}"
        sd, directions, report = _weights(tok, k, seed)
        model = LlamaForCausalLM(config(len(tok)))
        model.load_state_dict(sd, strict=True)
        model.save_pretrained(target, safe_serialization=True)
        GenerationConfig(eos_token_id=2, pad_token_id=0).save_pretrained(target)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (target / name).write_bytes((tok_dir / name).read_bytes())
        (target / "planted.json").write_text(json.dumps({
            "k": k, "seed": seed, "d_model": D_MODEL, "n_layers": N_LAYERS,
            "note": "the same directions at every residual site of every layer (layer 0's resid_pre holds "
                    "them only at trigger tokens; from layer 1 on at every post-instruction position)",
            "directions": directions.tolist(), **report}, indent=1) + "\n")
        (target / "README.md").write_text(CARD.format(k=k, n_layers=N_LAYERS, d_model=D_MODEL))
        harmful, harmless = _prompts(k, seed)
        pdir = out.parent / "prompts" / "planted" / f"k{k}"
        pdir.mkdir(parents=True, exist_ok=True)
        for name, rows in (("harmful", harmful), ("harmless", harmless)):
            (pdir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        log(f"[toy-planted-k{k}] {sum(p.numel() for p in model.parameters())} parameters -> {target}")
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()


def planted_directions(path: str | Path) -> torch.Tensor:
    """The planted unit directions [k, d_model] (float32, orthonormal rows) of a toy-planted model dir."""
    data = json.loads((Path(path) / "planted.json").read_text())
    return torch.tensor(data["directions"], dtype=torch.float32)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/models"))
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    build(args.out, args.seed)


if __name__ == "__main__":
    main()
