"""Tracing and the shape record: what a wrong example input is told."""

import pytest
import torch

import consensus_gates as cg
from consensus_gates.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float64, torch.float16])
def test_a_wrong_dtype_is_named_as_such(dtype):
    x = torch.zeros(2, 3, 32, 32, dtype=dtype)
    with pytest.raises(InputError) as e:
        cg.insert_gates(cg.create_model("resnet20"), x)
    message = str(e.value)
    assert f"has dtype {dtype}, but its first layer 'conv1' (Conv2d) has torch.float32" in message
    assert "pass torch.float32 inputs" in message
    assert "got (2, 3, 32, 32)" not in message  # the shape was right


def test_a_wrong_shape_is_still_told_as_a_shape():
    with pytest.raises(InputError, match=r"got \(2, 1, 32, 32\), expected \(N, 3, H, W\)"):
        cg.insert_gates(cg.create_model("resnet20"), torch.randn(2, 1, 32, 32))


def test_a_model_in_float64_takes_float64_inputs():
    model = cg.create_model("resnet20").double()
    gated = cg.insert_gates(model, torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert next(gated.parameters()).dtype == torch.float64
