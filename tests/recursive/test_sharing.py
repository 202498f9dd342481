import pytest

from effml.recursive import share_groups, stepwise_layers
from effml.recursive.sharing import init_sources


def test_cycle_and_sequence_groups():
    assert share_groups(6, 2, "cycle") == [[0, 3], [1, 4], [2, 5]]
    assert share_groups(6, 2, "sequence") == [[0, 1], [2, 3], [4, 5]]
    assert share_groups(6, 3, "cycle") == [[0, 2, 4], [1, 3, 5]]
    # first and last stay unique, the middle 4 layers cycle
    assert share_groups(6, 2, "middle_cycle") == [[0], [1, 3], [2, 4], [5]]


def test_every_depth_used_once():
    for strategy in ("cycle", "sequence", "middle_cycle"):
        groups = share_groups(32, 2, strategy)
        assert sorted(d for g in groups for d in g) == list(range(32))


def test_stepwise_matches_reference_examples():
    # reference note: 6 -> 3 gives [0, 2, 5]; Gemma 18 -> 9 and 18 -> 6; TinyLlama 22 -> 11
    assert stepwise_layers(0, 5, 3) == [0, 2, 5]
    assert stepwise_layers(0, 17, 9) == [0, 2, 4, 6, 8, 11, 13, 15, 17]
    assert stepwise_layers(0, 17, 6) == [0, 3, 7, 10, 14, 17]
    assert stepwise_layers(0, 21, 11) == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21]


def test_init_sources():
    groups = share_groups(6, 2, "cycle")
    assert init_sources(groups, "stepwise") == [[0], [2], [5]]
    assert init_sources(groups, "lower") == [[0], [1], [2]]
    assert init_sources(groups, "average") == [[0, 3], [1, 4], [2, 5]]
    mc = share_groups(6, 2, "middle_cycle")
    assert init_sources(mc, "lower") == [[0], [1], [2], [5]]
    assert init_sources(mc, "stepwise") == [[0], [1], [4], [5]]


@pytest.mark.parametrize("strategy", ["cycle", "sequence"])
def test_num_loops_must_divide(strategy):
    with pytest.raises(ValueError, match=r"does not divide.*allowed num_loops.*\[1, 2, 3, 5, 6, 10, 15, 30\]"):
        share_groups(30, 4, strategy)


def test_middle_cycle_divides_inner_layers():
    # 30 layers: 5 loops divide 30 but not the 28 middle layers
    with pytest.raises(ValueError, match=r"middle_cycle.*allowed num_loops.*\[1, 2, 4, 7, 14, 28\]"):
        share_groups(30, 5, "middle_cycle")
    assert len(share_groups(30, 7, "middle_cycle")) == 2 + 4  # 28 inner layers / 7 loops
