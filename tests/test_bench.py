"""The timing core: one model in this process, and the process-isolated comparison."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import consensus_gates as cg
from consensus_gates.bench.compare import compare, ratios
from consensus_gates.bench.measure import BenchConfig, Measurement, measure

ROOT = Path(__file__).resolve().parents[1]


def test_measure_reports_consistent_numbers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    m = measure(model, (3, 16, 16), 4, BenchConfig(threads=1, warmup=1, runs=5), name="tiny")
    assert (m.model, m.batch, m.threads, m.dtype) == ("tiny", 4, 1, "float32")
    assert 0 < m.median_ms <= m.p90_ms
    assert m.throughput == pytest.approx(4 / (m.median_ms / 1e3))
    assert m.energy_mj_per_image is None  # no NVML on a CPU
    # a count of page faults over the 5 timed runs, per run
    total = m.extra["page_faults_per_run"] * 5
    assert math.isfinite(total) and total >= 0 and total == pytest.approx(round(total))


@pytest.mark.parametrize(
    "kwargs,message",
    [({"device": "tpu"}, "device must be 'cpu' or 'cuda'"),
     ({"dtype": "int8"}, "dtype must be one of"),
     ({"runs": 0}, "runs and buffers >= 1")],
)  # fmt: skip
def test_bad_config_is_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**kwargs)


def test_cuda_refused_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        BenchConfig(device="cuda")


def test_ratios_against_a_baseline():
    def m(name, ms, flops):
        return Measurement(name, 8, "cpu", "float32", 2, ms, ms, 0.0, flops=flops, params=10)

    r = ratios([m("original", 10.0, 100), m("slim", 6.0, 50)], "original")
    assert r[("slim", 8)] == {"latency": 0.6, "flops": 0.5, "params": 1.0}
    with pytest.raises(ValueError, match="no results for the baseline 'nope'"):
        ratios([m("slim", 6.0, 50)], "nope")


@pytest.mark.slow
def test_after_gate_benchmark_quick_mode_runs():
    """examples/benchmarks/after_gate_add.py --quick: exports, times each model in its own
    process (bench.compare) and prints the table, so the script cannot rot."""
    script = ROOT / "examples" / "benchmarks" / "after_gate_add.py"
    run = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True,
                         text=True, timeout=400)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["full width", "index_add", "index_copy"]
    flops = [float(r.split("|")[2]) for r in rows]
    assert flops[0] == 1.0 and flops[1] == flops[2] < 0.8  # both cut the same channels


@pytest.mark.slow
def test_slim_speed_benchmark_quick_mode_writes_its_sections(tmp_path):
    """examples/benchmarks/slim_speed.py --quick runs P1–P4 on small models and rewrites only
    its own spans of the doc: the prose around them stays."""
    script = ROOT / "examples" / "benchmarks" / "slim_speed.py"
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\nHand-written intro.\n\n<!-- begin setup cpu -->\nSTALE-ROW\n"
        "<!-- end setup cpu -->\n\n"
        + "".join(f"<!-- begin P{i} cpu -->\nSTALE-ROW\n<!-- end P{i} cpu -->\n\nProse {i}.\n\n"
                  for i in range(1, 5))
        + "<!-- begin P1 cuda -->\nno GPU\n<!-- end P1 cuda -->\n"
    )  # fmt: skip
    # one thread per timing process: the other test worker shares the two cores, and
    # competing OpenMP threads made tiny timings stray tenfold and more
    cmd = [sys.executable, str(script), "--quick", "--threads", "1", "--out", str(doc)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stderr[-3000:]
    text = doc.read_text()
    assert "Hand-written intro." in text and "Prose 4." in text and "no GPU" in text
    assert "STALE-ROW" not in text and "slim_speed.py --quick" in text and "torch " in text

    def rows(key: str) -> list[list[str]]:
        body = text.split(f"<!-- begin {key} -->")[1].split(f"<!-- end {key} -->")[0]
        lines = [r for r in body.splitlines() if r.startswith("| ") and "---" not in r]
        return [[c.strip() for c in r.split("|")[1:-1]] for r in lines if r[2:7] != "model"]

    p1 = {r[0]: r for r in rows("P1 cpu")}
    assert list(p1) == ["original", "50% blocks closed", "50% channels closed"]
    assert float(p1["original"][1]) == 1.0
    assert all(0.4 < float(p1[k][1]) < 0.7 for k in list(p1)[1:])  # FLOPs ratios
    (p2,) = rows("P2 cpu")[1:]  # slim and hand-built: the same parameter count, asserted
    assert p2[0] == "50% blocks closed" and p2[1] == "1/2/2"
    assert len(p2) == 2 + 2 and all(re.fullmatch(r"\d+\.\d{3} \(\d+\.\d\)", c) for c in p2[2:])
    (p2m,) = rows("P2 module cpu")[1:]
    # a smoke test: under a loaded machine tiny timings stray far (55x was seen)
    assert p2m[:2] == ["50% blocks closed", "1/2/2"] and float(p2m[4]) > 0
    forms = {r[0]: r[1:] for r in rows("P1 forms cpu resnet20")}  # module, .pt2
    assert list(forms) == [*p1, "original, ms"]
    assert forms["original"] == ["1.000"] + ["1.000"] * 2
    # a smoke test of the table: three timed runs of a tiny model are too noisy for bounds
    assert all(0 < float(q) < 10 for k in list(p1)[1:] for q in forms[k][1:])
    assert [r[0] for r in rows("P3 cpu")[:3]] == ["ungated", "layer gates", "channel gates"]
    assert "`materialize, channel`" in [r[0] for r in rows("P4 cpu")]


def test_slim_model_has_no_gate_ops_and_the_params_of_a_smaller_resnet():
    """After surgery no gate module, mask or gate call is left, and the parameter count is
    that of a model built directly with the kept shape."""
    gated = cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 32, 32))
    keep = {n: n.endswith(".0") for n in gated.gates}  # the first block of each stage
    slim = cg.materialize(gated, keep)
    assert not any(isinstance(m, cg.Gate) for m in slim.modules())
    targets = {str(n.target) for n in slim.graph.nodes}
    assert not any("gate" in t for t in targets)
    direct = cg.create_model("cifar_resnet", blocks=(1, 1, 1))
    assert sum(p.numel() for p in slim.parameters()) == sum(p.numel() for p in direct.parameters())
    # the same tensors under the same names: the slim model is that network
    direct.load_state_dict(slim.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(slim.eval()(x), direct.eval()(x))


@pytest.mark.slow
def test_cgates_bench_json_schema_and_ratios(tmp_path):
    """A zoo model against a slim file of it: one process per model and batch, the JSON
    schema, and ratios that agree with the measurements and with fvcore."""
    from click.testing import CliRunner

    from consensus_gates.cli import main

    gated = cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 32, 32))
    slim = cg.materialize(gated, {n: n.endswith(".0") for n in gated.gates})
    cg.save(slim, tmp_path / "slim.safetensors")
    argv = ["bench", "resnet20", str(tmp_path / "slim.safetensors"), "--batch", "1,2",
            "--rounds", "1", "--runs", "2", "--warmup", "1", "--threads", "1",
            "--keep-memory", "--json"]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["baseline"] == "resnet20" and report["input_shape"] == [3, 32, 32]
    rows = {(m["model"], m["batch"]): m for m in report["results"]}
    assert set(rows) == {(n, b) for n in ("resnet20", "slim.safetensors") for b in (1, 2)}
    for m in rows.values():
        assert {"median_ms", "p90_ms", "throughput", "peak_memory_mb", "flops", "params"} <= set(m)
        assert m["threads"] == 1 and m["median_ms"] > 0
        assert report["config"]["keep_freed_memory"]
        # a whole number of page faults over the 2 timed runs, per run
        faults = m["extra"]["page_faults_per_run"]
        assert isinstance(faults, float) and math.isfinite(faults) and faults >= 0
        assert (faults * report["config"]["runs"]).is_integer()
        base = rows[("resnet20", m["batch"])]
        assert m["ratio"]["latency"] == pytest.approx(m["median_ms"] / base["median_ms"])
    x = torch.randn(1, 3, 32, 32)
    expected = cg.flops(slim, x).flops / cg.flops(cg.create_model("resnet20"), x).flops
    assert rows[("slim.safetensors", 1)]["ratio"]["flops"] == pytest.approx(expected)


@pytest.mark.parametrize(
    "args,message",
    [(["--batch", "0,x"], "expected batch sizes such as 1,16,64"),
     (["--device", "tpu"], "device must be 'cpu' or 'cuda'")],
)  # fmt: skip
def test_cgates_bench_bad_input_is_one_clear_line(args, message):
    from click.testing import CliRunner

    from consensus_gates.cli import main

    result = CliRunner().invoke(main, ["bench", "resnet20", *args])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def test_peak_memory_is_what_inference_adds():
    """On CPU, the peak resident memory during the runs over that just before them: a conv
    whose output is 64 MiB per batch needs at least that much; on one small image, once the
    process's one-off initializations are done, it needs almost nothing."""
    code = """
import json, torch
from consensus_gates.bench import BenchConfig, measure
config = BenchConfig(threads=1, warmup=1, runs=2, buffers=1)
conv = torch.nn.Conv2d(3, 64, 3, padding=1)
measure(conv, (3, 8, 8), 1, config)  # oneDNN and the thread pool initialize here
big = measure(conv, (3, 128, 128), 16, config)  # output 16*64*128*128 floats = 64 MiB
small = measure(conv, (3, 8, 8), 1, config)
print(json.dumps([small.peak_memory_mb, big.peak_memory_mb]))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    small, big = json.loads(run.stdout.splitlines()[-1])
    assert big >= 60
    assert small < 5  # not the big run's peak: the high-water mark starts again


@pytest.mark.slow
def test_keep_freed_memory_ends_the_page_faults_of_each_forward(tmp_path):
    """With glibc's defaults each forward touches freshly mapped activation memory again;
    with keep_freed_memory (applied in each timing process) it stays in the process."""
    model = tmp_path / "resnet20.pt2"
    x = torch.randn(2, 3, 32, 32)
    cg.export(cg.create_model("resnet20").eval(), x, model)
    config = BenchConfig(threads=1, warmup=2, runs=3)
    (default,) = compare({"m": model}, (3, 32, 32), [32], config, rounds=1)
    kept_config = BenchConfig(threads=1, warmup=2, runs=3, keep_freed_memory=True)
    (kept,) = compare({"m": model}, (3, 32, 32), [32], kept_config, rounds=1)
    # 32 images x 16 channels x 32 x 32 floats = 2 MiB per activation: hundreds of pages each
    assert default.extra["page_faults_per_run"] > 1000
    assert kept.extra["page_faults_per_run"] < 0.1 * default.extra["page_faults_per_run"]


@pytest.mark.slow
def test_progressive_training_benchmark_quick_mode_runs(tmp_path):
    """examples/benchmarks/progressive_training.py --quick on a small fake Fashion-MNIST:
    dense, gates and progressive runs, each in its own process, and the table."""
    from conftest import fake_fashion_mnist

    root = fake_fashion_mnist(tmp_path / "data", n_train=256, n_test=64)
    script = ROOT / "examples" / "benchmarks" / "progressive_training.py"
    cmd = [sys.executable, str(script), "--quick", "--data-root", str(root), "--subset", "256",
           "--epochs", "3", "--settle-steps", "2"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r.split("|")[1].strip(): r.split("|") for r in run.stdout.splitlines()
            if r.startswith("| ") and "---" not in r}  # fmt: skip
    assert list(rows)[1:] == ["dense", "gates", "progressive"]
    wall_over_gates = float(rows["gates"][7])
    assert wall_over_gates == 1.0
    # cutting can only lower the training FLOPs (tests/test_progressive.py checks the cuts)
    assert float(rows["progressive"][9]) <= 1.0 == float(rows["gates"][9])
    assert float(rows["dense"][3]) == 1.0 and float(rows["gates"][3]) <= 1.0  # FLOPs ratios


@pytest.mark.slow
def test_target_reaching_benchmark_quick_mode_meets_its_target(tmp_path):
    """examples/benchmarks/target_reaching.py --quick on a small fake Fashion-MNIST: one
    projected run with channel gates, which must end on its target."""
    from conftest import fake_fashion_mnist

    root = fake_fashion_mnist(tmp_path / "data", n_train=256, n_test=64)
    script = ROOT / "examples" / "benchmarks" / "target_reaching.py"
    cmd = [sys.executable, str(script), "--quick", "--data-root", str(root), "--subset", "256",
           "--targets", "0.45", "--heads", "ste", "--modes", "both"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = [r.split("|") for r in run.stdout.splitlines() if r.startswith("| both")]
    target, ratio, fvcore, within = (row[i].strip() for i in (3, 4, 5, 7))
    assert target == "0.45" and abs(float(ratio) - 0.45) <= 0.03 and within.startswith("yes")
    assert abs(float(fvcore) - float(ratio)) <= 0.01  # the estimate is what fvcore counts


def test_cgates_bench_rates_a_language_model_in_sequences_per_second(tmp_path):
    """Token inputs are timed as sequences: the table says seq/s, the JSON says what a
    sample is; an image model keeps img/s."""
    from click.testing import CliRunner

    from consensus_gates.cli import main

    from hf_models import inputs, tiny

    cg.save(cg.insert_gates(tiny("llama"), inputs("llama")), tmp_path / "gated.safetensors")
    argv = ["bench", str(tmp_path / "gated.safetensors"), "--batch", "2", "--rounds", "1",
            "--runs", "2", "--warmup", "1", "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("model"))
    assert "seq/s" in header and "img/s" not in header
    result = CliRunner().invoke(main, [*argv, "--json"])
    assert result.exit_code == 0, result.output
    assert [m["sample"] for m in json.loads(result.output)["results"]] == ["sequence"]
    image = measure(cg.create_model("resnet20"), (3, 8, 8), 1, BenchConfig(warmup=0, runs=1))
    assert image.sample == "image"


def test_a_failed_or_hung_worker_is_benchmark_failed():
    """Its own class, so that the command line catches it and no RuntimeError of ours."""
    from consensus_gates.errors import BenchmarkFailed

    config = BenchConfig(warmup=0, runs=1)
    with pytest.raises(BenchmarkFailed, match=r"benchmark of no_such_model failed:\n"):
        compare({"no_such_model": "no_such_model"}, (3, 8, 8), [1], config, rounds=1)
    with pytest.raises(BenchmarkFailed, match="benchmark of r20 took more than 0.01 s"):
        compare({"r20": "resnet20"}, (3, 8, 8), [1], config, rounds=1, timeout=0.01)
    assert issubclass(BenchmarkFailed, RuntimeError)
