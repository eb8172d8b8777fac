"""Imbalanced classes (--class-weights, --sampler balanced) and the metrics that show them."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import metadata_folder, resumed_copy, same, train
from vitfood.data import EpochBatchSampler
from vitfood.sources import balanced_weights


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
    drawn = torch.tensor([key[1] for batch in one for key in batch])
    share = torch.bincount(labels[drawn], minlength=3).float() / len(drawn)
    assert len(drawn) == 1000 and torch.allclose(share, torch.full((3,), 1 / 3), atol=0.05), share
    again = [key[1] for batch in EpochBatchSampler(1000, seed=7, global_batch=32, weights=weights) for key in batch]
    assert again == drawn.tolist()  # keyed: a resumed run draws the same epoch
    one.set_position(1, 0)
    assert [key[1] for batch in one for key in batch] != drawn.tolist()  # another epoch, another draw
    ranks = [EpochBatchSampler(1000, seed=7, global_batch=32, rank=r, world=3, weights=weights) for r in range(3)]
    merged = [key for parts in zip(*ranks) for part in parts for key in part]
    assert [key[1] for key in merged] == drawn.tolist()  # the same global batches, split over 3 processes
    assert [key[2] for key in merged] == list(range(1000))  # each draw its own augmentation key


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
    loss, _ = forward_backward(net, images, labels, contextlib.nullcontext(), scaler, mean, std, 4, class_weight=w)
    from vitfood.images import normalize
    logits = model(normalize(images, mean, std).flatten(1))
    expected = (w[labels] * torch.nn.functional.cross_entropy(logits, labels, reduction="none")).sum() / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_balanced_run_resumes_bit_exact_and_reports_balanced_metrics(tmp_path):
    out = tmp_path / "run"
    args = ["--max-steps", 6, "--eval-steps", 3, "--save-steps", 3, "--sampler", "balanced", "--random-erasing", "0.5"]
    results = train(*args, "--output-dir", out)
    card = (out / "model" / "README.md").read_text()  # the final eval's row holds both figures, as reported
    assert f"{results['eval_balanced_accuracy']:.4f} | {results['eval_f1_macro']:.4f} |" in card
    copy = resumed_copy(out, tmp_path / "resumed", *args)
    assert same(load_file(copy / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors"))
    card = (out / "model" / "README.md").read_text()
    assert "loss weights none, sampler balanced" in card and "balanced accuracy" in card


def _labelled_folder(root, fmt, classes=("pizza", "sushi", "ramen"), eval_classes=None, missing=False):
    """An imagefolder whose labels are in a metadata file (no class subfolders): train/ and test/ splits, 4 images
    of each class; `missing`: the train split's file also names an image that is not there."""
    for split, names in (("train", classes), ("test", eval_classes or classes)):
        metadata_folder(root, [names[i % len(names)] for i in range(4 * len(names))], fmt, "dish", split)
    if missing:
        with open(root / "train" / f"metadata.{fmt}", "a") as fh:
            fh.write("gone.jpg,pizza\n" if fmt == "csv" else '{"file_name": "gone.jpg", "dish": "pizza"}\n')
    return root


FROM_FILE = ["--train-split", "train", "--eval-split", "test", "--label-column", "dish", "--max-steps", 2,
             "--eval-steps", 2, "--save-steps", 2]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_labels_from_a_metadata_file_name_the_classes(fmt, tmp_path):
    import json
    data = _labelled_folder(tmp_path / "photos", fmt)
    results = train("--dataset", data, *FROM_FILE, "--output-dir", tmp_path / "run")
    assert results["global_step"] == 2
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["pizza", "ramen", "sushi"]


@pytest.mark.parametrize("problem, message", [
    (dict(missing=True), "gone.jpg is named in a metadata file"),
    (dict(eval_classes=("pizza", "sushi", "udon")), "class 'udon' appears only in the eval split"),
])
def test_a_bad_metadata_file_is_one_line(problem, message, tmp_path, capsys):
    from vitfood.common import run_main
    data = _labelled_folder(tmp_path / "photos", "csv", **problem)
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train("--dataset", data, *FROM_FILE, "--output-dir", tmp_path / "run"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in lines[-1] and not any("Traceback" in l for l in lines), lines[-3:]


def test_a_class_folder_only_the_eval_split_has_is_one_line(tmp_path, capsys):
    from conftest import error, image_folder
    image_folder(tmp_path / "photos", {"train": 3, "validation": 2}, classes=("pizza", "sushi"),
                 splits=["train", "validation"])
    image_folder(tmp_path / "photos" / "validation", 2, classes=("udon",))  # no train/udon folder
    assert "class 'udon' appears only in the eval split" in error(
        capsys, "--dataset", tmp_path / "photos", "--train-split", "train", "--eval-split", "validation",
        "--output-dir", tmp_path / "run")


@pytest.mark.parametrize("name", ["../../x.png", "/tmp/x/out.png"])
def test_a_metadata_path_that_escapes_the_folder_is_named_with_the_rule(name, tmp_path, capsys):
    import json
    from PIL import Image
    from conftest import error
    (tmp_path / "photos" / "train").mkdir(parents=True)
    rows = [dict(file_name=f"{i}.jpg", dish="ab"[i % 2]) for i in range(4)] + [dict(file_name=name, dish="a")]
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "train" / f"{i}.jpg")
    (tmp_path / "photos" / "train" / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    line = error(capsys, "--dataset", tmp_path / "photos", *FROM_FILE[:2], *FROM_FILE[4:],
                 "--output-dir", tmp_path / "run")
    assert f"Invalid metadata file_name '{name}'" in line and "must be a relative path" in line, line
