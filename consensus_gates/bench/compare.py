"""Compare models fairly: `compare` times every (model, batch) pair with `measure` in a fresh
Python process, alternating the order of the models from round to round (A B, B A, ...),
and reports the median over rounds; `ratios` divides each result by a baseline's.

Two models timed in one process interfere with each other (allocator, caches, thread pool),
most on small shared machines. The worker each round starts is this module:
``python -m consensus_gates.bench.compare JOB``, JOB a JSON object naming the model (a file
or a name, `load_for_bench`), the input shape, the batch and the `BenchConfig`; it prints
the `Measurement` as one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from torch import nn

from ..cost import flops
from ..errors import BenchmarkFailed
from ..hf.inputs import TokenProgram, token_vocabulary
from .measure import BenchConfig, Measurement, measure, random_batches


def load_for_bench(
    ref: str | os.PathLike,
    model_args: Mapping[str, Any] | None = None,
    config: BenchConfig | None = None,
) -> nn.Module:
    """A model to time: a ``.pt2`` file (torch.export; refused if it holds pickles or code,
    see `consensus_gates.saving.pt2`), an ``.onnx`` file (run by onnxruntime on
    `config`'s device and threads, `OnnxRuntimeModel`), a ``.safetensors`` file written by
    `consensus_gates.save`, a Hugging Face model folder (``save_pretrained``, safetensors
    weights), or a zoo / torchvision name (`create_model`)."""
    path = Path(ref)
    if path.suffix == ".pt2":
        from ..saving.pt2 import load_program, token_metadata

        module = load_program(path).module()
        return TokenProgram.read(module, token_metadata(path), str(path))
    if path.suffix == ".onnx":
        from ..saving.onnx_files import OnnxRuntimeModel, token_metadata

        config = config or BenchConfig()
        module = OnnxRuntimeModel(path, config.device, config.threads)
        return TokenProgram.read(module, token_metadata(module), str(path))
    if path.is_dir() and (path / "config.json").is_file():
        from ..hf.files import load_pretrained_folder

        return load_pretrained_folder(path)
    if path.suffix == ".safetensors" or path.is_file():
        from ..saving.files import load

        return load(path)
    from ..models import create_model

    return create_model(str(ref), **dict(model_args or {}))


def _check_onnx_config(config: BenchConfig) -> None:
    """onnxruntime runs an ``.onnx`` file as exported: float32, no torch.compile, and the
    memory layout it chooses itself."""
    if config.dtype != "float32" or config.compile or config.aot or config.channels_last:
        raise ValueError(
            "an .onnx file is timed as exported, in float32 by onnxruntime: drop --dtype, "
            "--compile, --aot and --channels-last for it, or time the .safetensors or .pt2 "
            "model with them"
        )


def _run_worker(job: dict[str, Any], timeout: float) -> Measurement:
    """Time one model at one batch size in a fresh Python process; BenchmarkFailed if it
    fails or runs past `timeout` seconds."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "consensus_gates.bench.compare", json.dumps(job)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkFailed(f"benchmark of {job['name']} took more than {timeout:g} s "
                              f"(batch {job['batch']}); time fewer runs or a smaller batch"
                              ) from None  # fmt: skip
    if proc.returncode != 0:
        raise BenchmarkFailed(f"benchmark of {job['name']} failed:\n{proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.pop("throughput")
    out["spread_ms"] = tuple(out["spread_ms"]) if out["spread_ms"] else None
    return Measurement(**out)


def compare(
    models: Mapping[str, str | os.PathLike],
    input_shape: Sequence[int],
    batches: Sequence[int] = (1,),
    config: BenchConfig | None = None,
    *,
    rounds: int = 3,
    model_args: Mapping[str, Mapping[str, Any]] | None = None,
    timeout: float = 600,
) -> list[Measurement]:
    """Time each model (label → file or name, see `load_for_bench`) at each batch size, each
    in its own process, `rounds` times in alternating order; report the median over rounds
    (``spread_ms`` holds the lowest and highest). FLOPs and parameters come from fvcore.

    Results are in the order of `batches`, then `models`; compare them with `ratios`.
    """
    config = config or BenchConfig()
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if any(str(ref).endswith(".onnx") for ref in models.values()):
        _check_onnx_config(config)
    names = list(models)
    runs: dict[tuple[str, int], list[Measurement]] = {}
    for r in range(rounds):
        for batch in batches:
            for name in names if r % 2 == 0 else reversed(names):
                job = {
                    "name": name,
                    "ref": str(models[name]),
                    "model_args": dict((model_args or {}).get(name, {})),
                    "input_shape": list(input_shape),
                    "batch": batch,
                    "config": asdict(config),
                    "count_flops": r == 0,
                }
                runs.setdefault((name, batch), []).append(_run_worker(job, timeout))
    results = []
    for batch in batches:
        for name in names:
            ms = runs[(name, batch)]
            medians = [m.median_ms for m in ms]
            results.append(
                replace(
                    ms[0],
                    median_ms=statistics.median(medians),
                    p90_ms=statistics.median(m.p90_ms for m in ms),
                    peak_memory_mb=max(m.peak_memory_mb for m in ms),
                    spread_ms=(min(medians), max(medians)),
                )
            )
    return results


def ratios(results: Sequence[Measurement], baseline: str) -> dict[tuple[str, int], dict]:
    """``model/baseline`` ratios of latency, FLOPs and parameters at each batch size."""
    base = {m.batch: m for m in results if m.model == baseline}
    if not base:
        raise ValueError(f"no results for the baseline {baseline!r}")
    out = {}
    for m in results:
        b = base[m.batch]
        out[(m.model, m.batch)] = {
            "latency": m.median_ms / b.median_ms,
            "flops": m.flops / b.flops if m.flops and b.flops else None,
            "params": m.params / b.params if m.params and b.params else None,
        }
    return out


def _worker_main(job: dict[str, Any]) -> None:
    """One timing in this (fresh) process: load, measure, count FLOPs in the first round."""
    config = BenchConfig(**job["config"])
    model = load_for_bench(job["ref"], job["model_args"], config)
    shape = job["input_shape"]
    m = measure(model, shape, job["batch"], config, name=job["name"])
    if job["count_flops"] and not job["ref"].endswith(".onnx"):  # fvcore traces torch code
        model = model.float().cpu()
        (x,) = random_batches(shape, 1, BenchConfig(buffers=1), token_vocabulary(model))
        cost = flops(model, x)
        m = replace(m, flops=cost.flops, params=cost.params)
    print(json.dumps(m.to_dict()))


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
