"""Session fixtures: one tiny saved checkpoint per architecture in ``drift.toy.TOY_CONFIGS``.

The whole session runs offline: nothing in the test suite may touch the network, so the
Hugging Face libraries are told so before anything imports them.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Callable

# Before anything imports huggingface_hub / transformers, which read these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from drift import toy  # noqa: E402

TOY_NAMES = tuple(toy.TOY_CONFIGS)

SHARD_SIZE = "20KB"
"""Small enough that one toy layer (hidden 64) spreads over several shards."""


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory) -> Callable[..., tuple[Path, torch.nn.Module]]:
    """``make(name, sharded=False, dtype=torch.float32) -> (folder, model)``.

    ``model`` is ``drift.toy.tiny_model(name, dtype=torch.float32)`` (built once per name;
    each call returns a private deep copy, so tests may mutate it). ``folder`` holds that
    model saved with ``save_pretrained`` in ``dtype``, sharded at ``SHARD_SIZE`` when
    ``sharded``; it is written once per (name, sharded, dtype) and shared by the whole session,
    so treat it as read-only: copy it (``shutil.copytree``) before corrupting it.
    """
    root = tmp_path_factory.mktemp("toy_checkpoints")
    models: dict[str, torch.nn.Module] = {}
    folders: dict[tuple[str, bool, torch.dtype], Path] = {}

    def make(name: str, sharded: bool = False,
             dtype: torch.dtype = torch.float32) -> tuple[Path, torch.nn.Module]:
        if name not in models:
            models[name] = toy.tiny_model(name, dtype=torch.float32)
        key = (name, sharded, dtype)
        if key not in folders:
            folder = root / f"{name}-{'sharded' if sharded else 'single'}-{str(dtype).split('.')[-1]}"
            toy.save(models[name], folder, shard_size=SHARD_SIZE if sharded else None,
                     dtype=None if dtype == torch.float32 else dtype)
            folders[key] = folder
        return folders[key], copy.deepcopy(models[name])

    return make


@pytest.fixture(scope="session")
def checkpoint_copy(toy_checkpoint, tmp_path_factory) -> Callable[..., Path]:
    """``copy(name, sharded=False, dtype=torch.float32, **config) -> folder``.

    A private, writable copy of ``toy_checkpoint(name, sharded, dtype)``'s folder, with the given
    ``config.json`` keys set (``None`` deletes a key). For tests that damage a checkpoint.
    """
    def copy_(name: str, sharded: bool = False, dtype: torch.dtype = torch.float32, **config) -> Path:
        src, _ = toy_checkpoint(name, sharded, dtype)
        dst = tmp_path_factory.mktemp(f"{name}-copy") / src.name
        shutil.copytree(src, dst)
        if config:
            f = dst / "config.json"
            cfg = json.loads(f.read_text())
            for k, v in config.items():
                if v is None:
                    cfg.pop(k, None)
                else:
                    cfg[k] = v
            f.write_text(json.dumps(cfg, indent=2))
        return dst

    return copy_


@pytest.fixture(autouse=True)
def _no_figures_left_over():
    """Each test starts with no pyplot figure: a figure one test leaves open would fail a
    later test that checks that drawing leaves none (tests/test_widgets.py)."""
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
