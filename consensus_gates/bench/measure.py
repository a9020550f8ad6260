"""Time one model in this process: latency (median and 90th percentile), throughput, the peak
memory inference adds and, on NVIDIA GPUs, energy per image; `BenchConfig` says how.

What ran before in a process changes its timings, so comparisons go through `compare`,
which calls `measure` in a fresh process per model and batch. `keep_freed_memory` makes
glibc keep freed memory, as a CPU deployment with jemalloc or tcmalloc would run.
"""

from __future__ import annotations

import ctypes
import re
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import set_training
from ..hf.inputs import token_vocabulary

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc's malloc.h


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in this process instead of returning it to the
    OS; True if it could (Linux with glibc).

    By default every large freed block goes back to the OS, so each forward pass page-faults
    its activation memory in afresh: a cost that grows with activation bytes, not FLOPs, and
    that can be a third of a small CNN's CPU time. jemalloc and tcmalloc keep such memory;
    this does the same for glibc, for the rest of the process. The price: the process holds
    on to its peak memory.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)  # glibc's largest threshold
            and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # never shrink the heap
        )
    except (OSError, AttributeError):  # not glibc
        return False


@dataclass(frozen=True)
class BenchConfig:
    """How to time a model.

    Attributes:
        device: ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        threads: torch intra-op threads on CPU; None keeps torch's default. Printed with
            every result, since it changes CPU timings more than most pruning does.
        warmup: untimed runs first (allocator, caches, cuDNN autotuning, compilation).
        runs: timed runs; their median and 90th percentile are reported.
        buffers: distinct random input batches, cycled, so that a cache-resident input does
            not flatter small models.
        compile: run the model through ``torch.compile`` first.
        aot: compile the model with AOTInductor first, in this process, and time the
            compiled package (what ``cgates slim --aot`` writes); needs a C++ compiler.
        channels_last: convert model and inputs to channels-last memory format.
        keep_freed_memory: call `keep_freed_memory` first, as a CPU deployment with jemalloc
            or tcmalloc would run (for the rest of the process: use it through `compare`).
    """

    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    warmup: int = 10
    runs: int = 50
    buffers: int = 4
    compile: bool = False
    aot: bool = False
    channels_last: bool = False
    keep_freed_memory: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        kind = self.device.split(":")[0]
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU here")
        if self.warmup < 0 or self.runs < 1 or self.buffers < 1:
            raise ValueError("warmup must be >= 0, runs and buffers >= 1")
        if self.compile and self.aot:
            raise ValueError("compile and aot are two ways to compile the model: choose one")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class Measurement:
    """One model at one batch size. Times in milliseconds per batch."""

    model: str
    batch: int
    device: str
    dtype: str
    threads: int
    median_ms: float
    p90_ms: float
    peak_memory_mb: float  # what inference adds: CUDA max_memory_allocated, CPU peak RSS
    energy_mj_per_image: float | None = None  # NVIDIA GPUs with nvidia-ml-py only
    flops: int | None = None  # fvcore, per image
    params: int | None = None
    spread_ms: tuple[float, float] | None = None  # min and max of the per-process medians
    extra: dict[str, Any] = field(default_factory=dict)
    sample: str = "image"  # what a batch row is: "image", or "sequence" of token ids

    @property
    def throughput(self) -> float:
        """Samples (images or sequences) per second."""
        return self.batch / (self.median_ms / 1e3)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "throughput": self.throughput}


def _status_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in MiB."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) / 1024 if match else None


class _PeakRss:
    """Peak resident memory from now on, over the current resident memory now. Linux can
    reset the high-water mark (/proc/self/clear_refs); elsewhere the process's lifetime peak
    (ru_maxrss) stands in, which counts only growth beyond everything before."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _status_mb("VmRSS")
        except OSError:
            self.base = None
        if self.base is None:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB

    def growth(self) -> float:
        peak = _status_mb("VmHWM")
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return max(0.0, peak - self.base)


class _Energy:
    """NVML's total-energy counter (millijoules since driver load), if it can be read."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.read()
        except Exception:  # no nvidia-ml-py, or a GPU without the counter
            self.handle = None

    def __call__(self) -> float | None:
        return self.read() if self.handle is not None else None


