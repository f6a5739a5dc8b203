import pytest
import torch
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
        (
            {"ranking": "random"},
            r"ranking='random' is not supported: allowed are \('combined', 'router', 'maxvar', 'measured'\)",
        ),
        ({"zeta": 0}, r"zeta=0 must be a finite number greater than 0"),
        ({"zeta": float("inf")}, r"zeta=inf must be a finite number"),  # config.json cannot hold inf
        ({"method": "awq"}, r"method='awq' is not supported: allowed are \('rtn', 'hqq', 'gptq'\)"),
        ({"allocation": {"m": []}}, r"allocation\['m'\]=\[\] must be a non-empty list"),
        ({"format_version": 3}, r"format_version=3 is not readable by this optimum-moeq \(it reads versions \[1, 2\]"),
        ({"integer_zeros": "yes"}, r"integer_zeros='yes' must be True, False or None"),
        ({"integer_zeros": True, "format_version": 1}, r"integer_zeros=True needs format_version 2"),
        ({"integer_zeros": True, "method": "hqq"}, r"method='hqq' optimises each zero point as a real number"),
        ({"damp_percent": "0.01"}, r"damp_percent='0.01' must be a number in \[0, 1\)"),
        ({"desc_act": "yes"}, r"desc_act='yes' must be True or False"),
        ({"dataset": 42}, r"dataset=42 is not calibration data: give a local text file, a non-empty list"),
        ({"dataset": []}, r"dataset=\[\] is not calibration data"),
        ({"modules_to_not_convert": "model.layers.0"}, r"modules_to_not_convert='model.layers.0' must be a list"),
        ({"quant_method": "gptq"}, r"quant_method='gptq': RouterNormConfig reads quant_method 'moeq' only"),
    ],
)
def test_bad_values_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterNormConfig(**kwargs)


def test_three_levels_and_defaults():
    config = RouterNormConfig(avg_bits=2.0, bit_levels=(1, 2, 3))
    assert config.bit_levels == [1, 2, 3]
    # method None: GPTQ where the family allows it, chosen when loading
    assert (config.group_size, config.ranking, config.zeta, config.method) == (128, "combined", 3.0, None)


@pytest.mark.parametrize(
    "kwargs, integer_zeros, version",
    [
        ({"method": "gptq"}, True, 2),
        ({"method": "rtn"}, True, 2),
        ({"method": "hqq"}, False, 1),  # HQQ's zero points are real numbers
        ({"method": "rtn", "integer_zeros": False}, False, 1),  # float16 zeros: readable by format-1 readers
        ({"method": "rtn", "format_version": 1}, False, 1),  # a config.json saved before version 2
        ({"method": "gptq", "format_version": 2, "integer_zeros": True}, True, 2),
    ],
)
def test_the_zero_format_follows_the_method_unless_given(kwargs, integer_zeros, version):
    config = RouterNormConfig(**kwargs)
    assert (config.integer_zeros, config.format_version) == (integer_zeros, version)
    again = AutoQuantizationConfig.from_dict(config.to_dict())
    assert (again.integer_zeros, again.format_version) == (integer_zeros, version)


def test_with_the_method_left_to_the_family_the_zero_format_is_settled_on_load():
    config = RouterNormConfig()
    assert (config.integer_zeros, config.format_version) == (None, None)
    config.method = "gptq"
    config.settle_zero_format()
    assert (config.integer_zeros, config.format_version) == (True, 2)


def test_round_trips_through_transformers_config_dispatch():
    config = RouterNormConfig(method="rtn", avg_bits=2.25, allocation={"model.layers.0.mlp.experts": [3, 2, 2, 2]})
    again = AutoQuantizationConfig.from_dict(config.to_dict())
    assert isinstance(again, RouterNormConfig)
    assert again.to_dict() == config.to_dict()


def test_a_misspelt_argument_is_refused_with_the_likely_name():
    with pytest.raises(
        TypeError, match=r"unknown arguments 'avgbits' \(did you mean 'avg_bits'\?\); it takes avg_bits,"
    ):
        RouterNormConfig(method="rtn", avgbits=3)


def test_numpy_and_torch_numbers_are_taken_as_python_numbers():
    import numpy as np
    import torch

    allocation = {"model.layers.0.mlp.experts": np.array([2, 3]), "model.layers.1.mlp.experts": torch.tensor([3, 2])}
    config = RouterNormConfig(
        method="rtn",
        avg_bits=np.float32(2.5),
        bit_levels=[np.int64(2), np.int64(3)],
        group_size=torch.tensor(64),
        allocation=allocation,
    )
    assert (config.avg_bits, config.bit_levels, config.group_size) == (2.5, [2, 3], 64)
    assert type(config.avg_bits) is float and type(config.group_size) is int
    assert config.allocation == {"model.layers.0.mlp.experts": [2, 3], "model.layers.1.mlp.experts": [3, 2]}
    assert all(type(b) is int for bits in config.allocation.values() for b in bits)
    assert RouterNormConfig(method="rtn", avg_bits=torch.tensor(2.5), zeta=torch.tensor(3.0)).avg_bits == 2.5
    config.to_json_string()  # serialisable


@pytest.mark.parametrize(
    "dataset", [[1, 2, 3], [[1, 2], [3]], ["some text"], "calibration.txt", [torch.tensor([1, 2]), torch.tensor([3])]]
)
def test_calibration_data_of_each_kind_is_accepted(dataset):
    assert RouterNormConfig(method="gptq", dataset=dataset).dataset == dataset


def test_a_dataset_without_gptq_is_warned_about_and_not_saved(caplog):
    with caplog.at_level("WARNING", logger="optimum_moeq.config"):
        config = RouterNormConfig(dataset="calibration.txt", method="hqq")
    assert "method='hqq' does not use it" in caplog.text
    assert config.to_dict()["dataset"] is None
    assert RouterNormConfig(dataset="calibration.txt", method="gptq").to_dict()["dataset"] == "calibration.txt"
