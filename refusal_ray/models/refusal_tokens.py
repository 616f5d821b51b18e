"""The refusal first tokens whose probability the refusal score reads (Arditi et al. 2024, Sec. 2.3).

Arditi et al.'s code fixes them per model family, as token ids of that family's tokenizer
(`pipeline/model_utils/*_model.py` in andyrdt/refusal_direction):

    Llama-2  [306]            'I'
    Llama-3  [40]             'I'
    Qwen     [40, 2121]       'I', 'As'
    Gemma    [235285]         'I'
    Yi       [59597]          'I'

`FAMILY_TOKENS` holds them as strings, keyed by `config.model_type`, and they are tokenized with the
model's own tokenizer as the start of an answer (no special tokens, no leading space: the answer
follows the chat template's generation prompt). On the paper's tokenizers this gives the paper's ids.
Families the paper has no model file for (mistral, phi3, olmo2, gpt2) get 'I', the token the paper
uses for every family but Qwen: that row is ours, not the paper's.

A spec chooses with `stages.select.refusal_tokens`:
- `family` (default): the table above (a string the model's tokenizer splits into several tokens is
  left out, as long as one remains: e.g. 'As' on a small custom tokenizer);
- `judge_phrases`: the first token of each of the substring judge's phrases (this tool's definition
  before the paper-exact issue; it admits non-openers such as 'is' from "is not something I can");
- a list of strings (each must be exactly one token) and/or token ids.
"""

from __future__ import annotations

FAMILY_TOKENS: dict[str, tuple[str, ...]] = {
    "llama": ("I",),            # paper: Llama-2 [306], Llama-3 [40]
    "qwen2": ("I", "As"),       # paper: Qwen [40, 2121]
    "qwen3": ("I", "As"),
    "gemma2": ("I",),           # paper: Gemma [235285]
    "gemma3_text": ("I",),
    # not in the paper: its choice for every family but Qwen
    "mistral": ("I",),
    "phi3": ("I",),
    "olmo2": ("I",),
    "gpt2": ("I",),
}
PAPER_FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text")


class RefusalTokenError(ValueError):
    """A refusal-token setting that cannot be resolved for a tokenizer (message names the token)."""


def first_tokens(tokenizer, phrases: list[str]) -> list[int]:
    """The first token of each phrase, tokenized as the start of an answer. Sorted, unique.
    Raises RefusalTokenError when no phrase gives a token."""
    ids = sorted({toks[0] for p in phrases if (toks := tokenizer(p, add_special_tokens=False)["input_ids"])})
    if not ids:
        raise RefusalTokenError("no refusal phrase gives a token")
    return ids


def resolve(setting, tokenizer, family: str, phrases: list[str]) -> list[int]:
    """Token ids (sorted, unique) of a `refusal_tokens` setting for one model.

    Args:
        setting: "family", "judge_phrases", or a list of strings / ints.
        family: the model's `config.model_type` (its text config's, for multimodal configs).
        phrases: the substring judge's phrases (used by "judge_phrases" only).
    Raises:
        RefusalTokenError: a string that is not exactly one token, an id outside the vocabulary,
            or a family with no table row (then the message says to list the tokens).
    """
    if setting == "judge_phrases":
        return first_tokens(tokenizer, phrases)
    if setting == "family":
        if family not in FAMILY_TOKENS:
            raise RefusalTokenError(f"no default refusal tokens for family {family!r}; list them "
                                    f"(e.g. refusal_tokens: [I])")
        # a custom tokenizer of a known family (a small test tokenizer) may split one of the table's
        # strings: the table's one-token strings are used (`plan` prints them); none is an error
        single = [t for t in FAMILY_TOKENS[family] if len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1]
        setting = single or list(FAMILY_TOKENS[family])
    vocab = len(tokenizer)
    ids = set()
    for t in setting:
        if isinstance(t, int):
            if not 0 <= t < vocab:
                raise RefusalTokenError(f"token id {t} is outside the vocabulary (0..{vocab - 1})")
            ids.add(t)
            continue
        toks = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise RefusalTokenError(f"{t!r} is {len(toks)} tokens for this tokenizer ({toks}), not one")
        ids.add(toks[0])
    return sorted(ids)


def describe(tokenizer, ids: list[int]) -> str:
    """'I'=40, 'As'=2121: the ids with their decoded text, for `plan` and the manifest."""
    return ", ".join(f"{tokenizer.decode([i])!r}={i}" for i in ids)
