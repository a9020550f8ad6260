"""A file we are handed is never code and never reaches the network.

A `.pt2` can carry code for `torch.export.load` in six places (pickled weights, example
inputs and constants, sympy shape strings, guard code, attribute names); each case below
was seen to run its payload through plain `torch.export.load`. The payload only creates
a marker file, which must never appear. A spec asking for pretrained weights must not
start a download.
"""

from __future__ import annotations

import json
import pickle
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from safetensors.torch import save_file

import consensus_gates as cg
from consensus_gates import ModelFileError
from consensus_gates.bench.compare import load_for_bench
from consensus_gates.cli import main

from conftest import rel_diff

pytestmark = pytest.mark.usefixtures("one_thread", "in_tmp_path")

X = torch.randn(2, 3, 8, 8)
SAFE_NOTE = "files written by consensus_gates.export() or `cgates slim` contain no pickles"


@pytest.fixture()
def in_tmp_path(tmp_path, monkeypatch) -> None:
    """Where a payload that did run would leave its marker."""
    monkeypatch.chdir(tmp_path)


def _slim(mode: str = "layer", position: str = "middle") -> torch.nn.Module:
    gated = cg.insert_gates(
        cg.create_model("cifar_resnet", blocks=[1, 1, 1], num_classes=4),
        X,
        cg.GateConfig(mode=mode, position=position),
    )
    decisions = {
        n: (n != "layer1.0") if isinstance(g, cg.LayerGate) else (False,) + (True,) * (g.units - 1)
        for n, g in gated.gates.items()
    }
    return cg.materialize(gated, decisions).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    slim = _slim()
    path = tmp_path_factory.mktemp("pt2") / "slim.pt2"
    cg.export(slim, X, path)
    return path, slim


