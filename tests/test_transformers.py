"""Hugging Face models: gates on every layer's attention and MLP branches, exact with all
gates open, exact after the cut (whole layers and their cache entries gone), generate(),
save/load, the trainer with the model's own loss, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch

import consensus_gates as cg
from consensus_gates.errors import InputError, TracingError

from hf_models import ARCHS, CAUSAL, SEQ2SEQ, VISION, inputs, labels, output, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def gated_model(arch: str):
    model = tiny(arch)
    return model, cg.insert_gates(model, inputs(arch))


def all_open(gated) -> dict[str, bool]:
    return {n: True for n in gated.gates}


def random_decisions(gated, seed: int = 0) -> dict[str, bool]:
    """Random decisions with the first layer's branches all closed: it goes entirely."""
    g = torch.Generator().manual_seed(seed)
    names = list(gated.gates)
    first = names[0].rsplit(".", 1)[0] + "."
    return {n: not n.startswith(first) and bool(torch.rand((), generator=g) < 0.6) for n in names}


@pytest.mark.parametrize("arch", ARCHS)
def test_gates_every_layer_and_keeps_the_class(arch):
    model, gated = gated_model(arch)
    assert isinstance(gated, type(model)) and type(gated).__name__ == f"Gated{type(model).__name__}"
    assert not any(isinstance(m, cg.Gate) for m in model.modules())  # the original is untouched
    from consensus_gates.hf.tracing import transformer_layers

    for path, _ in transformer_layers(model):  # two branches (three with cross-attention) each
        # T5's attention returns the position bias later layers read: its FF branch only
        branches = sum(n.startswith(path + ".") for n in gated.gates)
        assert branches == 1 if arch == "t5" else 2 <= branches <= 3
    assert all(isinstance(g, cg.LayerGate) for g in gated.gates.values())


def test_gate_names_follow_the_model():
    _, gated = gated_model("llama")
    assert list(gated.gates)[:2] == ["model.layers.0.self_attn", "model.layers.0.mlp"]
    _, gated = gated_model("bart")  # the decoder's cross-attention is a third branch
    assert [n for n in gated.gates if n.startswith("model.decoder.layers.0.")] == [
        "model.decoder.layers.0.self_attn", "model.decoder.layers.0.encoder_attn",
        "model.decoder.layers.0.fc1",
    ]  # fmt: skip
    _, gated = gated_model("neox")  # a parallel residual: both branches on one merge
    assert {n for n in gated.gates if n.startswith("gpt_neox.layers.0.")} == {
        "gpt_neox.layers.0.attention", "gpt_neox.layers.0.mlp",
    }  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_all_open_equals_the_original(arch):
    model, gated = gated_model(arch)
    cg.fix_decisions(gated, all_open(gated))
    with torch.no_grad():
        for x in (inputs(arch), inputs(arch, batch=3, length=11, seed=5)):
            assert torch.equal(output(gated, x), output(model, x))
            if arch not in VISION or arch == "vit":
                y = labels(arch, x)
                assert torch.equal(gated(**x, labels=y).loss, model(**x, labels=y).loss)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "bart", "vit"])
