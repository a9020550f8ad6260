"""save / load / export / read_spec: pickle-free round trips, atomic writes, clear errors.

Every reload that checks a round trip runs in a fresh Python process, so nothing of the
in-process model (registry state, cached modules, shared tensors) can leak into the check.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import consensus_gates as cg
import consensus_gates.saving.files as saving_files
from consensus_gates import LayerGate, ModelFileError
from consensus_gates.saving.files import read_spec

from conftest import randomize, rel_diff

TESTS_DIR = Path(__file__).resolve().parent
TOL = 1e-6


# --------------------------------------------------------------------------------------
# Models that are not in the zoo
# --------------------------------------------------------------------------------------


class MyNet(nn.Module):
    """A small residual CNN that is not in the registry."""

    def __init__(self, width: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


# Registered at import, so the fresh reload process registers it too (it imports this file).
@cg.register_model("test_saving_tiny_resnet")
def tiny_resnet(width: int = 8, num_classes: int = 4) -> MyNet:
    return MyNet(width, num_classes)


@cg.register_model("test_saving_kwargs_net")
def kwargs_net(device: torch.device | None = None, tag: object = None) -> MyNet:
    return MyNet().to(device)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(code: str, *args: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"fresh process failed:\n{proc.stdout}\n{proc.stderr}"


def _eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _resnet20() -> nn.Module:
    return randomize(cg.create_model("resnet20", num_classes=7))


def _x(batch: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, dtype=dtype)


# The fresh process: load every saved case, run it on its input, report what it rebuilt.
RELOAD = """
import json, sys
from pathlib import Path
import torch
root = Path(sys.argv[1])
sys.path.insert(0, sys.argv[2])
import consensus_gates as cg
import test_saving

report = {}
for name, needs_model in json.loads((root / "cases.json").read_text()).items():
    user_model = test_saving.MyNet() if needs_model else None
    model = cg.load(root / f"{name}.safetensors", model=user_model)
    x = torch.load(root / f"{name}.x.pt", weights_only=True)
    with torch.no_grad():
        torch.save(model(x), root / f"{name}.reloaded.pt")
    gates = [m for m in model.modules() if isinstance(m, cg.LayerGate)]
    report[name] = {
        "graph_module": isinstance(model, torch.fx.GraphModule),
        "gated": isinstance(model, cg.GatedModel),
        "num_gates": len(gates),
        "fixed": {g.name: g.fixed for g in gates},
        "keys": sorted(model.state_dict()),
        "float_dtypes": sorted(
            {str(t.dtype) for t in model.state_dict().values() if t.is_floating_point()}
        ),
        "training": model.training,
    }
