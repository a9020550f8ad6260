"""GateConfig refuses values it cannot build gates from, naming the field."""

import math

import pytest

import consensus_gates as cg


@pytest.mark.parametrize(
    "kwargs,message",
    [({"tau": math.nan}, "tau must be a finite number, got nan"),
     ({"tau": math.inf}, "tau must be a finite number"),
     ({"init_bias": "0.5"}, "init_bias must be a finite number, got '0.5'"),
     ({"momentum": math.nan}, "momentum must be a finite number"),
     ({"hidden": 16.0}, "hidden must be an integer, got 16.0"),
     ({"fc_layers": True}, "fc_layers must be an integer, got True"),
     ({"exclude": [1]}, "exclude takes name patterns"),
     ({"head": "softmax"}, "head must be one of"),
     ({"position": "inside"}, "position must be one of"),
     ({"bernoulli_momentum": 0}, "bernoulli_momentum must be in"),
     ({"tau": 0}, "tau must be > 0")],  # fmt: skip
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(v),
)
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match="GateConfig." + message.replace("(", r"\(")):
        cg.GateConfig(**kwargs)


def test_from_dict_round_trips_and_refuses_unknown_keys():
    config = cg.GateConfig(mode="both", exclude=("layer1.*",), momentum=None)
    assert cg.GateConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"GateConfig has no field \['temperature'\]"):
        cg.GateConfig.from_dict({**config.to_dict(), "temperature": 2})
