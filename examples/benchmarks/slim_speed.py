"""Is the slim model really faster? P1–P4 of docs/benchmarks.md, measured.

    python examples/benchmarks/slim_speed.py                  # CPU: writes docs/benchmarks.md
    python examples/benchmarks/slim_speed.py --device cuda    # the GPU sections of the same doc
    python examples/benchmarks/slim_speed.py --quick --out /tmp/b.md   # small models (CI)

P1  latency ratio slim/original against the FLOPs ratio: CIFAR ResNet-56 (batch 64, 32x32)
    and torchvision ResNet-50 (batch 16, 224x224), 25/50/75% of the blocks closed (layer
    surgery) and half of the internal channels closed (channel surgery).
P1F P1's ratios in every form a user can deploy (ResNet-56 and ResNet-50): the module
    `load` returns (glibc's default malloc and freed memory kept), .pt2 (both), .onnx under
    onnxruntime and the AOTInductor-compiled program.
P2  the slim model against the same network written by hand (`cifar_resnet(blocks=...)`), in
    the same forms.
P2M P2's target for the module `load` returns, with more processes and the page faults.
P3  one training step of the gated network against the ungated one (ResNet-56, batch 128),
    with a profiler table of where the extra time goes.
P4  wall time of `insert_gates` and `materialize` on ResNet-50.

Every model is timed in its own process, in alternating order, median over rounds
(`consensus_gates.bench.compare`); ratios come from one run of this script. The script
rewrites only its own sections of the doc (between `<!-- begin KEY -->` and
`<!-- end KEY -->` markers), so the prose around them stays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import consensus_gates as cg
from consensus_gates.bench.compare import compare, ratios
from consensus_gates.bench.measure import BenchConfig, keep_freed_memory
from consensus_gates.bench.reports import write_sections
from consensus_gates.losses import gate_losses

ROOT = Path(__file__).resolve().parents[2]
COMMAND = "python examples/benchmarks/slim_speed.py"


@dataclass(frozen=True)
class Arch:
    """One model of P1: its name, input shape, batch and how hard to time it."""

    name: str
    shape: tuple[int, int, int]
    batch: int
    config: BenchConfig
    rounds: int


def setup(quick: bool, device: str, threads: int) -> dict[str, Any]:
    """Models, sizes and timing effort of each part; --quick keeps every code path, smaller."""

    def timing(warmup: int, runs: int) -> BenchConfig:
        return BenchConfig(device=device, threads=threads, warmup=warmup, runs=runs)

    if quick:
        small = Arch("resnet20", (3, 32, 32), 8, timing(1, 3), 1)
        return {
            "p1": [small],
            "levels": (0.5,),
            "p2": small,
            "p2_levels": (0.5,),
            # AOTInductor compiles for minutes (tests/test_aot.py has it), freed memory kept
            # has tests/test_bench.py's own test and .onnx tests/test_onnx.py's: each form
            # is an export and a process per model
            "forms": (FORMS[0], FORMS[2]),
            "p2m_rounds": 1,
            "p1f": [(small, (0.5,))],
            "p3": {"name": "resnet20", "batch": 16, "warmup": 1, "steps": 2, "rounds": 1},
            "p4": ("resnet18", (3, 64, 64)),
        }
    cifar = Arch("resnet56", (3, 32, 32), 64, timing(10, 40), 4)
    return {
        "p1": [cifar, Arch("resnet50", (3, 224, 224), 16, timing(3, 10), 3)],
        "levels": (0.25, 0.5, 0.75),
        "p2": Arch("resnet56", (3, 32, 32), 64, timing(10, 40), 3),
        "p2_levels": (0.25, 0.75),
        "forms": deployable_forms(device),
        "p2m_rounds": 8,
        "p1f": [
            (replace(cifar, rounds=3), (0.25, 0.5, 0.75)),
            (Arch("resnet50", (3, 224, 224), 16, timing(3, 10), 3), (0.25, 0.5, 0.75)),
        ],
        "p3": {"name": "resnet56", "batch": 128, "warmup": 3, "steps": 10, "rounds": 3},
        "p4": ("resnet50", (3, 224, 224)),
    }


# ---------------------------------------------------------------------------------------- P1, P2


def closed_blocks(gate_names: list[str], fraction: float) -> dict[str, bool]:
    """Open/closed per layer gate with round(fraction × blocks) closed, spread over the stages
    in proportion to their size (largest remainder), the last blocks of a stage first. The
    first block of every stage stays, so the result is a plain ResNet with fewer blocks."""
    stages: dict[str, list[str]] = {}
    for n in gate_names:
        stages.setdefault(n.rsplit(".", 1)[0], []).append(n)
    total = round(fraction * len(gate_names))
    share = {s: fraction * len(b) for s, b in stages.items()}
    count = {s: min(int(share[s]), len(b) - 1) for s, b in stages.items()}
    for s in sorted(stages, key=lambda s: share[s] - int(share[s]), reverse=True):
        if sum(count.values()) < total and count[s] < len(stages[s]) - 1:
            count[s] += 1
    return {n: i < len(b) - count[s] for s, b in stages.items() for i, n in enumerate(b)}


def half_units(gated: cg.GatedModel) -> dict[str, tuple[bool, ...]]:
    """Every other unit of every channel gate closed."""
    return {n: tuple(i % 2 == 0 for i in range(g.units)) for n, g in gated.gates.items()}


def variants(arch: Arch, levels: tuple[float, ...]) -> dict[str, tuple[nn.Module, Any]]:
    """label → (model, decisions or None): the original, layer surgery at each level and
    channel surgery with every other internal channel (unit) closed."""
    torch.manual_seed(0)
    model = cg.create_model(arch.name).eval()
    x = torch.randn(2, *arch.shape)
    out: dict[str, tuple[nn.Module, Any]] = {"original": (model, None)}
    gated = cg.insert_gates(model, x)
    for level in levels:
        keep = closed_blocks(list(gated.gates), level)
        out[f"{level:.0%} blocks closed"] = (cg.materialize(gated, keep).eval(), keep)
    gated = cg.insert_gates(model, x, cg.GateConfig(mode="channel"))
    half = half_units(gated)
    out["50% channels closed"] = (cg.materialize(gated, half).eval(), half)
    return out


def both(files: Mapping[str, Any], arch: Arch, **kwargs: Any) -> tuple[list, list]:
    """`compare` with glibc's default malloc, then with freed memory kept in the process."""
    kept = replace(arch.config, keep_freed_memory=True)
    return tuple(
        compare(files, arch.shape, [arch.batch], config, rounds=arch.rounds, **kwargs)
        for config in (arch.config, kept)
    )


