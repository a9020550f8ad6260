"""The schema of the model spec that `save` writes and `load` reads back.

A spec comes from a file someone may hand us, so `validate_spec` checks all of it before
any of it is used: every field's type and range, no unknown fields, no request for
pretrained weights (loading never downloads) and bounded example input shapes (rebuilding
runs the model on them). A violation is a `ModelFileError` that names the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from ..config import GRANULARITIES, MODES
from ..errors import ModelFileError
from ..fx.positions import POSITIONS
from ..gates.heads import HEADS

FORMAT = "consensus-gates"
VERSION = 1

MODEL_DTYPES = ("float32", "float64", "float16", "bfloat16")
INPUT_DTYPES = (*MODEL_DTYPES, "int64", "int32", "int16", "int8", "uint8", "bool")
MAX_INPUTS = 8
MAX_BATCH = 2  # rebuilding traces with these inputs; two samples are all it needs
MAX_SAMPLE_ELEMENTS = 2**24  # per sample, e.g. 3 x 2364 x 2364
MAX_HIDDEN = 4096
MAX_UNITS = 2**16  # channels of one channel gate
MAX_PARAMETERS = 2**30  # elements in the model a spec asks `create_model` to build
PRETRAINED_KWARGS = ("weights", "pretrained", "weights_backbone", "pretrained_backbone")


class _Invalid(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")


# A check takes a value and its field's path ("inputs[0].shape"); it raises _Invalid.
Check = Callable[[Any, str], None]


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expect(ok: bool, field: str, expected: str, value: Any) -> None:
    if not ok:
        raise _Invalid(field, f"must be {expected}, got {_got(value)}")


def one_of(*values: Any) -> Check:
    def check(v: Any, field: str) -> None:  # `type(v) is type(x)`: True must not pass for 1
        ok = any(type(v) is type(x) and v == x for x in values)
        _expect(ok, field, f"one of {', '.join(map(repr, values))}", v)

    return check


def registered(registry: Mapping[str, Any]) -> Check:
    """One of the names in `registry` at the time of the check, so that a head or position
    registered after this module was imported is accepted too."""

    def check(v: Any, field: str) -> None:
        one_of(*registry)(v, field)

    return check


def integer(low: int, high: int | None = None) -> Check:
    expected = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")

    def check(v: Any, field: str) -> None:
        in_range = type(v) is int and v >= low and (high is None or v <= high)
        _expect(in_range, field, expected, v)

    return check


def number(low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> Check:
    def check(v: Any, field: str) -> None:
        finite = type(v) in (int, float) and math.isfinite(v)
        ok = finite and (v > low if low_open else v >= low) and v <= high
        bounds = [f"> {low}" if low_open else f">= {low}"] if low > -math.inf else []
        bounds += [f"<= {high}"] if high < math.inf else []
        _expect(ok, field, " and ".join(["a finite number", *bounds]), v)

    return check


def boolean(v: Any, field: str) -> None:
    _expect(type(v) is bool, field, "true or false", v)


def string(v: Any, field: str) -> None:
    _expect(isinstance(v, str), field, "a string", v)


def nullable(check: Check) -> Check:
    def nullable_check(v: Any, field: str) -> None:
        if v is not None:
            check(v, field)

    return nullable_check


def list_of(item: Check, max_len: int, min_len: int = 0) -> Check:
    def check(v: Any, field: str) -> None:
        ok = isinstance(v, (list, tuple)) and min_len <= len(v) <= max_len
        _expect(ok, field, f"a list of {min_len} to {max_len} items", v)
        for i, x in enumerate(v):
            item(x, f"{field}[{i}]")

    return check


def mapping(value: Check, max_len: int = 100_000) -> Check:
    def check(v: Any, field: str) -> None:
        ok = isinstance(v, dict) and len(v) <= max_len and all(isinstance(k, str) for k in v)
        _expect(ok, field, f"an object with at most {max_len} entries", v)
        for k, x in v.items():
            value(x, f"{field}.{k}")

    return check


def struct(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    known = {**required, **(optional or {})}

    def check(v: Any, field: str) -> None:
        _expect(isinstance(v, dict), field, "an object", v)
        prefix = f"{field}." if field else ""
        for key in required:
            if key not in v:
                raise _Invalid(f"{prefix}{key}", "is missing")
        for key, x in v.items():
            if key not in known:
                raise _Invalid(f"{prefix}{key}", f"is not a field here (fields: {list(known)})")
            known[key](x, prefix + key)

    return check


def any_json(v: Any, field: str) -> None:
    ok = v is None or isinstance(v, (bool, int, float, str, list, dict))
    _expect(ok, field, "a JSON value", v)


def _kwargs(v: Any, field: str) -> None:
    mapping(any_json)(v, field)
    for key in PRETRAINED_KWARGS:
        if v.get(key) not in (None, False):
            raise _Invalid(
                f"{field}.{key}",
                f"must be absent: loading a file never downloads weights (they are in the "
                f"file), got {_got(v[key])}",
            )


def _shape(v: Any, field: str) -> None:
    list_of(integer(1), 8, min_len=1)(v, field)
    _expect(v[0] <= MAX_BATCH, f"{field}[0]", f"a batch of at most {MAX_BATCH}", v[0])
    per_sample = math.prod(v[1:])
    ok = per_sample <= MAX_SAMPLE_ELEMENTS
    _expect(ok, field, f"at most {MAX_SAMPLE_ELEMENTS:,} elements per sample", per_sample)


def decision(v: Any, field: str) -> None:
    if type(v) is not bool:
        ok = isinstance(v, (list, tuple)) and 1 <= len(v) <= MAX_UNITS
        _expect(ok, field, f"true, false or a list of them (at most {MAX_UNITS})", v)
        for i, x in enumerate(v):
            boolean(x, f"{field}[{i}]")


SOURCE = struct({"name": string, "kwargs": _kwargs})
INPUT = struct({"shape": _shape, "dtype": one_of(*INPUT_DTYPES)})
CONFIG_FIELDS = {  # GateConfig's fields; GateConfig itself checks the rest on construction
    "mode": one_of(*MODES),
    "position": registered(POSITIONS),
    "fc_layers": one_of(1, 2),
    "head": registered(HEADS),
    "hidden": integer(1, MAX_HIDDEN),
    "tau": number(0, low_open=True),
    "init_bias": number(),
    "momentum": nullable(number(0, 1, low_open=True)),
    "exclude": list_of(string, 10_000),
    "bernoulli_momentum": number(0, 1, low_open=True),  # optional: older files lack it
    "granularity": one_of(*GRANULARITIES),  # optional too
}
_COMMON = {
    "format": one_of(FORMAT),
    "version": integer(1, VERSION),
    "kind": one_of("plain", "gated", "slim"),
    "dtype": nullable(one_of(*MODEL_DTYPES)),
}
_GATED = {
    **_COMMON,
    "source": nullable(SOURCE),
    "inputs": list_of(INPUT, MAX_INPUTS, min_len=1),
    "config": struct({}, CONFIG_FIELDS),
    "leaf_modules": list_of(string, 10_000),
}
KINDS = {
    "plain": struct({**_COMMON, "source": SOURCE}),
    "gated": struct(_GATED, {"fixed": mapping(decision), "cut": mapping(decision)}),
    "slim": struct({**_GATED, "decisions": mapping(decision)}),
}


# A gated or cut Hugging Face model (`hf.saving`): its class and config, and each layer's
# graph, checked node by node when it is rebuilt (`fx.graph_json`).
NAMES = list_of(string, 1_000)
LAYER = struct({
    "class": string,
    "call": struct({"positional": NAMES, "names": NAMES, "inputs": NAMES,
                    "concrete": mapping(any_json, 1_000)}),
    "attributes": mapping(any_json, 1_000),
    "graph": any_json,
    "gates": mapping(struct({"name": string, "channels": integer(1, 2**20),
                             "feature_dim": nullable(integer(0, 8)), "out_ndim": integer(1, 8)})),
    "dropouts": mapping(number(0, 1)),
    "constants": mapping(struct({"shape": list_of(integer(0, 2**20), 8),
                                 "dtype": one_of(*INPUT_DTYPES)})),
})  # fmt: skip
_TRANSFORMER = {
    **_COMMON,
    "source": one_of(None),
    "inputs": mapping(INPUT, MAX_INPUTS),
    "config": struct({}, CONFIG_FIELDS),
    "leaf_modules": list_of(string, 0),
    "transformers": struct(
        {"class": string, "config": any_json, "version": string, "layers": NAMES}
    ),
    "layers": mapping(LAYER, 10_000),
    "removed_layers": NAMES,
    "rejected": list_of(struct({"node": string, "module": string, "reason": string}), 10_000),
}
TRANSFORMER_KINDS = {
    # cut while training (progressive): the graphs are saved cut, so what the cuts saved
    # cannot be measured again on loading, as for a traced model; it is kept
    "gated": struct(_TRANSFORMER, {"fixed": mapping(decision), "cut": mapping(decision),
                                   "cut_flops": integer(0, 2**62)}),
    "slim": struct({**_TRANSFORMER, "decisions": mapping(decision)}),
}


def validate_spec(spec: Any, what: str) -> dict[str, Any]:
    """`spec` itself if it is a valid spec; otherwise a ModelFileError naming the field."""
    if not isinstance(spec, dict):
        raise ModelFileError(f"{what} has a model spec that is not an object: {_got(spec)}")
    if spec.get("format") != FORMAT:
        raise ModelFileError(
            f"{what} has a spec of another format ({_got(spec.get('format'))}), not {FORMAT!r}"
        )
    version = spec.get("version")
    if type(version) is int and version > VERSION:
        raise ModelFileError(
            f"{what} has spec version {version}; this consensus-gates reads up to {VERSION}: "
            "upgrade consensus-gates"
        )
    try:
        if "kind" not in spec:
            raise _Invalid("kind", f"is missing (one of {list(KINDS)})")
        kinds = TRANSFORMER_KINDS if "transformers" in spec else KINDS
        one_of(*kinds)(spec["kind"], "kind")
        kinds[spec["kind"]](spec, "")
    except _Invalid as e:
        raise ModelFileError(f"{what} has an invalid model spec: {e}") from None
    return spec


def parse_spec(text: str, what: str) -> dict[str, Any]:
    """The validated spec in a JSON string."""
    try:
        spec = json.loads(text)
    except RecursionError:
        raise ModelFileError(f"{what} has a corrupt model spec (JSON nested too deeply)") from None
    except ValueError as e:
        raise ModelFileError(f"{what} has a corrupt model spec in its header ({e})") from e
    return validate_spec(spec, what)


def architecture_source(source: dict[str, Any] | None) -> dict[str, Any] | None:
    """`create_model`'s name and kwargs without those that fetch pretrained weights (a saved
    file holds its weights), keeping what torchvision derives from the weights it was given:
    the number of classes, the image size, the input transform."""
    if source is None:
        return None
    kwargs = dict(source["kwargs"])
    given = [kwargs.pop(k) for k in PRETRAINED_KWARGS if k in kwargs]
    weights = next((w for w in given if w not in (None, False)), None)
    if weights is not None:
        kwargs = {**_implied_by(source["name"], weights), **kwargs}
    return {"name": source["name"], "kwargs": kwargs}


def _implied_by(name: str, weights: Any) -> dict[str, Any]:
    """The constructor kwargs torchvision's builder `name` sets when given `weights`."""
    import torchvision

    try:
        meta = (
            torchvision.models.get_model_weights(name)
            .verify("DEFAULT" if weights is True else weights)
            .meta
        )
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{name} was built with pretrained weights ({weights!r}) that save() cannot "
            f"resolve ({e}); build it with create_model({name!r}) and load the pretrained "
            "state dict into it instead"
        ) from e
    implied: dict[str, Any] = {"num_classes": len(meta["categories"])}
    if name.startswith("vit_"):
        implied["image_size"] = meta["min_size"][0]
    if name.startswith("maxvit"):
        implied["input_size"] = list(meta["min_size"])
    if name in ("googlenet", "inception_v3"):
        implied["transform_input"] = True
    return implied
