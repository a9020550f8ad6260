"""A transformers config or ``save_pretrained`` folder that comes from a file, read as data.

A config can ask transformers to reach outside torch: an attention or experts
implementation that is a Hub kernel repository (downloaded, then loaded as native code),
flash-attention packages, remote code (``auto_map``), quantization back ends. `check_config`
refuses every such key, at any depth of the config, in one line naming it; the build then
runs with the Hub in offline mode, so that a key no list knows of still cannot download.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from ..errors import ModelFileError
from ..saving.bounds import check_elements, module_budget, safetensors_files, stored_shapes

# Implementations that need nothing outside torch.
ATTENTION = ("eager", "sdpa")
EXPERTS = ("eager", "batched_mm", "grouped_mm")
IMPLEMENTATION_KEYS = {
    "attn_implementation": ATTENTION,
    "_attn_implementation": ATTENTION,
    "experts_implementation": EXPERTS,
    "_experts_implementation": EXPERTS,
}
# Keys whose presence makes transformers import, download or compile something.
REFUSED_KEYS = {
    "auto_map": "remote code",
    "trust_remote_code": "remote code",
    "quantization_config": "a quantization back end",
    "_attn_implementation_internal": "an attention implementation set past its check",
    "_experts_implementation_internal": "an experts implementation set past its check",
    "custom_pipelines": "remote code",
}
# Keys that are harmless when false: pretrained backbones are downloaded.
FALSE_KEYS = ("use_pretrained_backbone",)
MAX_DEPTH = 32


def check_config(data: Any, what: str) -> dict[str, Any]:
    """`data` itself, a config dict that asks transformers for nothing outside torch;
    otherwise a ModelFileError naming the key."""
    if not isinstance(data, dict):
        raise ModelFileError(f"{what} is not a JSON object (got {type(data).__name__})")
    stack: list[tuple[str, Any, int]] = [("", data, 0)]
    while stack:
        where, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ModelFileError(f"{what} nests more than {MAX_DEPTH} deep at {where!r}")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            field = f"{where}.{key}" if where else str(key)
            _check_key(str(key), item, field, what)
            if isinstance(item, (dict, list)):
                stack.append((field, item, depth + 1))
    return data


def _check_key(key: str, value: Any, field: str, what: str) -> None:
    if key in REFUSED_KEYS:
        raise ModelFileError(
            f"{what}: {field} asks for {REFUSED_KEYS[key]}, which loading a file never uses; "
            "remove the key"
        )
    if key in FALSE_KEYS and value not in (None, False):
        raise ModelFileError(f"{what}: {field} must be false: loading a file never downloads")
    allowed = IMPLEMENTATION_KEYS.get(key)
    values = value.values() if isinstance(value, dict) else [value]  # per sub-config
    if allowed and any(v is not None and v not in allowed for v in values):
        raise ModelFileError(
            f"{what}: {field} is {value!r:.80}; a file may ask only for "
            f"{', '.join(allowed)} (or leave it out), which need nothing outside torch"
        )


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The Hugging Face Hub refuses every request, as with ``HF_HUB_OFFLINE=1``."""
    import huggingface_hub.constants

    with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):
        yield


def model_class(name: Any, what: str) -> type:
    """transformers' own model class of that name: never remote code."""
    import transformers

    known = isinstance(name, str) and name.isidentifier()
    cls = getattr(transformers, name, None) if known else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelFileError(
            f"{what} names {name!r:.80}, which is not a model class of transformers "
            f"{transformers.__version__}"
        )
    return cls


def build_config(cls: type, data: Any, what: str) -> Any:
    """The checked config for `cls`, built offline."""
    check_config(data, what)
    try:
        with offline():
            return cls.config_class.from_dict(dict(data))
    except Exception as e:  # noqa: BLE001 - a config from a file can fail in many ways
        raise ModelFileError(f"{what}: its {cls.__name__} config does not build ({e})") from e


def meta_model(cls: type, config: Any, what: str) -> nn.Module:
    """`cls(config)` on the meta device, within the module budget: nothing is allocated."""
    try:
        with module_budget(what), torch.device("meta"), offline():
            return cls(config)
    except ModelFileError:
        raise
    except Exception as e:  # noqa: BLE001 - as build_config
        raise ModelFileError(f"{what}: its {cls.__name__} does not build ({e})") from e


def load_pretrained_folder(path: str | os.PathLike) -> nn.Module:
    """A model folder written by ``save_pretrained``, loaded as data: its class must be one
    of transformers' own (no remote code), its config must pass `check_config`, its
    weights are safetensors (no pickle) that hold at least the parameters it declares, and
    nothing is downloaded."""
    import transformers

    folder = Path(path)
    what = f"{folder}/config.json"
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as e:
        raise ModelFileError(f"{what} is not a readable JSON file ({e})") from e
    check_config(data, what)
    names = data.get("architectures") or [None]
    cls = model_class(names[0] if isinstance(names, list) else names, what)
    config = build_config(cls, data, what)
    files = safetensors_files(folder)
    if not files:
        raise ModelFileError(f"{folder} holds no .safetensors weights for {cls.__name__}")
    params = {id(p): p.numel() for p in meta_model(cls, config, what).parameters()}
    check_elements(sum(params.values()), what, stored_shapes(files))
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no bar between a command's lines
    try:
        with offline():
            return cls.from_pretrained(
                folder, config=config, local_files_only=True, use_safetensors=True
            )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{folder} does not load as a {cls.__name__} ({e})") from e
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
