"""`cgates inspect`: residual blocks, gates, per-block FLOPs and parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch

from ..consensus import consensus
from ..cost import branch_costs, flops
from ..errors import ModelFileError
from ..fx.graph_module import Gated, example_inputs_of
from ..fx.insert import insert_gates
from ..hf.gating import GatedTransformer
from ..hf.inputs import per_token_divisor
from ..models import CifarResNet, create_model
from ..saving.files import decisions_of, load, read_spec, rebuild_gated
from ..slimming import materialize
from ..training.checkpoint import model_from_checkpoint
from .app import USER_ERRORS, main, model_arg_option, parse_model_args, parse_shape

Decisions = dict[str, Any]


def _read(path: Path) -> tuple[torch.nn.Module, Decisions | None]:
    """The model in a file we wrote, and the decisions to show: a slim file's, or the
    consensus of a gated model (a gated .safetensors or a trainer checkpoint)."""
    if path.suffix in (".pt2", ".onnx"):
        kind = "a torch.export program" if path.suffix == ".pt2" else "an ONNX graph"
        raise ModelFileError(
            f"{path} is {kind}, which keeps no residual blocks or gates to show; inspect the "
            ".safetensors file written beside it"
        )
    if path.suffix == ".pt":
        model = model_from_checkpoint(path)
    else:
        spec = read_spec(path)
        if spec["kind"] == "slim":  # the gated model it was cut from shows what was cut
            load(path)  # but a file that does not load is refused, as bench refuses it
            gated = rebuild_gated(spec, what=str(path))
            return gated, decisions_of(spec, gated, str(path))
        model = load(path)
    return model, (consensus(model).decisions if isinstance(model, Gated) else None)


def _build(
    model_or_file: str, model_args: dict[str, Any], shape: str | None
) -> tuple[Gated, Decisions | None, Any]:
    """The gated model to inspect, the decisions to show (None for none) and its inputs."""
    path = Path(model_or_file)
    if path.is_file() or path.suffix in (".pt", ".pt2", ".onnx", ".safetensors"):
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        model, decisions = _read(path)
    else:
        model, decisions = create_model(model_or_file, **model_args), None
    if isinstance(model, GatedTransformer):
        if shape is not None:
            raise ValueError("--input-shape is for image models; a transformer file keeps its own")
        x = example_inputs_of(model)
    elif shape is not None:
        x = (torch.randn(1, *parse_shape(shape)),)
    elif isinstance(model, Gated):
        x = example_inputs_of(model)
    else:
        cifar = isinstance(model, CifarResNet)
        x = (torch.randn(1, *((model.conv1.in_channels, 32, 32) if cifar else (3, 224, 224))),)
    if isinstance(model, Gated):
        return model, decisions, x
    return insert_gates(model, tuple(t.expand(2, *t.shape[1:]) for t in x)), decisions, x


@main.command()
@click.argument("model_or_file")
@model_arg_option
@click.option(
    "--input-shape",
    default=None,
    metavar="C,H,W",
    help="one sample's shape (default: the saved shape, 3,32,32 for CIFAR ResNets, else 3,224,224)",
)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def inspect(
    model_or_file: str, model_args: tuple[str, ...], input_shape: str | None, as_json: bool
) -> None:
    """Show the residual blocks of a model: gates, per-block FLOPs and parameters.

    MODEL_OR_FILE is a zoo or torchvision name, a file written by `save` (plain, gated or
    slim; a slim model shows what was kept) or a trainer checkpoint.pt (its consensus).

    \b
    Examples:
      cgates inspect resnet56
      cgates inspect resnet50 --input-shape 3,224,224
      cgates inspect resnet20 --model-arg in_channels=1 --input-shape 1,28,28
      cgates inspect runs/quickstart/slim.safetensors
      cgates inspect runs/train/checkpoint.pt
    """
    try:
        gated, decisions, x = _build(model_or_file, parse_model_args(model_args), input_shape)
        report = _report(model_or_file, gated, decisions, x)
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_table(report)


def _report(name: str, gated: Gated, decisions: Decisions | None, x: Any) -> dict[str, Any]:
    # `flops` counts a text model per token of input_ids, branch_costs the whole input
    tokens = per_token_divisor(gated, x)
    costs = branch_costs(gated, x)
    total = flops(materialize(gated, dict.fromkeys(gated.gates, True)), x)
    ungated = flops(materialize(gated, dict.fromkeys(gated.gates, False)), x)
    report = {
        "model": name,
        "input_shape": input_shapes(x),
        "flops": total.flops,
        "params": total.params,
        "flops_per": "token" if isinstance(x, dict) and "input_ids" in x else "sample",
        "gated_flops": total.flops - ungated.flops,  # what closing every gate would remove
        "blocks": [
            {"name": n, "flops": round(c.flops / tokens), "params": c.params}
            | ({"open": decisions[n]} if decisions else {})
            for n, c in costs.items()
        ],
        "refused": gated.spec["rejected"],
    }
    if decisions:
        kept = flops(materialize(gated, decisions), x)
        report["kept"] = {"flops": kept.flops, "params": kept.params}
    return report


def input_shapes(x: Any) -> Any:
    """One sample's input shape; for a transformer, each input's."""
    if isinstance(x, dict):
        return {k: list(v.shape[1:]) for k, v in x.items()}
    return list(x[0].shape[1:])


def _kept(decision: bool | tuple[bool, ...]) -> str:
    if isinstance(decision, bool):
        return "yes" if decision else "no"
    return f"{sum(decision)}/{len(decision)}"


def _print_table(r: dict[str, Any]) -> None:
    blocks = r["blocks"]
    n_blocks = len({b["name"].split("/")[0] for b in blocks})
    gates = f", {len(blocks)} gates" if len(blocks) != n_blocks else ""
    shape = r["input_shape"]
    shown = tuple(shape)
    if isinstance(shape, dict):
        shown = ", ".join(f"{k} {tuple(v)}" for k, v in shape.items())
    per = " per token" if r["flops_per"] == "token" else ""
    click.echo(
        f"{r['model']}: input {shown}, {r['flops'] / 1e6:,.2f} MFLOPs{per}, "
        f"{r['params']:,} parameters, {n_blocks} residual blocks{gates}"
    )
    head = f"{'gate':<48}{'MFLOPs':>10}{'% FLOPs':>9}{'params':>12}"
    click.echo(head + ("    kept" if "kept" in r else ""))
    for b in blocks:
        share = 100 * b["flops"] / r["flops"]
        row = f"{b['name']:<48}{b['flops'] / 1e6:>10.2f}{share:>8.1f}%{b['params']:>12,}"
        click.echo(row + (f"{_kept(b['open']):>8}" if "open" in b else ""))
    click.echo(
        f"residual branches hold {100 * r['gated_flops'] / r['flops']:.1f}% of the FLOPs{per}"
    )
    if "kept" in r:
        layer = [b["open"] for b in blocks if isinstance(b["open"], bool)]
        channel = [b["open"] for b in blocks if not isinstance(b["open"], bool)]
        parts = [f"{sum(layer)}/{len(layer)} blocks"] if layer else []
        if channel:
            parts.append(f"{sum(map(sum, channel))}/{sum(map(len, channel))} channels")
        kept = r["kept"]
        click.echo(
            f"kept: {', '.join(parts)}, {kept['flops'] / 1e6:,.2f} MFLOPs{per} "
            f"({kept['flops'] / r['flops']:.3f} of the full model), {kept['params']:,} parameters"
        )
    for refused in r["refused"]:
        click.echo(f"not a block: {refused['node']} in '{refused['module']}': {refused['reason']}")
