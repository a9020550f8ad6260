"""`cgates bench`: latency, throughput, memory and FLOPs of models, each in its own process."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import click
import torch

from ..bench.compare import compare, load_for_bench, ratios
from ..bench.measure import BenchConfig
from ..hf import saved_input_shape
from ..saving.aot_package import require_compiler
from ..saving.files import load, read_spec, save
from ..saving.onnx_files import check_onnx, example_shapes
from ..saving.pt2 import load_program
from ..slimming import materialize
from .app import USER_ERRORS, main, model_arg_option, parse_model_args, parse_shape
from .slim import load_gated

TOKENS = 128  # the sequence length a Hugging Face folder is timed at, by default


def _batches(text: str) -> list[int]:
    try:
        batches = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise click.BadParameter(f"expected batch sizes such as 1,16,64, got {text!r}",
                                 param_hint="--batch")  # fmt: skip
    return batches


def _expand(models: tuple[str, ...], tmp: Path) -> tuple[dict[str, str], tuple[int, ...] | None]:
    """Label → what a worker loads; a gated checkpoint is timed gated and slim. Also the
    input shape a saved file records (a Hugging Face folder: its image size, or `TOKENS`
    tokens, unless a file beside it records one)."""
    refs, shape, folder_shape = {}, None, None
    for ref in models:
        path = Path(ref)
        if path.suffix == ".pt":  # a trainer checkpoint: the gated model and its slim cut
            gated = load_gated(path).eval()
            shape = shape or saved_input_shape(gated.spec["inputs"])
            for kind, model in (("gated", gated), ("slim", materialize(gated))):
                refs[f"{path.stem} ({kind})"] = str(tmp / f"{len(refs)}-{kind}.safetensors")
                save(model, refs[f"{path.stem} ({kind})"])
        elif path.suffix == ".pt2":
            load_program(path)  # a pickled or corrupt archive is refused here, in one line
            refs[path.name] = ref
        elif path.suffix == ".onnx":
            saved = example_shapes(check_onnx(path))  # refused here if not self-contained ONNX
            shape = shape or (tuple(saved[0][1:]) if saved else None)
            refs[path.name] = ref
        elif path.is_dir() and (path / "config.json").is_file():  # a save_pretrained folder
            model = load_for_bench(path)
            size = model.config.image_size if model.main_input_name == "pixel_values" else None
            folder_shape = (TOKENS,) if size is None else (3, size, size)
            refs[path.name] = ref
        elif path.suffix == ".safetensors" or path.is_file():
            load(path)  # as the workers will, so that a malformed file fails here
            shape = shape or saved_input_shape(read_spec(path).get("inputs"))
            refs[path.name] = ref
        else:
            refs[ref] = ref
    return refs, shape or folder_shape


@main.command("bench")
@click.argument("models", nargs=-1, required=True)
@click.option("--batch", "batch_text", default="1,16,64", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default="float32", show_default=True)  # fmt: skip
@click.option("--threads", type=int, default=None, help="CPU threads [torch's default]")
@click.option("--input-shape", default=None, metavar="C,H,W",
              help="one sample's shape [the saved one, else 3,224,224]")  # fmt: skip
@click.option("--rounds", default=3, show_default=True, help="processes per model and batch")
@click.option("--runs", default=50, show_default=True, help="timed runs per process")
@click.option("--warmup", default=10, show_default=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile each model first")
@click.option("--aot", is_flag=True, help="compile each model with AOTInductor first, in its "
              "timing process: the form `cgates slim --aot` writes")  # fmt: skip
@click.option("--channels-last", is_flag=True)
@click.option("--keep-memory", is_flag=True,
              help="glibc keeps freed memory, as jemalloc and tcmalloc do")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@model_arg_option
def bench_command(models: tuple[str, ...], batch_text: str, device: str, dtype: str,
                  threads: int | None, input_shape: str | None, rounds: int, runs: int,
                  warmup: int, compile_: bool, aot: bool, channels_last: bool, keep_memory: bool,
                  as_json: bool, model_args: tuple[str, ...]) -> None:  # fmt: skip
    """Time MODELS, each in its own process, alternating; the first is the baseline.

    A model is a .safetensors file, a .pt2, an .onnx (run by onnxruntime), a checkpoint.pt
    (timed gated and slim), a save_pretrained folder or a zoo / torchvision name. An
    AOTInductor package (.aoti.pt2) holds native code and is not loaded: give the .pt2 it
    was compiled from with --aot, which compiles it in each timing process.

    \b
    Examples:
      cgates bench resnet56 runs/train/slim/slim.safetensors --batch 1,64
      cgates bench runs/train/checkpoint.pt --batch 64 --json
      cgates bench runs/train/slim/slim.pt2 runs/train/slim/slim.onnx --batch 1,64
      cgates bench runs/train/original.pt2 runs/train/slim/slim.pt2 --aot --batch 64
      cgates bench resnet50 --device cuda --dtype float16 --batch 1,16,64,256
    """
    batches = _batches(batch_text)
    try:
        if aot:
            require_compiler()
        config = BenchConfig(device=device, dtype=dtype, threads=threads, warmup=warmup,
                             runs=runs, compile=compile_, aot=aot, channels_last=channels_last,
                             keep_freed_memory=keep_memory)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            refs, saved_shape = _expand(models, Path(tmp))
            shape = parse_shape(input_shape) if input_shape else saved_shape or (3, 224, 224)
            kwargs = parse_model_args(model_args)
            results = compare(refs, shape, batches, config, rounds=rounds,
                              model_args={k: kwargs for k in refs})  # fmt: skip
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from e
    baseline = next(iter(refs))
    r = ratios(results, baseline)
    report = {
        "config": asdict(config),
        "torch": torch.__version__,
        "input_shape": list(shape),
        "baseline": baseline,
        "results": [m.to_dict() | {"ratio": r[(m.model, m.batch)]} for m in results],
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"input {tuple(shape)}, {results[0].device}, {config.dtype}, "
               f"{results[0].threads} threads, torch {torch.__version__}; median of {rounds} "
               f"processes; ratios against {baseline}"
               f"{'; freed memory kept' if keep_memory else ''}"
               f"{'; compiled by AOTInductor' if aot else ''}")  # fmt: skip
    _print_table(results, r)


def _print_table(results: list, r: dict) -> None:
    samples = {m.sample for m in results}  # several: image and token models together
    rate = (
        "samples/s" if len(samples) > 1 else {"image": "img/s", "sequence": "seq/s"}[samples.pop()]
    )
    click.echo(f"{'model':<32}{'batch':>6}{'ms':>10}{'p90 ms':>10}{rate:>10}{'peak MB':>9}"
               f"{'MFLOPs':>10}{'latency x':>10}{'FLOPs x':>9}")  # fmt: skip
    for m in results:
        q = r[(m.model, m.batch)]
        flops = f"{m.flops / 1e6:.2f}" if m.flops else "-"
        fx = f"{q['flops']:.3f}" if q["flops"] else "-"
        click.echo(f"{m.model[:31]:<32}{m.batch:>6}{m.median_ms:>10.2f}{m.p90_ms:>10.2f}"
                   f"{m.throughput:>10.1f}{m.peak_memory_mb:>9.1f}{flops:>10}"
                   f"{q['latency']:>10.3f}{fx:>9}")  # fmt: skip
