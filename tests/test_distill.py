"""--teacher: the distillation loss against the textbook formulas, a student trained from a teacher of another
size and normalisation, what a run reports of it, and what it refuses."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import TINY, error, events, killed_and_resumed, same, train
from vitfood.distill import Teacher

STUDENT = ["--image-size", "32", "--max-steps", 20, "--eval-steps", 10, "--save-steps", 10]


def _teacher(mode, multi, alpha=0.3, temperature=3.0):
    """A Teacher's loss alone (no model behind it)."""
    t = Teacher.__new__(Teacher)
    t.mode, t.multi, t.alpha, t.temperature = mode, multi, alpha, temperature
    return t


def test_the_soft_and_hard_losses_are_the_textbook_ones():
    torch.manual_seed(0)
    s, t, labels = torch.randn(6, 5), torch.randn(6, 5) * 2, torch.randint(0, 5, (6,))
    hard = F.cross_entropy(s, labels, reduction="sum")
    # Hinton et al.: T^2 x KL(p_teacher || p_student), the distributions at temperature T; summed over the batch
    p, q = torch.softmax(t / 3, -1), torch.softmax(s / 3, -1)
    kl = (p * (p.log() - q.log())).sum() * 9
    loss, (soft, h) = _teacher("soft", False).loss(s, t, hard)
    assert torch.allclose(soft, kl, atol=1e-5) and torch.equal(h, hard)
    assert torch.allclose(loss, 0.7 * hard + 0.3 * kl, atol=1e-5)
    # DeiT's hard distillation: cross-entropy against the teacher's top class
    loss, (soft, _) = _teacher("hard", False).loss(s, t, hard)
    assert torch.allclose(soft, F.cross_entropy(s, t.argmax(-1), reduction="sum"))
    # multi-label: the teacher's tempered sigmoid scores as the targets of a binary cross-entropy, mean over classes
    targets = torch.sigmoid(t / 3)
    bce = -(targets * F.logsigmoid(s / 3) + (1 - targets) * F.logsigmoid(-s / 3)).sum() / 5 * 9
    assert torch.allclose(_teacher("soft", True).loss(s, t, hard)[1][0], bce, atol=1e-4)
    # the gradient of the soft term at T: (q - p) x T / batch-sum, as the textbook derivation gives
    s.requires_grad_(True)
    _teacher("soft", False, alpha=1.0).loss(s, t, torch.zeros(()))[0].backward()
    assert torch.allclose(s.grad, (q - p) * 3, atol=1e-5)


@pytest.fixture(scope="module")
def distilled(tiny_run, tmp_path_factory):
    """A vit-micro student at 32 px distilled from the tiny run's model (64 px): (teacher, student run, results)."""
    teacher, _ = tiny_run
    out = tmp_path_factory.mktemp("distill") / "student"
    return teacher, out, train(*STUDENT, "--teacher", teacher / "model", "--output-dir", out)


def test_a_student_distilled_from_a_teacher_reports_it(distilled):
    teacher, out, results = distilled
    assert results["teacher"] == str(teacher / "model") and 0 <= results["eval_agreement"] <= 1
    assert 0 <= results["teacher_eval_accuracy"] <= 1
    ea = events(out)
    soft = [e.value for e in ea.Scalars("distill/soft_loss")]
    assert len(soft) == 4 and all(v > 0 for v in soft) and ea.Scalars("distill/hard_loss")
    assert [e.step for e in ea.Scalars("distill/agreement")] == [10, 20]
    assert ea.Scalars("distill/agreement")[-1].value == pytest.approx(results["eval_agreement"])
    assert ea.Scalars("distill/teacher_top1")[-1].value == pytest.approx(results["teacher_eval_accuracy"])
    assert f"distilled from `{teacher / 'model'}`" in (out / "model" / "README.md").read_text()
    assert json.loads((out / "train_config.json").read_text())["teacher"] == str(teacher / "model")


def test_a_teacher_of_other_classes_or_another_teacher_on_resume_is_one_line(distilled, tmp_path, capsys):
    teacher, out, _ = distilled
    line = error(capsys, *STUDENT, "--synthetic-classes", "3", "--teacher", teacher / "model",
                 "--output-dir", tmp_path / "three")
    assert "--teacher" in line and "4 labels" in line and "3 classes" in line
    assert not (tmp_path / "three" / "checkpoint-10").exists()
    assert "no such folder" in error(capsys, *STUDENT, "--teacher", tmp_path / "nowhere", "--output-dir", tmp_path / "x")
    # the same path holding other weights: refused on resume, before anything of the run changes
    swapped = tmp_path / "teacher"
    shutil.copytree(teacher / "model", swapped)
    part = tmp_path / "part"
    train(*STUDENT[:2], "--max-steps", 20, "--eval-steps", 10, "--save-steps", 10, "--teacher", swapped,
          "--output-dir", part)
    shutil.rmtree(part / "model")
    (part / "all_results.json").unlink()
    shutil.rmtree(swapped)
    shutil.copytree(out / "model", swapped)  # the student's own model/: other weights, the same classes
    line = error(capsys, *STUDENT, "--teacher", swapped, "--output-dir", part, "--resume", "auto")
    assert "is not the teacher the run was trained with" in line and "SHA-256" in line


def test_a_distilled_run_killed_and_resumed_ends_bit_identical(tiny_run, tmp_path):
    teacher, _ = tiny_run
    ref, killed = killed_and_resumed(tmp_path, "--image-size", "32", "--teacher", teacher / "model",
                                     "--distill", "hard", "--distill-alpha", "0.7")
    assert same(load_file(killed / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors"))
