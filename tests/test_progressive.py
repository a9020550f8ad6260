"""Progressive surgery: settled layer gates cut out of the model while it trains
(`fx.cut.cut_gates`, `training.progressive`)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import consensus_gates as cg
from consensus_gates.fx.cut import cut_gates
from consensus_gates.training.progressive import SettleTracker, cut_settled

from conftest import randomize

X = torch.randn(4, 3, 8, 8)


def _gated(mode: str = "layer") -> cg.GatedModel:
    model = randomize(cg.create_model("resnet20"))
    return cg.insert_gates(model, X, cg.GateConfig(mode=mode)).eval()


def _layer_gates(gated) -> list[str]:
    return [n for n, g in gated.gates.items() if isinstance(g, cg.LayerGate)]


@pytest.mark.parametrize("mode", ["layer", "both"])
def test_a_cut_changes_nothing(mode):
    gated = _gated(mode)
    names = _layer_gates(gated)
    decisions = {names[0]: False, names[4]: True, names[7]: False}
    for name, d in decisions.items():
        gated.gates[name].fixed = d
    params = sum(p.numel() for p in gated.parameters())
    with torch.no_grad():
        before = gated(X)
        removed = cut_gates(gated, decisions)
        after = gated(X)
    assert torch.equal(before, after)
    assert set(decisions) <= set(removed) and not set(removed) & set(gated.gates)
    assert sum(p.numel() for p in gated.parameters()) < params
    if mode == "both":  # the channel gates inside the closed branches went with them
        assert any("/" in n for n in removed)
    # FLOPs ratios stay relative to the original model, cut gates counted as decided
    full = _gated(mode)
    all_open = {n: True for n in full.gates}
    assert cg.flops_ratio(gated, {n: True for n in gated.gates}) == pytest.approx(
        cg.flops_ratio(full, {**all_open, **decisions}), abs=1e-9
    )


def test_the_final_model_is_what_materialize_gives_and_files_round_trip(tmp_path):
    gated = _gated("both")
    full = copy.deepcopy(gated)
    names = _layer_gates(gated)
    decisions = {names[1]: False, names[2]: True}
    cut_gates(gated, decisions)
    c = cg.consensus(gated)
    assert {n: c.decisions[n] for n in decisions} == decisions  # cut gates keep their decision
    with pytest.raises(ValueError, match="cut out while training"):
        cg.materialize(gated, {names[1]: True})
    slim = cg.materialize(gated, c)
    reference = cg.materialize(full, c.decisions)
    with torch.no_grad():
        assert torch.equal(slim(X), reference(X))
    for model, name in ((gated, "cut.safetensors"), (slim, "slim.safetensors")):
        cg.save(model, tmp_path / name)
        loaded = cg.load(tmp_path / name).eval()
        with torch.no_grad():
            assert torch.equal(loaded(X), model(X)), name
    assert list(cg.load(tmp_path / "cut.safetensors").gates) == list(gated.gates)


def test_cut_refuses_unknown_gates_and_channel_gates_alone():
    gated = _gated("both")
    with pytest.raises(KeyError, match="no gate named"):
        cut_gates(gated, {"layer9.9": False})
    channel = next(n for n in gated.gates if "/" in n)
    with pytest.raises(ValueError, match="cut only together with every other gate"):
        cut_gates(gated, {channel: False})


def _some_channels_closed(gated) -> dict:
    """Blocks 0 and 4 closed, the others open with every third channel of theirs closed."""
    layers = _layer_gates(gated)
    decisions = {n: i not in (0, 4) for i, n in enumerate(layers)}
    for name, gate in gated.gates.items():
        if isinstance(gate, cg.ChannelGate):
            decisions[name] = tuple(i % 3 != 0 for i in range(gate.units))
    return decisions


@pytest.mark.parametrize("mode", ["both", "channel"])
def test_a_channel_cut_changes_nothing_and_files_round_trip(mode, tmp_path):
    gated = _gated(mode)
    decisions = _some_channels_closed(gated)
    cg.fix_decisions(gated, decisions)
    reference = cg.materialize(copy.deepcopy(gated), decisions)
    params = sum(p.numel() for p in gated.parameters())
    layers = _layer_gates(gated)[:2]  # with layer gates, two cut first, as they settle
    first = {n: decisions[n] for n in layers}
    with torch.no_grad():
        before = gated(X)
        cut_gates(gated, first)
        cut_gates(gated, {n: d for n, d in decisions.items() if n in gated.gates})
        after = gated(X)
    assert torch.allclose(before, after, atol=1e-5) and not gated.gates
    assert sum(p.numel() for p in gated.parameters()) < params
    assert cg.flops(gated, X[:1]) == cg.flops(reference, X[:1])
    with torch.no_grad():
        assert torch.equal(cg.materialize(gated)(X), after)
    cg.save(gated, tmp_path / "cut.safetensors")
    with torch.no_grad():
        assert torch.equal(cg.load(tmp_path / "cut.safetensors").eval()(X), after)


def _sliced_by_hand(name: str, buffer: torch.Tensor, decisions: dict) -> torch.Tensor:
    """ResNet-20's middle channel gate cuts conv1's outputs, bn1, and conv2's inputs."""
    gate = ".".join(name.split(".")[:2]) + "/conv1"
    if gate not in decisions:
        return buffer
    keep = torch.tensor(decisions[gate]).nonzero().flatten()
    if ".conv1." in name or ".bn1." in name:
        return buffer[keep]
    return buffer[:, keep] if name.endswith("conv2.weight") else buffer


