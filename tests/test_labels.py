"""Issue #22: imbalanced classes (--class-weights, --sampler balanced) and the metrics that show them."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import same, train
from vitfood import checkpoint
from vitfood.data import EpochBatchSampler, balanced_weights


def test_balanced_weights_make_every_class_weigh_the_same():
    labels = [0] * 90 + [1] * 9 + [2] * 1  # class 3 has no training image
    w = balanced_weights(labels, 4)
    assert torch.allclose(w, torch.tensor([100 / (3 * 90), 100 / (3 * 9), 100 / 3, 0.0]))
    counts = torch.bincount(torch.tensor(labels), minlength=4).float()
    assert torch.allclose(w[:3] * counts[:3], torch.full((3,), 100 / 3))  # equal total weight per class


def test_the_balanced_sampler_draws_classes_evenly_keyed_on_seed_and_epoch_for_any_world_size():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    weights = balanced_weights(labels.tolist(), 3)[labels]
    one = EpochBatchSampler(1000, seed=7, global_batch=32, weights=weights)
    drawn = torch.tensor([i for batch in one for _, i in batch])
    share = torch.bincount(labels[drawn], minlength=3).float() / len(drawn)
    assert len(drawn) == 1000 and torch.allclose(share, torch.full((3,), 1 / 3), atol=0.05), share
    again = [i for batch in EpochBatchSampler(1000, seed=7, global_batch=32, weights=weights) for _, i in batch]
    assert again == drawn.tolist()  # keyed: a resumed run draws the same epoch
    one.set_position(1, 0)
    assert [i for batch in one for _, i in batch] != drawn.tolist()  # another epoch, another draw
    ranks = [EpochBatchSampler(1000, seed=7, global_batch=32, rank=r, world=3, weights=weights) for r in range(3)]
    merged = [i for parts in zip(*ranks) for part in parts for _, i in part]
    assert merged == drawn.tolist()  # the same global batches, split over 3 processes


def test_class_weights_weigh_each_samples_loss_by_its_class():
    from vitfood.steps import forward_backward
    torch.manual_seed(0)
    model = torch.nn.Linear(3 * 2 * 2, 3)
    net = lambda pixel_values: type("Out", (), {"logits": model(pixel_values.flatten(1))})()
    net.parameters = model.parameters
    images = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
    labels = torch.tensor([0, 0, 1, 2])
    w = torch.tensor([0.5, 2.0, 3.0])
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    import contextlib
    loss = forward_backward(net, images, labels, contextlib.nullcontext(), scaler, mean, std, 4, class_weight=w)
    from vitfood.data import normalize
    logits = model(normalize(images, mean, std).flatten(1))
    expected = (w[labels] * torch.nn.functional.cross_entropy(logits, labels, reduction="none")).sum() / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_balanced_run_resumes_bit_exact_and_reports_balanced_metrics(tmp_path):
    out = tmp_path / "run"
    args = ["--max-steps", 6, "--eval-steps", 3, "--save-steps", 3, "--sampler", "balanced", "--class-weights", "balanced"]
    results = train(*args, "--output-dir", out)
    assert 0 <= results["eval_balanced_accuracy"] <= 1 and 0 <= results["eval_f1_macro"] <= 1
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("run.lock"))
    for name in ("model", "checkpoint-6"):
        shutil.rmtree(copy / name)
    for name in ("all_results.json", checkpoint.BEST):
        (copy / name).unlink(missing_ok=True)
    train(*args, "--output-dir", copy, "--resume", "auto")
    assert same(load_file(copy / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors"))
    card = (out / "model" / "README.md").read_text()
    assert "loss weights balanced, sampler balanced" in card and "balanced accuracy" in card
