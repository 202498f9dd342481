"""Bad input gives clear errors."""

import pytest

from effml.recursive import RecursiveConfig, recursify
from effml.testing import tiny_model


def test_num_loops_not_dividing_names_the_strategies():
    with pytest.raises(ValueError, match=r"num_loops=3 does not divide.*allowed num_loops for 'cycle': \[1, 2, 4\]"):
        recursify(tiny_model("llama"), num_loops=3)
    with pytest.raises(ValueError, match="middle_cycle"):
        recursify(tiny_model("llama"), num_loops=3, strategy="sequence")


@pytest.mark.parametrize("kwargs,match", [
    (dict(lora_rank=-1), "must be >= 0"),
    (dict(lora_rank={"q": -2}), "must be >= 0"),
    (dict(lora_rank=1.5), "non-negative int or 'full'"),
    (dict(lora_targets=("q", "qkv")), r"unknown lora target\(s\) \['qkv'\]"),
    (dict(lora_rank={"attn": 4}), "unknown target"),
    (dict(lora_rank={"q": 4}, lora_targets=("k",)), "not in lora_targets"),
    (dict(strategy="zigzag"), r"unknown strategy 'zigzag'; choose one of \('cycle', 'sequence', 'middle_cycle'\)"),
    (dict(init="random"), "unknown init 'random'"),
    (dict(lora_init="pissa"), "unknown lora_init"),
    (dict(tie_norms="yes"), "tie_norms must be one of"),
    (dict(num_loops=0), "positive int"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecursiveConfig(**kwargs)


def test_recursify_twice_is_refused():
    model = recursify(tiny_model("llama"), num_loops=2)
    with pytest.raises(ValueError, match="already recursive"):
        recursify(model, num_loops=2)
