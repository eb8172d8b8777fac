"""--teacher: the distillation loss against the textbook formulas, a student trained from a teacher of another
size and normalisation, what a run reports of it, and what it refuses."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import error, events, killed_and_resumed, same, train
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


def test_other_families_precisions_and_multi_label_distil(tiny_run, tmp_path, capsys):
    """A ResNet student of a ViT teacher in bf16; a multi-label ViT student of a multi-label teacher, with mixup, in
    bf16 and in fp32."""
    import transformers as t
    teacher, _ = tiny_run
    resnet = tmp_path / "resnet"
    t.ResNetForImageClassification(t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(resnet)
    t.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(resnet)
    r = train("--model", resnet, "--teacher", teacher / "model", "--precision", "bf16", "--max-steps", 10,
              "--eval-steps", 10, "--save-steps", 10, "--output-dir", tmp_path / "resnet-run")
    assert 0 <= r["eval_agreement"] <= 1 and r["teacher"] == str(teacher / "model")
    # and a ResNet teacher (BatchNorm's step counter, a 0-d integer, among its weights) of a ViT student
    r = train(*STUDENT, "--teacher", tmp_path / "resnet-run" / "model", "--output-dir", tmp_path / "from-resnet")
    assert r["teacher"] == str(tmp_path / "resnet-run" / "model")
    plates = ["--synthetic-dishes", "3", "--max-steps", 10, "--eval-steps", 10, "--save-steps", 10]
    train(*plates, "--output-dir", tmp_path / "multi-teacher")
    for precision in ("bf16", "fp32"):
        r = train(*plates, "--image-size", 32, "--teacher", tmp_path / "multi-teacher" / "model", "--mixup", "0.8",
                  "--precision", precision, "--output-dir", tmp_path / f"multi-{precision}")
        assert 0 <= r["teacher_eval_map"] <= 1 and 0 <= r["eval_agreement"] <= 1
        assert [e.step for e in events(tmp_path / f"multi-{precision}").Scalars("distill/soft_loss")] == [5, 10]
    line = error(capsys, *plates, "--teacher", teacher / "model", "--output-dir", tmp_path / "mismatch")
    assert "single-label classifier and the run is multi-label" in line


def test_a_distilled_run_killed_and_resumed_ends_bit_identical(tiny_run, tmp_path):
    teacher, _ = tiny_run
    ref, killed = killed_and_resumed(tmp_path, "--image-size", "32", "--teacher", teacher / "model",
                                     "--distill", "hard", "--distill-alpha", "0.7")
    assert same(load_file(killed / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors"))


def _plain_loop(root, teacher_dir, seed, steps, alpha, temperature, lr=2e-3, batch=16):
    """A student trained by a loop written from the textbook alone: transformers' ViT built from its config, the
    images read with Pillow and normalised by hand, loss (1 - alpha) CE + alpha T^2 KL(p_teacher || p_student);
    returns its top-1 on the validation split."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    def split(name, size):
        classes = sorted(p.name for p in (root / "train").iterdir())
        files = [(f, k) for k, c in enumerate(classes) for f in sorted((root / name / c).iterdir())]
        x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((size, size)), dtype=np.float32)
                                          ).permute(2, 0, 1) / 255 for f, _ in files])
        return x, torch.tensor([k for _, k in files])

    teacher = AutoModelForImageClassification.from_pretrained(teacher_dir).eval()
    t_proc = AutoImageProcessor.from_pretrained(teacher_dir)
    t_size = teacher.config.image_size
    norm = lambda x, p: (x - torch.tensor(p.image_mean).view(1, 3, 1, 1)) / torch.tensor(p.image_std).view(1, 3, 1, 1)
    torch.manual_seed(seed)
    student = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                  intermediate_size=64, patch_size=8, image_size=32, num_labels=4))
    x, y = split("train", 32)
    xt, _ = split("train", t_size)
    with torch.no_grad():
        taught = teacher(pixel_values=norm(xt, t_proc)).logits
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(y), (batch,), generator=g)
        logits = student(pixel_values=norm(x[i], t_proc)).logits
        p = F.log_softmax(taught[i] / temperature, -1)
        q = F.log_softmax(logits / temperature, -1)
        kl = (p.exp() * (p - q)).sum(-1).mean() * temperature ** 2
        loss = (1 - alpha) * F.cross_entropy(logits, y[i]) + alpha * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    xv, yv = split("validation", 32)
    with torch.no_grad():
        return (student.eval()(pixel_values=norm(xv, t_proc)).logits.argmax(-1) == yv).float().mean().item()


@pytest.mark.slow
def test_distillation_learns_as_the_textbook_loop_does(tmp_path, cache_dir):
    """The student learns from the teacher alone (alpha 1: no label in its loss): through vitfood and through the
    plain loop above, 5 seeds each, it reaches the same accuracy within seed noise, far above chance (measured on
    a 2-core Xeon: 0.545 and 0.520, each with a spread of about 0.05)."""
    import statistics
    import numpy as np
    from PIL import Image
    root, rng = tmp_path / "data", np.random.default_rng(0)
    for split, n in (("train", 60), ("validation", 30)):  # 4 grey levels, each image's level off by up to +-40:
        for k in range(4):  # neighbours overlap, so no model is right on every image
            (root / split / f"level{k}").mkdir(parents=True)
            for i in range(n):
                level = 64 * k + 32 + rng.uniform(-40, 40)
                pixels = np.clip(level + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"level{k}" / f"{i}.png")
    common = ["--dataset", root, "--train-split", "train", "--eval-split", "validation", "--precision", "fp32",
              "--batch-size", 16, "--num-workers", 0, "--lr", "2e-3", "--logging-steps", 10]
    teacher = train(*common, "--model", "vit-micro", "--max-steps", 80, "--eval-steps", 80, "--save-steps", 80,
                    "--output-dir", tmp_path / "teacher")
    assert teacher["eval_accuracy"] >= 0.6, teacher
    ours, plain = [], []
    steps = 30
    for seed in (1, 2, 3, 4, 5):
        ours.append(train(*common, "--model", "vit-micro", "--image-size", 32, "--teacher", tmp_path / "teacher" / "model",
                          "--distill-alpha", 1.0, "--distill-temperature", 2.0, "--max-steps", steps, "--eval-steps",
                          steps, "--save-steps", steps, "--seed", seed, "--calibrate", "none",
                          "--output-dir", tmp_path / f"student-{seed}")["eval_accuracy"])
        plain.append(_plain_loop(root, tmp_path / "teacher" / "model", seed, steps, 1.0, 2.0))
    noise = max(statistics.stdev(ours), statistics.stdev(plain), 0.05)
    assert min(statistics.mean(ours), statistics.mean(plain)) > 0.4, (ours, plain)  # chance: 1/4
    assert abs(statistics.mean(ours) - statistics.mean(plain)) <= 3 * noise, (ours, plain)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_a_teacher_under_torchrun_and_fsdp(tiny_run, tmp_path, fsdp):
    """Two processes (gloo), the teacher replicated on each: the run ends and reports the agreement, which is over
    every rank's share of the eval split."""
    from conftest import TINY, cli
    teacher, _ = tiny_run
    out = tmp_path / "run"
    p = cli("--standalone", "--nproc_per_node=2", "-m", "vitfood.train", *TINY, *STUDENT, "--teacher", teacher / "model",
            *(["--fsdp"] if fsdp else []), "--output-dir", out, module="torch.distributed.run",
            env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert 0 <= results["eval_agreement"] <= 1 and results["teacher"] == str(teacher / "model")
    assert [e.step for e in events(out).Scalars("distill/agreement")] == [10, 20]