def _rewrite(
    src: Path,
    dst: Path,
    edit: Callable[[str, bytes], bytes | None] = lambda rel, data: data,
    add: dict[str, bytes] | None = None,
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """Copy a .pt2 entry by entry, as an attacker would: `edit(relative name, data)`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = edit(info.filename.split("/", 1)[1], zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
        for rel, data in (add or {}).items():
            zout.writestr(f"{root}/{rel}", data)
    return dst


class _Marker:
    """Unpickling it creates the file "marker" in the working directory."""

    def __reduce__(self):
        return (open, ("marker", "w"))


PAYLOAD = pickle.dumps(_Marker())
TOUCH = 'getattr(getattr(__import__("pathlib"), "Path")("marker"), "touch")()'


def _edit_json(entry: str, change: Callable[[dict], None]):
    def edit(rel: str, data: bytes) -> bytes:
        if rel != entry:
            return data
        tree = json.loads(data)
        change(tree)
        return json.dumps(tree).encode()

    return edit


def _pickled_weight(rel: str, data: bytes) -> bytes:
    if rel == "data/weights/weight_0":
        return PAYLOAD
    return _edit_json(
        "data/weights/model_weights_config.json",
        lambda c: c["config"]["conv1.weight"].update(use_pickle=True),
    )(rel, data)


def _pickled_constant(tree: dict) -> None:
    tree["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False,
                              "use_pickle": True, "tensor_meta": None}  # fmt: skip


def _sympy_code(rel: str, data: bytes) -> bytes:
    if rel != "models/model.json":
        return data
    symbol = json.dumps("Symbol('s77', positive=True, integer=True)")
    assert symbol in data.decode()
    return data.decode().replace(symbol, json.dumps(f"{TOUCH} or {symbol[1:-1]}")).encode()


def _name_code(rel: str, data: bytes) -> bytes:
    if rel not in ("models/model.json", "data/weights/model_weights_config.json"):
        return data
    name = 'bn1.x", 0) or ' + TOUCH + ' or getattr(self, "y'  # no "." but the module path's
    return data.decode().replace('"bn1.running_mean"', json.dumps(name)).encode()


ATTACKS = {
    "pickled-weight": (
        {"edit": _pickled_weight},
        r"a pickled tensor \('conv1\.weight' in data/weights/, marked use_pickle\)",
    ),
    "pickled-example-inputs": (
        {"edit": lambda rel, data: PAYLOAD if rel == "data/sample_inputs/model.pt" else data},
        r"example inputs that are not plain tensors",
    ),
    "pickled-constant": (
        {
            "edit": _edit_json("data/constants/model_constants_config.json", _pickled_constant),
            "add": {"data/constants/opaque_obj_0": PAYLOAD},
        },
        r"a pickled Python object",
    ),
    "sympy-string": ({"edit": _sympy_code}, r"a shape expression that sympy would eval"),
    "guard-code": (
        {"edit": _edit_json("models/model.json", lambda p: p.update(guards_code=[TOUCH]))},
        r"guard code torch would execute",
    ),
    "attribute-name": ({"edit": _name_code}, r"a name torch would write into Python source"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_code_in_a_pt2_is_refused_and_never_runs(exported, tmp_path, attack):
    rewrite, message = ATTACKS[attack]
    path = _rewrite(exported[0], tmp_path / "evil.pt2", **rewrite)
    with pytest.raises(ModelFileError, match=rf"refusing to load .*evil\.pt2: it holds {message}"):
        load_for_bench(path)(X)
    assert not (tmp_path / "marker").exists()


def test_refusal_says_why_and_what_is_safe(exported, tmp_path):
    path = _rewrite(exported[0], tmp_path / "evil.pt2", edit=_pickled_weight)
    with pytest.raises(ModelFileError) as info:
        load_for_bench(path)
    assert "unpickling it would run whatever code it names" in str(info.value)
    assert SAFE_NOTE in str(info.value)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("data/aotinductor/model/model.so", r"AOTInductor package, compiled native code.*--aot"),
        ("data/weights/model.pt", r"pickled weights \(the legacy weights file\)"),
        ("data/constants/custom_obj_0", r"a pickled custom object"),
        ("data/other/thing", r"an entry torch\.export\.save does not write \('data/other/"),
    ],
    ids=["aotinductor", "legacy-weights", "custom-object", "unknown"],
)
def test_entries_that_could_run_code_are_refused(exported, tmp_path, entry, message):
    path = _rewrite(exported[0], tmp_path / "evil.pt2", add={entry: b"\x7fELF" + PAYLOAD})
    with pytest.raises(ModelFileError, match=message):
        load_for_bench(path)


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_a_second_copy_of_an_entry_is_refused(exported, tmp_path):
    # the check would read one copy and torch's reader perhaps the other
    with zipfile.ZipFile(exported[0]) as z:
        config = json.loads(z.read(next(n for n in z.namelist() if "weights_config" in n)))
    config["config"]["conv1.weight"]["use_pickle"] = True
    path = _rewrite(
        exported[0],
        tmp_path / "twice.pt2",
        add={"data/weights/model_weights_config.json": json.dumps(config).encode()},
    )
    with pytest.raises(ModelFileError, match=r"model_weights_config\.json' appears twice"):
        load_for_bench(path)


def test_compressed_entries_are_refused(exported, tmp_path):
    path = _rewrite(exported[0], tmp_path / "zipped.pt2", compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(ModelFileError, match=r"is compressed; torch\.export\.save stores"):
        load_for_bench(path)


@pytest.mark.parametrize("content", ["garbage", "truncated", "empty"])
def test_corrupt_pt2_is_a_model_file_error(exported, tmp_path, content):
    data = {"garbage": b"PK\x03\x04" + bytes(range(256)) * 8,
            "truncated": exported[0].read_bytes()[:5000], "empty": b""}[content]  # fmt: skip
    path = tmp_path / "bad.pt2"
    path.write_bytes(data)
    with pytest.raises(ModelFileError, match=r"bad\.pt2 is not a readable \.pt2 archive"):
        load_for_bench(path)


def test_a_zip_of_something_else_is_a_model_file_error(tmp_path):
    path = tmp_path / "other.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ModelFileError, match=r"zip file but not a torch\.export archive"):
        load_for_bench(path)


def test_an_archive_torch_cannot_read_is_a_model_file_error(exported, tmp_path):
    def no_outputs(program: dict) -> None:
        program["graph_module"]["graph"]["outputs"] = "not a list"

    path = _rewrite(exported[0], tmp_path / "odd.pt2",
                    edit=_edit_json("models/model.json", no_outputs))  # fmt: skip
    with pytest.raises(ModelFileError, match=r"odd\.pt2 is not a loadable torch\.export program"):
        load_for_bench(path)


def test_bench_refuses_a_pickled_pt2_in_one_line(exported, tmp_path):
    path = _rewrite(exported[0], tmp_path / "evil.pt2", edit=_pickled_weight)
    result = CliRunner().invoke(
        main, ["bench", str(path), "--rounds", "1", "--runs", "1", "--warmup", "0", "--batch", "1"]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.startswith("Error: refusing to load") and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("mode, position", [("layer", "middle"), ("channel", "after"),
                                            ("channel", "before"), ("both", "middle")])  # fmt: skip
def test_our_export_writes_no_pickles_and_passes_the_check(tmp_path, mode, position):
    from consensus_gates.saving.pt2 import check_archive

    slim = _slim(mode, position)
    path = tmp_path / "slim.pt2"
    cg.export(slim, X, path)
    with zipfile.ZipFile(path) as z:
        names = [n.split("/", 1)[1] for n in z.namelist()]
        configs = [json.loads(z.read(n))["config"] for n in z.namelist()
                   if n.endswith("config.json")]  # fmt: skip
    assert not [n for n in names if "aotinductor" in n or "_obj_" in n]
    assert "data/weights/model.pt" not in names and "data/constants/model.pt" not in names
    payloads = {fqn: meta for config in configs for fqn, meta in config.items()}
    assert payloads and all(meta["use_pickle"] is False for meta in payloads.values())
    if position in ("after", "before"):  # the index buffers of channel surgery are in there
        assert any(fqn.startswith("cg_kept_") for fqn in payloads)
    check_archive(path)
    with torch.no_grad():
        assert rel_diff(slim(X), load_for_bench(path)(X)) <= 1e-6


# --------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------


@pytest.fixture()
def no_network(monkeypatch) -> list[str]:
    """Every way torch and torchvision fetch weights fails the test; returns the calls."""
    calls: list[str] = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called: loading a file must never download")

        return call

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", refuse("weights"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse("hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse("download"))
    monkeypatch.setattr(torch.hub, "urlopen", refuse("torch.hub.urlopen"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse("urlopen"))
    return calls


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weights": "DEFAULT"}, "weights"),
        ({"weights": "ResNet18_Weights.IMAGENET1K_V1"}, "weights"),
        ({"pretrained": True}, "pretrained"),
        ({"num_classes": 10, "weights_backbone": "DEFAULT"}, "weights_backbone"),
    ],
    ids=["weights-default", "weights-enum-name", "pretrained", "weights-backbone"],
)
def test_a_spec_that_asks_for_pretrained_weights_never_downloads(tmp_path, no_network,
                                                                kwargs, field):  # fmt: skip
    header = {"format": "consensus-gates", "version": 1, "kind": "plain", "dtype": "float32",
              "source": {"name": "resnet18", "kwargs": kwargs}}  # fmt: skip
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"consensus_gates": json.dumps(header)})
    with pytest.raises(ModelFileError, match=rf"source\.kwargs\.{field} must be absent: loading "
                       "a file never downloads weights"):  # fmt: skip
        cg.load(path)
    assert no_network == []


def test_save_writes_the_architecture_not_the_pretrained_weights(tmp_path, monkeypatch,
                                                                 no_network):  # fmt: skip
    offline = cg.create_model("squeezenet1_1").state_dict()
    with monkeypatch.context() as m:  # "pretrained" weights, without a download
        m.setattr(torchvision.models._api.WeightsEnum, "get_state_dict",
                  lambda self, *a, **k: offline)  # fmt: skip
        model = cg.create_model("squeezenet1_1", weights="DEFAULT").eval()
    cg.save(model, tmp_path / "m.safetensors")
    spec = cg.saving.read_spec(tmp_path / "m.safetensors")
    assert spec["source"] == {"name": "squeezenet1_1", "kwargs": {"num_classes": 1000}}
    back = cg.load(tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
    assert no_network == []


@pytest.mark.parametrize(
    "source, kwargs",
    [
        ({"name": "vit_h_14", "kwargs": {"weights": "IMAGENET1K_SWAG_E2E_V1"}},
         {"num_classes": 1000, "image_size": 518}),
        ({"name": "maxvit_t", "kwargs": {"weights": "DEFAULT"}},
         {"num_classes": 1000, "input_size": [224, 224]}),
        ({"name": "inception_v3", "kwargs": {"weights": "DEFAULT"}},
         {"num_classes": 1000, "transform_input": True}),
        ({"name": "googlenet", "kwargs": {"weights": "DEFAULT", "transform_input": False}},
         {"num_classes": 1000, "transform_input": False}),
        ({"name": "resnet50", "kwargs": {"pretrained": True}}, {"num_classes": 1000}),
        ({"name": "resnet50", "kwargs": {"weights": None, "num_classes": 7}}, {"num_classes": 7}),
    ],
    ids=["vit-image-size", "maxvit-input-size", "inception-transform", "given-kwarg-kept",
         "legacy-pretrained", "no-weights"],
)  # fmt: skip
def test_architecture_source_keeps_what_the_weights_imply(source, kwargs):
    from consensus_gates.saving.spec import architecture_source

    assert architecture_source(source) == {"name": source["name"], "kwargs": kwargs}


def test_save_refuses_pretrained_weights_it_cannot_resolve(tmp_path):
    @cg.register_model("test_security_pretrained_net")
    def net(pretrained: bool = False) -> torch.nn.Module:
        return cg.create_model("resnet20")

    with pytest.raises(ValueError, match=r"cannot resolve.*load the pretrained state dict"):
        cg.save(cg.create_model("test_security_pretrained_net", pretrained=True), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def exported_llm(tmp_path_factory) -> Path:
    """A cut language model's program: its masks' shapes are powers of the length."""
    from hf_models import inputs, tiny

    gated = cg.insert_gates(tiny("llama"), inputs("llama", batch=1))
    slim = cg.materialize(gated, {n: i != 1 for i, n in enumerate(gated.gates)})
    path = tmp_path_factory.mktemp("llm") / "slim.pt2"
    cg.export(slim, inputs("llama"), path)
    return path


def _power(rel: str, data: bytes, to: str) -> bytes:
    if rel != "models/model.json":
        return data
    text = data.decode()
    start = text.index('"Pow(Symbol(')
    end = text.index('"', start + 1)
    return (text[:start] + json.dumps(to) + text[end + 1 :]).encode()


@pytest.mark.parametrize(
    "power",
    ["Pow(Integer(10), Integer(4000000000000))", "Pow(Symbol('s1'), Integer(99999))",
     "Pow(Pow(Symbol('s1'), Integer(8)), Integer(8))"],  # fmt: skip
    ids=["huge-number", "huge-exponent", "nested"],
)
def test_a_language_model_program_loads_and_only_small_powers_pass(exported_llm, tmp_path, power):
    from hf_models import inputs

    program = load_for_bench(exported_llm)  # token ids in, logits out
    assert program(inputs("llama", 3, 5)["input_ids"]).shape == (3, 5, 100)
    path = _rewrite(exported_llm, tmp_path / "evil.pt2", lambda r, d: _power(r, d, power))
    with pytest.raises(ModelFileError, match="a shape expression that sympy would eval"):
        load_for_bench(path)


@pytest.mark.parametrize(
    "metadata, message",
    [
        (b"{", "unreadable consensus_gates.token_inputs"),
        (b'{"names": ["input_ids", "__import__"], "vocabulary": 100}', "only token ids and"),
        (b'{"names": ["input_ids"], "vocabulary": 1e30}', "only token ids and"),
    ],
    ids=["not-json", "unknown-input", "bad-vocabulary"],
)
def test_a_language_model_programs_input_metadata_is_checked(
    exported_llm, tmp_path, metadata, message
):
    from consensus_gates.saving.pt2 import TOKENS_FILE

    def edit(rel: str, data: bytes) -> bytes:
        return metadata if rel == f"extra/{TOKENS_FILE}" else data

    path = _rewrite(exported_llm, tmp_path / "odd.pt2", edit)
    with pytest.raises(ModelFileError, match=message):
        load_for_bench(path)
