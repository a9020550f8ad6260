"""The saved spec is checked as a schema before any of it is used: each malformed field is a
ModelFileError that names the field and what was expected."""

from __future__ import annotations

import copy
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import consensus_gates as cg
from consensus_gates import GateConfig, ModelFileError

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 8, 8)


def _net():
    return cg.create_model("cifar_resnet", blocks=[1, 1, 1], num_classes=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A gated file (layer gates, one pinned) and a slim file cut with channel gates."""
    root = tmp_path_factory.mktemp("spec")
    gated = cg.insert_gates(_net(), X)
    gated.gates["layer2.0"].fixed = False
    cg.save(gated, root / "gated.safetensors")
    channel = cg.insert_gates(_net(), X, GateConfig(mode="channel"))
    decisions = {n: (False,) + (True,) * (g.units - 1) for n, g in channel.gates.items()}
    cg.save(cg.materialize(channel, decisions), root / "slim.safetensors")
    return {"gated": root / "gated.safetensors", "slim": root / "slim.safetensors"}


def _spec(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["consensus_gates"])


def _write(src: Path, dst: Path, header: str) -> Path:
    save_file(load_file(str(src)), str(dst), metadata={"consensus_gates": header})
    return dst


def _without(key):
    return lambda s: s.pop(key)


def _put(*path_and_value):
    *path, value = path_and_value

    def edit(spec):
        node = spec
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


# (file, edit of the spec dict or a header string, expected message)
CASES = {
    "missing-kind": ("gated", _without("kind"), r"kind is missing \(one of \['plain', 'gated'"),
    "missing-dtype": ("gated", _without("dtype"), r": dtype is missing"),
    "missing-inputs": ("slim", _without("inputs"), r": inputs is missing"),
    "dtype-int": ("gated", _put("dtype", 5), r"dtype must be one of 'float32', .*, got 5"),
    "dtype-unknown": ("gated", _put("dtype", "float8"), r"dtype must be one of .*got 'float8'"),
    "source-string": (
        "gated",
        _put("source", "cifar_resnet"),
        r"source must be an object, got 'cifar_resnet'",
    ),
    "source-without-kwargs": (
        "gated",
        _put("source", {"name": "cifar_resnet"}),
        r"source\.kwargs is missing",
    ),
    "unknown-kwarg": (
        "gated",
        _put("source", "kwargs", "foo", 1),
        r"could not build its source model 'cifar_resnet' .*'foo'",
    ),
    "bad-kwarg": (
        "gated",
        _put("source", "kwargs", "blocks", [0, 1, 1]),
        r"could not build .*\(ValueError: blocks must be three counts >= 1",
    ),
    "unknown-model": (
        "gated",
        _put("source", "name", "resnet21"),
        r"could not build its source model 'resnet21' .*unknown model",
    ),
    "huge-model": (
        "gated",
        _put("source", "kwargs", "num_classes", 2**40),
        r"cifar_resnet with kwargs .*\) asks for a model of [\d,]+ parameters and buffers; a "
        r"file may ask for at most 1,073,741,824",
    ),
    "config-extra-key": ("gated", _put("config", "bogus", 1), r"config\.bogus is not a field"),
    "tau-nan": (
        "gated",
        _put("config", "tau", float("nan")),
        r"config\.tau must be a finite number and > 0, got nan",
    ),
    "tau-zero": ("gated", _put("config", "tau", 0), r"config\.tau must be .* > 0, got 0"),
    "hidden-bool": ("gated", _put("config", "hidden", True), r"config\.hidden must be an integer"),
    "hidden-huge": ("gated", _put("config", "hidden", 10**6), r"config\.hidden .* <= 4096"),
    "fc-layers-true": (
        "gated",
        _put("config", "fc_layers", True),
        r"config\.fc_layers must be one of 1, 2, got True",
    ),
    "mode-unknown": ("gated", _put("config", "mode", "width"), r"config\.mode must be one of"),
    "momentum": (
        "gated",
        _put("config", "momentum", 2.0),
        r"config\.momentum must be a finite number and > 0 and <= 1, got 2\.0",
    ),
    "bernoulli-momentum": (
        "gated",
        _put("config", "bernoulli_momentum", 0),
        r"config\.bernoulli_momentum must be a finite number and > 0 and <= 1, got 0",
    ),
    "head-unknown": (
        "gated",
        _put("config", "head", "softmax"),
        r"config\.head must be one of 'ste', 'gumbel', 'bernoulli', got 'softmax'",
    ),
    "position-unknown": (
        "gated",
        _put("config", "position", "inside"),
        r"config\.position must be one of 'middle', 'after', 'before', got 'inside'",
    ),
    "exclude-string": (
        "gated",
        _put("config", "exclude", "layer1.*"),
        r"config\.exclude must be a list",
    ),
    "unknown-fixed-gate": (
        "gated",
        _put("fixed", "layer9.9", True),
        r"fixed names gates the model does not have: \['layer9\.9'\]",
    ),
    "fixed-as-string": (
        "gated",
        _put("fixed", "layer2.0", "False"),
        r"fixed\.layer2\.0 must be true, false or a list of them .*, got 'False'",
    ),
    "fixed-list-for-layer-gate": (
        "gated",
        _put("fixed", "layer2.0", [False]),
        r"fixed\.layer2\.0 must be true or false \(a layer gate\)",
    ),
    "unknown-decision-gate": (
        "slim",
        _put("decisions", "layer9.9/conv1", True),
        r"decisions names gates the model does not have",
    ),
    "missing-decision-gate": (
        "slim",
        lambda s: s["decisions"].pop("layer1.0/conv1"),
        r"decisions lacks gates: \['layer1\.0/conv1'\]",
    ),
    "decision-int": (
        "slim",
        _put("decisions", "layer1.0/conv1", [0] * 16),
        r"decisions\.layer1\.0/conv1\[0\] must be true or false, got 0",
    ),
    "decision-length": (
        "slim",
        _put("decisions", "layer1.0/conv1", [True] * 3),
        r"read decisions\.layer1\.0/conv1 .*takes 16 decisions; got 3",
    ),
    "negative-shape": (
        "slim",
        _put("inputs", 0, "shape", 2, -8),
        r"inputs\[0\]\.shape\[2\] must be an integer >= 1, got -8",
    ),
    "batch-64": (
        "slim",
        _put("inputs", 0, "shape", 0, 64),
        r"inputs\[0\]\.shape\[0\] must be a batch of at most 2, got 64",
    ),
    "huge-sample": (
        "slim",
        _put("inputs", 0, "shape", [1, 3, 10**5, 10**5]),
        r"inputs\[0\]\.shape must be at most 16,777,216 elements per sample",
    ),
    "input-dtype": ("slim", _put("inputs", 0, "dtype", "str"), r"inputs\[0\]\.dtype must be"),
    "no-inputs": ("slim", _put("inputs", []), r"inputs must be a list of 1 to 8 items"),
    "leaf-modules": ("slim", _put("leaf_modules", "layer1"), r"leaf_modules must be a list"),
    "version-negative": (
        "gated",
        _put("version", -5),
        r"version must be an integer >= 1 and <= 1, got -5",
    ),
    "version-bool": ("gated", _put("version", True), r"version must be an integer .* got True"),
    "kind-unknown": (
        "gated",
        _put("kind", "weird"),
        r"kind must be one of 'plain', 'gated', 'slim', got 'weird'",
    ),
    "kind-plain-with-gates": ("gated", _put("kind", "plain"), r"inputs is not a field here"),
    "extra-field": ("gated", _put("comment", "hi"), r"comment is not a field here"),
    "spec-list": ("gated", "[1, 2]", r"a model spec that is not an object: \[1, 2\]"),
    "spec-number": ("gated", "3", r"a model spec that is not an object: 3"),
    "nested": ("gated", "[" * 100_000 + "]" * 100_000, r"JSON nested too deeply"),
    "not-json": ("gated", "{oops", r"corrupt model spec in its header"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_spec_is_a_model_file_error(saved, tmp_path, case):
    kind, edit, message = CASES[case]
    if isinstance(edit, str):
        header = edit
    else:
        spec = _spec(saved[kind])
        edit(spec)
        header = json.dumps(spec)
    path = _write(saved[kind], tmp_path / "bad.safetensors", header)
    with pytest.raises(ModelFileError, match=rf"bad\.safetensors.*{message}"):
        cg.load(path)


@pytest.mark.parametrize("kind", ["gated", "slim"])
def test_the_unedited_files_load(saved, tmp_path, kind):
    # the cases above fail because of their edit, not because of how they are written
    path = _write(saved[kind], tmp_path / "ok.safetensors", json.dumps(_spec(saved[kind])))
    assert cg.load(path).training is False


def test_a_file_from_before_bernoulli_momentum_loads(saved, tmp_path):
    spec = _spec(saved["gated"])
    del spec["config"]["bernoulli_momentum"]
    path = _write(saved["gated"], tmp_path / "old.safetensors", json.dumps(spec))
    assert cg.load(path).spec["config"]["bernoulli_momentum"] == 0.1


def test_rebuild_validates_a_spec_from_anywhere(saved):
    from consensus_gates.saving.files import rebuild

    spec = copy.deepcopy(_spec(saved["gated"]))
    spec["config"]["tau"] = float("inf")
    with pytest.raises(ModelFileError, match=r"the checkpoint has an invalid model spec: "
                       r"config\.tau must be a finite number"):  # fmt: skip
        rebuild(spec, what="the checkpoint")


def test_the_schema_covers_every_gate_config_field():
    from consensus_gates.saving.spec import CONFIG_FIELDS

    assert set(CONFIG_FIELDS) == {f.name for f in fields(GateConfig)}


def test_save_writes_a_batch_of_two_and_refuses_what_load_would(tmp_path):
    gated = cg.insert_gates(_net(), torch.randn(16, 3, 8, 8))
    cg.save(gated, tmp_path / "m.safetensors")
    assert _spec(tmp_path / "m.safetensors")["inputs"][0]["shape"] == [2, 3, 8, 8]
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(gated.eval()(x), cg.load(tmp_path / "m.safetensors")(x))
    big = cg.insert_gates(_net(), X)  # as if traced at 2400x2400, without the memory
    big.meta["consensus_gates"]["inputs"][0]["shape"] = [2, 3, 2400, 2400]
    with pytest.raises(ValueError, match=r"inputs\[0\]\.shape must be at most 16,777,216"):
        cg.save(big, tmp_path / "big.safetensors")
    assert not (tmp_path / "big.safetensors").exists()
