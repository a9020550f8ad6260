"""README's commands and code, and the examples, run as written."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fake_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command():
    test_cmd = _bash_blocks()[1].strip().split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd == ".venv/bin/python -m pytest"
    assert any(line.strip() == test_cmd for line in ci.splitlines())


def _run_readme_block(marker: str, tmp_path, monkeypatch, skip: str | None = None) -> dict:
    """Run README's python block that mentions `marker` in `tmp_path`, without its lines
    that mention `skip`; its namespace."""
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", README, re.S) if marker in c]
    if skip is not None:
        code = "\n".join(line for line in code.splitlines() if skip not in line)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The resnet50 snippet: gate, 3 training steps, consensus, slim, save, export. Its
    AOTInductor line compiles for most of a minute; tests/test_aot.py runs that export."""
    namespace = _run_readme_block("resnet50", tmp_path, monkeypatch, skip="slim.aoti.pt2")
    cg, gated, slim = namespace["cg"], namespace["gated"], namespace["slim"]
    assert len(gated.gates) == 16
    assert not any(isinstance(m, cg.LayerGate) for m in slim.modules())
    assert (tmp_path / "slim.safetensors").is_file() and (tmp_path / "slim.pt2").is_file()
    assert (tmp_path / "slim.onnx").is_file()


def test_readme_transformers_example_runs(tmp_path, monkeypatch):
    """The Llama snippet: gate, train with its own loss and a target, cut, generate, save."""
    namespace = _run_readme_block("LlamaForCausalLM", tmp_path, monkeypatch)
    cg, model, slim = namespace["cg"], namespace["model"], namespace["slim"]
    assert type(slim).__name__ == "SlimLlamaForCausalLM"
    ids = namespace["ids"][:1]
    assert cg.flops(slim, ids).flops < cg.flops(model, ids).flops  # the target closed some
    loaded = cg.load(tmp_path / "slim.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, slim(ids).logits)


def test_quickstart_example_end_to_end(tmp_path):
    root = fake_fashion_mnist(tmp_path / "data", n_train=256, n_test=128)
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(ROOT / "examples" / "fashion_mnist_quickstart.py"),
        "--data-root", str(root), "--epochs", "2", "--subset", "0", "--batch", "32",
        "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "MFLOPs per image" in run.stdout and "gates fully open" in run.stdout
    assert (out / "slim.safetensors").is_file() and (out / "slim.pt2").is_file()


def test_quickstart_example_says_where_the_data_should_be(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "fashion_mnist_quickstart.py"),
           "--data-root", str(tmp_path)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "FashionMNIST/raw" in run.stderr and "--data-root" in run.stderr


def _readme_main_command() -> list[str]:
    """README's main command after the set-up steps: the `cgates` call, as arguments."""
    *setup, main = _bash_blocks()[0].strip().split("&&")
    assert any("pip install -e ." in step for step in setup)
    return shlex.split(main)


@pytest.mark.slow
def test_readme_main_command_runs_the_demo_end_to_end(tmp_path):
    """README's main command, with its own arguments, on a small fake Fashion-MNIST: train,
    slim, bench in separate processes, report; files and numbers."""
    program, command, *args = _readme_main_command()
    assert (program, command) == (".venv/bin/cgates", "demo")
    assert args[args.index("--data-root") + 1] == "../shared/data"
    root = fake_fashion_mnist(tmp_path / "data", n_train=256, n_test=128)
    args[args.index("--data-root") + 1] = str(root)
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "consensus_gates.cli", command, *args,
        "--out", str(out), "--epochs", "1", "--subset", "128", "--rounds", "1", "--batch", "4",
        "--no-progress",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    for row in ("MFLOPs per sample", "parameters (M)", "test accuracy", "latency ms, batch 4"):
        assert row in run.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"][0] == report["accuracy"][1]  # the slim model is the consensus
    assert report["max_rel_diff"] <= 1e-5 and report["latency_ratio"] > 0
    for name in ("checkpoint.pt", "metrics.jsonl", "gates.png", "slim.safetensors", "slim.pt2"):
        assert (out / name).is_file(), name


def test_readme_pipeline_table_names_modules_that_exist():
    table = README[README.index("## The pipeline"):].split("\n\n")[2]
    rows = [line.split("|")[2] for line in table.splitlines()[2:]]
    names = [n for row in rows for n in re.findall(r"`([a-z_/]+)`", row)]
    assert len(names) >= 15
    package = ROOT / "consensus_gates"
    missing = [
        n for n in names
        if not (package / f"{n.rstrip('/')}.py").is_file()
        and not (package / n / "__init__.py").is_file()
    ]  # fmt: skip
    assert missing == []


@pytest.fixture
def registries():
    """Restore every registry the architecture page's examples add to."""
    from consensus_gates.experiments.methods import METHODS
    from consensus_gates.fx import blocks
    from consensus_gates.fx.positions import POSITIONS
    from consensus_gates.gates.heads import HEADS

    saved = [(r, dict(r)) for r in (METHODS, POSITIONS, HEADS)]
    tables = {role: (t.modules, set(t.functions), set(t.methods))
              for role, t in blocks.OP_ROLES.items()}  # fmt: skip
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)
    for role, (modules, functions, methods) in tables.items():
        table = blocks.OP_ROLES[role]
        table.modules, table.functions, table.methods = modules, functions, methods


def test_architecture_page_examples_run(registries):
    """docs/architecture.md's examples, as written: each registers its extension, and the
    heads and positions ones gate a model with it."""
    import consensus_gates as cg
    from consensus_gates.experiments.methods import METHODS

    page = (ROOT / "docs" / "architecture.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) == 5  # the model's path, then head, block pattern, position, method
    namespace = {
        "cg": cg, "model": cg.create_model("resnet20"), "x": torch.randn(2, 3, 16, 16),
        "BlurPool": type("BlurPool", (torch.nn.Module,), {"forward": lambda self, t: t}),
        "my_downsample_fn": lambda t: t[..., ::2, ::2],
    }  # fmt: skip
    for code in blocks[1:]:
        namespace.pop("gated", None)
        exec(compile(code, "docs/architecture.md", "exec"), namespace)
    assert "my-method" in METHODS
    assert cg.GateConfig(head="sigmoid_ste", position="first").position == "first"


@pytest.mark.slow
def test_llm_depth_pruning_example_quick(tmp_path):
    """The transformer example, small: pretrain, gate, fine-tune to a target, cut, compare."""
    out = tmp_path / "llm"
    # one thread: the other test worker shares the two cores, and OpenMP threads that
    # compete for them slow training down tenfold
    cmd = [sys.executable, str(ROOT / "examples" / "llm_depth_pruning.py"), "--quick",
           "--threads", "1", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    ppl = results["perplexity"]
    assert ppl["gated"] == ppl["slim"]  # the cut is exact
    flops, params = results["flops_per_token"], results["params"]
    assert flops[1] < flops[0] and params[1] < params[0]
    assert abs(flops[1] / flops[0] - results["target"]) < 0.1
    assert (out / "dense" / "config.json").is_file() and (out / "slim.safetensors").is_file()
    # whole-layer gates, the default: the cut is a plain LlamaForCausalLM folder, which a
    # process without consensus_gates loads, with the cut model's logits
    plain = results["plain_transformers"]
    assert plain["class"] == "LlamaForCausalLM" and plain["layers"] == results["layers"][1]
    assert plain["imports_consensus_gates"] == "False" and plain["max_logit_difference"] < 1e-4
    assert results["perplexity"]["reloaded cut"] == pytest.approx(ppl["slim"], rel=1e-5)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "--overwrite" in again.stderr
