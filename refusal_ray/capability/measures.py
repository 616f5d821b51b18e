"""Capability measurements on a loaded model, with whatever edit is active (hooks or weights).

- `cross_entropy`: mean next-token cross-entropy on held-out text, in nats per scored token
  (Arditi et al. 2024, Sec. 4.2 / App. G report CE loss on held-out text and on chat completions
  for the ablated and orthogonalised models). Plain text: every token after the first is scored,
  as `model(input_ids, labels=input_ids).loss` does for one document; a completion after an
  instruction: only its tokens. Documents pool their tokens (the mean over all scored tokens, not
  over documents).
- `next_token_logprobs` and `first_token_kl`: KL(P_baseline || P_arm) of the first generated
  token on harmless chat prompts (Arditi et al. 2024, Sec. 4.2, "KL divergence" on harmless
  prompts), in nats, averaged over prompts.

Edits are `{(site kind, layer): RowEdit}` whose tensors have one row ([1, d_model]): they
broadcast over any batch (`refusal_ray.interventions.RowEdit`), so one arm edits every row. Or a
callable `EditsFor`: given one batch's items (in batch row order) it returns that batch's per-row edits
([batch, d_model] rows, any SiteEdit), called before the batch's edited forward pass and outside its
hooks (so it may run its own unedited pass: a per-text gate, `Operator.prefill`, stage capability).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from refusal_ray.data import left_pad, read_table
from refusal_ray.interventions import RowEdit, forward, row_edits
from refusal_ray.models.loading import LoadedModel

Edits = dict[tuple[str, int], RowEdit]
# one batch's items (CE: its (token ids, first scored index) documents; next-token: its prompts' token ids), in
# batch row order -> the edits of that batch's rows
EditsFor = Callable[[list], dict[tuple[str, int], Any]]


def _batch_edits(edits: Edits | EditsFor | None, batch: list) -> dict:
    """The edits active on one batch: broadcast ones as given, a callable's for this batch, {} for None."""
    if edits is None:
        return {}
    return edits(batch) if callable(edits) else edits


