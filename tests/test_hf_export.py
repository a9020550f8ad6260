"""A cut transformer out of consensus_gates. Whole-layer gates
(`GateConfig(granularity="layer")`) and `hf.to_transformers`: a cut that removes only whole
layers comes out as the original class, whose `save_pretrained` folder plain transformers
loads. `cg.export`: a ``.pt2`` or ``.onnx`` program of the forward, at any batch and length;
`cgates slim` writes them all and `cgates bench` times them on token ids."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import consensus_gates as cg
from consensus_gates.saving.onnx_files import OnnxRuntimeModel
from consensus_gates.saving.pt2 import load_program

from hf_models import CAUSAL, VISION, inputs, output, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
WHOLE = cg.GateConfig(granularity="layer")
# T5's first layer returns the position bias the others use, and Swin's blocks alternate
# shifted windows by their index: neither is covered here (see docs/transformers.md)
ARCHS = ("gpt2", "llama", "qwen2", "neox", "bert", "bart", "vit")


def _alternate(gated) -> dict[str, bool]:
    return {n: i % 2 == 1 for i, n in enumerate(gated.gates)}


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_layer_gates_cut_whole_layers_and_give_the_original_class(arch):
    model, x = tiny(arch), inputs(arch)
    gated = cg.insert_gates(model, x, WHOLE)
    layers = [p for p, _ in cg.hf.gating.traced_layers(gated)]
    assert list(gated.gates) == layers  # one gate per layer, named by it
    with torch.no_grad():
        torch.testing.assert_close(output(gated, x), output(model, x))  # all open
    decisions = _alternate(gated)
    slim = cg.materialize(gated, decisions)
    cg.fix_decisions(gated, decisions)
    plain = cg.hf.to_transformers(slim)
    assert type(plain) is type(model)
    assert len(cg.hf.gating.traced_layers(slim)) == sum(decisions.values())
    with torch.no_grad():
        torch.testing.assert_close(output(slim, x), output(gated, x))
        assert torch.equal(output(plain, x), output(slim, x))
    assert not any("gate_modules" in k for k in plain.state_dict())


def test_a_whole_layer_gate_is_saved_and_loaded(tmp_path):
    gated = cg.insert_gates(tiny("llama"), inputs("llama"), WHOLE)
    cg.save(gated, tmp_path / "gated.safetensors")
    loaded = cg.load(tmp_path / "gated.safetensors")
    assert loaded.spec["config"]["granularity"] == "layer"
    slim = cg.materialize(loaded, _alternate(loaded))
    cg.save(slim, tmp_path / "slim.safetensors")
    x = inputs("llama")
    with torch.no_grad():
        assert torch.equal(output(cg.load(tmp_path / "slim.safetensors"), x), output(slim, x))


def test_a_branch_cut_is_refused_naming_its_layers():
    gated = cg.insert_gates(tiny("llama"), inputs("llama"))
    decisions = dict.fromkeys(gated.gates, True) | {"model.layers.1.mlp": False}
    with pytest.raises(ValueError, match=r"1 layers keep only part of their blocks.*"
                       r"model\.layers\.1 \(without mlp.*granularity='layer'"):  # fmt: skip
        cg.hf.to_transformers(cg.materialize(gated, decisions))
    with pytest.raises(TypeError, match="takes a cut Hugging Face model"):
        cg.hf.to_transformers(gated)


def test_granularity_is_for_transformers_and_checked():
    with pytest.raises(ValueError, match="granularity must be one of"):
        cg.GateConfig(granularity="block")
    with pytest.raises(ValueError, match="is for Hugging Face models"):
        cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 32, 32), WHOLE)


def test_per_layer_config_lists_follow_the_kept_layers():
    import transformers

    types = ["full_attention", "sliding_attention", "full_attention"]
    config = transformers.Qwen2Config(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, layer_types=types, use_sliding_window=True,
        sliding_window=4,
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config).eval()
    gated = cg.insert_gates(model, inputs("qwen2"), WHOLE)
    slim = cg.materialize(gated, {"model.layers.0": True, "model.layers.1": False,
                                  "model.layers.2": True})  # fmt: skip
    assert slim.config.num_hidden_layers == 2
    assert slim.config.layer_types == ["full_attention", "full_attention"]
    assert cg.hf.to_transformers(slim).config.layer_types == slim.config.layer_types


@pytest.mark.slow
@pytest.mark.parametrize("arch", CAUSAL[:2])
def test_the_folder_loads_with_plain_transformers_in_a_fresh_process(tmp_path, arch):
    """`from_pretrained` in a process that never imports consensus_gates gives the cut
    model's logits and generate() tokens."""
    from safetensors.torch import load_file, save_file

    gated = cg.insert_gates(tiny(arch), inputs(arch), WHOLE)
    slim = cg.materialize(gated, _alternate(gated))
    cg.hf.to_transformers(slim).save_pretrained(tmp_path / "folder")
    x = inputs(arch, batch=2, length=9, seed=4)
    save_file(x, str(tmp_path / "x.safetensors"))
    code = f"""
import sys, torch, transformers
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)
m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "folder")!r}).eval()
x = load_file({str(tmp_path / "x.safetensors")!r})
with torch.no_grad():
    y = m(**x).logits
    t = m.generate(x["input_ids"][:1], max_new_tokens=6, do_sample=False)
save_file({{"y": y, "t": t}}, {str(tmp_path / "y.safetensors")!r})
print(type(m).__name__, m.config.num_hidden_layers, any(k.startswith("consensus_gates")
                                                         for k in sys.modules))
"""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    kept = sum(_alternate(gated).values())
    assert done.stdout.split() == [type(tiny(arch)).__name__, str(kept), "False"]
    got = load_file(str(tmp_path / "y.safetensors"))
    with torch.no_grad():
        # another process: the same model, not necessarily the same rounding
        torch.testing.assert_close(got["y"], slim(**x).logits, rtol=1e-5, atol=1e-6)
        tokens = slim.generate(x["input_ids"][:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(got["t"], tokens)


@pytest.mark.parametrize("arch", ("gpt2", "llama", "bert", "bart", "vit"))
def test_export_runs_at_another_batch_and_length(tmp_path, arch):
    """The .pt2 (through the safe loader) and the .onnx (onnxruntime) give the cut model's
    output at batches and lengths they were not exported at, with a padding mask."""
    gated = cg.insert_gates(tiny(arch), inputs(arch, batch=1))
    slim = cg.materialize(gated, _alternate(gated))
    x = inputs(arch)  # batch 2, length 7
    cg.export(slim, x, tmp_path / "slim.pt2")
    cg.export(slim, x, tmp_path / "slim.onnx")
    program, ort = load_program(tmp_path / "slim.pt2").module(), OnnxRuntimeModel(
        tmp_path / "slim.onnx"
    )
    assert ort.input_names == list(x)
    for batch, length in ((3, 11), (1, 4)):
        y = inputs(arch, batch, length, seed=5)
        if arch in VISION:
            y["pixel_values"] = y["pixel_values"] * 2  # other images, of the exported size
        with torch.no_grad():
            ref = output(slim, y)
            got = program(*y.values())
        assert got.shape == ref.shape and ref.shape[0] == batch
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        # a left-padded causal row has queries with no key to attend to: undefined there
        valid = y["attention_mask"].bool() if arch in CAUSAL else slice(None)
        torch.testing.assert_close(ort(*y.values())[valid], ref[valid], rtol=1e-4, atol=1e-5)


def _gated_file(tmp_path, config=WHOLE) -> str:
    """A gated llama whose consensus closes every other gate, saved as `cgates slim` reads."""
    gated = cg.insert_gates(tiny("llama"), inputs("llama", batch=1), config)
    for name, gate in gated.gates.items():
        gate.running_open_rate.fill_(float(_alternate(gated)[name]))
    cg.save(gated, tmp_path / "gated.safetensors")
    return str(tmp_path / "gated.safetensors")


@pytest.mark.slow
def test_cli_slim_writes_every_form_of_a_cut_transformer_and_bench_times_them(tmp_path):
    import json

    import transformers
    from click.testing import CliRunner

    from consensus_gates.cli import main

    out = tmp_path / "out"
    args = ["slim", _gated_file(tmp_path), "-o", str(out), "--onnx", "--hf-folder", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    names = ["slim.safetensors", "slim.pt2", "slim.onnx", "hf"]
    assert json.loads(result.output)["files"] == [str(out / n) for n in names]
    slim = cg.load(out / "slim.safetensors")
    plain = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    assert plain.config.num_hidden_layers == 1  # of 3, every other gate closed
    assert not [p.name for p in tmp_path.rglob(".*")]  # no temporary left behind
    x = inputs("llama", batch=3, length=9, pad=False)
    with torch.no_grad():
        torch.testing.assert_close(output(plain, x), output(slim, x), rtol=0, atol=0)
        program = load_program(out / "slim.pt2").module()
        torch.testing.assert_close(program(*x.values()), output(slim, x), rtol=1e-5, atol=1e-6)

    again = CliRunner().invoke(main, args)  # nothing is overwritten unasked
    assert again.exit_code != 0 and "already exist" in again.output and "hf" in again.output
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0
    assert not [p.name for p in tmp_path.rglob(".*")]

    bench = ["bench", str(out / "slim.pt2"), str(out / "slim.onnx"), "--batch", "2",
             "--rounds", "1", "--runs", "2", "--warmup", "1", "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(main, bench)
    assert result.exit_code == 0, result.output
    assert "seq/s" in result.output and "input (7,)" in result.output  # the exported length


def test_cli_slim_hf_folder_refuses_a_branch_cut_before_writing(tmp_path):
    from click.testing import CliRunner

    from consensus_gates.cli import main

    out = tmp_path / "out"
    path = _gated_file(tmp_path, cg.GateConfig())
    result = CliRunner().invoke(main, ["slim", path, "-o", str(out), "--hf-folder"])
    assert result.exit_code != 0
    assert "keep only part of their blocks" in result.output
    assert "granularity='layer'" in result.output
    assert not out.exists() or not list(out.iterdir())


def test_the_plain_model_keeps_the_generation_settings():
    """A Trainer sets config.use_cache=False; a generation config made from that config
    would generate without the KV cache, at a fraction of the speed."""
    gated = cg.insert_gates(tiny("llama"), inputs("llama"), WHOLE)
    slim = cg.materialize(gated, _alternate(gated))
    slim.config.use_cache = False  # as transformers.Trainer leaves it
    slim.generation_config.max_new_tokens = 7
    plain = cg.hf.to_transformers(slim)
    assert plain.generation_config.use_cache is True
    assert plain.generation_config.max_new_tokens == 7
