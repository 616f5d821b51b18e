"""Chat prompts and generation settings that a spec can state in one line.

Real checkpoints bring more than a template: a default system prompt (Qwen2.5, SmolLM2), today's
date (Llama-3.x templates read `date_string` or the clock), an end-of-turn token that is not the
tokenizer's EOS (Gemma's `<end_of_turn>`), and sampling settings in `generation_config.json`
(Qwen2.5-1.5B-Instruct ships `repetition_penalty: 1.1`). Everything here makes those explicit:

- `ChatOptions`: the system prompt ("none", "default" or a text) and the fixed date.
- `resolve_chat_template` / `use_chat_template`: a spec's `chat_template` (template text or a
  .jinja/.txt file) replacing the tokenizer's own, for base models or to override a checkpoint's.
- `render`: instructions -> prompt strings through the tokenizer's own chat template.
- `post_instruction_ids` / `post_instruction_positions`: the tokens the template puts after the
  instruction up to the end of the generation prompt (Arditi et al. 2024, Sec. 2.1 and App. C:
  the candidate positions of direction selection).
- `stop_token_ids`: the union of the checkpoint's `generation_config.eos_token_id`, the
  tokenizer's EOS and the template's end-of-turn token.
- `greedy_config` / `generate`: greedy decoding with nothing inherited from the checkpoint
  (repetition penalty 1, no top-k / top-p / temperature, no forced or suppressed tokens), and
  completions cut at the first stop token, so a judge never sees text after the turn ended.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

_PROBE = "Name three colours."
_SENTINEL = "QQSENTINELQQ"
_ANSWER = "Red, green and blue."


class TemplateError(ValueError):
    """The tokenizer's chat template cannot do what the options ask (message names the fix)."""


class NoTemplateError(TemplateError):
    """The tokenizer has no chat template (a base model): the model needs a `chat_template`."""


TEMPLATE_FILE_SUFFIXES = (".jinja", ".txt")


def resolve_chat_template(value: str | None) -> str | None:
    """A `chat_template` value as template text.

    A single line without Jinja markup (`{{` or `{%`) is a file name: a .jinja or .txt file, read
    (relative paths: against the working directory). Anything else is the template itself.

    Raises:
        TemplateError: a file name that does not exist, does not end in .jinja/.txt, or an empty file.
    """
    if value is None or "{{" in value or "{%" in value or "\n" in value.strip():
        return value
    path = Path(value.strip()).expanduser()
    if path.suffix.lower() not in TEMPLATE_FILE_SUFFIXES:
        raise TemplateError(f"{value!r} is neither a Jinja template (no {{{{ or {{%) nor a .jinja/.txt file")
    if not path.is_file():
        raise TemplateError(f"template file not found: {value}")
    text = path.read_text()
    if not text.strip():
        raise TemplateError(f"template file is empty: {value}")
    return text


def use_chat_template(tokenizer, value: str | None):
    """Install a `chat_template` (text or a .jinja/.txt file, see `resolve_chat_template`) as the
    tokenizer's template, replacing its own; None leaves the tokenizer's. Returns the tokenizer."""
    text = resolve_chat_template(value)
    if text is not None:
        tokenizer.chat_template = text
    return tokenizer


@dataclass(frozen=True)
class ChatOptions:
    """How instructions become chat prompts.

    system_prompt: "none" (no system text; a template that always emits a system turn gets an
        empty one), "default" (whatever the template adds when no system message is given, e.g.
        Qwen2.5's "You are Qwen, ..."), or any other string, used as the system message.
    date: the value of the template variable `date_string` (Llama-3.x templates print it), fixed
        so a prompt renders the same on every day.
    """

    system_prompt: str = "none"
    date: str = "26 Jul 2024"

    def as_dict(self) -> dict:
        return asdict(self)


def _apply(tokenizer, messages: list[dict], options: ChatOptions, generation_prompt: bool = True) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise NoTemplateError("the tokenizer has no chat template (a base model?): give the model a chat_template "
                              "(the template text or a .jinja/.txt file)")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False,
                                         date_string=options.date)


def default_system_prompt(tokenizer, options: ChatOptions = ChatOptions()) -> str | None:
    """The system text the template inserts when no system message is given.

    None when the template adds no system turn of its own; "" when it always emits a system turn
    with no text of its own (e.g. Llama-3.1's date header). Found by rendering the template with a
    sentinel system message and without one: whatever stands where the sentinel stood is the default.
    """
    plain = _apply(tokenizer, [{"role": "user", "content": _PROBE}], options)
    try:
        probe = _apply(tokenizer, [{"role": "system", "content": _SENTINEL}, {"role": "user", "content": _PROBE}],
                       options)
    except Exception:  # noqa: BLE001 - templates that raise on a system role have no system turn
        return None
    if _SENTINEL not in probe:
        return None
    pre, post = probe.split(_SENTINEL, 1)
    if plain.startswith(pre) and plain.endswith(post) and len(plain) >= len(pre) + len(post):
        return plain[len(pre): len(plain) - len(post)]
    return None


def messages(instruction: str, options: ChatOptions, default: str | None) -> list[dict]:
    """The message list for one instruction (`default` from `default_system_prompt`)."""
    user = [{"role": "user", "content": instruction}]
    if options.system_prompt == "default":
        return user
    if options.system_prompt == "none":
        return user if default is None else [{"role": "system", "content": ""}, *user]
    return [{"role": "system", "content": options.system_prompt}, *user]


