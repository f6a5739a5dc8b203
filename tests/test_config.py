import pytest
from transformers.quantizers.auto import AutoQuantizationConfig

from optimum_moeq import RouterNormConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"avg_bits": 5.0}, r"avg_bits=5.0 is outside the bit levels \(2, 3\)"),
        ({"avg_bits": 1.5}, r"avg_bits=1.5 is outside the bit levels \(2, 3\)"),
        ({"avg_bits": "2.5"}, r"avg_bits='2.5' must be a number"),
        ({"bit_levels": (3, 2)}, r"bit_levels=\(3, 2\) must be strictly ascending"),
        ({"bit_levels": (1, 2, 4), "avg_bits": 2}, r"bit_levels=\(1, 2, 4\): three levels must be equally spaced"),
        ({"bit_levels": (2,)}, r"bit_levels=\(2,\) must have 2 or 3 levels"),
        ({"bit_levels": (2, 9)}, r"bits=9 is not supported: allowed are integers 1 to 8"),
        ({"bit_levels": "23"}, r"bit_levels='23' must be a list or tuple"),
        ({"group_size": 0}, r"group_size=0 must be a positive integer"),
        ({"ranking": "random"}, r"ranking='random' is not supported: allowed are \('combined', 'router', 'maxvar'\)"),
        ({"zeta": 0}, r"zeta=0 must be a number greater than 0"),
        ({"method": "awq"}, r"method='awq' is not supported: allowed are \('rtn', 'hqq', 'gptq'\)"),
        ({"allocation": {"m": []}}, r"allocation\['m'\]=\[\] must be a non-empty list"),
        ({"format_version": 2}, r"format_version=2 is not readable"),
    ],
)
def test_bad_values_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterNormConfig(**kwargs)


def test_three_levels_and_defaults():
    config = RouterNormConfig(avg_bits=2.0, bit_levels=(1, 2, 3))
    assert config.bit_levels == [1, 2, 3]
    assert (config.group_size, config.ranking, config.zeta, config.method) == (128, "combined", 3.0, "rtn")


def test_round_trips_through_transformers_config_dispatch():
    config = RouterNormConfig(avg_bits=2.25, allocation={"model.layers.0.mlp.experts": [3, 2, 2, 2]})
    again = AutoQuantizationConfig.from_dict(config.to_dict())
    assert isinstance(again, RouterNormConfig)
    assert again.to_dict() == config.to_dict()