def p1(arch: Arch, levels: tuple[float, ...], tmp: Path) -> str:
    x = torch.randn(2, *arch.shape)
    files = {}
    for label, (model, _) in variants(arch, levels).items():
        files[label] = tmp / f"{arch.name}-{len(files)}.pt2"
        cg.export(model, x, files[label])
    default, kept = both(files, arch)
    r, rk = ratios(default, "original"), ratios(kept, "original")
    energy = all(m.energy_mj_per_image is not None for m in kept)  # NVIDIA GPUs only
    rows = []
    for m, k in zip(default, kept, strict=True):
        q, qk = r[(m.model, m.batch)], rk[(k.model, k.batch)]
        rows.append([
            m.model, f"{q['flops']:.3f}", f"{q['params']:.3f}",
            f"{m.median_ms:.1f}", f"{q['latency']:.3f}", f"{q['latency'] / q['flops']:.2f}",
            f"{m.extra['page_faults_per_run']:.0f}",
            f"{k.median_ms:.1f}", f"{qk['latency']:.3f}", f"{qk['latency'] / qk['flops']:.2f}",
            f"{k.throughput:.0f}", f"{k.peak_memory_mb:.0f}",
        ])  # fmt: skip
        if energy:
            rows[-1].append(f"{k.energy_mj_per_image:.2f}")
    title = (
        f"**{arch.name}**, batch {arch.batch}, input {'x'.join(map(str, arch.shape))}, "
        f"median of {arch.rounds} processes per model × {arch.config.runs} runs; left: glibc's "
        "default malloc, right: freed memory kept (`keep_freed_memory`)"
    )
    head = ["model", "FLOPs ratio", "params ratio", "ms", "latency ratio", "latency ÷ FLOPs",
            "page faults / run", "ms, kept", "latency ratio, kept", "latency ÷ FLOPs, kept",
            "images/s, kept", "peak MB"] + ["mJ/image"] * energy  # fmt: skip
    return f"{title}\n\n{table(head, rows)}"


