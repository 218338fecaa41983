"""Shared test fixtures."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed Python, NumPy and torch before every test so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def seed() -> int:
    """The seed applied before the test (for tests that build their own generators)."""
    return 0
