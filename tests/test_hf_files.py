"""Hugging Face files are data: a tampered slim or gated `.safetensors` spec, or a tampered
`save_pretrained` folder, is one ModelFileError that names what is wrong. Loading opens no
socket, asks transformers for nothing outside torch, and allocates nothing the file's own
tensors do not bound."""

from __future__ import annotations

import copy
import functools
import json
import shutil
import socket

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

import consensus_gates as cg
from consensus_gates.cli import main
from consensus_gates.hf.files import load_pretrained_folder
from consensus_gates.saving.bounds import MAX_MODULES

from hf_models import inputs, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = "model.layers.0"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A slim and a gated Llama file (spec and tensors) and a save_pretrained folder."""
    root = tmp_path_factory.mktemp("hf_files")
    torch.manual_seed(0)
    gated = cg.insert_gates(tiny("llama"), inputs("llama"))
    decisions = {n: i % 2 == 0 for i, n in enumerate(gated.gates)}
    out = {"root": root}
    for kind, model in (("gated", gated), ("slim", cg.materialize(gated, decisions))):
        path = root / f"{kind}.safetensors"
        cg.save(model, path)
        with safe_open(str(path), framework="pt") as f:
            spec = json.loads(f.metadata()["consensus_gates"])
            out[kind] = (path, spec, {k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    tiny("llama").save_pretrained(root / "folder")
    out["folder"] = root / "folder"
    return out


def _tampered(files, tmp_path, kind: str, change) -> str:
    _, spec, tensors = files[kind]
    bad = copy.deepcopy(spec)
    change(bad)
    path = tmp_path / f"bad-{kind}.safetensors"
    save_file(tensors, str(path), metadata={"consensus_gates": json.dumps(bad)})
    return str(path)


def _folder(files, tmp_path, change) -> str:
    folder = tmp_path / "folder"
    shutil.copytree(files["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    config = change(config) or config
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture()
def no_socket(monkeypatch) -> list[str]:
    """Name resolution and connections fail, as with the network unplugged; returns the
    attempts."""
    attempts: list[str] = []

    def refuse(name):
        def call(*args, **kwargs):
            attempts.append(f"{name}{args[:2]}")
            raise OSError(f"test: {name} called while loading a file")

        return call

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    return attempts


def _nodes(spec, layer=LAYER):
    return spec["layers"][layer]["graph"]["nodes"]


def _first(spec, op, target=None):
    return next(n for n in _nodes(spec) if n["op"] == op and target in (None, n["target"]))


# --------------------------------------------------------------------------------------
# The config: nothing outside torch, and no socket
# --------------------------------------------------------------------------------------

CONFIG_KEYS = {  # key, value -> what the refusal says
    "hub-kernel": ("attn_implementation", "kernels-community/flash-attn2", "eager, sdpa"),
    "flash-attention": ("attn_implementation", "flash_attention_2", "eager, sdpa"),
    "private-attn": ("_attn_implementation", "kernels-community/flash-attn2", "eager, sdpa"),
    "internal-attn": ("_attn_implementation_internal", "flash_attention_2", "past its check"),
    "experts-kernel": ("experts_implementation", "kernels-community/moe", "batched_mm"),
    "auto-map": ("auto_map", {"AutoModel": "evil--modeling.Model"}, "remote code"),
    "remote-code": ("trust_remote_code", True, "remote code"),
    "quantization": ("quantization_config", {"quant_method": "bitsandbytes"}, "quantization"),
    "pretrained-backbone": ("use_pretrained_backbone", True, "never downloads"),
}


@pytest.mark.parametrize("case", list(CONFIG_KEYS))
def test_config_keys_that_reach_outside_torch_are_refused(files, tmp_path, no_socket, case):
    key, value, message = CONFIG_KEYS[case]
    path = _tampered(files, tmp_path, "slim", lambda s: s["transformers"]["config"].update(
        {key: value}))  # fmt: skip
    with pytest.raises(cg.ModelFileError, match=rf"{key}.*{message}"):
        cg.load(path)
    folder = _folder(files, tmp_path, lambda c: c.update({key: value}))
    with pytest.raises(cg.ModelFileError, match=rf"config.json: {key}.*{message}"):
        load_pretrained_folder(folder)
    assert no_socket == []


def test_a_key_in_a_sub_config_is_refused_too(files, tmp_path):
    def nested(spec):
        spec["transformers"]["config"]["rope_parameters"]["attn_implementation"] = {
            "": "sdpa", "text_config": "kernels-community/flash-attn2"}  # fmt: skip

    with pytest.raises(cg.ModelFileError, match=r"rope_parameters\.attn_implementation"):
        cg.load(_tampered(files, tmp_path, "slim", nested))


def test_the_allowed_implementations_load(files, tmp_path, no_socket):
    for value in ("eager", "sdpa"):
        path = _tampered(files, tmp_path, "slim", lambda s, v=value: s["transformers"][
            "config"].update(attn_implementation=v))  # fmt: skip
        assert cg.load(path).config._attn_implementation == value
    assert no_socket == []


def test_loading_opens_no_socket(files, no_socket):
    """A slim file, a gated file and a folder for bench load with the network unplugged."""
    x = inputs("llama")
    for kind in ("slim", "gated"):
        with torch.no_grad():
            cg.load(files[kind][0])(**x)
    folder = load_pretrained_folder(files["folder"])
    with torch.no_grad():
        torch.testing.assert_close(folder(**x).logits, tiny("llama")(**x).logits)
    assert no_socket == []


def test_the_cli_refuses_a_hostile_folder_in_one_line(files, tmp_path, no_socket):
    folder = _folder(files, tmp_path, lambda c: c.update(attn_implementation="flash_attention_2"))
    result = CliRunner().invoke(main, ["bench", folder, "--batch", "1", "--rounds", "1"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "attn_implementation" in result.output and "Traceback" not in result.output
    assert no_socket == []


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: [1, 2], "is not a JSON object"),
        (lambda c: "text", "is not a JSON object"),
        (lambda c: c.update(architectures=["os"]), "'os', which is not a model class"),
        (lambda c: c.update(architectures={"a": 1}), "which is not a model class"),
        (lambda c: c.update(hidden_size=4096), "weights hold"),
        (lambda c: c.update(num_hidden_layers=10_000), f"more than {MAX_MODULES:,} modules"),
    ],
    ids=["list", "string", "class", "class-not-list", "larger-than-weights", "modules"],
)
def test_a_malformed_folder_is_one_error(files, tmp_path, change, message):
    with pytest.raises(cg.ModelFileError, match=message):
        load_pretrained_folder(_folder(files, tmp_path, change))


def test_a_folder_without_json_or_weights_is_one_error(files, tmp_path):
    folder = _folder(files, tmp_path, lambda c: None)
    (tmp_path / "folder" / "model.safetensors").unlink()
    with pytest.raises(cg.ModelFileError, match="holds no .safetensors weights"):
        load_pretrained_folder(folder)
    (tmp_path / "folder" / "config.json").write_text("{not json")
    with pytest.raises(cg.ModelFileError, match="config.json is not a readable JSON file"):
        load_pretrained_folder(folder)


# --------------------------------------------------------------------------------------
# A malformed spec: one ModelFileError, from the library and the CLI
# --------------------------------------------------------------------------------------


def _deep(levels: int):
    return functools.reduce(lambda v, _: [v], range(levels), 1)


def _set_attr(name):
    return lambda s: s["layers"][LAYER]["attributes"].update({name: 1})


MALFORMED = {  # kind, change -> what the refusal says
    "get-attr-missing": ("slim", lambda s: _first(s, "call_method").update(
        op="get_attr", target="nothing_here", args=[]), "not a module or tensor of the layer"),
    "method-no-args": ("slim", lambda s: _first(s, "call_method").update(args=[]),
                       "has no tensor to call it on"),
    "add-one-arg": ("slim", lambda s: _first(s, "call_function", "operator.add").update(
        args=[1]), "operator.add cannot take these arguments"),
    "duplicate-placeholder": ("slim", lambda s: _nodes(s)[1].update(
        target=_nodes(s)[0]["target"]), "is a duplicate"),
    "self-placeholder": ("slim", lambda s: _nodes(s)[0].update(target="self"), "is self"),
    "default-first": ("slim", lambda s: _nodes(s)[0].update(args=[1]),
                      "without a default follows one with a default"),
    "attribute-graph": ("slim", _set_attr("graph"), "not plain attributes"),
    "attribute-dict": ("slim", _set_attr("__dict__"), "not plain attributes"),
    "attribute-class": ("slim", _set_attr("__class__"), "not plain attributes"),
    "empty-layer-path": ("slim", lambda s: s["layers"].update({"": s["layers"].pop(LAYER)}),
                         r"unknown: \[''\]"),
    "unknown-removed": ("slim", lambda s: s["removed_layers"].append("model.nope.3"),
                        "unknown: .'model.nope.3'"),
    "removed-twice": ("slim", lambda s: s["removed_layers"].extend(["model.layers.1"] * 2),
                      "each once"),
    "unknown-fixed": ("gated", lambda s: s.update(fixed={"nope": True}),
                      "fixed names gates the model does not have"),
    "nested-400": ("slim", lambda s: _first(s, "call_method")["args"].append(_deep(400)),
                   "nest more than 16 deep"),
    "recorded-layers": ("slim", lambda s: s["transformers"].update(layers=["", "model"]),
                        "records the layers"),
    "call-inputs": ("slim", lambda s: s["layers"][LAYER]["call"].update(inputs=["x"]),
                    "are not the graph's"),
    "call-names": ("slim", lambda s: s["layers"][LAYER]["call"].update(names=["x", "x"]),
                   "the recorded call does not fit"),
    "class-name": ("slim", lambda s: s["layers"][LAYER].update({"class": "a b"}),
                   "is not an identifier"),
    "config-not-object": ("slim", lambda s: s["transformers"].update(config=[1]),
                          "is not a JSON object"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_spec_is_one_model_file_error(files, tmp_path, case):
    kind, change, message = MALFORMED[case]
    path = _tampered(files, tmp_path, kind, change)
    with pytest.raises(cg.ModelFileError, match=message):
        cg.load(path)
    for command in ("inspect", "bench"):
        result = CliRunner().invoke(main, [command, path, "--batch", "1", "--rounds", "1"]
                                    if command == "bench" else [command, path])  # fmt: skip
        assert result.exit_code == 1, (command, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, (
            command, result.output)  # fmt: skip


# --------------------------------------------------------------------------------------
# Bounded: nothing is allocated past what the file holds
# --------------------------------------------------------------------------------------


class _LargeAllocations(TorchDispatchMode):
    """Records every tensor of more than `limit` elements made on a real device."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() > self.limit:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def _huge_gate(spec):
    gate = next(iter(spec["layers"][LAYER]["gates"].values()))
    gate["channels"] = 2**20


