"""AOTInductor packages (``.aoti.pt2``): the exported program compiled ahead of time.

A package holds a shared library, so loading one runs native code: `check_archive` refuses
it, and `cgates bench --aot` compiles the program it is given in the timing process instead
(`compiled_module`) rather than load a package from a file.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._utils import atomic_path
from ..errors import CompilerNotFound

AOT_SUFFIX = ".aoti.pt2"


def require_compiler() -> None:
    """Raise a clear error where AOTInductor has no C++ compiler to call."""
    cxx = os.environ.get("CXX")
    if not (shutil.which(cxx) if cxx else shutil.which("g++") or shutil.which("clang++")):
        raise CompilerNotFound(
            "AOTInductor compiles C++ and found no compiler (g++ or clang++ on PATH, or $CXX); "
            "install one, or deploy the .pt2 or .onnx file instead"
        )


def compile_package(program: torch.export.ExportedProgram, path: str | os.PathLike) -> Path:
    """Compile `program` with AOTInductor into the package `path`, written atomically."""
    require_compiler()
    import torch._inductor  # a second of import time: only here, not with the package

    # on a machine without CUDA, torch warns that it found none, though none is needed
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with atomic_path(path) as tmp:
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    finally:
        quiet.setLevel(level)
    return Path(path)


def compiled_module(program: torch.export.ExportedProgram) -> Callable[..., Any]:
    """`program` compiled with AOTInductor and loaded back, in this process: a callable
    that runs like the program's module. The package lives only in a temporary folder."""
    import torch._inductor

    with tempfile.TemporaryDirectory() as tmp:
        package = compile_package(program, Path(tmp) / f"model{AOT_SUFFIX}")
        return torch._inductor.aoti_load_package(str(package))
