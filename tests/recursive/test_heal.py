"""``heal``: block-local, teacher-forced hidden-state distillation of recursive and layer-dropped
students, driven by the layer-wise calibration engine."""

import pytest
import torch
from recursive_helpers import copy_of, tiny_with_biases
from test_drop import budget_dropping, make_identity

from effml.recursive import drop_layers, heal, recursify
from effml.testing import random_ids, tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_heal_lowers_every_block_loss_of_a_recursive_student(family):
    teacher = tiny_model(family)
    student = recursify(copy_of(teacher), num_loops=2, init="average", lora_rank=2, lora_init="svd")
    calib = random_ids(teacher, 8, 24, seed=1)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_" not in n}
    out, rep = heal(student, teacher, calib, epochs=4, lr=3e-3, batch_size=2)
    assert out is student and student.effml_report["heal"]["blocks"] == rep["blocks"]
    assert [b["source"] for b in rep["blocks"]] == [0, 1, 2, 3]
    assert [b["teacher_span"] for b in rep["blocks"]] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    for b in rep["blocks"]:
        assert b["after"] < 0.9 * b["before"], b
        assert b["steps"] == 4 * 4
    assert not rep["shared_trained"]
    # only the LoRA trained (tied norms and shared weights are left alone), and the tie survives
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    assert student.model.layers[0].self_attn.q_proj.weight is student.model.layers[2].self_attn.q_proj.weight
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_lr_zero_leaves_the_student_unchanged_and_the_teacher_too():
    teacher = tiny_with_biases("qwen2")
    student = recursify(copy_of(teacher), num_loops=2, init="average", lora_rank=3, tie_norms=False, lora_init="svd")
    s_state = {k: v.clone() for k, v in student.state_dict().items()}
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    _, rep = heal(student, teacher, random_ids(teacher, 4, 16, seed=1), epochs=2, lr=0.0)
    assert all(torch.equal(v, s_state[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, t_state[k]) for k, v in teacher.state_dict().items())
    for b in rep["blocks"]:
        assert b["after"] == pytest.approx(b["before"], rel=1e-6)
        assert b["trainable_params"] > 0  # LoRA and the per-depth norms


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_an_exact_student_starts_at_zero_loss(family):
    """Full-rank LoRA with untied norms reproduces every original layer: if heal feeds each depth
    the right teacher inputs and call arguments (Gemma's sliding/global masks), the loss is ~0."""
    teacher = tiny_model(family)
    student = recursify(copy_of(teacher), num_loops=2, init="average", lora_rank="full", tie_norms=False)
    _, rep = heal(student, teacher, random_ids(teacher, 2, 24, seed=1), lr=0.0)
    assert max(b["before"] for b in rep["blocks"]) < 1e-9


def test_heal_a_dropped_model_from_the_original():
    teacher = tiny_model("llama", num_hidden_layers=6)
    calib = random_ids(teacher, 8, 24, seed=1)
    student = drop_layers(copy_of(teacher), budget_dropping(teacher, 2), calib)
    kept = student.effml_report["drop_layers"]["kept"]
    _, rep = heal(student, teacher, calib, epochs=4, lr=3e-3, batch_size=2)
    assert [b["source"] for b in rep["blocks"]] == kept
    # each kept layer stands in for the dropped ones just before it (and the last for those after)
    spans = [b["teacher_span"] for b in rep["blocks"]]
    assert spans[0][0] == 0 and spans[-1][1] == 5 and all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:]))
    assert any(b["teacher_span"][0] < b["teacher_span"][1] for b in rep["blocks"])  # something was dropped
    for b in rep["blocks"]:
        if b["teacher_span"][0] < b["teacher_span"][1]:  # stands in for dropped layers too: something to heal
            assert b["after"] < 0.9 * b["before"], b
        else:  # an unchanged copy of its only layer: exact, and stays so
            assert b["before"] == b["after"] == 0.0, b
    assert rep["blocks"][0]["trainable_params"] == sum(p.numel() for p in student.model.layers[0].parameters())
    # without absorbing, each layer is fitted on its own source layer only
    _, own = heal(student, teacher, calib, lr=0.0, absorb_dropped=False)
    assert [b["teacher_span"] for b in own["blocks"]] == [[k, k] for k in kept]


def test_heal_after_drop_then_recursify_uses_the_composed_map():
    teacher = make_identity(tiny_model("llama", num_hidden_layers=6), 2, 5)
    calib = random_ids(teacher, 2, 16, seed=1)
    student = drop_layers(copy_of(teacher), budget_dropping(teacher, 2), calib)
    student = recursify(student, num_loops=2, init="average", lora_rank="full", tie_norms=False)
    _, rep = heal(student, teacher, calib, lr=0.0)
    assert [b["source"] for b in rep["blocks"]] == [0, 1, 3, 4]
    assert max(b["before"] for b in rep["blocks"]) < 1e-9  # exact: only identity blocks were dropped


def test_training_shared_weights_reports_final_losses():
    teacher = tiny_model("llama")
    student = recursify(copy_of(teacher), num_loops=2, init="average", lora_rank=2, lora_init="svd")
    _, rep = heal(student, teacher, random_ids(teacher, 4, 16, seed=1), epochs=2, lr=1e-3, train="all")
    assert rep["shared_trained"]
    assert all("final" in b for b in rep["blocks"])
    assert student.model.layers[0].self_attn.q_proj.weight is student.model.layers[2].self_attn.q_proj.weight


def test_heal_is_reproducible():
    teacher = tiny_model("llama")
    calib = random_ids(teacher, 4, 16, seed=1)
    runs = []
    for _ in range(2):
        student = recursify(copy_of(teacher), num_loops=2, init="average", lora_rank=2, lora_init="svd")
        heal(student, teacher, calib, epochs=2, lr=1e-3, seed=3)
        runs.append(student.state_dict())
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())


def test_bad_inputs_are_clear_errors():
    teacher = tiny_model("llama")
    calib = random_ids(teacher, 2, 16)
    student = recursify(copy_of(teacher), num_loops=2, init="average", lora_rank=2, lora_init="svd")
    with pytest.raises(ValueError, match="same model"):
        heal(student, student, calib)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        heal(student, teacher, calib, epochs=0)
    with pytest.raises(ValueError, match="lr must be a number >= 0"):
        heal(student, teacher, calib, lr=-1.0)
    with pytest.raises(ValueError, match="unknown train='everything'"):
        heal(student, teacher, calib, train="everything")
    with pytest.raises(ValueError, match="come from a 4-layer model.*teacher has 6 layers"):
        heal(student, tiny_model("llama", num_hidden_layers=6), calib)
    with pytest.raises(ValueError, match="strictly increasing"):
        heal(student, teacher, calib, layer_map=[0, 2, 1, 3])
    with pytest.raises(ValueError, match="one teacher layer per student layer"):
        heal(student, teacher, calib, layer_map=[0, 1])
    pure = recursify(copy_of(teacher), num_loops=2)
    with pytest.raises(ValueError, match="nothing to train.*train='all'"):
        heal(pure, teacher, calib)
    with pytest.raises(ValueError, match="calib"):
        heal(student, teacher, torch.rand(2, 16))
