"""Model registry: `create_model(name, **kwargs)` for the zoo, user models and torchvision."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Set on every model create_model builds, so save()/load() can rebuild it without pickle.
SOURCE_ATTR = "_consensus_gates_source"


def register_model(name: str | Callable[..., nn.Module] | None = None) -> Any:
    """Decorator that makes a model constructor available to `create_model` (and `load`),
    by its function name (``@register_model``) or another (``@register_model("net")``)."""
    if callable(name):  # used bare
        return register_model()(name)

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


def list_models(filter: str = "") -> list[str]:
    """Names `create_model` accepts, the registry's first, then torchvision classifiers;
    with `filter`, those that match it as a wildcard pattern (``"resnet*"``)."""
    names = sorted(_REGISTRY) + [n for n in _torchvision_names() if n not in _REGISTRY]
    return [n for n in names if fnmatch.fnmatch(n, filter)] if filter else names


def accepts(name: str, keyword: str) -> bool:
    """Whether the registered constructor `name` takes `keyword` (False for torchvision)."""
    fn = _REGISTRY.get(name)
    return fn is not None and keyword in inspect.signature(fn).parameters


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name: a registered (zoo or user) model, or a torchvision classifier.

    Torchvision models are built with random weights unless ``weights=...`` is passed.
    The name and kwargs are remembered on the model so `save` can rebuild it.

    Raises ValueError for an unknown name, or kwargs the constructor does not take.
    """
    if name in _REGISTRY:
        fn = _REGISTRY[name]
        _check_kwargs(name, fn, kwargs)
    elif name in _torchvision_names():
        import torchvision

        fn = torchvision.models.get_model_builder(name)
    else:
        raise _unknown_model(name)
    try:
        model = fn(**kwargs)
    except TypeError as e:  # a torchvision builder passes kwargs on to the model class
        raise ValueError(f"{name} cannot be built with {kwargs}: {e}") from e
    setattr(model, SOURCE_ATTR, {"name": name, "kwargs": dict(kwargs)})
    return model


def _unknown_model(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown model {name!r}.{hint} See consensus_gates.list_models() for every name, "
        "or register your own constructor with @consensus_gates.register_model()."
    )


def _check_kwargs(name: str, fn: Callable[..., nn.Module], kwargs: dict[str, Any]) -> None:
    """ValueError naming the keywords that the registered constructor `fn` does not take."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [n for n, p in params.items() if p.kind in named]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(
            f"{name} takes no {', '.join(map(repr, unknown))}; its keywords: "
            f"{', '.join(accepted) or 'none'}"
        )


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

    Raises ValueError for an unknown model, or one that takes only 3-channel images when the
    data have another number of channels.
    """
    if name not in _REGISTRY and name not in _torchvision_names():
        raise _unknown_model(name)
    kwargs = {"num_classes": num_classes, **(model_args or {})}
    if accepts(name, "in_channels"):
        kwargs.setdefault("in_channels", in_channels)
    elif in_channels != 3:
        raise ValueError(
            f"{name} takes 3-channel images and the data have {in_channels}; use a zoo model "
            "that takes in_channels (e.g. resnet20) for this data set"
        )
    return create_model(name, **kwargs)