def _huge_constant(spec):
    spec["layers"][LAYER]["constants"]["_tensor_constant0"] = {"shape": [2**20, 2**8],
                                                              "dtype": "float32"}  # fmt: skip
    nodes = _nodes(spec)
    nodes.insert(len(nodes) - 1, {"name": "c0", "op": "get_attr", "target": "_tensor_constant0",
                                  "args": [], "kwargs": {}})  # fmt: skip


@pytest.mark.parametrize(
    "kind, change",
    [("gated", _huge_gate), ("slim", _huge_constant)],
    ids=["gate-of-2^20-channels", "constant-of-2^28-elements"],
)
def test_declared_shapes_must_match_the_files_tensors_before_allocation(files, tmp_path, kind,
                                                                       change):  # fmt: skip
    path = _tampered(files, tmp_path, kind, change)
    with _LargeAllocations(2**20) as spy, pytest.raises(
        cg.ModelFileError, match="do not match the model its spec describes"
    ):
        cg.load(path)
    assert spy.seen == []


def test_a_spec_of_too_many_modules_is_refused_before_it_is_built(files, tmp_path):
    def many(spec):
        spec["transformers"]["config"].update(num_hidden_layers=50_000, hidden_size=8,
                                              intermediate_size=8)  # fmt: skip

    with pytest.raises(cg.ModelFileError, match=f"more than {MAX_MODULES:,} modules"):
        cg.load(_tampered(files, tmp_path, "slim", many))


def test_inspect_counts_a_long_saved_example_at_a_bounded_length(files, tmp_path):
    """A file may record an example of 2^16 tokens; inspect traces and counts at 512 tokens (the
    time to count attention grows with the square of the length)."""

    def longer(spec):
        for name in ("input_ids", "attention_mask"):
            spec["inputs"][name]["shape"] = [1, 2**16]

    path = _tampered(files, tmp_path, "slim", longer)
    result = CliRunner().invoke(main, ["inspect", path, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["input_shape"]["input_ids"] == [512]
