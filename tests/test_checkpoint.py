"""Training checkpoints: what a damaged or hand-made one is told."""

import json

import pytest
import torch
from click.testing import CliRunner

import consensus_gates as cg
from consensus_gates.cli import main
from consensus_gates.errors import ModelFileError
from consensus_gates.training.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)


@pytest.fixture
def checkpoint(tmp_path):
    gated = cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 3, 16, 16))
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, gated, epoch=1)
    return path


def _tampered(path, **changes):
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)
    return path


def test_a_checkpoint_round_trips(checkpoint):
    model = model_from_checkpoint(checkpoint)
    assert isinstance(model, cg.GatedModel) and len(model.gates) == 9


@pytest.mark.parametrize(
    "changes,message",
    [({"spec": "[" * 100_000 + "]" * 100_000}, "JSON nested too deeply"),
     ({"spec": "{not json"}, "corrupt model spec"),
     ({"spec": json.dumps({"format": "consensus-gates", "version": 1})}, "kind"),
     ({"spec": 5}, "incomplete checkpoint"),
     ({"version": "1"}, "no valid checkpoint version"),
     ({"version": 99}, "upgrade consensus-gates")],  # fmt: skip
    ids=["nested", "not json", "no kind", "spec not text", "version text", "newer"],
)
def test_a_damaged_checkpoint_is_a_model_file_error(checkpoint, changes, message):
    _tampered(checkpoint, **changes)
    with pytest.raises(ModelFileError, match=message):
        load_checkpoint(checkpoint)
    result = CliRunner().invoke(main, ["slim", str(checkpoint)])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output