def test_all_open_equals_the_original_in_train_mode_with_dropout(arch):
    model, gated = gated_model(arch)
    cg.fix_decisions(gated, all_open(gated))
    model.train(), gated.train()
    x = inputs(arch)
    torch.manual_seed(3)
    expected = output(model, x)
    torch.manual_seed(3)
    got = output(gated, x)
    torch.manual_seed(4)
    assert torch.equal(got, expected) and not torch.equal(output(gated, x), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_cut_equals_the_gated_model_with_the_same_decisions(arch):
    _, gated = gated_model(arch)
    decisions = random_decisions(gated)
    cg.fix_decisions(gated, decisions)
    slim = cg.materialize(gated, decisions)
    assert isinstance(slim, cg.hf.gating.original_class(gated))
    assert not any(isinstance(m, cg.Gate) for m in slim.modules())
    with torch.no_grad():
        for x in (inputs(arch), inputs(arch, batch=3, length=11, seed=5)):
            assert torch.equal(output(slim, x), output(gated, x))


def test_cut_removes_exactly_the_closed_modules_and_whole_layers():
    model, gated = gated_model("llama")
    attn, mlp = "model.layers.{}.self_attn", "model.layers.{}.mlp"
    decisions = {**all_open(gated), attn.format(0): False, mlp.format(0): False,
                 mlp.format(2): False}  # fmt: skip
    slim = cg.materialize(gated, decisions)

    def size(module):
        return sum(p.numel() for p in module.parameters())

    layers = model.model.layers
    removed = size(layers[0]) + size(layers[2].mlp) + size(layers[2].post_attention_layernorm)
    assert size(slim) == size(model) - removed
    assert len(slim.model.layers) == 2 and slim.config.num_hidden_layers == 2
    assert [m.self_attn.layer_idx for m in slim.model.layers] == [0, 1]
    assert model.config.num_hidden_layers == 3  # the original's config is its own
    out = slim(**inputs("llama"), use_cache=True)
    assert len(out.past_key_values.layers) == 2  # the KV cache lost the removed layer


@pytest.mark.parametrize("arch", [*CAUSAL, *SEQ2SEQ])
def test_generate_gives_the_same_tokens(arch):
    model, gated = gated_model(arch)
    ids = inputs(arch, batch=1, pad=False)["input_ids"]
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    cg.fix_decisions(gated, all_open(gated))
    assert torch.equal(gated.generate(ids, **kwargs), model.generate(ids, **kwargs))
    decisions = random_decisions(gated, seed=1)
    cg.fix_decisions(gated, decisions)
    slim = cg.materialize(gated, decisions)
    expected = gated.generate(ids, **kwargs)
    for cache in (True, False):
        assert torch.equal(slim.generate(ids, use_cache=cache, **kwargs), expected)


def test_flops_are_per_token_and_the_ratio_matches_the_cut():
    model, gated = gated_model("llama")
    x = inputs("llama", batch=1, length=7, pad=False)  # the length gates were inserted at
    decisions = random_decisions(gated, seed=2)
    slim = cg.materialize(gated, decisions)
    whole, cut = cg.flops(model, x), cg.flops(slim, x)
    assert not model.training and not slim.training  # counting leaves the mode alone
    model.train()
    cg.flops(model, x)
    assert model.training
    model.eval()
    assert cg.flops(model, {k: v.repeat(3, 1) for k, v in x.items()}).flops == whole.flops
    hidden, mlp = 32, 64
    assert whole.flops > 3 * (4 * hidden * hidden + 3 * hidden * mlp)  # the layers, at least
    assert cut.params < whole.params and cut.flops < whole.flops
    total = cg.cost.total_cost
    ratio = total(slim, x).flops / total(model, x).flops
    assert cg.flops_ratio(gated, decisions) == pytest.approx(ratio, rel=1e-9)


def test_attention_flops_are_counted():
    model = tiny("llama")
    short, long = (inputs("llama", batch=1, length=n, pad=False) for n in (8, 32))
    # per token, attention's Q·Kᵀ and weighted sum grow with the length; nothing else does
    grown = cg.flops(model, long).flops - cg.flops(model, short).flops
    heads, head_dim, layers = 4, 8, 3
    mean_keys = (32 - 8)  # keys per query without a mask: the length
    assert grown == layers * heads * mean_keys * 2 * head_dim


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bart", "vit"])
def test_save_and_load(tmp_path, arch):
    _, gated = gated_model(arch)
    decisions = random_decisions(gated)
    cg.fix_decisions(gated, decisions)
    slim = cg.materialize(gated, decisions)
    x = inputs(arch, batch=3, length=9, seed=7)
    for name, model in (("gated", gated), ("slim", slim)):
        path = tmp_path / f"{name}.safetensors"
        cg.save(model, path)
        loaded = cg.load(path)
        assert type(loaded).__name__ == type(model).__name__
        with torch.no_grad():
            assert torch.equal(output(loaded, x), output(model.eval(), x))
        assert sum(p.numel() for p in loaded.parameters()) == sum(
            p.numel() for p in model.parameters()
        )


def test_save_pretrained_refuses(tmp_path):
    _, gated = gated_model("gpt2")
    slim = cg.materialize(gated, random_decisions(gated))
    for model in (gated, slim):
        with pytest.raises(NotImplementedError, match="consensus_gates.save"):
            model.save_pretrained(tmp_path / "folder")
    assert not (tmp_path / "folder").exists()


def test_a_tampered_file_is_refused(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    _, gated = gated_model("llama")
    path = tmp_path / "slim.safetensors"
    cg.save(cg.materialize(gated, random_decisions(gated)), path)
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    spec = json.loads(header["consensus_gates"])

    def tampered(change, name):
        bad = copy.deepcopy(spec)
        change(bad)
        out = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(out), metadata={"consensus_gates": json.dumps(bad)})
        return out

    layer = next(iter(spec["layers"]))
    node = next(n for n in spec["layers"][layer]["graph"]["nodes"] if n["op"] == "call_function")

    def system(s):
        n = next(n for n in s["layers"][layer]["graph"]["nodes"] if n["name"] == node["name"])
        n["target"] = "os.system"

    def method(s):
        s["layers"][layer]["graph"]["nodes"][-2]["op"] = "get_attr"
        s["layers"][layer]["graph"]["nodes"][-2]["target"] = "self_attn.forward"

    cases = {
        "class": (lambda s: s["transformers"].update({"class": "os"}), "not a model class"),
        "system": (system, "not allowed"),
        "method": (method, "not a module or tensor"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(cg.ModelFileError, match=message):
            cg.load(tampered(change, name))


def test_train_with_dict_batches_and_the_models_own_loss(tmp_path):
    _, gated = gated_model("llama")
    before = {n: g.fc2.weight.detach().clone() for n, g in gated.gates.items()}
    x = inputs("llama", batch=4, length=8, pad=False)
    batches = [{**x, "labels": x["input_ids"]}] * 3
    config = cg.TrainConfig(epochs=1, lr=0.05, milestones=(), lambda_polar=1.0, progress=False,
                            target=0.7)  # fmt: skip
    run = tmp_path / "run"
    records = cg.train(gated, batches, batches, config, out_dir=run, log=lambda _: None)
    (record,) = records
    assert record["test_acc"] is None and record["test_loss"] > 0
    assert 0 < record["flops_ratio"] <= 1
    assert any(not torch.equal(before[n], g.fc2.weight) for n, g in gated.gates.items())
    assert (run / "gates.png").is_file()
    from click.testing import CliRunner

    from consensus_gates.cli import main

    result = CliRunner().invoke(main, ["slim", str(run / "checkpoint.pt"), "--json"])
    assert result.exit_code == 0, result.output
    slim = cg.load(run / "slim" / "slim.safetensors")
    decisions = cg.consensus(gated).decisions
    x = inputs("llama", batch=2, length=8, pad=False)
    cg.fix_decisions(gated, decisions)
    with torch.no_grad():
        assert torch.equal(output(slim, x), output(gated.eval(), x))


def test_a_call_the_layer_was_not_traced_for_is_refused():
    _, gated = gated_model("gpt2")  # traced without encoder_hidden_states: baked None
    layer = gated.transformer.h[0]
    hidden = torch.randn(1, 4, 32)
    with pytest.raises(TypeError, match="traced with encoder_hidden_states=None"):
        layer(hidden, encoder_hidden_states=hidden)
    with pytest.raises(TypeError, match=r"traced without the arguments \['output_attentions'\]"):
        layer(hidden, output_attentions=True)


def test_input_errors():
    model = tiny("llama")
    ids = inputs("llama")["input_ids"]
    names = set(cg.insert_gates(model, {"input_ids": ids}).gates)
    assert set(cg.insert_gates(model, ids).gates) == names
    with pytest.raises(InputError, match="a dict of the model's inputs"):
        cg.insert_gates(model, [ids])
    with pytest.raises(ValueError, match="mode='layer'"):
        cg.insert_gates(model, ids, cg.GateConfig(mode="channel"))
    with pytest.raises(InputError, match="T5ForConditionalGeneration failed on the example"):
        cg.insert_gates(tiny("t5"), ids)


def test_an_untraceable_layer_is_named():
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    class Layer(GradientCheckpointingLayer):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, hidden_states):
            if hidden_states.sum() > 0:  # data-dependent: fx cannot trace it
                return hidden_states + self.fc(hidden_states)
            return hidden_states

    class Tiny(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

        def forward(self, inputs_embeds):
            for layer in self.layers:
                inputs_embeds = layer(inputs_embeds)
            return inputs_embeds

    with pytest.raises(TracingError, match=r"layer 'layers.0' \(Layer\).*leaf_modules"):
        cg.insert_gates(Tiny(PretrainedConfig()), {"inputs_embeds": torch.ones(2, 3, 8)})


def test_load_in_a_fresh_process(tmp_path):
    """No tracing, no network, nothing from this process: the file alone rebuilds it."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    _, gated = gated_model("llama")
    slim = cg.materialize(gated, random_decisions(gated))
    cg.save(slim, tmp_path / "slim.safetensors")
    x = inputs("llama", batch=2, length=9, seed=3)
    save_file(x, str(tmp_path / "x.safetensors"))
    code = (
        "import sys, torch, consensus_gates as cg\n"
        "from safetensors.torch import load_file, save_file\n"
        f"m = cg.load({str(tmp_path / 'slim.safetensors')!r})\n"
        f"x = load_file({str(tmp_path / 'x.safetensors')!r})\n"
        "with torch.no_grad():\n"
        f"    save_file({{'y': m(**x).logits}}, {str(tmp_path / 'y.safetensors')!r})\n"
        "print(type(m).__name__, len(m.model.layers))\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SlimLlamaForCausalLM", str(len(slim.model.layers))]
    from safetensors.torch import load_file

    # another process may split a matmul differently (thread count, CPU vendor): the file
    # rebuilds the same model, not the same rounding
    with torch.no_grad():
        torch.testing.assert_close(
            load_file(str(tmp_path / "y.safetensors"))["y"], output(slim, x), rtol=1e-5, atol=1e-6
        )


def test_cli_inspect_and_slim_take_transformer_files(tmp_path):
    import json

    from click.testing import CliRunner

    from consensus_gates.cli import main

    _, gated = gated_model("gpt2")
    cg.save(gated, tmp_path / "gated.safetensors")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "gated.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [b["name"] for b in report["blocks"]] == list(gated.gates)
    assert report["input_shape"] == {"input_ids": [7], "attention_mask": [7]}
    result = CliRunner().invoke(
        main, ["slim", str(tmp_path / "gated.safetensors"), "-o", str(tmp_path / "out"), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["files"] == [str(tmp_path / "out" / n) for n in ("slim.safetensors", "slim.pt2")]
    assert report["max_rel_diff"] == 0.0
    slim = cg.load(tmp_path / "out" / "slim.safetensors")
    assert report["params"][1] == sum(p.numel() for p in slim.parameters())
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out" / "slim.safetensors")])
    assert result.exit_code == 0, result.output
    assert "MFLOPs per token" in result.output and "kept:" in result.output


def test_cli_bench_times_a_pretrained_folder_against_a_cut_file(tmp_path):
    import json

    from click.testing import CliRunner

    from consensus_gates.cli import main

    model, gated = gated_model("llama")
    model.save_pretrained(tmp_path / "dense")
    slim = cg.materialize(gated, random_decisions(gated))
    cg.save(slim, tmp_path / "slim.safetensors")
    args = ["bench", str(tmp_path / "dense"), str(tmp_path / "slim.safetensors"), "--batch",
            "2", "--rounds", "1", "--runs", "2", "--warmup", "1", "--threads", "1", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["input_shape"] == [7]  # the length the cut file was traced at
    dense, cut = report["results"]
    x = {"input_ids": torch.randint(0, 100, (1, 7))}
    assert dense["flops"] == cg.flops(model, x).flops and cut["flops"] == cg.flops(slim, x).flops
    assert cut["ratio"]["params"] == pytest.approx(cut["params"] / dense["params"])