(root / "report.json").write_text(json.dumps(report))
"""


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Save a set of models, reload them all in one fresh process (one interpreter start
    keeps the file fast), and return the in-process references with the fresh results."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("reload")
    cases: dict[str, tuple[nn.Module, torch.Tensor, bool]] = {}

    cases["plain"] = (_resnet20(), _x(), False)

    # gated: gate BNs randomized, running open rates moved off their initial 1.0 by training
    # steps, then two gates pinned (one open, one closed) and the others left free
    gated = randomize(cg.insert_gates(_resnet20(), _x()))
    gated.train()
    with torch.no_grad():
        for _ in range(2):
            gated(_x(8))
    names = list(gated.gates)
    cg.fix_decisions(gated, {names[0]: False, names[4]: True})
    for n in names:
        if n not in (names[0], names[4]):
            gated.gates[n].fixed = None
    cases["gated"] = (gated, _x(), False)

    # slim: a mix of open and closed branches, including a closed downsampling block
    decisions = {n: i % 3 != 0 for i, n in enumerate(names)}
    assert 0 < sum(decisions.values()) < len(decisions)
    cases["slim"] = (cg.materialize(gated, decisions), _x(), False)

    double = cg.insert_gates(_resnet20().double(), _x(dtype=torch.float64))
    cases["double"] = (randomize(double), _x(dtype=torch.float64), False)

    cases["mynet"] = (randomize(cg.insert_gates(MyNet(), _x())), _x(), True)

    registered = cg.create_model("test_saving_tiny_resnet", width=6, num_classes=5)
    cases["registered"] = (randomize(cg.insert_gates(randomize(registered), _x())), _x(), False)

    refs = {}
    for name, (model, x, _) in cases.items():
        cg.save(model, root / f"{name}.safetensors")
        torch.save(x, root / f"{name}.x.pt")
        refs[name] = _eval_out(model, x)
    (root / "cases.json").write_text(json.dumps({n: c[2] for n, c in cases.items()}))

    _run(RELOAD, str(root), str(TESTS_DIR), cwd=root)
    report = json.loads((root / "report.json").read_text())
    outs = {n: torch.load(root / f"{n}.reloaded.pt", weights_only=True) for n in cases}
    models = {n: c[0] for n, c in cases.items()}
    return {"root": root, "models": models, "refs": refs, "outs": outs, "report": report}


# --------------------------------------------------------------------------------------
# Round trips (fresh process)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["plain", "gated", "slim", "double", "mynet", "registered"])
def test_round_trip_outputs_match_in_fresh_process(reloaded, case):
    ref, out = reloaded["refs"][case], reloaded["outs"][case]
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype
    assert rel_diff(ref, out) <= TOL
    assert reloaded["report"][case]["training"] is False  # load returns an eval-mode model
    # and the state is the same tensors, not just close outputs
    assert reloaded["report"][case]["keys"] == sorted(reloaded["models"][case].state_dict())


def test_gated_round_trip_keeps_pinned_gates(reloaded):
    gated = reloaded["models"]["gated"]
    report = reloaded["report"]["gated"]
    expected = {n: g.fixed for n, g in gated.gates.items()}
    assert sorted(v for v in expected.values() if v is not None) == [False, True]
    assert report["gated"] and report["num_gates"] == len(gated.gates)
    assert report["fixed"] == expected
    spec = read_spec(reloaded["root"] / "gated.safetensors")
    assert spec["kind"] == "gated"
    assert spec["fixed"] == {n: d for n, d in expected.items() if d is not None}
    assert spec["source"] == {"name": "resnet20", "kwargs": {"num_classes": 7}}


def test_gated_round_trip_keeps_gate_statistics(reloaded):
    # the running open rates moved during training; they are buffers, so they come back
    gated = reloaded["models"]["gated"]
    rates = {n: g.running_open_rate.clone() for n, g in gated.gates.items()}
    assert any(r.item() != 1.0 for r in rates.values())
    back = cg.load(reloaded["root"] / "gated.safetensors")
    for n, g in back.gates.items():
        assert torch.equal(g.running_open_rate, rates[n])
    assert cg.consensus(back).decisions == cg.consensus(gated).decisions


def test_slim_reload_is_a_plain_graph_module(reloaded):
    slim = reloaded["models"]["slim"]
    report = reloaded["report"]["slim"]
    assert isinstance(slim, fx.GraphModule)
    assert not any(isinstance(m, LayerGate) for m in slim.modules())
    assert report["graph_module"]
    assert not report["gated"]
    assert report["num_gates"] == 0
    assert report["keys"] == sorted(slim.state_dict())
    assert not any("gate" in k for k in report["keys"])
    assert read_spec(reloaded["root"] / "slim.safetensors")["kind"] == "slim"


def test_double_round_trips_as_float64(reloaded):
    assert reloaded["report"]["double"]["float_dtypes"] == ["torch.float64"]
    assert reloaded["outs"]["double"].dtype == torch.float64
    assert read_spec(reloaded["root"] / "double.safetensors")["dtype"] == "float64"


def test_plain_double_model_round_trips_as_float64(tmp_path):
    model = _resnet20().double().eval()
    x = _x(dtype=torch.float64)
    cg.save(model, tmp_path / "m.safetensors")
    back = cg.load(tmp_path / "m.safetensors")
    assert {p.dtype for p in back.parameters()} == {torch.float64}
    assert rel_diff(_eval_out(model, x), _eval_out(back, x)) <= TOL


def test_registered_user_model_needs_no_model_argument(reloaded):
    spec = read_spec(reloaded["root"] / "registered.safetensors")
    assert spec["source"] == {
        "name": "test_saving_tiny_resnet",
        "kwargs": {"width": 6, "num_classes": 5},
    }
    assert reloaded["refs"]["registered"].shape == (2, 5)


def test_reloaded_model_can_be_saved_again(tmp_path, reloaded):
    for name in ("plain", "gated", "slim"):
        first = cg.load(reloaded["root"] / f"{name}.safetensors")
        cg.save(first, tmp_path / f"{name}.safetensors")
        second = cg.load(tmp_path / f"{name}.safetensors")
        x = _x()
        assert rel_diff(_eval_out(first, x), _eval_out(second, x)) <= TOL


# --------------------------------------------------------------------------------------
# No pickle
# --------------------------------------------------------------------------------------


def test_load_never_unpickles(monkeypatch, reloaded):
    def refuse(*args, **kwargs):
        raise AssertionError("load() must not unpickle")

    x = _x()
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for name in ("plain", "gated", "slim"):
        back = cg.load(reloaded["root"] / f"{name}.safetensors")
        ref = _eval_out(reloaded["models"][name], x)
        assert rel_diff(ref, _eval_out(back, x)) <= TOL
    with pytest.raises(AssertionError, match="must not unpickle"):  # the patch is live
        torch.load(reloaded["root"] / "plain.x.pt")


def test_file_is_plain_safetensors(reloaded):
    # readable with safetensors alone: tensors + a JSON string in the metadata
    from safetensors import safe_open

    with safe_open(str(reloaded["root"] / "slim.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert json.loads(meta["consensus_gates"])["format"] == "consensus-gates"
    assert keys <= set(reloaded["models"]["slim"].state_dict())


# --------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------


def test_save_leaves_only_the_target_file(tmp_path):
    target = tmp_path / "model.safetensors"
    cg.save(_resnet20(), target)
    assert list(tmp_path.iterdir()) == [target]
    cg.save(_resnet20(), target)  # overwriting leaves nothing behind either
    assert list(tmp_path.iterdir()) == [target]


def test_save_creates_missing_directories(tmp_path):
    target = tmp_path / "a" / "b" / "model.safetensors"
    cg.save(_resnet20(), target)
    assert target.is_file()
    assert list(target.parent.iterdir()) == [target]


def test_failed_save_keeps_the_existing_file(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    model = _resnet20().eval()
    cg.save(model, target)
    before = target.read_bytes()

    def broken_save_model(model, filename, metadata=None):
        Path(filename).write_bytes(b"half-written garbage" * 100)
        raise OSError("disk full while writing")

    monkeypatch.setattr(saving_files, "save_model", broken_save_model)
    with pytest.raises(OSError, match="disk full"):
        cg.save(cg.create_model("resnet20", num_classes=3), target)

    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind
    assert target.read_bytes() == before
    monkeypatch.undo()
    x = _x()
    assert rel_diff(_eval_out(model, x), _eval_out(cg.load(target), x)) <= TOL


def test_failed_first_save_creates_no_file(tmp_path, monkeypatch):
    def broken_save_model(model, filename, metadata=None):
        Path(filename).write_bytes(b"garbage")
        raise OSError("disk full while writing")

    monkeypatch.setattr(saving_files, "save_model", broken_save_model)
    with pytest.raises(OSError, match="disk full"):
        cg.save(_resnet20(), tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.fixture()
def saved_plain(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    cg.save(cg.create_model("resnet20", num_classes=7), path)
    return path


def _spec_file(path: Path, header: str) -> Path:
    save_file({"w": torch.zeros(3)}, str(path), metadata={"consensus_gates": header})
    return path


def test_truncated_file(tmp_path, saved_plain):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(saved_plain.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match=r"not a readable safetensors file.*truncated"):
        cg.load(path)
    with pytest.raises(ModelFileError, match=r"truncated or corrupt"):
        read_spec(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ModelFileError, match=r"garbage\.safetensors is not a readable safetensors"):
        cg.load(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"truncated or corrupt"):
        cg.load(path)


def test_safetensors_file_without_spec(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ModelFileError, match=r"not one written by consensus_gates\.save\(\)"):
        cg.load(path)
    save_file({"weight": torch.zeros(3, 3)}, str(path), metadata={"other": "x"})
    with pytest.raises(ModelFileError, match=r"no model spec"):
        read_spec(path)


def test_spec_version_too_new(tmp_path):
    header = json.dumps(
        {
            "format": "consensus-gates",
            "version": 999,
            "kind": "plain",
            "source": {"name": "resnet20", "kwargs": {}},
            "dtype": "float32",
        }
    )
    path = _spec_file(tmp_path / "future.safetensors", header)
    with pytest.raises(ModelFileError, match=r"spec version 999.*reads up to 1.*upgrade"):
        cg.load(path)


def test_weights_do_not_match_the_model(saved_plain):
    with pytest.raises(ModelFileError, match=r"do not match the rebuilt model.*fc\.weight"):
        cg.load(saved_plain, model=cg.create_model("resnet20", num_classes=3))
    with pytest.raises(ModelFileError, match=r"must be the architecture the file was saved from"):
        cg.load(saved_plain, model=cg.create_model("resnet32", num_classes=7))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        cg.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        read_spec(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    "header",
    ["{not json", "[1, 2]", json.dumps({"format": "consensus-gates", "version": "2"})],
    ids=["invalid-json", "not-an-object", "string-version"],
)
def test_corrupt_spec_header_is_a_model_file_error(tmp_path, header):
    path = _spec_file(tmp_path / "corrupt.safetensors", header)
    with pytest.raises(ModelFileError, match=r"corrupt\.safetensors"):
        cg.load(path)


def test_wrong_format_is_not_reported_as_a_version_problem(tmp_path):
    header = json.dumps({"format": "something-else", "version": 1})
    path = _spec_file(tmp_path / "other.safetensors", header)
    with pytest.raises(ModelFileError) as info:
        cg.load(path)
    assert "upgrade" not in str(info.value)
    assert "format" in str(info.value)


# --------------------------------------------------------------------------------------
# Models outside the registry, kwargs
# --------------------------------------------------------------------------------------


def test_unregistered_model_needs_model_argument(reloaded):
    path = reloaded["root"] / "mynet.safetensors"
    assert read_spec(path)["source"] is None
    with pytest.raises(ModelFileError, match=r"not in the registry.*load\(path, model="):
        cg.load(path)


def test_unregistered_model_with_model_argument_round_trips(reloaded):
    # checked in a fresh process by test_round_trip_outputs_match_in_fresh_process[mynet];
    # here, the same in-process with a differently initialised instance
    back = cg.load(reloaded["root"] / "mynet.safetensors", model=MyNet())
    x = _x()
    assert torch.equal(_eval_out(reloaded["models"]["mynet"], x), _eval_out(back, x))


def test_plain_unregistered_model_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match=r"cannot describe how to rebuild a MyNet.*create_model"):
        cg.save(MyNet(), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"device": torch.device("cpu")}, {"tag": object()}],
    ids=["torch-device", "object"],
)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_non_json_constructor_kwargs(tmp_path, kwargs, gated):
    model = cg.create_model("test_saving_kwargs_net", **kwargs)
    if gated:
        model = cg.insert_gates(model, _x())
    with pytest.raises(ValueError, match=r"not JSON-serializable.*create_model\(\)"):
        cg.save(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------

EXPORT_CHECK = """
import sys
sys.modules["consensus_gates"] = None  # before anything else: consensus_gates cannot load
from pathlib import Path
import torch
try:
    import consensus_gates
