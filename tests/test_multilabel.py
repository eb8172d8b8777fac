"""Multi-label data (a list of classes per image): the label forms, BCE, mAP/F1/exact match,
resume, export to transformers' pipeline, predict and evaluate."""

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import events, metadata_folder, resumed_copy, same, train
from vitfood.metrics import MultiLabel, average_precision

# The generated plates of 1 to 3 dishes, 4 classes, at TINY's scale.
PLATES = ["--synthetic-dishes", "3", "--max-steps", 6, "--eval-steps", 3, "--save-steps", 3]
LEVERS = ["--mixup", "0.8", "--label-smoothing", "0.1", "--ema-decay", "0.9", "--threshold", "0.4"]


def test_average_precision_is_scikit_learns_definition_with_ties_and_nan_for_a_class_never_present():
    scores = torch.tensor([[0.9, 0.2], [0.8, 0.4], [0.8, 0.1], [0.1, 0.3]])
    targets = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=torch.bool)
    ap = average_precision(scores, targets)
    # thresholds 0.9 (P 1, R 1/2), 0.8 (a tie: P 2/3, R 1), 0.1 (P 1/2, R 1): 1/2 x 1 + 1/2 x 2/3
    assert ap[0] == pytest.approx(0.5 + 0.5 * 2 / 3) and math.isnan(ap[1])


def test_average_precision_matches_scikit_learn_on_random_scores_with_many_ties():
    import sklearn.metrics as sklearn  # in the test extra
    g = torch.Generator().manual_seed(0)
    s, t = torch.rand(200, 5, generator=g).round(decimals=1), torch.rand(200, 5, generator=g) < 0.3  # many ties
    assert average_precision(s, t) == pytest.approx([sklearn.average_precision_score(t[:, c], s[:, c]) for c in range(5)])


def test_multi_label_metrics_at_the_threshold():
    logits = torch.tensor([[3.0, -3.0, 0.5], [2.0, 1.0, -1.0], [-2.0, -2.0, -2.0]])  # p ~ .95 .05 .62 / .88 .73 .27
    labels = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 0, 1]], dtype=torch.uint8)
    meter = MultiLabel(3, "cpu", threshold=0.5)
    meter.add(logits, labels, None)
    r = meter.result(3)
    # predicted sets {0, 2}, {0, 1}, {}: class 0 tp 2; class 1 fp 1; class 2 tp 1, fn 1
    assert r["per_class"]["tp"] == [2, 0, 1] and r["per_class"]["fp"] == [0, 1, 0] and r["per_class"]["fn"] == [0, 0, 1]
    assert r["exact_match"] == pytest.approx(1 / 3)
    assert r["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert r["f1_macro"] == pytest.approx((1.0 + 0.0 + 2 / 3) / 3)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())  # the mean over every entry
    assert r["loss"] == pytest.approx(bce.item())


def test_mixing_mixes_multi_hot_targets():
    from vitfood.steps import Mixing
    images = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.uint8)
    mixing = Mixing(mixup=0.8, cutmix=0.0, prob=1.0, switch_prob=0.5, smoothing=0.1, num_classes=3, seed=0)
    mixed, targets = mixing.at(0, 0)(images, labels)
    smooth = labels.float() * 0.9 + 0.1 / 3
    lam = ((mixed - images.flip(0)) / (images - images.flip(0)))[0, 0, 0, 0].item()
    assert torch.allclose(targets, smooth * lam + smooth.flip(0) * (1 - lam), atol=1e-5)


# ---------------------------------------------------------------------------------------------- label forms

def _folder(root, fmt, rows, split="train"):
    """An imagefolder split whose labels are in a metadata file: `rows` = the label of each image, as written."""
    return metadata_folder(root, rows, fmt, "dishes", split)


def _splits(data, **options):
    from vitfood.config import Config
    from vitfood.sources import is_multi_label, load_splits
    cfg = Config(dataset=str(data), train_split="train", eval_split="test", label_column="dishes", **options)
    train_ds, eval_ds, names = load_splits(cfg, log=lambda *_: None)
    return names, is_multi_label(train_ds, "dishes"), train_ds["dishes"], eval_ds["dishes"]


