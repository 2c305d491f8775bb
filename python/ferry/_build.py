"""Where the extension's sources, headers and the ferry library are, for setup.py and for a
JIT build through ``torch.utils.cpp_extension.load()`` (``FERRY_JIT=1``). Both build the same
sources with the same flags; see docs/python.md."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import List

# C++17 as the library (torch 1.13's default for extensions is C++14); warnings on as for it.
COMPILE_ARGS: List[str] = ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

_PYTHON_DIR = Path(__file__).resolve().parent.parent
_SOURCE_ROOT = _PYTHON_DIR.parent


@dataclass(frozen=True)
class BuildPaths:
    sources: List[Path]
    include_dirs: List[Path]
    library_dir: Path
    version: str


def paths() -> BuildPaths:
    """The extension's sources and the CMake build to link: ``$FERRY_BUILD_DIR`` or
    ``<source root>/build``. Raises FileNotFoundError, saying how to build it, when the library
    is not there."""
    build_dir = Path(os.environ.get("FERRY_BUILD_DIR", _SOURCE_ROOT / "build")).resolve()
    if not any(build_dir.glob("libferry.so*")):
        raise FileNotFoundError(
            f"no libferry.so in {build_dir}: build the library first "
            f"(cmake -S {_SOURCE_ROOT} -B {build_dir} -G Ninja && cmake --build {build_dir}) "
            "or set FERRY_BUILD_DIR to the CMake build directory")
    version_header = build_dir / "include" / "ferry" / "version.h"
    match = re.search(r'FERRY_VERSION_STRING "([^"]+)"', version_header.read_text())
    if match is None:
        raise RuntimeError(f"{version_header} does not define FERRY_VERSION_STRING")
    return BuildPaths(
        sources=sorted((_PYTHON_DIR / "csrc").glob("*.cpp")),
        include_dirs=[_SOURCE_ROOT / "include", build_dir / "include"],
        library_dir=build_dir,
        version=match.group(1),
    )


def use_cuda() -> bool:
    """CUDA-enabled when the installed torch was built with CUDA and a toolkit is present."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def load_jit(verbose: bool = False) -> ModuleType:
    """Compiles (once; torch caches the build) and imports the extension with
    ``torch.utils.cpp_extension.load()``."""
    from torch.utils.cpp_extension import load

    build = paths()
    return load(
        name="ferry_C",
        sources=[str(source) for source in build.sources],
        extra_include_paths=[str(directory) for directory in build.include_dirs],
        extra_cflags=COMPILE_ARGS,
        extra_ldflags=[f"-L{build.library_dir}", "-lferry", f"-Wl,-rpath,{build.library_dir}"],
        with_cuda=use_cuda(),
        verbose=verbose,
    )
