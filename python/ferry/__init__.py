"""ferry: fine-tuning models larger than GPU memory, from PyTorch.

A thin layer over ferry's C++ runtime (``ferry._C``), not a second implementation:

- :class:`Engine` drives a model block by block in the ``gpu`` or ``zero-offload`` mode;
- :class:`LayeredModel` is a built-in family (a preset or a Hugging Face directory) or a model
  assembled from your own ``torch.nn.Module`` stem, blocks and head;
- :mod:`ferry.optim` holds ferry's vectorized CPU optimizers as ``torch.optim.Optimizer``
  subclasses;
- :mod:`ferry.data` the token and text datasets (instruction and chat formats), loader and demo
  task of ferry's data layer; :class:`Tokenizer` a model's own tokenizer and chat templates;
- :func:`plan` the planner's dry run: bytes per tier, fit, predicted step time; :func:`calibrate`
  the I/O, PCIe, matmul and optimizer benchmarks it reads.

Errors from the runtime are :class:`Error` (a ``RuntimeError``), :class:`BudgetExceeded`
(also a ``MemoryError``) and :class:`IoError` (also an ``OSError``). See docs/python.md.
"""

from __future__ import annotations

import os
import sys

import torch  # noqa: F401  (loads libtorch and libc10, which the extension links against)

if os.environ.get("FERRY_JIT") == "1":
    from ._build import load_jit

    _C = load_jit(verbose=os.environ.get("FERRY_JIT_VERBOSE") == "1")
    sys.modules[__name__ + "._C"] = _C
else:
    from . import _C

    # Note: python/ferry/_C/ holds only the type stubs; without the built extension beside it,
    # Python imports that folder as an empty namespace package.
    if getattr(_C, "__file__", None) is None:
        raise ImportError("ferry's extension ferry._C is not built: run `python3 setup.py build_ext --inplace` "
                          "in python/ after building libferry with CMake, or set FERRY_JIT=1 (docs/python.md)")

from . import data, optim
from ._C import BudgetExceeded, Error, InternalError, IoError, StepContext, StepResult
from .engine import Engine
from .model import LayeredModel, causal_lm_loss, preset_names
from .plan import Plan, calibrate, plan
from .tokenizer import Tokenizer, chat_template_names

__version__: str = _C.__version__

__all__ = [
    "BudgetExceeded",
    "Engine",
    "Error",
    "InternalError",
    "IoError",
    "LayeredModel",
    "Plan",
    "StepContext",
    "StepResult",
    "Tokenizer",
    "calibrate",
    "chat_template_names",
    "causal_lm_loss",
    "data",
    "optim",
    "plan",
    "preset_names",
]