class _PeakCuda:
    """Peak CUDA memory allocated from now on, over what is allocated now."""

    def __init__(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        self.device, self.base = device, torch.cuda.memory_allocated(device)

    def growth(self) -> float:
        return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20


def _prepare(model: nn.Module, config: BenchConfig) -> nn.Module:
    """The process set up as `config` asks, and the model on its device and dtype, in eval
    mode, channels-last and compiled if asked."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.keep_freed_memory:
        keep_freed_memory()
    model = model.to(device=torch.device(config.device), dtype=DTYPES[config.dtype])
    set_training(model, False)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if config.compile else model


def _aot_compiled(model: nn.Module, x: Tensor) -> tuple[Callable[[Tensor], Any], float]:
    """`model` compiled by AOTInductor for inputs like `x`, and the seconds it took."""
    from ..saving.aot_package import compiled_module
    from ..saving.files import export_program

    t0 = time.perf_counter()
    compiled = compiled_module(export_program(model, (x,)))
    return compiled, time.perf_counter() - t0


def random_batches(
    input_shape: Sequence[int], batch: int, config: BenchConfig, vocabulary: int | None = None
) -> list[Tensor]:
    """`config.buffers` random batches, the same for every model (seed 0), on the device:
    token ids of that many tokens for a language model (`vocabulary`), else floats."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    if vocabulary is not None:
        shape = (batch, *input_shape)
        return [torch.randint(0, vocabulary, shape, generator=gen).to(config.device)
                for _ in range(config.buffers)]  # fmt: skip
    image = config.channels_last and len(input_shape) == 3
    fmt = torch.channels_last if image else torch.contiguous_format
    return [
        torch.randn(batch, *input_shape, generator=gen)
        .to(device=torch.device(config.device), dtype=DTYPES[config.dtype])
        .contiguous(memory_format=fmt)
        for _ in range(config.buffers)
    ]


def _cpu_ms(model: nn.Module, x: Tensor) -> float:
    t0 = time.perf_counter()
    model(x)
    return (time.perf_counter() - t0) * 1e3


def _cuda_ms(model: nn.Module, x: Tensor) -> float:
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
    begin.record()
    model(x)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


@dataclass(frozen=True)
class _Runs:
    """What the timed runs measured: each one's milliseconds, sorted; the energy they took
    (None where it cannot be read) and the minor page faults they caused."""

    times_ms: list[float]
    energy_mj: float | None
    page_faults: int


def _timed_runs(model: nn.Module, inputs: list[Tensor], config: BenchConfig) -> _Runs:
    """Warm-up runs, then `config.runs` timed ones, cycling over `inputs`."""
    device = torch.device(config.device)
    clock, energy = (_cuda_ms if device.type == "cuda" else _cpu_ms), _Energy(device)
    for i in range(config.warmup):
        model(inputs[i % len(inputs)])
    start_energy, faults = energy(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = [clock(model, inputs[i % len(inputs)]) for i in range(config.runs)]
    end_energy, faults = energy(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    spent = None if start_energy is None or end_energy is None else end_energy - start_energy
    return _Runs(sorted(times), spent, faults)


def measure(
    model: nn.Module,
    input_shape: Sequence[int],
    batch: int,
    config: BenchConfig | None = None,
    *,
    name: str = "model",
) -> Measurement:
    """Time `model` on random batches of shape ``(batch, *input_shape)`` in this process
    (for a Hugging Face language model, token ids: `input_shape` is the sequence length).

    Call it in a fresh process for comparisons (see `compare`): what ran before changes
    the timings. On CPU the peak memory is the peak resident memory during the runs over
    that just before the first one.
    """
    config = config or BenchConfig()
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    vocabulary = token_vocabulary(model)
    model = _prepare(model, config)
    inputs = random_batches(input_shape, batch, config, vocabulary)
    extra = {}
    if config.aot:
        model, extra["aot_compile_s"] = _aot_compiled(model, inputs[0])
    # from before the first forward: what inference itself needs, at this batch
    device = torch.device(config.device)
    peak = _PeakCuda(device) if device.type == "cuda" else _PeakRss()
    with torch.inference_mode():
        runs = _timed_runs(model, inputs, config)
    times = runs.times_ms
    return Measurement(
        model=name,
        batch=batch,
        device=str(device),
        dtype=config.dtype,
        threads=torch.get_num_threads(),
        median_ms=statistics.median(times),
        p90_ms=times[min(len(times) - 1, int(0.9 * len(times)))],
        peak_memory_mb=peak.growth(),
        energy_mj_per_image=(
            None if runs.energy_mj is None else runs.energy_mj / (config.runs * batch)
        ),
        # memory the allocator had returned to the OS and touched again: `keep_freed_memory`
        extra={"page_faults_per_run": runs.page_faults / config.runs, **extra},
        sample="image" if vocabulary is None else "sequence",
    )