# Every form a user can deploy: (column, file kind, timing changes). The module is what
# `consensus_gates.load` returns (an fx GraphModule for a slim model, the eager network for a
# plain one); AOTInductor compiles the .pt2 in each timing process.
FORMS = (
    ("module", "module", {}),
    ("module, kept", "module", {"keep_freed_memory": True}),
    (".pt2", ".pt2", {}),
    (".pt2, kept", ".pt2", {"keep_freed_memory": True}),
    (".onnx", ".onnx", {}),
    ("AOTInductor", ".pt2", {"aot": True}),
)


def deployable_forms(device: str) -> tuple:
    """FORMS, without .onnx on a GPU where onnxruntime has no CUDA execution provider."""
    if device == "cpu":
        return FORMS
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return FORMS
    print("onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu): the "
          ".onnx form is left out", file=sys.stderr)  # fmt: skip
    return tuple(f for f in FORMS if f[1] != ".onnx")


def write_forms(models: Mapping[str, nn.Module], x: torch.Tensor, tmp: Path,
                forms: tuple) -> dict:  # fmt: skip
    """Each model saved, and exported to the file kinds `forms` time: kind → label → file."""
    kinds = {kind for _, kind, _ in forms}
    files: dict[str, dict[str, Path]] = {kind: {} for kind in kinds}
    for i, (label, model) in enumerate(models.items()):
        for kind in kinds:
            if kind == "module":
                files[kind][label] = tmp / f"m{i}.safetensors"
                cg.save(model, files[kind][label])
            else:
                files[kind][label] = tmp / f"m{i}{kind}"
                cg.export(model, x, files[kind][label])
    return files


def time_forms(files: dict, arch: Arch, forms: tuple) -> dict[str, dict[str, Any]]:
    """column → label → Measurement, each form timed by its own `compare` (alternating)."""
    return {
        column: {m.model: m for m in compare(
            files[kind], arch.shape, [arch.batch], replace(arch.config, **changes),
            rounds=arch.rounds)}
        for column, kind, changes in forms
    }  # fmt: skip


def p1_forms(arch: Arch, levels: tuple[float, ...], forms: tuple, tmp: Path) -> str:
    """P1's latency ratios, slim/original, in every deployable form."""
    shape = "x".join(map(str, arch.shape))
    models = {label: model for label, (model, _) in variants(arch, levels).items()}
    files = write_forms(models, torch.randn(2, *arch.shape), tmp, forms)
    timed = time_forms(files, arch, forms)
    flops = {k: m.flops / timed[".pt2"]["original"].flops for k, m in timed[".pt2"].items()}
    rows = []
    for label in models:
        cells = [timed[c][label].median_ms / timed[c]["original"].median_ms for c, *_ in forms]
        rows.append([label, f"{flops[label]:.3f}", *(f"{q:.3f}" for q in cells)])
    rows.append(["original, ms", "", *(f"{timed[c]['original'].median_ms:.1f}" for c, *_ in forms)])
    return (
        f"**{arch.name}**, batch {arch.batch}, input {shape}, latency ratio slim/original in "
        f"each form; median of {arch.rounds} processes per model and form × {arch.config.runs} "
        'runs; "kept": freed memory kept (`keep_freed_memory`)\n\n'
        + table(["model", "FLOPs ratio", *(c for c, *_ in forms)], rows)
    )


