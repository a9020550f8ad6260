"""`cgates inspect` on every file the project writes, in every gate mode, and `inspect`,
`slim` and `bench` on malformed files: one line, a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import consensus_gates as cg
from consensus_gates.cli import main
from consensus_gates.training.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 8, 8)
MODES = [("layer", "middle"), ("channel", "middle"), ("channel", "after"),
         ("channel", "before"), ("both", "middle")]  # fmt: skip


def _net():
    return cg.create_model("cifar_resnet", blocks=[2, 1, 1], num_classes=5)


def _gated(mode: str, position: str) -> cg.GatedModel:
    model = _net()
    return cg.insert_gates(model, X, cg.GateConfig(mode=mode, position=position))


def _pattern(gated: cg.GatedModel) -> dict:
    """Decisions with every kind of gate partly closed, no channel gate fully: two layer
    gates closed (one a downsampling block), and the first quarter of every channel gate."""
    out = {}
    for name, gate in gated.gates.items():
        if isinstance(gate, cg.LayerGate):
            out[name] = name not in ("layer1.1", "layer3.0")
        else:
            out[name] = tuple(i >= gate.units // 4 for i in range(gate.units))
    return out


def _set_rates(gated: cg.GatedModel, decisions: dict) -> None:
    """Running open rates whose consensus is `decisions` (as training would leave them)."""
    for name, d in decisions.items():
        gated.gates[name].running_open_rate.copy_(torch.tensor(d, dtype=torch.float) * 0.9)


def _inspect(path: Path | str, *args: str) -> str:
    result = CliRunner().invoke(main, ["inspect", str(path), *args])
    assert result.exit_code == 0, result.output
    return result.output


def _kept_line(gated: cg.GatedModel, decisions: dict) -> str:
    x1 = X[:1]
    slim = cg.flops(cg.materialize(gated, decisions), x1)
    full = cg.flops(_net(), x1)
    return f"{slim.flops / 1e6:,.2f} MFLOPs ({slim.flops / full.flops:.3f} of the full model)"


def _expected_rows(gated: cg.GatedModel, decisions: dict) -> dict[str, str]:
    rows = {}
    for name, d in decisions.items():
        rows[name] = ("yes" if d else "no") if isinstance(d, bool) else f"{sum(d)}/{len(d)}"
    return rows


def _check_table(out: str, gated: cg.GatedModel, decisions: dict) -> None:
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    for name, kept in _expected_rows(gated, decisions).items():
        assert lines[name][-1] == kept, (name, lines[name])
    layer = [d for d in decisions.values() if isinstance(d, bool)]
    channel = [d for d in decisions.values() if not isinstance(d, bool)]
    parts = [f"{sum(layer)}/{len(layer)} blocks"] if layer else []
    if channel:
        parts.append(f"{sum(map(sum, channel))}/{sum(map(len, channel))} channels")
    assert f"kept: {', '.join(parts)}, {_kept_line(gated, decisions)}" in out
    assert "4 residual blocks" in out.splitlines()[0]
    assert "input (3, 8, 8)" in out.splitlines()[0]


@pytest.mark.parametrize("mode, position", MODES, ids=[f"{m}-{p}" for m, p in MODES])
def test_inspect_slim_file_shows_what_was_kept(tmp_path, mode, position):
    gated = _gated(mode, position)
    decisions = _pattern(gated)
    cg.save(cg.materialize(gated, decisions), tmp_path / "slim.safetensors")
    _check_table(_inspect(tmp_path / "slim.safetensors"), gated, decisions)


@pytest.mark.parametrize("mode, position", MODES, ids=[f"{m}-{p}" for m, p in MODES])
def test_inspect_gated_file_shows_its_consensus(tmp_path, mode, position):
    gated = _gated(mode, position)
    decisions = _pattern(gated)
    _set_rates(gated, decisions)
    cg.save(gated, tmp_path / "gated.safetensors")
    _check_table(_inspect(tmp_path / "gated.safetensors"), gated, decisions)


def test_inspect_a_trainer_checkpoint(tmp_path):
    gated = _gated("channel", "middle")
    decisions = _pattern(gated)
    _set_rates(gated, decisions)
    save_checkpoint(tmp_path / "checkpoint.pt", gated, epoch=3)
    _check_table(_inspect(tmp_path / "checkpoint.pt"), gated, decisions)


def test_inspect_plain_file_and_plain_checkpoint(tmp_path):
    model = _net()
    cg.save(model, tmp_path / "plain.safetensors")
    save_checkpoint(tmp_path / "plain.pt", model, epoch=1)
    args = ["--input-shape", "3,8,8", "--json"]
    reference = json.loads(_inspect("cifar_resnet", "--model-arg", "blocks=[2,1,1]",
                                    "--model-arg", "num_classes=5", *args))  # fmt: skip
    assert [b["name"] for b in reference["blocks"]] == ["layer1.0", "layer1.1", "layer2.0",
                                                        "layer3.0"]  # fmt: skip
    for name in ("plain.safetensors", "plain.pt"):
        report = json.loads(_inspect(tmp_path / name, *args))
        assert report["blocks"] == reference["blocks"]
        assert report["flops"] == cg.flops(model, X[:1]).flops
        assert "kept" not in report


def test_inspect_json_of_a_channel_slim_file(tmp_path):
    gated = _gated("channel", "middle")
    decisions = _pattern(gated)
    slim = cg.materialize(gated, decisions)
    cg.save(slim, tmp_path / "slim.safetensors")
    report = json.loads(_inspect(tmp_path / "slim.safetensors", "--json"))
    blocks = {b["name"]: b for b in report["blocks"]}
    assert blocks["layer1.0/conv1"]["open"] == [False] * 4 + [True] * 12
    cost = cg.flops(slim, X[:1])
    assert report["kept"] == {"flops": cost.flops, "params": cost.params}


def test_inspect_refuses_a_pt2_in_one_line(tmp_path):
    path = tmp_path / "slim.pt2"
    path.write_bytes(b"not read")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "a torch.export program" in result.output
    assert "inspect the .safetensors file" in result.output


# --------------------------------------------------------------------------------------
# Malformed files: one line, never a traceback
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gated_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gated") / "gated.safetensors"
    cg.save(_gated("layer", "middle"), path)
    return path


def _with_spec(src: Path, dst: Path, edit) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        spec = json.loads(f.metadata()["consensus_gates"])
    header = edit(spec)
    save_file(load_file(str(src)), str(dst), metadata={"consensus_gates": header})
    return dst


def _set(key, value):
    def edit(spec):
        spec[key] = value
        return json.dumps(spec)

    return edit


def _set_config(key, value):
    def edit(spec):
        spec["config"][key] = value
        return json.dumps(spec)

    return edit


MALFORMED = {
    "truncated": (None, r"not a readable safetensors file"),
    "nested": (lambda spec: "[" * 100_000 + "]" * 100_000, r"nested too deeply"),
    "source-string": (_set("source", "resnet20"), r"source must be an object, got 'resnet20'"),
    "tau-nan": (_set_config("tau", float("nan")), r"config\.tau must be a finite number"),
    "weights": (
        _set("source", {"name": "resnet20", "kwargs": {"weights": "DEFAULT"}}),
        r"source\.kwargs\.weights must be absent: loading a file never downloads",
    ),
    "negative-shape": (
        _set("inputs", [{"shape": [2, 3, -8, 8], "dtype": "float32"}]),
        r"inputs\[0\]\.shape\[2\] must be an integer >= 1, got -8",
    ),
    "no-inputs": (
        lambda spec: json.dumps({k: v for k, v in spec.items() if k != "inputs"}),
        r"inputs is missing",
    ),  # fmt: skip
}


@pytest.fixture(params=list(MALFORMED), ids=list(MALFORMED))
def malformed(request, tmp_path, gated_file) -> tuple[Path, str]:
    edit, message = MALFORMED[request.param]
    path = tmp_path / "bad.safetensors"
    if edit is None:
        path.write_bytes(gated_file.read_bytes()[:300])
    else:
        _with_spec(gated_file, path, edit)
    return path, message


def _one_line_error(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no uncaught error
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("command", ["inspect", "slim", "bench"])
def test_malformed_file_is_one_line(malformed, command, tmp_path):
    path, message = malformed
    extra = {
        "inspect": [],
        "slim": ["-o", str(tmp_path / "out")],
        "bench": ["--rounds", "1", "--runs", "1", "--warmup", "0", "--batch", "1"],
    }
    _one_line_error([command, str(path), *extra[command]], message)


def test_malformed_checkpoint_spec_is_one_line(tmp_path, gated_file):
    gated = cg.load(gated_file)
    save_checkpoint(tmp_path / "checkpoint.pt", gated, epoch=1)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    spec = json.loads(payload["spec"])
    spec["config"]["hidden"] = 100_000
    payload["spec"] = json.dumps(spec)
    torch.save(payload, tmp_path / "checkpoint.pt")
    for command in (["inspect"], ["slim", "-o", str(tmp_path / "out")]):
        _one_line_error(
            [*command, str(tmp_path / "checkpoint.pt")],
            r"config\.hidden must be an integer >= 1 and <= 4096, got 100000",
        )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_inspect_a_transformer_counts_branches_per_token_as_the_total(tmp_path, arch):
    """`flops` of a Hugging Face model is per token of input_ids: the branches' shares are
    of that same count, so none exceeds the whole and together they make the gated part."""
    from hf_models import inputs, tiny

    gated = cg.insert_gates(tiny(arch), inputs(arch, length=32))
    cg.save(gated, tmp_path / "gated.safetensors")
    report = json.loads(_inspect(tmp_path / "gated.safetensors", "--json"))
    assert report["flops_per"] == "token"
    blocks = report["blocks"]
    assert all(0 < b["flops"] <= report["gated_flops"] < report["flops"] for b in blocks)
    total = sum(b["flops"] for b in blocks)
    assert abs(total - report["gated_flops"]) <= len(blocks)  # each rounded to an integer
    table = _inspect(tmp_path / "gated.safetensors")
    shares = [float(s) for s in re.findall(r"([\d.]+)%\s+[\d,]+\s+yes", table)]
    assert len(shares) == len(blocks) and max(shares) <= 100
    held = float(re.search(r"residual branches hold ([\d.]+)% of the FLOPs per token", table)[1])
    assert sum(shares) == pytest.approx(held, abs=0.1 * len(shares))
    assert "MFLOPs per token" in table.splitlines()[0]
