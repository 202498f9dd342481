"""Uptraining: the loss falls, schedules, checkpoint/resume, early exit."""

import json
import math

import pytest
import torch

from effml.recursive import UptrainConfig, recursify, uptrain
from effml.recursive.losses import kd_loss
from effml.recursive.uptrain import CHECKPOINT_META, batch_indices, exit_depths, lr_at
from effml.testing import random_ids, tiny_model


def student_teacher(strategy="cycle", rank=4):
    teacher = tiny_model("llama")
    student = recursify(tiny_model("llama"), num_loops=2, strategy=strategy, init="average", lora_rank=rank)
    return student, teacher


def test_distillation_lowers_the_kl_to_the_teacher():
    student, teacher = student_teacher()
    data = random_ids(teacher, 8, 16, seed=1)

    def kl(m):
        with torch.no_grad():
            return {"kl": kd_loss(m(input_ids=data).logits, teacher(input_ids=data).logits).item()}

    out = uptrain(student, teacher, data, steps=12, lr=3e-3, batch_size=4, eval_fn=kl, log_every=4)
    assert [e["step"] for e in out["evals"]] == [0, 12]
    assert out["evals"][1]["kl"] < 0.7 * out["evals"][0]["kl"]
    assert len(out["history"]) == 12 and not student.training
    # the tie survives training: both depths still hold one tensor
    assert student.model.layers[0].mlp.up_proj.weight is student.model.layers[2].mlp.up_proj.weight


def test_kd_loss_forward_kl_reference():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    p, q = t.softmax(-1), s.softmax(-1)
    ref = (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t, "forward_kl"), ref, atol=1e-6)
    assert torch.allclose(kd_loss(s, t, "reverse_kl"), (q * (q.log() - p.log())).sum(-1).mean(), atol=1e-6)


def test_cosine_schedule_with_warmup():
    cfg = UptrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    mid = 10 + (100 - 10 - 1) / 2
    assert lr_at(int(mid), cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))
    assert lr_at(99, cfg) == pytest.approx(1e-4)


def test_batches_depend_only_on_step_and_cover_the_data():
    first_epoch = [i for s in range(4) for i in batch_indices(s, 8, 2, seed=3)]
    assert sorted(first_epoch) == list(range(8))
    assert batch_indices(5, 8, 2, seed=3) == batch_indices(5, 8, 2, seed=3)
    # two processes see disjoint rows in one step
    a, b = batch_indices(0, 8, 2, 0, rank=0, world=2), batch_indices(0, 8, 2, 0, rank=1, world=2)
    assert not set(a) & set(b)


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    data = random_ids(tiny_model("llama"), 6, 12, seed=2)
    kw = dict(steps=6, lr=2e-3, batch_size=2, early_exit=True, seed=5)
    straight, teacher = student_teacher()
    uptrain(straight, teacher, data, **kw)
    cut, _ = student_teacher()
    uptrain(cut, teacher, data, checkpoint_dir=str(tmp_path), stop_at=3, **kw)
    meta = json.loads((tmp_path / CHECKPOINT_META).read_text())
    assert meta["step"] == 3 and sorted(p.name for p in tmp_path.iterdir()) == [
        "optimizer.safetensors", "state.json", "trainable.safetensors"]
    resumed, _ = student_teacher()  # a fresh process: same conversion, then resume
    out = uptrain(resumed, teacher, data, checkpoint_dir=str(tmp_path), resume=True, **kw)
    assert [h["step"] for h in out["history"]] == [1, 2, 3, 4, 5, 6]
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_early_exit_points_and_errors():
    student, teacher = student_teacher()
    assert exit_depths(student) == [1]  # 4 layers, 2 loops: loop 1 ends after depth 1
    seq, _ = student_teacher(strategy="sequence")
    data = random_ids(teacher, 2, 8)
    with pytest.raises(ValueError, match="early_exit needs strategy='cycle'"):
        uptrain(seq, teacher, data, steps=1, early_exit=True)
    with pytest.raises(ValueError, match="made by effml.recursify"):
        uptrain(tiny_model("llama"), teacher, data, steps=1, early_exit=True)
    out = uptrain(student, teacher, data, steps=2, batch_size=1, early_exit=True)
    assert all("early_exit" in h for h in out["history"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps must be a positive int"),
    (dict(steps=2, kd="js"), "unknown kd 'js'"),
    (dict(steps=2, kd_weight=0.0, ce_weight=0.0), "not both 0"),
    (dict(steps=2, checkpoint_every=1), "need checkpoint_dir"),
    (dict(steps=2, warmup_steps=5), "warmup_steps must be in"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UptrainConfig(**kwargs)


def test_bad_data():
    student, teacher = student_teacher()
    with pytest.raises(ValueError, match=r"\[n, seq_len\] LongTensor"):
        uptrain(student, teacher, torch.randn(2, 8), steps=1)