def render(tokenizer, instructions: list[str], options: ChatOptions = ChatOptions()) -> list[str]:
    """Instructions wrapped in the tokenizer's chat template, with the generation prompt.

    Raises:
        TemplateError: no chat template, or a system text the template drops or refuses.
    """
    default = default_system_prompt(tokenizer, options)
    if options.system_prompt not in ("none", "default"):
        try:
            probe = _apply(tokenizer, messages(_PROBE, options, default), options)
        except Exception as e:  # noqa: BLE001 - e.g. Gemma-2: "System role not supported"
            raise TemplateError(f"the chat template refuses a system prompt ({e}); use system_prompt: none") from None
        if options.system_prompt not in probe:
            raise TemplateError("the chat template drops the system prompt; use system_prompt: none")
    return [_apply(tokenizer, messages(x, options, default), options) for x in instructions]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def post_instruction_ids(tokenizer, options: ChatOptions = ChatOptions()) -> list[int]:
    """Token ids the template puts after the user's instruction, to the end of the generation
    prompt (e.g. ChatML: `<|im_end|>`, `\\n`, `<|im_start|>`, `assistant`, `\\n`).

    Arditi et al.'s `eoi_toks`: the template's text after the instruction, tokenized alone.
    """
    text = render(tokenizer, [_SENTINEL], options)[0]
    if _SENTINEL not in text:
        raise TemplateError("the chat template leaves out the user's message (no message['content'] in it)")
    return _ids(tokenizer, text[text.rindex(_SENTINEL) + len(_SENTINEL):])


def post_instruction_positions(tokenizer, options: ChatOptions, instructions: list[str]) -> list[int]:
    """Negative offsets of the post-instruction tokens, e.g. [-5, -4, -3, -2, -1].

    The template's post-instruction ids are checked against the real prompts: k is the largest
    count such that every prompt ends with the last k of them (a tokenizer that merges the
    instruction's last characters with the template's first would shorten it).

    Raises:
        TemplateError: no post-instruction token is shared by every prompt.
    """
    eoi = post_instruction_ids(tokenizer, options)
    prompts = [_ids(tokenizer, p) for p in render(tokenizer, instructions, options)]
    k = len(eoi)
    while k and any(p[len(p) - k:] != eoi[len(eoi) - k:] for p in prompts):
        k -= 1
    if k == 0:
        raise TemplateError("no token after the instruction is the same in every prompt; give positions explicitly")
    return list(range(-k, 0))


def end_of_turn_id(tokenizer, options: ChatOptions = ChatOptions()) -> int | None:
    """The special token that closes an assistant turn in the template (None if there is none)."""
    try:
        text = _apply(tokenizer, [*messages(_PROBE, options, default_system_prompt(tokenizer, options)),
                                  {"role": "assistant", "content": _ANSWER}], options, generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that cannot render an assistant turn
        return None
    if _ANSWER not in text:
        return None
    ids = _ids(tokenizer, text[text.rindex(_ANSWER) + len(_ANSWER):])
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids[0] if ids and ids[0] in added else None


def stop_token_ids(tokenizer, generation_config=None, options: ChatOptions = ChatOptions()) -> list[int]:
    """Union of the checkpoint's `generation_config.eos_token_id`, the tokenizer's EOS and the
    template's end-of-turn token, sorted."""
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eot = end_of_turn_id(tokenizer, options)
    if eot is not None:
        ids.add(eot)
    return sorted(ids)


def greedy_config(model, tokenizer, options: ChatOptions, max_new_tokens: int):
    """Greedy decoding, stated in full so nothing is inherited from the checkpoint.

    The checkpoint's `generation_config` contributes its stop tokens only. `generate` fills every
    unset field from the model's own config, so `generate` below runs with this config installed
    as the model's (see `neutral_defaults`).
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
        temperature=1.0, top_k=None, top_p=1.0, no_repeat_ngram_size=0, min_length=0,
        eos_token_id=stop_token_ids(tokenizer, getattr(model, "generation_config", None), options),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)


def effective_settings(config) -> dict:
    """The settings a manifest records: every non-default field of a GenerationConfig."""
    return {k: v for k, v in config.to_diff_dict().items() if not k.startswith("_") and k != "transformers_version"}


@contextmanager
def neutral_defaults(model, config):
    """Install `config` as the model's generation config for the block (transformers fills any unset
    field of a passed config from `model.generation_config`: a checkpoint's repetition penalty,
    suppressed tokens or top-k would otherwise leak in)."""
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


def cut_at_stop(ids: list[int], stops: set[int]) -> list[int]:
    """Token ids up to (not including) the first stop token."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


@torch.inference_mode()
def generate(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, options: ChatOptions,
             max_new_tokens: int, config=None, finished: list | None = None, **generate_kwargs) -> list[str]:
    """Greedy completions of a left-padded batch, cut at the first stop token.

    Args:
        lm: a LoadedModel; input_ids, attention_mask: [batch, pos] (left padded).
        config: a `greedy_config` (built here when None).
        finished: a list to extend with one bool per row: True where a stop token ended the row
            (False: it ran to max_new_tokens).
    Returns:
        One decoded completion per row, special tokens skipped, nothing after the first stop token.
    """
    config = config or greedy_config(lm.model, lm.tokenizer, options, max_new_tokens)
    with neutral_defaults(lm.model, config):
        out = lm.model.generate(input_ids=input_ids.to(lm.device), attention_mask=attention_mask.to(lm.device),
                                generation_config=config, **generate_kwargs)
    stops = set(config.eos_token_id or [])
    new = out[:, input_ids.shape[1]:].tolist()
    if finished is not None:
        finished.extend(any(t in stops for t in row) for row in new)
    return lm.tokenizer.batch_decode([cut_at_stop(row, stops) for row in new], skip_special_tokens=True)