@pytest.mark.parametrize("fmt, train_rows, eval_rows", [
    ("jsonl", [["sushi", "pizza"], ["ramen"], ["pizza"]], [["ramen", "sushi"]]),
    ("csv", ["sushi;pizza", "ramen", "pizza"], ["ramen; sushi"]),
])
def test_lists_of_class_names_become_a_list_of_class_labels(fmt, train_rows, eval_rows, tmp_path):
    data = _folder(_folder(tmp_path / "d", fmt, train_rows), fmt, eval_rows, "test")
    names, multi, train_labels, eval_labels = _splits(data)
    assert names == ["pizza", "ramen", "sushi"] and multi
    assert train_labels == [[2, 0], [1], [0]] and eval_labels == [[1, 2]]


def test_a_saved_list_of_class_labels_and_multi_label_forced_on_single_labels(tmp_path):
    import datasets
    from PIL import Image
    image = Image.new("RGB", (8, 8))
    listed = datasets.Features({"image": datasets.Image(), "dishes": datasets.List(datasets.ClassLabel(names=["a", "b", "c"]))})
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"image": [image] * 2, "dishes": [[0, 2], [1]]}, features=listed)
                          for s in ("train", "test")}).save_to_disk(tmp_path / "saved")
    assert _splits(tmp_path / "saved")[:3] == (["a", "b", "c"], True, [[0, 2], [1]])
    data = _folder(_folder(tmp_path / "single", "csv", ["b", "a"]), "csv", ["a"], "test")
    assert _splits(data)[:2] == (["a", "b"], False)
    assert _splits(data, multi_label=True)[1:] == (True, [[1], [0]], [[0]])


