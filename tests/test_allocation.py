import pytest
import torch

from optimum_moeq.allocation import (
    Allocation,
    LayerSignals,
    allocate_layers,
    assign_bits,
    combined_rerank,
    level_counts,
    max_neuron_variance,
    rank_by_maxvar,
    rank_by_router,
    router_norm_change,
)


def test_router_norm_change_uses_the_chosen_row_norms():
    directions = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    norms = torch.tensor([2.0, 0.5, 1.0, 3.0])
    reference = directions * 1.5
    assert torch.allclose(router_norm_change(directions * norms[:, None]), norms.double(), atol=1e-6)
    assert torch.allclose(router_norm_change(directions * norms[:, None], reference), norms.double() - 1.5, atol=1e-6)


def test_reference_router_must_match_in_shape():
    with pytest.raises(ValueError, match=r"reference router shape \(3, 16\) does not match the router's \(4, 16\)"):
        router_norm_change(torch.randn(4, 16), torch.randn(3, 16))


def test_maxvar_finds_the_one_high_variance_neuron():
    weight = torch.randn(32, 64) * 0.1
    weight[9] = torch.randn(64) * 5.0
    expected = weight[9].double().var().item()  # sample variance of the loud neuron
    assert max_neuron_variance(weight) == pytest.approx(expected, rel=1e-6)


def test_rankings():
    change = [0.5, 0.1, 0.9, 0.3]
    assert rank_by_router(change) == [1, 3, 0, 2]
    assert rank_by_maxvar([1.0, 4.0, 2.0, 3.0]) == [1, 3, 2, 0]


def test_combined_rerank_moves_a_loud_expert_to_the_front():
    router_order = [1, 3, 0, 2]
    assert combined_rerank(router_order, [1.0, 1.0, 10.0, 1.0], zeta=3.0) == [2, 1, 3, 0]
    # not loud enough relative to zeta: the router order stands
    assert combined_rerank(router_order, [1.0, 1.0, 10.0, 1.0], zeta=20.0) == router_order
    # a move only happens forward, to the first expert it dominates by zeta
    assert combined_rerank(router_order, [4.0, 1.0, 2.0, 1.0], zeta=3.0) == [0, 1, 3, 2]


@pytest.mark.parametrize(
    ("num_experts", "avg_bits", "expected"),
    [(8, 2.5, [4, 4]), (8, 2.0, [0, 8]), (8, 3.0, [8, 0]), (4, 2.125, [0, 4]), (4, 2.375, [2, 2])],
)
def test_two_level_counts_round_half_to_even(num_experts, avg_bits, expected):
    assert level_counts(num_experts, avg_bits, (2, 3)) == expected


@pytest.mark.parametrize(
    ("avg_bits", "low_mid_high"),
    [(2.0, (2, 4, 2)), (2.25, (2, 2, 4)), (2.5, (2, 0, 6)), (1.5, (4, 4, 0)), (1.0, (8, 0, 0)), (3.0, (0, 0, 8))],
)
def test_three_level_policy_matches_the_design_examples(avg_bits, low_mid_high):
    n_hi, n_mid, n_lo = level_counts(8, avg_bits, (1, 2, 3))
    assert (n_lo, n_mid, n_hi) == low_mid_high


def test_avg_bits_outside_the_levels_is_an_error_not_clamped():
    with pytest.raises(ValueError, match=r"avg_bits=3.5 is outside the bit levels \(1, 2, 3\)"):
        level_counts(8, 3.5, (1, 2, 3))


def test_assign_bits_follows_the_order():
    order = [5, 2, 7, 0, 1, 3, 4, 6]
    assert assign_bits(order, 2.5, (2, 3)) == [3, 2, 3, 2, 2, 3, 2, 3]
    bits = assign_bits(order, 2.0, (1, 2, 3))
    assert [bits[e] for e in order] == [3, 3, 2, 2, 2, 2, 1, 1]


def test_allocation_prints_a_table_and_round_trips_through_json():
    signals = {
        f"model.layers.{i}.mlp.experts": LayerSignals([0.5, 0.1, 0.9, 0.3], [1.0, 1.0, 10.0, 1.0]) for i in range(2)
    }
    allocation = allocate_layers(signals, 2.5, (2, 3), ranking="combined", zeta=3.0)
    assert allocation.bits["model.layers.0.mlp.experts"] == [2, 3, 3, 2]
    assert allocation.average_bits == 2.5
    again = Allocation.from_json(allocation.to_json())
    assert again == allocation
    table = str(allocation)
    assert "model.layers.1.mlp.experts |  2  3  3  2 | 2.50" in table
    assert "average bits per expert weight: 2.5000 (4 at 3 bits, 4 at 2 bits)" in table


def test_allocation_refuses_bits_outside_1_to_8():
    with pytest.raises(ValueError, match=r"allocation\['m'\]\[1\]: bits=9 is not supported"):
        Allocation(bits={"m": [2, 9]})


def test_maxvar_stays_exact_when_the_mean_dominates():
    weight = torch.randn(16, 256, dtype=torch.float64) * 1e-3 + 5.0  # one-pass variance would cancel
    weight[3] += torch.randn(256, dtype=torch.float64) * 1e-2
    expected = weight.var(dim=-1).max().item()
    assert max_neuron_variance(weight.float()) == pytest.approx(expected, rel=1e-4)
    assert max_neuron_variance(weight.to(torch.bfloat16)) > 0


def test_an_average_the_expert_count_cannot_reach_is_warned_about(caplog):
    signals = {"layer": LayerSignals([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0])}
    with caplog.at_level("WARNING"):
        allocation = allocate_layers(signals, 2.375, (2, 3))  # 1.5 experts at 3 bits: rounds to 2
    assert allocation.bits["layer"].count(3) == 2
    assert "avg_bits=2.375 is not reachable with 4 experts per layer at levels [2, 3]" in caplog.text
    assert "layer: 2.5000 bits" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        allocate_layers(signals, 2.5, (2, 3))
    assert caplog.text == ""
