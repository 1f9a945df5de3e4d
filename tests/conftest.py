"""Shared fixtures: short real runs of the shipped tiny CLIP, made once per test session."""

import os
from pathlib import Path

# Tests never reach a hub: offline mode makes a missing model or dataset fail at once instead
# of after a minute of retries. Set before huggingface_hub is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch

from attndrift.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# Small but real: 1 epoch over 320 images (10 steps), 3 probes, 40 probe images.
FAST = ["train.epochs=1", "data.train_limit=320", "train.batch_size=32", "probe.per_epoch=3",
        "probe.images=40", "train.log_every=5"]


def tiny_config(name: str, *overrides: str):
    return load_config(ROOT / "configs" / "runs" / f"{name}.yaml", [*FAST, *overrides])


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def full_ft_run(tmp_path_factory) -> Path:
    from attndrift.train import run

    out = tmp_path_factory.mktemp("full_ft")
    run(tiny_config("tiny_full_ft"), out, progress=False)
    return out


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory) -> Path:
    from attndrift.train import run

    out = tmp_path_factory.mktemp("lora")
    run(tiny_config("tiny_lora"), out, progress=False)
    return out