def timed_twins(arch: Arch, levels: tuple[float, ...], forms: tuple, tmp: Path) -> Iterator:
    """For each layer cut: its label, blocks per stage, and `time_forms` of the slim model
    against `cifar_resnet(blocks=...)` holding the same weights."""
    for label, (slim, keep) in variants(arch, levels).items():
        if keep is None or "blocks" not in label:
            continue
        counts = [sum(v for n, v in keep.items() if n.startswith(f"layer{s}.")) for s in (1, 2, 3)]
        hand = cg.create_model("cifar_resnet", blocks=counts).eval()
        hand.load_state_dict(slim.state_dict())  # same names, same shapes: the same network
        files = write_forms({"slim": slim, "hand": hand}, torch.randn(2, *arch.shape), tmp,
                            forms)  # fmt: skip
        yield label, counts, time_forms(files, arch, forms)


def p2(arch: Arch, levels: tuple[float, ...], forms: tuple, tmp: Path) -> str:
    """The slim model against the hand-written network with the same weights, in every
    deployable form: the module as `consensus_gates.load` returns it (the slim model an fx
    module, the hand-written one eager), exported, under onnxruntime and AOTInductor."""
    rows = []
    for label, counts, timed in timed_twins(arch, levels, forms, tmp):
        assert timed[".pt2"]["slim"].params == timed[".pt2"]["hand"].params
        cells = [f"{timed[c]['slim'].median_ms / timed[c]['hand'].median_ms:.3f} "
                 f"({timed[c]['hand'].median_ms:.1f})" for c, *_ in forms]  # fmt: skip
        rows.append([label, "/".join(map(str, counts)), *cells])
    return (
        f"**{arch.name}** cut, against `cifar_resnet(blocks=...)` with the same weights; batch "
        f"{arch.batch}; slim/hand in each form, the hand-built network's ms in brackets; median "
        f'of {arch.rounds} processes per model and form × {arch.config.runs} runs; "kept": '
        "freed memory kept (`keep_freed_memory`)\n\n"
        + table(["slim model", "blocks per stage", *(c for c, *_ in forms)], rows)
    )


def p2_module(arch: Arch, levels: tuple[float, ...], rounds: int, tmp: Path) -> str:
    """P2's target for the module `load` returns, with more processes: slim (an fx module)
    against hand-built (eager), glibc's default malloc and freed memory kept, page faults."""
    arch = replace(arch, rounds=rounds)
    rows = []
    for label, counts, timed in timed_twins(arch, levels, FORMS[:2], tmp):
        row = [label, "/".join(map(str, counts))]
        for column in ("module", "module, kept"):
            ms = {k: m.median_ms for k, m in timed[column].items()}
            spread = {k: m.spread_ms for k, m in timed[column].items()}
            faults = {k: m.extra["page_faults_per_run"] for k, m in timed[column].items()}
            row += [f"{ms['hand']:.1f} ({spread['hand'][0]:.0f}–{spread['hand'][1]:.0f})",
                    f"{ms['slim']:.1f} ({spread['slim'][0]:.0f}–{spread['slim'][1]:.0f})",
                    f"{ms['slim'] / ms['hand']:.3f}",
                    f"{faults['hand']:.0f} / {faults['slim']:.0f}"]  # fmt: skip
        rows.append(row)
    head = ["slim model", "blocks per stage", "hand ms", "slim ms", "slim/hand",
            "page faults hand / slim", "hand ms, kept", "slim ms, kept", "slim/hand, kept",
            "page faults, kept"]  # fmt: skip
    return (
        f"**{arch.name}** cut, batch {arch.batch}: the slim model as `consensus_gates.load` "
        "returns it (an fx module) against `cifar_resnet(blocks=...)` (eager) with the same "
        f"weights; median of {rounds} processes per model × {arch.config.runs} runs, the "
        "lowest and highest process in brackets; page faults per forward\n\n" + table(head, rows)
    )


