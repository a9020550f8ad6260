"""`cgates inspect`: residual blocks, gates, per-block FLOPs and parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch

from ..consensus import consensus
from ..cost import branch_costs, flops
from ..insert import GatedModel, insert_gates
from ..models import CifarResNet, create_model
from ..saving import load, read_spec
from ..surgery import materialize
from .app import main, model_arg_option, parse_model_args, parse_shape


def _build(model_or_file: str, model_args: dict[str, Any], shape: str | None):
    """The gated model to inspect, the decisions to show (None for none) and one input."""
    decisions = None
    if Path(model_or_file).is_file():
        spec = read_spec(model_or_file)
        if spec["kind"] == "slim" and spec.get("source"):  # rebuild the full model: what was cut
            model = create_model(spec["source"]["name"], **spec["source"]["kwargs"])
            decisions = spec["decisions"]
        else:
            model = load(model_or_file)
        if spec["kind"] != "plain" and shape is None:
            shape = ",".join(map(str, spec["inputs"][0]["shape"][1:]))
    else:
        model = create_model(model_or_file, **model_args)
    if shape is None:
        cifar = isinstance(model, CifarResNet)
        shape = f"{model.conv1.in_channels},32,32" if cifar else "3,224,224"
    x = torch.randn(1, *parse_shape(shape))
    if isinstance(model, GatedModel):
        return model, consensus(model).decisions, x
    return insert_gates(model, x.expand(2, *x.shape[1:])), decisions, x


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

    MODEL_OR_FILE is a zoo or torchvision name, or a file written by `save` (a saved slim
    model shows which blocks were kept).

    \b
    Examples:
      cgates inspect resnet56
      cgates inspect resnet50 --input-shape 3,224,224
      cgates inspect resnet20 --model-arg in_channels=1 --input-shape 1,28,28
      cgates inspect runs/quickstart/slim.safetensors
    """
    try:
        gated, decisions, x = _build(model_or_file, parse_model_args(model_args), input_shape)
    except (ValueError, TypeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    costs = branch_costs(gated, x)
    total = flops(materialize(gated, dict.fromkeys(gated.gates, True)), x)
    report = {
        "model": model_or_file,
        "input_shape": list(x.shape[1:]),
        "flops": total.flops,
        "params": total.params,
        "blocks": [
            {"name": n, "flops": c.flops, "params": c.params}
            | ({"open": decisions[n]} if decisions else {})
            for n, c in costs.items()
        ],
        "refused": gated.spec["rejected"],
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_table(report)


def _print_table(r: dict[str, Any]) -> None:
    has_decision = any("open" in b for b in r["blocks"])
    click.echo(
        f"{r['model']}: input {tuple(r['input_shape'])}, {r['flops'] / 1e6:,.2f} MFLOPs, "
        f"{r['params']:,} parameters, {len(r['blocks'])} residual blocks"
    )
    head = f"{'block':<48}{'MFLOPs':>10}{'% FLOPs':>9}{'params':>12}"
    click.echo(head + (f"{'kept':>6}" if has_decision else ""))
    for b in r["blocks"]:
        share = 100 * b["flops"] / r["flops"]
        row = f"{b['name']:<48}{b['flops'] / 1e6:>10.2f}{share:>8.1f}%{b['params']:>12,}"
        click.echo(row + (f"{'yes' if b['open'] else 'no':>6}" if has_decision else ""))
    gated_share = sum(b["flops"] for b in r["blocks"]) / r["flops"]
    click.echo(f"residual branches hold {100 * gated_share:.1f}% of the FLOPs")
    if has_decision:
        kept = sum(b["flops"] for b in r["blocks"] if b["open"]) + r["flops"] * (1 - gated_share)
        n_kept = sum(b["open"] for b in r["blocks"])
        click.echo(
            f"kept: {n_kept}/{len(r['blocks'])} blocks, "
            f"{kept / 1e6:,.2f} MFLOPs ({kept / r['flops']:.3f} of the full model)"
        )
    for refused in r["refused"]:
        click.echo(f"not a block: {refused['node']} in '{refused['module']}': {refused['reason']}")
