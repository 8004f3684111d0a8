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


@pytest.fixture(scope="session")
def tiny_chatml_model(tmp_path_factory) -> Path:
    """Path to a tiny random-init Llama whose tokenizer carries a ChatML template that writes a default system
    prompt of its own when a chat has none (like SmolLM2-Instruct's); EOS <|im_end|> (built once)."""
    from tools.make_tiny_model import build_chatml

    return build_chatml(tmp_path_factory.mktemp("tiny") / "tiny-chatml")


@pytest.fixture
def openai_server():
    """A fresh loopback OpenAI-compatible server; set `.responder` in the test."""
    with FakeOpenAI() as srv:
        yield srv


def pytest_addoption(parser):
    parser.addoption("--cuda", action="store_true",
                     help="let the tests see the GPU (run with -m numerics on a GPU host: the paths that differ by "
                          "device). Without it the suite hides every GPU, also from its subprocesses: it checks the "
                          "CPU behaviour that CI and a laptop see, the same on a GPU host")
    parser.addoption("--torch-threads", default="1", choices=("1", "all"),
                     help="intra-op threads of the tests that ask for one_torch_thread: 1 (the default, fast) or all "
                          "(torch's default, as a user runs). CI runs the numerically sensitive tests (-m numerics) "
                          "both ways, the second time with OMP_NUM_THREADS=1 for everything else too")


def pytest_configure(config):
    if not config.getoption("--cuda"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before any test module imports torch


def pytest_collection_modifyitems(config, items):
    if config.getoption("--cuda"):
        skip = pytest.mark.skip(reason="checks CPU behaviour (CPU tensors, gloo processes): run without --cuda")
        for item in items:
            if "cpu_only" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread(request):
    """Tiny models gain nothing from intra-op threads, and when the 2 CPUs are shared, OpenMP spin-waits
    made generation tests up to 50x slower (32 s instead of 0.5 s for an interactive session).
    --torch-threads all leaves torch's thread count as it is."""
    import torch

    if request.config.getoption("--torch-threads") == "all":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


__all__ = ["Reply"]
