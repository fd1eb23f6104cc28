import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pixelbert_dist.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pretrain" / "tiny-cpu.yaml"


@pytest.fixture
def tiny_cfg():
    """The shipped tiny config, so tests exercise what users run."""
    torch.manual_seed(0)
    return load_config(TINY)
