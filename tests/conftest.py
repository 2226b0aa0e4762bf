import copy
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model and its tokenizer saved to a folder, for what loads a model by path."""
    from tiny import make_model, make_tokenizer

    folder = tmp_path_factory.mktemp("tiny_model")
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def session_tokenizer():
    """`tiny.make_tokenizer()`, trained once per test process; tests take the `tokenizer` fixture, a copy of it."""
    from tiny import make_tokenizer

    return make_tokenizer()


@pytest.fixture
def tokenizer(session_tokenizer):
    """A fresh copy of `tiny.make_tokenizer()`'s tokenizer for one test, which may change it (padding side, tokens)."""
    return copy.deepcopy(session_tokenizer)
