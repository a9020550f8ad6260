"""What loading a file may allocate, checked before anything real is built.

A spec is small and the model it describes can be large: every model a file asks for is
built on the meta device first (no memory), with a cap on its number of modules (a build's
time and memory grow with it), and refused if it would hold more elements than one limit
or than the tensors the file itself holds.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import ModelFileError
from .spec import MAX_PARAMETERS

MAX_MODULES = 2**15  # modules in one model a file asks for: building 30,000 takes seconds

Shapes = Mapping[str, tuple[int, ...]]


@contextlib.contextmanager
def module_budget(what: str, limit: int = MAX_MODULES) -> Iterator[None]:
    """Stop a model build as soon as it registers more than `limit` submodules."""
    count = 0

    def count_one(*_args) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise ModelFileError(f"{what} asks for a model of more than {limit:,} modules")

    handle = nn.modules.module.register_module_module_registration_hook(count_one)
    try:
        yield
    finally:
        handle.remove()


def stored_shapes(paths: Iterable[str | os.PathLike]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in safetensors files, read from their headers alone."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"{path} is not a readable safetensors file ({e})") from e
    return shapes


def elements(shapes: Iterable[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


def check_elements(count: int, what: str, stored: Shapes | None = None) -> None:
    """Refuse a model of more than `MAX_PARAMETERS` elements, or, where the file's tensors
    are known, of more than the file holds."""
    if count > MAX_PARAMETERS:
        raise ModelFileError(
            f"{what} asks for a model of {count:,} parameters and buffers; a file may ask for "
            f"at most {MAX_PARAMETERS:,}"
        )
    held = elements(stored.values()) if stored is not None else None
    if held is not None and count > held:
        raise ModelFileError(
            f"{what} asks for a model of {count:,} parameters and buffers, but its weights "
            f"hold {held:,}: the spec does not describe these weights"
        )


def check_matches(model: nn.Module, stored: Shapes, what: str) -> None:
    """The tensors a rebuilt (meta) model will load are those in the file, of the same
    shapes. Tied weights are one tensor under several names, which the file holds once."""
    groups: dict[int, list[str]] = {}
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    missing = sorted(ns[0] for ns in groups.values() if not any(n in stored for n in ns))
    unexpected = sorted(set(stored) - set(state))
    wrong = sorted(k for k in set(state) & set(stored) if tuple(state[k].shape) != stored[k])
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:3]}" if missing else "",
                 f"unexpected {unexpected[:3]}" if unexpected else "",
                 ", ".join(f"{k} is {list(stored[k])} in the file, {list(state[k].shape)} in "
                           "the spec" for k in wrong[:3])]  # fmt: skip
        raise ModelFileError(
            f"the weights in {what} do not match the model its spec describes "
            f"({'; '.join(p for p in parts if p)})"
        )


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))