def load_texts(path: str | Path, text_column: str = "completion", prompt_column: str | None = None,
               n: int | None = None) -> list[tuple[str | None, str]]:
    """Documents of a held-out text file as (instruction or None, text): a .txt file holds one plain
    text per line (blank lines skipped); a JSONL/CSV/Parquet file holds them in `text_column`, each
    after the instruction in `prompt_column` when that is given. The first `n` (None: all).
    Raises ValueError naming the problem (missing column, no documents)."""
    path = Path(path)
    if path.suffix.lower() in (".txt", ".text", ""):
        docs = [(None, line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        df = read_table(path)
        for col in (text_column, prompt_column):
            if col is not None and col not in df.columns:
                raise ValueError(f"no column {col!r} (columns: {', '.join(map(str, df.columns))})")
        prompts = df[prompt_column] if prompt_column is not None else [None] * len(df)
        docs = []
        for i, (p, t) in enumerate(zip(prompts, df[text_column])):
            if not (isinstance(t, str) and t.strip()):
                continue
            if prompt_column is not None and not (isinstance(p, str) and p.strip()):
                raise ValueError(f"row {i}: empty {prompt_column!r} (every scored text needs its instruction; "
                                 f"set prompt_column: null to score plain text)")
            docs.append((p if prompt_column is not None else None, t))
    if not docs:
        raise ValueError("no documents")
    return docs[:n] if n is not None else docs


class Scored(tuple):
    """One CE document: the pair (token ids, index of the first scored token), carrying `prompt`: how many of
    its leading tokens are the chat prompt of its instruction (0: a plain text, no prompt part)."""

    def __new__(cls, ids: list[int], first: int, prompt: int = 0):
        out = super().__new__(cls, (ids, first))
        out.prompt = prompt
        return out

    def __getnewargs__(self):
        return (self[0], self[1], self.prompt)


def text_tokens(tokenizer, docs: list[tuple[str | None, str]], max_tokens: int, chat=None
                ) -> list[tuple[list[int], int]]:
    """(token ids, index of the first scored token) per document, cut to `max_tokens` (each a `Scored`, whose
    `prompt` is its chat prompt's length, 0 for plain text).

    Plain text: the tokenizer's encoding with its own special tokens (BOS, if any); every token after
    the first is scored. With an instruction: the chat prompt exactly as generation sees it
    (`refusal_ray.data.prompt_tokens`), then the text's tokens, which alone are scored (Arditi et
    al.'s on-distribution CE scores the completion after its instruction). Documents with nothing
    left to score after cutting are dropped."""
    from refusal_ray.data import prompt_tokens

    out = []
    for instruction, text in docs:
        if instruction is None:
            ids, start, n_prompt = tokenizer(text, add_special_tokens=True)["input_ids"], 1, 0
        else:
            prompt = prompt_tokens(tokenizer, [instruction], chat)[0]
            ids, start = prompt + tokenizer(text, add_special_tokens=False)["input_ids"], max(len(prompt), 1)
            n_prompt = len(prompt)
        ids = ids[:max_tokens]
        if len(ids) > start:
            out.append(Scored(ids, start, n_prompt))
    return out


@torch.inference_mode()
def cross_entropy(lm: LoadedModel, seqs: list[tuple[list[int], int]], batch_size: int, edits: Edits | None = None
                  ) -> tuple[float, int]:
    """Mean next-token cross-entropy over every scored token of `seqs`, with `edits` active.

    Args:
        seqs: (token ids, first scored index >= 1) per document (`text_tokens`).
        edits: broadcast edits ([1, ...] rows), an `EditsFor` called with each batch's documents
            [(token ids, first scored index)] (rows in that order), or None (the model as loaded).
    Returns:
        (loss in nats per scored token, number of scored tokens). Accumulated in float64;
        log-softmax in float32 whatever the model's dtype.
    """
    total, count = 0.0, 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[start: start + batch_size]]
        ids, mask = left_pad([s for s, _ in chunk], lm.tokenizer.pad_token_id or 0)
        width = ids.shape[1]
        active = _batch_edits(edits, chunk)
        with row_edits(lm.sites, active):
            logits = forward(lm.model, ids.to(lm.device), mask.to(lm.device)).logits      # [batch, pos, vocab]
        for b, (seq, first) in enumerate(chunk):        # one row at a time: float32 [n_scored, vocab] only
            lo = width - len(seq) + first                 # position of the first scored token in the padded row
            lp = torch.log_softmax(logits[b, lo - 1: width - 1].float(), -1)            # predicts tokens lo..width-1
            target = ids[b, lo:].to(lp.device)                                           # [n_scored]
            total -= float(lp.gather(-1, target[:, None]).double().sum())
            count += int(target.numel())
    if count == 0:
        raise ValueError("no token to score: every document was dropped (its chat prompt fills "
                         "stages.capability.text.max_tokens; raise it)")
    return total / count, count


@torch.inference_mode()
def next_token_logprobs(lm: LoadedModel, seqs: list[list[int]], batch_size: int,
                        edits: Edits | EditsFor | None = None) -> torch.Tensor:
    """Log-probabilities of the token after each (left-padded) prompt: [n_prompts, vocab] float64 on CPU.
    edits: broadcast edits, an `EditsFor` called with each batch's prompts (token ids, rows in that order),
    or None."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        batch = [seqs[i] for i in idx]
        ids, mask = left_pad(batch, lm.tokenizer.pad_token_id or 0)
        active = _batch_edits(edits, batch)
        with row_edits(lm.sites, active):
            logits = forward(lm.model, ids.to(lm.device), mask.to(lm.device), logits_to_keep=1).logits[:, -1]
        lp = torch.log_softmax(logits.double(), -1).cpu()                 # [chunk, vocab]
        for j, i in enumerate(idx):
            out[i] = lp[j]
    return torch.stack(out)


def first_token_kl(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P_other) per prompt, from log-probabilities [n, vocab]: [n] nats (0 for equal inputs;
    tokens the baseline gives probability 0 contribute 0, not 0 * inf)."""
    return torch.where(base > -torch.inf, base.exp() * (base - other), 0.0).sum(-1)