except ImportError:
    pass
else:
    raise SystemExit("consensus_gates was importable")
root = Path(sys.argv[1])
program = torch.export.load(str(root / "slim.pt2")).module()
for name in ("x2", "x5"):
    x = torch.load(root / f"{name}.pt", weights_only=True)
    with torch.no_grad():
        torch.save(program(x), root / f"{name}.out.pt")
assert not any(m.startswith("consensus_gates.") for m in sys.modules), "imported anyway"
"""


def test_export_loads_without_consensus_gates_and_has_dynamic_batch(tmp_path, reloaded):
    slim = reloaded["models"]["slim"]
    x2, x5 = _x(2), _x(5)
    path = tmp_path / "slim.pt2"
    program = cg.export(slim, x2, path)
    assert isinstance(program, torch.export.ExportedProgram)
    assert list(tmp_path.iterdir()) == [path]  # atomic: no temp file left
    torch.save(x2, tmp_path / "x2.pt")
    torch.save(x5, tmp_path / "x5.pt")

    _run(EXPORT_CHECK, str(tmp_path), cwd=tmp_path)

    for name, x in (("x2", x2), ("x5", x5)):
        out = torch.load(tmp_path / f"{name}.out.pt", weights_only=True)
        assert out.shape == (x.shape[0], 7)
        assert rel_diff(_eval_out(slim, x), out) <= TOL


def test_export_restores_training_mode(tmp_path, reloaded):
    slim = reloaded["models"]["slim"]
    slim.train()
    try:
        cg.export(slim, _x(), tmp_path / "slim.pt2", dynamic_batch=False)
        assert slim.training
    finally:
        slim.eval()


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "m.safetensors"
    cg.save(cg.create_model("resnet20"), path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
