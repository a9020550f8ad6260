"""`GatesTrainer`: a gated Hugging Face model fine-tuned by `transformers.Trainer`, with its
checkpoints, resume, gradient accumulation, logs and a 2-process torchrun run."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import consensus_gates as cg
from consensus_gates.training.hf_trainer import GATE_OPTIONS, MODEL_FILE, STATE_FILE

from hf_models import tiny

GatesTrainer = cg.GatesTrainer
HERE = Path(__file__).resolve().parent


def _data(rows: int = 64, length: int = 16, seed: int = 0, same: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (rows, length), generator=g)
    if same:
        ids = ids[:1].expand(rows, length).clone()
    return [{"input_ids": r, "labels": r} for r in ids]


def _gated():
    model = tiny("llama").train()
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(5))
    return cg.insert_gates(model, {"input_ids": ids})


def _args(out: Path, **kw) -> transformers.TrainingArguments:
    defaults = dict(max_steps=12, per_device_train_batch_size=8, learning_rate=1e-3,
                    logging_steps=3, save_strategy="no", use_cpu=True, report_to=[],
                    disable_tqdm=True, seed=0)  # fmt: skip
    return transformers.TrainingArguments(str(out), **{**defaults, **kw})


def _trainer(out: Path, model=None, data=None, gate_options=None, eval_dataset=None, **kw
             ) -> GatesTrainer:  # fmt: skip
    options = (
        gate_options
        if gate_options is not None
        else dict(target=0.6, polar_schedule="constant", lambda_polar=0.5)
    )
    return GatesTrainer(model=model if model is not None else _gated(), args=_args(out, **kw),
                        train_dataset=data if data is not None else _data(),
                        eval_dataset=eval_dataset, **options)  # fmt: skip


def test_gate_options_have_train_configs_names_and_defaults():
    names = {f.name for f in dataclasses.fields(cg.TrainConfig)}
    assert set(GATE_OPTIONS) <= names
    assert "epochs" not in GATE_OPTIONS and "lr" not in GATE_OPTIONS  # TrainingArguments'
    trainer = _trainer(Path("unused"), gate_options={})
    assert trainer.gate_config == cg.TrainConfig(progress=False)


def test_fine_tunes_to_the_target_logs_the_gates_and_saves_our_format(tmp_path, caplog):
    trainer = _trainer(tmp_path)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 4
    for key in ("r_polar", "open_ratio", "flops_ratio", "lambda_polar", "lambda_act"):
        assert all(isinstance(r[key], float) for r in logs), key
    # the controller raised λ_act, then the projection pinned the gates onto the target
    assert logs[0]["lambda_act"] > 0 and logs[-1]["lambda_act"] == 0.0
    assert trainer.gates.projected
    assert abs(cg.flops_ratio(trainer.model) - 0.6) < 0.1
    assert all(g.fixed is not None for g in trainer.model.gates.values())
    with caplog.at_level("WARNING"):
        trainer.save_model(str(tmp_path / "final"))
    assert "consensus_gates.load" in caplog.text and MODEL_FILE in caplog.text
    loaded = cg.load(tmp_path / "final" / MODEL_FILE)
    x = torch.randint(3, 100, (2, 16))
    trainer.model.eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, trainer.model(input_ids=x).logits)
    slim = cg.materialize(loaded)
    torch.testing.assert_close(slim(input_ids=x).logits, loaded(input_ids=x).logits,
                               rtol=1e-4, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("stop", [2, 6], ids=["before-projection", "after-projection"])
def test_resume_from_a_checkpoint_continues_exactly(tmp_path, stop):
    """12 steps in one go, against `stop` steps, a checkpoint, and a new trainer that
    resumes: the same weights, λ_act, controller and decisions."""
    whole = _trainer(tmp_path / "whole")
    whole.train()
    first = _trainer(tmp_path / "parts", save_strategy="steps", save_steps=stop)
    first.train()  # it goes on to 12 after the checkpoint; the checkpoint is what matters
    folder = tmp_path / "parts" / f"checkpoint-{stop}"
    assert sorted(p.name for p in folder.iterdir()) >= [MODEL_FILE, STATE_FILE]
    assert not (folder / "model.safetensors").exists()
    state = json.loads((folder / STATE_FILE).read_text())
    assert state["projected"] is (stop > 3)  # the ramp is a quarter of the 12 steps
    resumed = _trainer(tmp_path / "parts")
    resumed.train(resume_from_checkpoint=str(folder))
    assert resumed.state.global_step == 12
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    mine, theirs = resumed.gates.state_dict(), whole.gates.state_dict()
    assert mine.pop("controller") == pytest.approx(theirs.pop("controller"))
    assert mine == pytest.approx(theirs)
    assert cg.consensus(resumed.model).decisions == cg.consensus(whole.model).decisions


PROGRESSIVE = dict(target=0.6, polar_schedule="constant", lambda_polar=0.5, progressive=True,
                   settle_steps=2)


def test_progressive_cuts_gates_out_of_the_model_it_fine_tunes(tmp_path):
    """Settled gates, then at the projection every gate left, leave the model while the
    Trainer trains it: fewer parameters, the optimizer over exactly those left, and a cut
    that is already the consensus."""
    trainer = _trainer(tmp_path, gate_options=PROGRESSIVE)
    before = sum(p.numel() for p in trainer.model.parameters())
    trainer.train()
    model = trainer.model
    assert trainer.gates.projected and not model.gates  # every gate was cut out
    cut = cg.consensus(model).decisions
    assert len(cut) == 6 and not all(cut.values())
    after = sum(p.numel() for p in model.parameters())
    assert after < before
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert abs(cg.flops_ratio(model) - 0.6) < 0.1
    slim = cg.materialize(model)
    x = torch.randint(3, 100, (2, 16))
    model.eval()
    torch.testing.assert_close(slim(input_ids=x).logits, model(input_ids=x).logits,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert sum(p.numel() for p in slim.parameters()) == after


def test_progressive_resume_continues_exactly_after_the_cut(tmp_path):
    whole = _trainer(tmp_path / "whole", gate_options=PROGRESSIVE)
    whole.train()
    first = _trainer(tmp_path / "parts", gate_options=PROGRESSIVE, save_strategy="steps",
                     save_steps=6)  # fmt: skip
    first.train()
    folder = tmp_path / "parts" / "checkpoint-6"
    assert cg.load(folder / MODEL_FILE).spec["cut"]  # cut before the checkpoint
    resumed = _trainer(tmp_path / "parts", gate_options=PROGRESSIVE)
    resumed.train(resume_from_checkpoint=str(folder))
    assert resumed.model.state_dict().keys() == whole.model.state_dict().keys()
    for name, a in whole.model.state_dict().items():
        torch.testing.assert_close(a, resumed.model.state_dict()[name], rtol=1e-5, atol=1e-6,
                                   msg=name)  # fmt: skip
    assert cg.consensus(resumed.model).decisions == cg.consensus(whole.model).decisions


def test_resume_true_finds_the_last_checkpoint(tmp_path):
    _trainer(tmp_path, save_strategy="steps", save_steps=4, max_steps=8).train()
    again = _trainer(tmp_path, save_strategy="steps", save_steps=4, max_steps=12)
    again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 12 and (tmp_path / "checkpoint-12" / MODEL_FILE).is_file()


@pytest.mark.parametrize("scaled", [True, False], ids=["token-count", "per-batch-mean"])
def test_gradient_accumulation_gives_the_gradient_of_one_batch(tmp_path, scaled):
    """Two micro-batches of the same 4 rows against one batch of them: one SGD step lands on
    the same weights, whichever way the Trainer scales the loss. Unscaled gate terms would
    count twice."""
    data = _data(rows=8, same=True)
    options = dict(lambda_polar=0.5, lambda_act=0.8, polar_schedule="constant")
    weights = []
    for accumulate in (1, 2):
        trainer = _trainer(tmp_path / str(accumulate), data=data, gate_options=options,
                           max_steps=1, per_device_train_batch_size=4, optim="sgd",
                           learning_rate=0.5, gradient_accumulation_steps=accumulate)  # fmt: skip
        trainer.model_accepts_loss_kwargs = scaled
        trainer.train()
        # parameters only: the gates' running statistics count micro-batches
        weights.append({n: p.detach() for n, p in trainer.model.named_parameters()})
    moved = 0
    start = dict(_gated().named_parameters())
    for name, a in weights[0].items():
        torch.testing.assert_close(a, weights[1][name], rtol=1e-4, atol=1e-6, msg=name)
        moved += "gate" in name and not torch.equal(a, start[name])
    assert moved > 0  # the gate heads did learn from the gate terms


def test_evaluation_reports_the_models_own_loss(tmp_path):
    trainer = _trainer(tmp_path, gate_options=dict(lambda_act=5.0, polar_schedule="constant"))
    trainer.model.eval()
    batch = trainer.data_collator(_data(rows=4))
    own = trainer.model(**batch).loss
    metrics = trainer.evaluate(_data(rows=4))
    assert metrics["eval_loss"] == pytest.approx(own.item(), rel=1e-5)


def test_load_best_model_at_end_loads_our_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, eval_strategy="steps", eval_steps=4, save_strategy="steps",
                       save_steps=4, load_best_model_at_end=True, max_steps=8,
                       eval_dataset=_data(rows=8, seed=3))  # fmt: skip
    trainer.train()
    best = cg.load(Path(trainer.state.best_model_checkpoint) / MODEL_FILE)
    for name, t in best.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], t, msg=name)


def test_refusals_are_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match="from insert_gates, got LlamaForCausalLM"):
        GatesTrainer(model=tiny("llama"), args=_args(tmp_path), train_dataset=_data())
    with pytest.raises(ValueError, match="set load_best_model_at_end=False, or progressive"):
        _trainer(tmp_path, gate_options=dict(progressive=True), load_best_model_at_end=True,
                 eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
                 eval_dataset=_data(rows=8))  # fmt: skip
    with pytest.raises(ValueError, match="target must be in"):
        _trainer(tmp_path, gate_options=dict(target=1.5))
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=False"):
        _trainer(tmp_path, ddp_find_unused_parameters=False)
    plain = transformers.Trainer(model=tiny("llama").train(), args=_args(tmp_path / "plain",
                                 save_strategy="steps", save_steps=2, max_steps=2),
                                 train_dataset=_data())  # fmt: skip
    plain.train()
    with pytest.raises(ValueError, match="is not a GatesTrainer checkpoint"):
        _trainer(tmp_path / "plain").train(
            resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2")
        )
    _trainer(tmp_path / "a", save_strategy="steps", save_steps=2, max_steps=2).train()
    other = cg.insert_gates(tiny("gpt2").train(), {"input_ids": torch.randint(3, 100, (2, 16))})
    with pytest.raises(cg.ModelFileError, match="holds another gated model"):
        _trainer(tmp_path / "a", model=other).train(
            resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2")
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = """
import json, os, sys
import torch, transformers
sys.path.insert(0, {tests!r})
import consensus_gates as cg
from test_hf_trainer import _data, _gated
torch.set_num_threads(1)
out = sys.argv[1]
args = transformers.TrainingArguments(out, max_steps=12, per_device_train_batch_size=4,
    learning_rate=1e-3, logging_steps=4, save_strategy="steps", save_steps=6, use_cpu=True,
    report_to=[], disable_tqdm=True, seed=0)
