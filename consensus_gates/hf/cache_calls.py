"""A layer's KV-cache calls as functions that also run without a cache.

Some layers update the cache in their own code (Bloom: ``if layer_past is not None:
key, value = layer_past.update(...)``), so a graph traced with a cache holds the method call
``layer_past.update``, which fails on ``use_cache=False`` (``layer_past`` is None), and a
method of a non-tensor that a saved graph may not name. `as_cache_functions` turns those
calls into the functions here: each does what the layer's code does with and without a
cache, and takes nothing but a transformers ``Cache`` (or None) to call it on.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..fx.graph_json import register_function


def _cache(cache: Any, method: str) -> Any:
    from transformers import Cache

    if not isinstance(cache, Cache):
        raise TypeError(f"{method} is called on a transformers Cache, got {type(cache).__name__}")
    return cache


def cache_update(cache: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
    """``cache.update(key, value, ...)``; without a cache, the key and value as they are."""
    if cache is None:
        return key, value
    return _cache(cache, "update").update(key, value, *args, **kwargs)


def cache_length(cache: Any, *args: Any) -> Any:
    """``cache.get_seq_length(...)``; without a cache, 0 tokens before these."""
    return 0 if cache is None else _cache(cache, "get_seq_length").get_seq_length(*args)


FUNCTIONS = {"update": cache_update, "get_seq_length": cache_length}
for _fn in FUNCTIONS.values():
    register_function(f"{__name__}.{_fn.__name__}", _fn)


def as_cache_functions(gm: fx.GraphModule, values: dict[str, Any]) -> None:
    """Rewrite `gm`'s method calls on a cache input (its traced value in `values`, by
    placeholder name) into `FUNCTIONS`."""
    from transformers import Cache

    caches = {n for n in gm.graph.nodes
              if n.op == "placeholder" and isinstance(values.get(n.target), Cache)}  # fmt: skip
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.args and node.args[0] in caches:
            fn = FUNCTIONS.get(node.target)
            if fn is not None:
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(fn, node.args, node.kwargs)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                changed = True
    if changed:
        gm.recompile()
