"""Shared fixtures: a tiny chat model built once per session and the loopback OpenAI server."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# Tests never touch the network: make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fake_openai import FakeOpenAI, Reply  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Path to a tiny random-init Mistral chat model with Zephyr's template (built once)."""
    from tools.make_tiny_model import build

    return build(tmp_path_factory.mktemp("tiny") / "tiny-zephyr")


@pytest.fixture
def openai_server():
    """A fresh loopback OpenAI-compatible server; set `.responder` in the test."""
    with FakeOpenAI() as srv:
        yield srv


@pytest.fixture
def repo_root() -> Path:
    return ROOT


__all__ = ["Reply"]
