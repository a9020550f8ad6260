"""What transformers records by forward hooks, kept working on gated and cut models.

transformers 5 collects ``output_hidden_states`` and ``output_router_logits`` with forward
hooks, installed once per model on the modules of the classes its ``_can_record_outputs``
names (the layer class, the MoE router), and looked up by the model's class. A traced layer
is not of the layer's class and a router traced through is not a module call, so without
this both would come back empty, silently. Here the hooks are installed before the layers
are replaced and carried over to each `TracedLayer`; routers run as modules (leaves); and
the ``Gated``/``Slim`` classes are registered with their original's recorders.
"""

from __future__ import annotations

from torch import nn

# recorded by the hooks of modules whose graph gating needs to see inside
_TRACED_THROUGH = {"hidden_states", "attentions", "cross_attentions"}


def _capturing():
    try:
        from transformers.utils import output_capturing
    except ImportError:  # a transformers without hook-recorded outputs
        return None
    return output_capturing


def install_recording_hooks(model: nn.Module) -> None:
    """Install the recording hooks of `model` and of every model inside it (an
    encoder-decoder's stacks) now, while its layers are still the original modules."""
    capturing = _capturing()
    if capturing is None:
        return
    from transformers import PreTrainedModel

    flag = "_output_capturing_hooks_installed"
    models = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    for outer in models:  # outer models first: installing one covers those inside
        inner = [m for m in outer.modules() if isinstance(m, PreTrainedModel)]
        # ... and hooks an inner one again even if it has them (copied with a model run once)
        if not any(getattr(m, flag, False) for m in inner):
            capturing.maybe_install_capturing_hooks(outer)


def recorded_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes of modules whose outputs transformers records (MoE routers) and which
    gating does not need to see inside: `kept_modules` of each layer."""
    classes: list[type] = []
    for module in model.modules():
        for key, specs in (getattr(module, "_can_record_outputs", None) or {}).items():
            if key in _TRACED_THROUGH:
                continue
            for spec in specs if isinstance(specs, list) else [specs]:
                target = getattr(spec, "target_class", spec)
                if isinstance(target, type):
                    classes.append(target)
    return tuple(classes)


def kept_modules(layer: nn.Module, classes: tuple[type, ...]) -> frozenset[str]:
    """The modules inside `layer` of the `recorded_classes`, by name in it: traced as
    leaves, so that their hooks run."""
    if not classes:
        return frozenset()
    return frozenset(n for n, m in layer.named_modules() if n and isinstance(m, classes))


def carry_hooks(source: nn.Module, target: nn.Module) -> None:
    """`source`'s forward hooks on `target`, which takes its place (a layer's recorders)."""
    target._forward_hooks.update(source._forward_hooks)
    target._forward_hooks_with_kwargs.update(source._forward_hooks_with_kwargs)
    target._forward_hooks_always_called.update(source._forward_hooks_always_called)


def retype(model: nn.Module, cls: type) -> None:
    """`model` becomes a `cls` (``Gated<Class>``, ``Slim<Class>``), whose recorded outputs
    are its original class's: transformers looks them up by the class's name."""
    model.__class__ = cls
    capturing = _capturing()
    registry = getattr(capturing, "_CAN_RECORD_REGISTRY", None)
    if registry is not None:
        registry[model] = getattr(model, "_can_record_outputs", None)
