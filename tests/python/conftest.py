"""pytest set-up: import ferry from the source tree (python/, built in place by
`python3 setup.py build_ext --inplace`) and find the CMake build for the CLI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

SOURCE_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(SOURCE_ROOT / "python"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def build_dir() -> Path:
    """The CMake build directory: $FERRY_BUILD_DIR or <source root>/build."""
    return Path(os.environ.get("FERRY_BUILD_DIR", SOURCE_ROOT / "build"))


@pytest.fixture(autouse=True)
def deterministic_seed() -> None:
    torch.manual_seed(0)