# -------------------------------------------------------------------------------------------- P3


def p3_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Time training steps of one model (plain or gated) in this process, then profile two."""
    torch.set_num_threads(job["threads"])
    if job["keep"]:
        keep_freed_memory()
    torch.manual_seed(0)
    device = torch.device(job["device"])
    model = cg.create_model(job["name"])
    gated = job["gates"] is not None
    if gated:
        model = cg.insert_gates(model, torch.randn(2, 3, 32, 32), cg.GateConfig(mode=job["gates"]))
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=5e-4)
    batches = [
        (torch.randn(job["batch"], 3, 32, 32, device=device),
         torch.randint(0, 10, (job["batch"],), device=device))
        for _ in range(2)
    ]  # fmt: skip

    def step(i: int) -> None:  # what the trainer does per step
        x, y = batches[i % 2]
        loss = F.cross_entropy(model(x), y)
        if gated:
            polar, act, _ = gate_losses(model, weight="flops")
            loss = loss + 2.0 * polar + 0.5 * act
        loss.item()  # the trainer's one device sync per step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(job["warmup"]):
        step(i)
    times = []
    for i in range(job["steps"]):
        t0 = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - t0) * 1e3)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(2):
            step(i)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = {e.key: getattr(e, attr) / 2e3 for e in prof.key_averages()}  # ms per step
    return {"median_ms": statistics.median(times), "ops": ops}


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"worker {job['task']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def p3(spec: dict[str, Any], device: str, threads: int) -> str:
    kinds = {"ungated": None, "layer gates": "layer", "channel gates": "channel"}
    runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for r in range(spec["rounds"]):
        for keep in (False, True):
            for label in list(kinds) if r % 2 == 0 else list(kinds)[::-1]:
                job = {**spec, "task": "p3", "gates": kinds[label], "device": device,
                       "threads": threads, "keep": keep}  # fmt: skip
                runs.setdefault((label, keep), []).append(run_worker(job))
    ms = {key: statistics.median(v["median_ms"] for v in done) for key, done in runs.items()}
    rows = [
        [k] + [f"{ms[k, keep]:.1f}" if i == 0 else f"{ms[k, keep] / ms['ungated', keep] - 1:+.1%}"
               for keep in (False, True) for i in (0, 1)]
        for k in kinds
    ]  # fmt: skip
    out = (
        f"**{spec['name']}**, batch {spec['batch']}, one SGD step (forward, loss, backward, "
        f"update; gated: plus R_polar and FLOPs-weighted R_act), median of {spec['rounds']} "
        f'processes × {spec["steps"]} steps; "kept": freed memory kept '
        "(`keep_freed_memory`)\n\n"
        + table(["model", "step ms", "overhead", "step ms, kept", "overhead, kept"], rows)
    )
    # where the extra time goes: per-op time of the gated step minus the ungated one
    for label in ("layer gates", "channel gates"):
        plain, gated = runs["ungated", True][0]["ops"], runs[label, True][0]["ops"]
        delta = {op: gated.get(op, 0.0) - plain.get(op, 0.0) for op in set(plain) | set(gated)}
        top = sorted(delta, key=lambda op: -abs(delta[op]))[:8]
        rows = [[f"`{op}`", f"{plain.get(op, 0):.1f}", f"{gated.get(op, 0):.1f}",
                 f"{delta[op]:+.1f}"] for op in top]  # fmt: skip
        out += (
            f"\n\nProfiler, {label}, freed memory kept: the ops whose self time changed most "
            "(ms per step, one process, two profiled steps)\n\n"
            + table(["op", "ungated", label, "change"], rows)
        )
    return out


# -------------------------------------------------------------------------------------------- P4


def p4_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Wall time of each call: the first (imports, caches cold) and the median of three more."""
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    model = cg.create_model(job["name"]).to(device).eval()
    x = torch.randn(1, *job["shape"], device=device)
    out: dict[str, list[float]] = {}

    def timed(label: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        result = fn(*args)
        out.setdefault(label, []).append(time.perf_counter() - t0)
        return result

    for _ in range(4):
        for mode in ("layer", "channel"):
            gated = timed(f"insert_gates, {mode}", cg.insert_gates, model, x, cg.GateConfig(mode))
            keep = closed_blocks(list(gated.gates), 0.5) if mode == "layer" else half_units(gated)
            timed(f"materialize, {mode}", cg.materialize, gated, keep)
    return out


def p4(name: str, shape: tuple[int, int, int], device: str, threads: int) -> str:
    seconds = run_worker({"task": "p4", "name": name, "shape": shape, "device": device,
                          "threads": threads})  # fmt: skip
    rows = [[f"`{k}`", f"{v[0]:.2f}", f"{statistics.median(v[1:]):.2f}"]
            for k, v in seconds.items()]  # fmt: skip
    return (
        f"**{name}**, example input 1x{'x'.join(map(str, shape))}; `materialize` with half the "
        "blocks (layer) or half the internal channels (channel) closed. Seconds; one fresh "
        "process, the first call includes lazy imports\n\n"
        + table(["call", "first call s", "median of next 3 s"], rows)
    )


# ---------------------------------------------------------------------------------------- output


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def machine(device: str, threads: int) -> str:
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else (
        f"{platform.machine()} CPU, {os.cpu_count()} cores visible"
    )  # fmt: skip
    return (
        f"{where}; {threads} threads; torch {torch.__version__}; Python "
        f"{platform.python_version()}; {time.strftime('%Y-%m-%d')}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (printed in the doc)")
    p.add_argument("--parts", default="P1,P1F,P2,P2M,P3,P4", help="which parts to run")
    p.add_argument("--quick", action="store_true", help="small models, few runs; for CI")
    p.add_argument("--archs", default=None, help="P1F: only these models, e.g. resnet50")
    p.add_argument("--out", type=Path, default=None, help="the doc [docs/benchmarks.md]; "
                   "--quick writes only where told")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps({"p3": p3_worker, "p4": p4_worker}[job["task"]](job)))
        return
    parts = [s.strip().upper() for s in args.parts.split(",")]
    if unknown := set(parts) - {"P1", "P1F", "P2", "P2M", "P3", "P4"}:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from P1,P1F,P2,P2M,P3,P4")
    BenchConfig(device=args.device)  # a clear error now if there is no such device
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    s = setup(args.quick, args.device, args.threads)
    sections = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "P1" in parts:
            sections[f"P1 {kind}"] = "\n\n".join(p1(a, s["levels"], Path(tmp)) for a in s["p1"])
        for arch, levels in s["p1f"] if "P1F" in parts else ():
            if args.archs is None or arch.name in args.archs.split(","):
                sections[f"P1 forms {kind} {arch.name}"] = p1_forms(arch, levels, s["forms"],
                                                                    Path(tmp))  # fmt: skip
        if "P2" in parts:
            sections[f"P2 {kind}"] = p2(s["p2"], s["p2_levels"], s["forms"], Path(tmp))
        if "P2M" in parts:
            sections[f"P2 module {kind}"] = p2_module(s["p2"], s["p2_levels"], s["p2m_rounds"],
                                                      Path(tmp))  # fmt: skip
    if "P3" in parts:
        sections[f"P3 {kind}"] = p3(s["p3"], args.device, args.threads)
    if "P4" in parts:
        sections[f"P4 {kind}"] = p4(*s["p4"], args.device, args.threads)
    flags = [f"--device {args.device}"] * (kind == "cuda") + ["--quick"] * args.quick
    sections[f"setup {kind}"] = (
        f"Written by `{' '.join([COMMAND, *flags])}` on {machine(args.device, args.threads)}."
    )
    for key, body in sections.items():
        print(f"\n## {key}\n\n{body}")
    out = args.out or (None if args.quick else ROOT / "docs" / "benchmarks.md")
    if out is not None:
        write_sections(out, sections, title="Benchmarks")
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