@pytest.mark.parametrize("fmt, rows, message", [
    ("jsonl", [["a", "b"], "b", ["a"]], "mixes a list of classes and a single class"),
    ("jsonl", [["a", "b"], [], ["a"]], "image 1 of split 'train' names no class"),
    ("csv", ["a;b", ";", "a"], "image 1 of split 'train' names no class"),
])
def test_a_label_column_that_mixes_forms_or_names_no_class_is_one_line(fmt, rows, message, tmp_path, capsys):
    from vitfood.common import run_main
    data = _folder(_folder(tmp_path / "d", fmt, rows), fmt, [["a"]] if fmt == "jsonl" else ["a"], "test")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train("--dataset", data, "--train-split", "train", "--eval-split", "test", "--label-column",
                               "dishes", "--max-steps", 1, "--output-dir", tmp_path / "run"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in lines[-1] and not any("Traceback" in l for l in lines), lines[-3:]


# ---------------------------------------------------------------------------------------------- a multi-label run

@pytest.fixture(scope="module")
def plates_run(tmp_path_factory):
    """A multi-label run on the generated plates, mixup, label smoothing and EMA on: (run dir, all_results)."""
    out = tmp_path_factory.mktemp("plates") / "run"
    return out, train(*PLATES, *LEVERS, "--output-dir", out)


def test_a_multi_label_run_reports_map_f1_and_exact_match(plates_run):
    out, results = plates_run
    for key in ("eval_map", "eval_f1_micro", "eval_f1_macro", "eval_exact_match", "eval_loss"):
        assert 0 <= results[key] <= (1 if key != "eval_loss" else 10), key
    assert "eval_accuracy" not in results and 0 <= results["eval_ema_map"] <= 1
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    card = (out / "model" / "README.md").read_text()
    assert f"macro mAP of **{results['eval_map']:.4f}**" in card and "| mAP | micro F1 | macro F1 | exact match |" in card
    ea = events(out)
    tags = ea.Tags()["scalars"]
    assert {"accuracy/map", "metrics/f1_micro", "metrics/f1_macro", "metrics/exact_match", "accuracy/map_ema"} <= set(tags)
    # its loss, a binary cross-entropy, on tags of its own: no chart puts it on the axis of a cross-entropy
    assert sorted(tags)[:5] == ["accuracy/map", "accuracy/map_ema", "loss/bce_eval", "loss/bce_eval_ema",
                                "loss/bce_train"] and "loss/eval" not in tags and "loss/train" not in tags
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["multi_label"] is True  # as detected from the data (no --multi-label was given)
    assert ea.Scalars("accuracy/map")[-1].value == pytest.approx(results["eval_map"], abs=1e-6)
    table = ea.Tensors("tables/per_class")[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| class | AP | precision | recall | f1 | support |")
    assert "predictions/mistakes" in ea.Tags()["images"] and "predictions/confusion_matrix" not in ea.Tags()["images"]
    best = json.loads((out / "best_checkpoint.json").read_text())
    assert set(best) == {"step", "eval_map", "eval_loss"}


def test_the_loss_is_the_one_transformers_computes(plates_run):
    """Our eval loss, on a batch, is what the exported model computes itself with problem_type multi-label."""
    from transformers import AutoModelForImageClassification
    from vitfood.images import normalize
    out, _ = plates_run
    model = AutoModelForImageClassification.from_pretrained(out / "model").eval()
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.uint8)
    pixels = normalize(images, [0.5] * 3, [0.5] * 3)
    meter = MultiLabel(4, "cpu")
    with torch.no_grad():
        theirs = model(pixel_values=pixels, labels=labels.float()).loss
        meter.add(model(pixel_values=pixels).logits, labels, images)
    assert meter.result(4)["loss"] == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_multi_label_run_resumes_bit_exact(precision, plates_run, tmp_path):
    args = [*PLATES, *LEVERS, "--precision", precision]
    out = tmp_path / "run"
    if precision == "fp32":  # the shared run is this one
        out = plates_run[0]
    else:
        train(*args, "--output-dir", out)
    copy = resumed_copy(out, tmp_path / "resumed", *args)
    assert same(load_file(copy / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors"))


def test_pipeline_scores_are_vitfood_predict_scores_and_predict_prints_classes_over_the_threshold(plates_run, tmp_path,
                                                                                                   capsys):
    from PIL import Image
    from transformers import pipeline
    from vitfood.model import load_for_inference
    from vitfood.predict import main as predict_main, predict
    from vitfood.synthetic import make_plate
    import numpy as np
    out, _ = plates_run
    files = []
    for i, dishes in enumerate(([0], [1, 3], [0, 2, 3])):
        Image.fromarray(make_plate(dishes, np.random.default_rng(i), 128, 4)).save(tmp_path / f"plate{i}.jpg")
        files.append(str(tmp_path / f"plate{i}.jpg"))
    clf = pipeline("image-classification", model=str(out / "model"), device="cpu")
    model, processor = load_for_inference(str(out / "model"), torch.device("cpu"))
    ours = list(predict(model, processor, files, torch.device("cpu"), "fp32", threshold=0.0))
    for f, mine in zip(files, ours):
        theirs = {p["label"]: p["score"] for p in clf(f, top_k=None)}
        assert len(mine["predictions"]) == 4 and sum(theirs.values()) != pytest.approx(1.0)  # sigmoid, not softmax
        for p in mine["predictions"]:
            assert p["score"] == pytest.approx(theirs[p["label"]], abs=1e-4)
    predict_main(["--model", str(out / "model"), "--json", "--threshold", "0.5", *files])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for line, mine in zip(lines, ours):
        assert [p["label"] for p in line["predictions"]] == [p["label"] for p in mine["predictions"] if p["score"] >= 0.5]
    predict_main(["--model", str(out / "model"), "--top-k", "1", *files])  # not silently ignored
    assert "note: --top-k is for single-label models" in capsys.readouterr().err


def test_evaluate_a_multi_label_model_reports_per_class_ap_and_the_run_s_figures_at_its_threshold(plates_run, tmp_path):
    """The temperature folded into model/ moves every sigmoid score; the threshold model/ holds moves with them,
    so that it gives the run's answers: F1 and exact match at the run's --threshold 0.4, as well as the mAP."""
    from vitfood import calibrate
    from vitfood.evaluate import main as evaluate_main
    out, results = plates_run
    own = json.loads((out / "model" / "config.json").read_text())["vitfood_threshold"]
    assert own == pytest.approx(calibrate.moved(0.4, calibrate.kept(results["calibration"])))
    r = evaluate_main(["--model", str(out / "model"), "--output-dir", str(tmp_path / "eval"), "--num-workers", "0"])
    assert r["threshold"] == own and results["eval_precision"] == r["precision"] == "fp32"
    for key in ("eval_map", "eval_f1_micro", "eval_f1_macro", "eval_exact_match"):  # the run's eval split, precision
        assert r[key] == pytest.approx(results[key], abs=1e-6), key
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_class.csv")))
    assert list(rows[0]) == ["label", "ap", "precision", "recall", "f1", "support"] and len(rows) == 4
    assert not (tmp_path / "eval" / "confusion_matrix.png").exists() and (tmp_path / "eval" / "mistakes.png").is_file()


def test_a_calibrated_copy_of_a_multi_label_model_gives_its_answers_with_other_scores(plates_run, tmp_path, capsys):
    """An overconfident model (its head x 4): evaluate --calibrate keeps a temperature, and the copy it writes holds
    the threshold moved with it, so that predict gives every image the same classes as the model it came from."""
    import shutil
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file
    from vitfood import seal
    from vitfood.evaluate import main as evaluate_main
    from vitfood.predict import main as predict_main
    from vitfood.synthetic import make_plate
    out = tmp_path / "run"
    shutil.copytree(plates_run[0], out, ignore=shutil.ignore_patterns("checkpoint-*", "export*"))
    weights = load_file(out / "model" / "model.safetensors")
    weights = {k: v * 4 if k.startswith("classifier.") else v for k, v in weights.items()}
    (out / "model" / "model.safetensors").unlink()  # a new file: the checkpoint's hard link stays as it was
    save_file(weights, out / "model" / "model.safetensors", metadata={"format": "pt"})
    seal.seal_folder(out / "model")
    r = evaluate_main(["--model", str(out / "model"), "--calibrate", "--output-dir", str(tmp_path / "eval"),
                       "--num-workers", "0"])
    assert r["calibration"]["kept"] and abs(r["calibration"]["temperature"] - 1) > 0.2, r["calibration"]  # it moves scores
    (tmp_path / "plates").mkdir()
    for i in range(24):
        dishes = np.random.default_rng(i).choice(4, size=1 + i % 3, replace=False).tolist()
        Image.fromarray(make_plate(dishes, np.random.default_rng(i), 128, 4)).save(tmp_path / "plates" / f"{i}.png")
    capsys.readouterr()
    answers = []
    for model in (out / "model", tmp_path / "eval" / "model"):
        predict_main(["--model", str(model), "--json", str(tmp_path / "plates")])
        answers.append([json.loads(line)["predictions"] for line in capsys.readouterr().out.splitlines()])
    labels = [[[p["label"] for p in image] for image in run] for run in answers]
    assert labels[0] == labels[1] and any(labels[0]) and not all(len(x) == 4 for x in labels[0])
    assert answers[0] != answers[1]  # the scores did move


def test_a_multi_label_export_passes_the_gate_and_predict_writes_each_plates_classes_to_csv(plates_run, tmp_path):
    """The gate compares the sets of classes at the run's threshold and the mAP; the CSV holds each image's set."""
    import contextlib
    import io
    import shutil
    import numpy as np
    from PIL import Image
    from vitfood import export
    from vitfood.predict import main as predict_main
    from vitfood.synthetic import make_plate
    out = tmp_path / "run"
    shutil.copytree(plates_run[0], out)
    with contextlib.redirect_stdout(io.StringIO()):
        parity = export.main([str(out)])
    onnx = parity["models"]["onnx"]
    assert parity["multi_label"] and parity["score_name"] == "mAP" and onnx["passed"] and onnx["agreement"] >= 0.999
    assert onnx["score"] == pytest.approx(parity["models"]["pytorch"]["score"], abs=1e-6)
    assert parity["models"]["pytorch"]["score"] == pytest.approx(plates_run[1]["eval_map"], abs=1e-6)
    (tmp_path / "plates").mkdir()
    for i, dishes in enumerate(([0], [1, 3], [0, 2, 3])):
        Image.fromarray(make_plate(dishes, np.random.default_rng(i), 128, 4)).save(tmp_path / "plates" / f"plate{i}.jpg")
    for model in (out / "model", out / "export" / "model.onnx"):
        predict_main(["--model", str(model), "--precision", "fp32", "--threshold", "0.5", str(tmp_path / "plates"),
                      "--output", str(tmp_path / f"{model.name}.csv")])
    rows = list(csv.DictReader(open(tmp_path / "model.csv")))
    assert list(rows[0]) == ["file", "labels", "scores", "error"] and len(rows) == 3
    for a, b in zip(rows, csv.DictReader(open(tmp_path / "model.onnx.csv"))):  # the same sets, scores within 1e-3
        assert a["labels"] == b["labels"] and all(abs(float(x) - float(y)) <= 1e-3 for x, y in
                                                  zip(a["scores"].split(";"), b["scores"].split(";")))
    for row in rows:
        scores = [float(x) for x in row["scores"].split(";") if x]
        assert len(scores) == len([x for x in row["labels"].split(";") if x]) and all(x >= 0.5 for x in scores)
        assert scores == sorted(scores, reverse=True)
    assert any(len(row["labels"].split(";")) < 4 for row in rows)  # the threshold left classes out


def test_balanced_sampling_of_multi_label_data_is_one_line(tmp_path, capsys):
    from vitfood.common import run_main
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train(*PLATES, "--sampler", "balanced", "--output-dir", tmp_path / "run"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "are for single-label data" in err[-1], err[-3:]


def test_evaluate_reads_another_data_set_as_multi_label_for_a_multi_label_model(plates_run, tmp_path):
    from vitfood.evaluate import main as evaluate_main
    from vitfood.synthetic import class_names
    names = class_names(4)
    data = _folder(tmp_path / "d", "csv", [names[0], f"{names[1]}|{names[2]}", names[3]], "test")  # one: a list of one
    out, _ = plates_run
    r = evaluate_main(["--model", str(out / "model"), "--dataset", str(data), "--split", "test", "--label-column",
                       "dishes", "--label-separator", "|", "--output-dir", str(tmp_path / "eval"), "--num-workers", "0"])
    assert r["eval_samples"] == 3 and 0 <= r["eval_map"] <= 1
    assert [row["support"] for row in r["per_class"]] == [1, 1, 1, 1]


def test_more_dishes_than_classes_is_one_line():
    from vitfood.common import UserError
    from vitfood.config import Config
    with pytest.raises(UserError, match="at most --synthetic-classes"):
        Config(synthetic_classes=2, synthetic_dishes=3).validate()


def test_a_multi_label_mistake_card_says_what_was_missed_and_what_is_not_there():
    from vitfood import report
    names = ["grilled_cheese_sandwich", "apple_pie", "tomato_yellow_leaf_curl_virus_on_leaves", "pizza", "eggs_benedict"]
    mistake = dict(confidence=0.97, true=[0, 2, 4], pred=[1, 4], surest=2, image=torch.zeros(3, 8, 8, dtype=torch.uint8))
    lines = [text for text, _ in report.card_caption(mistake, names, report.font(12), 100)]
    assert lines[0] == "missed (2)" and lines[1].startswith("grilled_") and "not there" in lines
    assert lines[lines.index("not there") + 1] == "apple_pie" and len(lines) <= 7
    # the score said with its class: the model gave the missed class 2 a score of 1 - 0.97
    assert lines[-1].startswith("p(to") and "…" in lines[-1] and lines[-1].endswith("ves)=0.03")
    wrongly = dict(mistake, surest=1)  # a class predicted but absent: its score is the confidence
    assert report.card_caption(wrongly, names, report.font(12), 160)[-1][0] == "p(apple_pie)=0.97"


def test_evaluate_says_when_it_measures_a_run_s_model_in_another_precision_than_the_run_did(tmp_path):
    from vitfood.evaluate import run_precision_differs
    (tmp_path / "model").mkdir()
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "all_results.json").write_text(json.dumps({"eval_precision": "bf16"}))
    assert run_precision_differs(str(tmp_path / "model"), "fp32") == (
        "note: the run measured its figures (all_results.json) in bf16, these are in fp32; --precision bf16 gives the run's")
    assert run_precision_differs(str(tmp_path / "model"), "bf16") is None
    assert run_precision_differs(str(tmp_path / "checkpoint-6"), "fp32") is None  # no figures of its own there
