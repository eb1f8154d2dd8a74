"""Tiny random Qwen3 reranker checkpoints (real tokenizer, real architecture) for the tests.

Written once per checkout under tests/.tiny-model/ (git-ignored) and reused by every session:
building the tokenizer takes seconds, loading a written checkpoint is fast, and the engine
keeps one loaded copy per process. Use: `Qwen3Reranker(str(tiny_model_dir), device="cpu")`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

__all__ = ["tiny_model_dir", "tiny_model_dir_untied", "tiny_checkpoint", "tiny_embedding_dir",
           "tiny_embedding_checkpoint"]

CACHE_ROOT = Path(__file__).resolve().parent / ".tiny-model"
#: bump when adapter.rerank.tiny changes what it writes
LAYOUT_VERSION = "v2"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def tiny_checkpoint(tied: bool = True, seed: int = 0) -> Path:
    """The cached tiny checkpoint directory, written atomically on first use."""
    from adapter.rerank.tiny import make_tiny_model

    target = CACHE_ROOT / f"{LAYOUT_VERSION}-{'tied' if tied else 'untied'}-seed{seed}"
    if all((target / name).exists() for name in _FILES):
        return target
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="writing-", dir=CACHE_ROOT))
    make_tiny_model(staging, seed=seed, tie_word_embeddings=tied)
    try:
        os.replace(staging, target)  # atomic; another session may have won the race
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_embedding_checkpoint(seed: int = 0) -> Path:
    """The cached tiny Qwen3-Embedding-like checkpoint, written atomically on first use."""
    from adapter.rerank.tiny import make_tiny_model

    target = CACHE_ROOT / f"{LAYOUT_VERSION}-embedding-seed{seed}"
    if all((target / name).exists() for name in _FILES):
        return target
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="writing-", dir=CACHE_ROOT))
    make_tiny_model(staging, seed=seed, kind="embedding")
    try:
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tiny_embedding_dir() -> Path:
    """A tiny random Qwen3-Embedding-like checkpoint (float32, real tokenizer)."""
    return tiny_embedding_checkpoint()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny Qwen3 reranker with a tied head (like 0.6B / 4B)."""
    return tiny_checkpoint(tied=True)


@pytest.fixture(scope="session")
def tiny_model_dir_untied() -> Path:
    """A tiny Qwen3 reranker with an untied lm_head (like 8B)."""
    return tiny_checkpoint(tied=False)
