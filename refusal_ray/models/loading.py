"""Loading a Hugging Face causal LM with its tokenizer and site adapter.

Weights load from safetensors only; `trust_remote_code` stays off unless asked for. Big models
go through accelerate (`device_map`, `max_memory`, `offload_folder`) and bitsandbytes
(`quantization: 8bit | 4bit`), both handled by `from_pretrained` itself.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_ray.models.chat import resolve_chat_template, use_chat_template
from refusal_ray.models.sites import SiteAdapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BNB_CPU_BLOCKSIZE = 64  # bitsandbytes' 4-bit CPU kernel needs in_features divisible by this


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    sites: SiteAdapter

    def __iter__(self):  # allows `model, tokenizer, sites = load_model(...)`
        return iter((self.model, self.tokenizer, self.sites))

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where input ids must go)."""
        return self.model.get_input_embeddings().weight.device


def model_type(lm: LoadedModel) -> str:
    """The loaded model's `model_type` (a multimodal config's text model's): the refusal-token family key."""
    cfg = lm.model.config
    return (getattr(cfg, "text_config", None) or cfg).model_type


def read_config(path_or_id: str, revision: str | None = None, trust_remote_code: bool = False) -> dict:
    """The model's config.json as a dict, without loading weights."""
    local = Path(path_or_id) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path_or_id, revision=revision,
                                      trust_remote_code=trust_remote_code).to_dict()


WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".safetensors")


def safetensors_problem(path: str | Path) -> str | None:
    """Why the local checkpoint directory `path` has no safetensors weights `load_model` can read
    (None when it has them, or when `path` is not a local directory, e.g. a hub id). Safetensors
    weights are `model.safetensors`, or `model.safetensors.index.json` with every shard it lists."""
    d = Path(path)
    if not d.is_dir() or (d / "model.safetensors").is_file():
        return None
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return f"cannot read {index}: {type(e).__name__}: {e}".splitlines()[0]
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            return (f"{len(missing)} of the {len(shards)} shards listed in {index.name} are missing from {path} "
                    f"(first: {missing[0]})")
        return None
    found = sorted(f.name for f in d.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))
    has = f"it has {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}" if found else "it has no weight files"
    return (f"no safetensors weights in {path} ({has}; expected model.safetensors, or "
            f"model.safetensors.index.json and its shards): weights load from safetensors only; convert with "
            f"transformers' save_pretrained(out_dir, safe_serialization=True) or use a safetensors checkpoint")


def bnb_4bit_cpu_problem(config: dict) -> str | None:
    """Why bitsandbytes cannot run this config in 4 bits on CPU (None when it can)."""
    cfg = config.get("text_config") or config
    widths = {cfg.get("hidden_size"), cfg.get("intermediate_size")} - {None}
    bad = sorted(w for w in widths if w % BNB_CPU_BLOCKSIZE)
    if not bad:
        return None
    return (f"4-bit quantisation on CPU needs layer widths divisible by {BNB_CPU_BLOCKSIZE} "
            f"(bitsandbytes' CPU kernel); this model has {bad[0]}: use 8bit or a GPU")


def contiguous_head_input(model) -> None:
    """Give the output head a contiguous input.

    Transformers slices the last positions (`logits_to_keep`) before the head, a non-contiguous
    [batch, k, d_model] view. torch 2.13's CPU bfloat16 linear on such a view with a vocabulary-
    sized weight allocates about 24x the weight and runs 600x slower (measured with the Qwen2.5-3B
    config: 14 GiB and 72 s instead of 0.1 s for a 24-row batch); a contiguous copy of the few kept
    positions avoids it.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]) if args else None)


def load_model(path_or_id: str, *, dtype: str = "float32", device: str = "cpu",
               device_map: str | dict | None = None, max_memory: dict | None = None,
               offload_folder: str | None = None, quantization: str | None = None,
               revision: str | None = None, trust_remote_code: bool = False,
               attn_implementation: str | None = None, chat_template: str | None = None) -> LoadedModel:
    """Load model, tokenizer and site adapter.

    Args:
        path_or_id: local directory or hub id.
        dtype: "float32" | "bfloat16" | "float16".
        device: "cpu" | "cuda" | "cuda:N" | "auto" (ignored when `device_map` is given).
        device_map / max_memory / offload_folder: passed to accelerate via `from_pretrained`.
        quantization: None | "8bit" | "4bit" (nf4), through `BitsAndBytesConfig`.
        chat_template: a Jinja chat template replacing the tokenizer's own (for base models, or to
            override a checkpoint's): the template text, or a .jinja/.txt file
            (`refusal_ray.models.chat.resolve_chat_template`).
    Returns:
        LoadedModel(model, tokenizer, sites); the model is in eval mode with gradients off.
    Raises:
        ValueError: unknown dtype or quantization, or 4-bit on CPU with widths bitsandbytes' CPU
            kernel cannot pack; UnsupportedFamilyError: unknown family; TemplateError: a
            chat_template file that does not exist; OSError: no safetensors weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    chat_template = resolve_chat_template(chat_template)   # a missing template file fails before any weight
    kwargs: dict = {"dtype": DTYPES[dtype], "use_safetensors": True, "revision": revision,
                    "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        if quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            # said on every matmul of a float32 model; once in the docs is enough
            warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        elif quantization == "4bit":
            problem = device == "cpu" and bnb_4bit_cpu_problem(read_config(path_or_id, revision, trust_remote_code))
            if problem:
                raise ValueError(problem)
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype])
        else:
            raise ValueError(f"unknown quantization {quantization!r}; expected '8bit' or '4bit'")
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    elif device == "auto":
        kwargs["device_map"] = "auto"
    elif quantization is None:
        kwargs["device_map"] = {"": device}
    problem = safetensors_problem(path_or_id)
    if problem:   # transformers would say only "no file named model.safetensors"
        raise OSError(problem)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, **kwargs)
    model.eval().requires_grad_(False)
    contiguous_head_input(model)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, revision=revision, trust_remote_code=trust_remote_code)
    use_chat_template(tokenizer, chat_template)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, SiteAdapter.for_model(model))
