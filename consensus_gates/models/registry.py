"""Model registry: `create_model(name, **kwargs)` for the zoo, user models and torchvision."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Set on every model create_model builds, so save()/load() can rebuild it without pickle.
SOURCE_ATTR = "_consensus_gates_source"


def register_model(name: str | None = None) -> Callable[[Callable[..., nn.Module]], Callable]:
    """Decorator that makes a model constructor available to `create_model` (and `load`)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise ValueError(f"a model named {key!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    return wrap


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """Names `create_model` accepts: the registry's first, then torchvision classifiers."""
    return sorted(_REGISTRY) + [n for n in _torchvision_names() if n not in _REGISTRY]


def accepts(name: str, keyword: str) -> bool:
    """Whether the registered constructor `name` takes `keyword` (False for torchvision)."""
    import inspect

    fn = _REGISTRY.get(name)
    return fn is not None and keyword in inspect.signature(fn).parameters


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name: a registered (zoo or user) model, or a torchvision classifier.

    Torchvision models are built with random weights unless ``weights=...`` is passed.
    The name and kwargs are remembered on the model so `save` can rebuild it.
    """
    if name in _REGISTRY:
        model = _REGISTRY[name](**kwargs)
    elif name in _torchvision_names():
        import torchvision

        model = torchvision.models.get_model(name, **kwargs)
    else:
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} See consensus_gates.list_models() for every name, "
            "or register your own constructor with @consensus_gates.register_model()."
        )
    setattr(model, SOURCE_ATTR, {"name": name, "kwargs": dict(kwargs)})
    return model


def forget_source(model: nn.Module) -> None:
    """Mark a model that no longer has the shapes `create_model` built (pruned), so that
    `save` refuses it clearly instead of writing a spec its weights do not fit."""
    if hasattr(model, SOURCE_ATTR):
        delattr(model, SOURCE_ATTR)


def create_model_for(
    name: str, num_classes: int, in_channels: int, model_args: dict[str, Any] | None = None
) -> nn.Module:
    """`create_model` sized to a data set: its number of classes, and its image channels where
    the constructor takes ``in_channels`` (the zoo's models); `model_args` take precedence.

    Raises ValueError for a model that takes only 3-channel images when the data have another
    number of channels.
    """
    kwargs = {"num_classes": num_classes, **(model_args or {})}
    if accepts(name, "in_channels"):
        kwargs.setdefault("in_channels", in_channels)
    elif in_channels != 3:
        raise ValueError(
            f"{name} takes 3-channel images and the data have {in_channels}; use a zoo model "
            "that takes in_channels (e.g. resnet20) for this data set"
        )
    return create_model(name, **kwargs)