def test_the_optimizer_carries_over():
    """One SGD step after a cut equals one step of a fresh optimizer on a network built
    without the cut units, given the same momentum buffers."""
    _steps_after_a_cut(
        "layer",
        lambda gated: {n: i in (5,) for i, n in enumerate(_layer_gates(gated)) if i in (0, 5)},
    )


def test_the_optimizer_carries_over_a_channel_cut_with_sliced_momentum():
    _steps_after_a_cut("both", _some_channels_closed)


def _steps_after_a_cut(mode: str, decide) -> None:
    gated = _gated(mode).train()
    opt = torch.optim.SGD(gated.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(gated(x), y).backward()
        opt.step()
    decisions = decide(gated)
    other = copy.deepcopy(gated)
    buffers = {n: opt.state[p]["momentum_buffer"].clone() for n, p in gated.named_parameters()}
    cut_settled(gated, opt, decisions)
    cut_gates(other, decisions)
    fresh = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for n, p in other.named_parameters():
        fresh.state[p]["momentum_buffer"] = _sliced_by_hand(n, buffers[n], decisions).clone()
    for n, p in gated.named_parameters():  # the cut sliced them so too
        assert torch.equal(opt.state[p]["momentum_buffer"], fresh.state[
            dict(other.named_parameters())[n]]["momentum_buffer"]), n  # fmt: skip
    assert len(opt.param_groups[0]["params"]) == len(list(other.parameters()))
    for model, optimizer in ((gated, opt), (other, fresh)):
        torch.manual_seed(1)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for (n, a), b in zip(gated.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b), n


def test_a_gate_settles_after_a_window_of_unanimous_steps():
    gated = _gated()
    tracker = SettleTracker(window=3)
    gate = gated.gates["layer1.0"]
    other = [g for n, g in gated.gates.items() if n != "layer1.0"]
    for g in other:
        g.decisions = torch.tensor([[1.0], [0.0]])  # split: never settles
    history = []
    for row in ([1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]):
        gate.decisions = torch.tensor(row)[:, None]
        history.append(tracker.update(gated))
    assert history == [{}, {}, {}, {}, {"layer1.0": False}]  # the switch restarted the count
    assert tracker.state_dict()["runs"]["layer1.0"] == 3 and tracker.runs["layer1.1"] == 0


def _data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=24, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


def _progressive_gated() -> cg.GatedModel:
    torch.manual_seed(0)
    gated = cg.insert_gates(cg.create_model("resnet20", num_classes=2), X, cg.GateConfig())
    for i, gate in enumerate(gated.gates.values()):  # some start firmly closed, some open
        last = [m for m in gate.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias.data.fill_(-6.0 if i % 3 == 0 else 6.0)
    return gated


CONFIG = cg.TrainConfig(
    epochs=3, lr=0.02, milestones=(2,), polar_schedule="constant", lambda_polar=1.0,
    lambda_act=0.0,
    progressive=True, settle_steps=6, progress=False,
)  # fmt: skip


def test_progressive_training_cuts_settled_gates_and_records_it():
    gated = _progressive_gated()
    records = cg.train(gated, _data(), _data(48, 1), CONFIG, log=lambda s: None)
    cut = [c for r in records for c in r["cut"]]
    assert [c["step"] for c in cut] == [2] * 9  # the 6th unanimous step: epoch 2, step 2
    assert {c["gate"]: c["open"] for c in cut} == {n: i % 3 != 0 for i, n in enumerate(
        f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3))}  # fmt: skip
    assert records[0]["model_flops"] > records[1]["model_flops"] == records[2]["model_flops"]
    assert records[1]["model_params"] < records[0]["model_params"]
    assert not gated.gates and cg.consensus(gated).open_ratio == pytest.approx(6 / 9)
    first, second = (records[i]["train_flops"] for i in (0, 1))
    assert first == 3 * records[0]["model_flops"] * 96
    assert second - first < first  # the second epoch ran the smaller network after step 2
    assert records[2]["flops_ratio"] == pytest.approx(records[1]["flops_ratio"])
    assert records[2]["flops_ratio"] < 1


def test_resume_across_a_cut_is_exact(tmp_path):
    straight = cg.train(_progressive_gated(), _data(), None, CONFIG, log=lambda s: None)
    one = cg.TrainConfig(**{**CONFIG.__dict__, "epochs": 1})
    cg.train(_progressive_gated(), _data(), None, one, out_dir=tmp_path, log=lambda s: None)
    two = cg.TrainConfig(**{**CONFIG.__dict__, "epochs": 2})  # the cut happens in epoch 2
    cg.train(_progressive_gated(), _data(), None, two, out_dir=tmp_path, resume=True,
             log=lambda s: None)  # fmt: skip
    model = _progressive_gated()
    resumed = cg.train(model, _data(), None, CONFIG, out_dir=tmp_path, resume=True,
                       log=lambda s: None)  # fmt: skip
    for a, b in zip(straight, resumed, strict=True):
        for key in ("loss", "train_acc", "cut", "train_flops", "model_flops", "flops_ratio"):
            assert a[key] == b[key], key
    saved = json.loads(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["spec"])
    assert len(saved["cut"]) == 9


def test_progressive_needs_gates_and_a_window():
    with pytest.raises(ValueError, match="settle_steps must be >= 1"):
        cg.TrainConfig(settle_steps=0)
    with pytest.raises(ValueError, match="progressive cuts settled gates"):
        cg.train(cg.create_model("resnet20"), _data(), None, CONFIG)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    try:
        gated = _progressive_gated()
        records = cg.train(gated, _data(48, seed=rank), None, CONFIG, log=lambda s: None)
        weights = {n: p.detach().clone() for n, p in gated.state_dict().items()}
        # the projection onto a target: pinned (gates that take no gradient), and cut with
        # the channels
        projected = {}
        for progressive in (False, True):
            torch.manual_seed(0)
            model = cg.insert_gates(cg.create_model("resnet20", num_classes=2), X,
                                    cg.GateConfig(mode="both"))  # fmt: skip
            config = cg.TrainConfig(epochs=4, lr=0.05, target=0.5, progress=False,
                                    progressive=progressive)  # fmt: skip
            runs = cg.train(model, _data(48, seed=rank), None, config, log=lambda s: None)
            projected[progressive] = {
                "records": [(r["projected"], r["cut"], r["flops_ratio"]) for r in runs],
                "weights": {n: p.detach().clone() for n, p in model.state_dict().items()},
            }
        torch.save({"cut": [r["cut"] for r in records], "weights": weights,
                    "projected": projected}, f"{out}/{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to rounding: each rank is its own process."""
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_under_ddp_every_rank_cuts_and_projects_the_same_gates_at_the_same_step(tmp_path):
    import torch.multiprocessing as mp
    from test_distributed import _free_port

    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert a["cut"] == b["cut"] and sum(len(c) for c in a["cut"]) == 9
    assert a["weights"].keys() == b["weights"].keys()
    assert all(_close(a["weights"][k], b["weights"][k]) for k in a["weights"])
    for progressive in (False, True):
        x, y = a["projected"][progressive], b["projected"][progressive]
        assert x["records"] == y["records"] and x["records"][1][0] == 1  # projected at step 1
        # BatchNorm's running statistics are each rank's own (DDP broadcasts rank 0's
        # before each forward); everything else is the same
        differ = [k for k in x["weights"] if not _close(x["weights"][k], y["weights"][k])]
        assert all(k.endswith(("running_mean", "running_var")) for k in differ)
    assert len(a["projected"][True]["records"][1][1]) == 18  # every gate cut at once


def test_train_cuts_a_transformers_gates_out_as_it_trains(tmp_path):
    """`train(progressive=True)` on a Hugging Face model: its layers' graphs lose the cut
    gates in place, the optimizer goes on with what is left, the checkpoint resumes and
    `cgates slim` measures against the uncut model."""
    from click.testing import CliRunner

    from consensus_gates.cli import main

    from hf_models import inputs, tiny

    x = inputs("llama", batch=8, length=12, pad=False)
    batches = [{**x, "labels": x["input_ids"]}] * 6
    gated = cg.insert_gates(tiny("llama"), {k: v[:1] for k, v in x.items()})
    before = sum(p.numel() for p in gated.parameters())
    config = cg.TrainConfig(optimizer="adamw", lr=3e-3, epochs=4, target=0.5,
                            progressive=True, settle_steps=2, progress=False)  # fmt: skip
    history = cg.train(gated, batches, batches[:2], config=config, out_dir=tmp_path / "run")
    assert any(r["cut"] for r in history) and not gated.gates
    assert sum(p.numel() for p in gated.parameters()) < before
    assert abs(cg.flops_ratio(gated) - 0.5) < 0.1
    again = cg.insert_gates(tiny("llama"), {k: v[:1] for k, v in x.items()})
    more = cg.train(again, batches, batches[:2], config=replace(config, epochs=5),
                    out_dir=tmp_path / "run", resume=True)  # fmt: skip
    assert len(more) == 5 and not again.gates
    for name, t in gated.state_dict().items():  # one more epoch moved them, the cut did not
        assert again.state_dict()[name].shape == t.shape, name
    result = CliRunner().invoke(main, ["slim", str(tmp_path / "run" / "checkpoint.pt"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["flops"][1] / report["flops"][0] == pytest.approx(cg.flops_ratio(again), abs=0.02)