trainer = cg.GatesTrainer(model=_gated(), args=args, train_dataset=_data(),
                          target=0.6, polar_schedule="constant", lambda_polar=0.5)
trainer.train()
rank = int(os.environ["RANK"])
gates = trainer.model.gates
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"decisions": {{n: g.fixed for n, g in gates.items()}},
               "rates": {{n: g.running_open_rate.tolist() for n, g in gates.items()}},
               "world": int(os.environ["WORLD_SIZE"])}}, f)
"""


@pytest.mark.slow
def test_two_processes_under_torchrun_end_with_the_same_decisions(tmp_path):
    """torchrun --nproc_per_node 2 on gloo: both ranks make the same decisions from the
    global batch's statistics, and rank 0 writes the checkpoints."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(HERE)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(script), str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert all(d is not None for d in ranks[0]["decisions"].values())
    assert ranks[0]["rates"] == ranks[1]["rates"]
    assert (tmp_path / "out" / "checkpoint-12" / MODEL_FILE).is_file()
    assert cg.consensus(cg.load(tmp_path / "out" / "checkpoint-12" / MODEL_FILE)).decisions == {
        n: bool(d) for n, d in ranks[0]["decisions"].items()
    }


def test_the_trainer_is_documented_where_users_look():
    doc = inspect.getdoc(GatesTrainer)
    for option in GATE_OPTIONS:
        assert option in doc, option
