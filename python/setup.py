"""Builds ferry's Python extension, ``ferry._C``, against the ferry library CMake built.

    cmake -S . -B build -G Ninja && cmake --build build      # the library, first
    cd python && /usr/bin/python3 setup.py build_ext --inplace

``FERRY_BUILD_DIR`` names the CMake build directory (default: ``../build`` from this file);
the extension links its ``libferry.so`` with an rpath to it, so ``import ferry`` needs no
``LD_LIBRARY_PATH``. The extension is a CUDAExtension when the installed torch has CUDA and a
toolkit is present. See docs/python.md.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

# Note: ferry/_build.py is loaded by path, because importing the package would import the
# extension this script is about to build.
_spec = importlib.util.spec_from_file_location(
    "ferry_build", Path(__file__).resolve().parent / "ferry" / "_build.py")
ferry_build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ferry_build
_spec.loader.exec_module(ferry_build)

build = ferry_build.paths()
extension_type = CUDAExtension if ferry_build.use_cuda() else CppExtension

setup(
    name="ferry",
    version=build.version,
    description="Fine-tuning models larger than GPU memory: the Python face of the ferry runtime",
    packages=["ferry"],
    package_data={"ferry": ["py.typed", "_C/*.pyi"]},
    ext_modules=[
        extension_type(
            name="ferry._C",
            sources=[str(source) for source in build.sources],
            include_dirs=[str(directory) for directory in build.include_dirs],
            library_dirs=[str(build.library_dir)],
            libraries=["ferry"],
            extra_compile_args=ferry_build.COMPILE_ARGS,
            extra_link_args=[f"-Wl,-rpath,{build.library_dir}"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
