"""The JIT build through torch.utils.cpp_extension.load(): FERRY_JIT=1 `import ferry` compiles
the same sources. It takes minutes, so it runs only with FERRY_TEST_JIT=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SOURCE_ROOT


@pytest.mark.skipif(os.environ.get("FERRY_TEST_JIT") != "1",
                    reason="compiles the extension (minutes); set FERRY_TEST_JIT=1")
def test_import_with_a_jit_build(tmp_path: Path) -> None:
    script = ("import ferry; "
              "assert ferry._C.__name__ == 'ferry_C', ferry._C; "
              "engine = ferry.Engine('tiny-gpt2', device='cpu'); "
              "print(engine)")
    environment = dict(os.environ, FERRY_JIT="1", TORCH_EXTENSIONS_DIR=str(tmp_path),
                       PYTHONPATH=str(SOURCE_ROOT / "python"))
    result = subprocess.run([sys.executable, "-c", script], env=environment, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ferry.Engine(" in result.stdout
