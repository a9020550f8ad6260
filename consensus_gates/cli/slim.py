"""`cgates slim`: cut the consensus sub-network out of a trained gated model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from ..consensus import consensus, fix_decisions, kept_fraction, unfix_decisions
from ..cost import flops
from ..errors import ModelFileError
from ..fx.graph_module import Gated, cut_decisions, example_inputs_of
from ..hf import main_output, repeat_rows, to_transformers
from ..hf.export import save_folder
from ..hf.gating import GatedTransformer
from ..saving.aot_package import AOT_SUFFIX, require_compiler
from ..saving.files import export, load, model_spec, read_spec, rebuild_gated, save
from ..saving.onnx_files import require_onnx
from ..slimming import materialize
from ..training.checkpoint import model_from_checkpoint
from ..training.runs import check_folder
from .app import USER_ERRORS, main, overwrite_files_option, refuse_existing_files
from .inspect import input_shapes


def load_gated(path: str | Path) -> Gated:
    """A trained gated model from a trainer checkpoint (.pt) or a gated .safetensors file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if read_spec(path)["kind"] != "gated":
            raise ModelFileError(f"{path} holds no gates; give a checkpoint of a gated model")
        return load(path)
    model = model_from_checkpoint(path)
    if not isinstance(model, Gated):
        raise ModelFileError(
            f"{path} is the checkpoint of a plain {type(model).__name__}, trained without "
            "gates: there is no consensus to cut out"
        )
    return model


def slim_report(gated: Gated, threshold: float = 0.5) -> tuple[nn.Module, dict[str, Any]]:
    """Materialize the consensus; measure both sides and check that the outputs agree."""
    gated = gated.eval()
    c = consensus(gated, threshold)
    fix_decisions(gated, c)
    slim = materialize(gated, c).eval()
    x = example_inputs_of(gated)
    before, after = flops(_original(gated), x), flops(slim, x)
    batch = repeat_rows(x, 4)
    with torch.no_grad():
        ref, out = main_output(gated, batch), main_output(slim, batch)
    report = {
        "input_shape": input_shapes(x),
        "flops": [before.flops, after.flops],
        "params": [before.params, after.params],
        "gates": len(c.decisions),
        "gates_fully_open": sum(kept_fraction(d) == 1 for d in c.decisions.values()),
        "open_ratio": c.open_ratio,
        "max_rel_diff": float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-12)),
        "decisions": c.decisions,
    }
    unfix_decisions(gated)
    return slim, report


def _original(gated: Gated) -> nn.Module:
    """The network `gated` was made from, with every gate open and gone: rebuilt from its
    spec when gates were cut out of it while training (its weights do not matter here)."""
    if cut_decisions(gated):
        spec = model_spec(gated)
        if spec["source"] or "transformers" in spec:  # (a transformer: traced from its config)
            gated = rebuild_gated(spec)
    return materialize(gated, dict.fromkeys(gated.gates, True))


def _unit(r: dict[str, Any]) -> str:
    shape = r["input_shape"]
    return "token" if isinstance(shape, dict) and "input_ids" in shape else "sample"


def print_report(r: dict[str, Any]) -> None:
    click.echo(f"{'':<24}{'original':>14}{'slim':>14}{'slim/original':>15}")
    for label, (a, b), scale in (
        (f"MFLOPs per {_unit(r)}", r["flops"], 1e6),
        ("parameters (M)", r["params"], 1e6),
    ):
        click.echo(f"{label:<24}{a / scale:>14,.3f}{b / scale:>14,.3f}{b / a:>15.3f}")
    click.echo(
        f"{'gates fully open':<24}{r['gates']:>14}{r['gates_fully_open']:>14}"
        f"{r['gates_fully_open'] / r['gates']:>15.3f}"
    )
    click.echo(
        f"open ratio {r['open_ratio']:.3f}; slim vs gated with the consensus fixed: "
        f"max relative difference {r['max_rel_diff']:.2e}"
    )


@main.command("slim")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", default=None, help="output folder [CHECKPOINT's/slim]")
@click.option("--threshold", default=0.5, show_default=True, help="open iff running rate >= it")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--onnx", "onnx_", is_flag=True,
              help="also write OUT/slim.onnx, for onnxruntime (the onnx extra)")  # fmt: skip
@click.option("--aot", is_flag=True, help="also write OUT/slim.aoti.pt2, compiled by "
              "AOTInductor for this machine (needs a C++ compiler; tens of seconds)")  # fmt: skip
@click.option("--hf-folder", is_flag=True, help="also write OUT/hf, a save_pretrained "
              "folder that plain transformers loads (cuts of whole layers)")  # fmt: skip
@overwrite_files_option("the slim files in OUT")
def slim_command(checkpoint: str, out_dir: str | None, threshold: float, as_json: bool,
                 onnx_: bool, aot: bool, hf_folder: bool, overwrite: bool) -> None:  # fmt: skip
    """Cut the consensus sub-network out of a trained gated model.

    CHECKPOINT is the trainer's checkpoint.pt (or a gated model saved with `save`). Writes
    OUT/slim.safetensors (load with consensus_gates.load) and OUT/slim.pt2 (torch.export,
    loads with plain torch), with --onnx also OUT/slim.onnx and with --aot the AOTInductor
    package OUT/slim.aoti.pt2, then prints parameters, FLOPs and gates kept, before and after.
    For a Hugging Face model, --hf-folder also writes OUT/hf, which
    ``AutoModel...from_pretrained`` loads without consensus_gates, where the cut removed
    whole layers only. Files already in OUT are kept unless --overwrite.

    \b
    Examples:
      cgates slim runs/train/checkpoint.pt
      cgates slim runs/train/checkpoint.pt -o runs/slim --json
      cgates slim runs/train/checkpoint.pt --onnx --aot
      cgates slim runs/llm/checkpoint.pt --hf-folder --onnx
    """
    try:
        if onnx_:  # before anything is written
            require_onnx()
        if aot:
            require_compiler()
        out = check_folder(out_dir or Path(checkpoint).parent / "slim")
        files = [out / "slim.safetensors", out / "slim.pt2"]
        files += [out / "slim.onnx"] * onnx_ + [out / f"slim{AOT_SUFFIX}"] * aot
        folder = [out / "hf"] * hf_folder
        refuse_existing_files(files + folder, overwrite, "-o")  # before loading and cutting
        gated = load_gated(checkpoint)
        transformer = isinstance(gated, GatedTransformer)
        if transformer and aot:
            raise ValueError("--aot is for image models; for a Hugging Face model, deploy "
                             "slim.pt2 or --onnx")  # fmt: skip
        if hf_folder and not transformer:
            raise ValueError("--hf-folder is for Hugging Face models; this one is a "
                             f"{type(gated).__name__}")  # fmt: skip
        slim, report = slim_report(gated, threshold)
        plain = to_transformers(slim) if hf_folder else None  # refused before writing
        save(slim, files[0])
        x = repeat_rows(example_inputs_of(gated), 2)
        for path in files[1:]:
            export(slim, x, path)  # batch 2: torch.export specializes a batch of 1
        if plain is not None:
            save_folder(plain, folder[0])
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from e
    report["files"] = [str(f) for f in files + folder]
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_report(report)
        click.echo(f"wrote {', '.join(report['files'])}")
