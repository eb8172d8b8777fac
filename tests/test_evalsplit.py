"""A model opened on an eval split (evalsplit.py), the one way evaluate, export and the audit do it: one label
rule (the same classes, in any order) and one multi-label rule."""

import json
import shutil

import pytest
import torch

from conftest import error, metadata_folder
from vitfood.common import UserError
from vitfood.config import resolve
from vitfood.evalsplit import class_order, open_eval
from vitfood.model import load_for_inference


def test_the_same_classes_in_another_order_are_relabelled_and_other_classes_are_one_line():
    assert class_order(["b", "c", "a"], ["a", "b", "c"]) == [2, 0, 1]  # data class i is the model's logit relabel[i]
    assert class_order(["a", "b"], ["a", "b"]) == [0, 1]
    with pytest.raises(UserError, match=r"^m's 2 labels \(a, b, \.\.\.\) are not the data set's 2 classes \(a, x"):
        class_order(["a", "b"], ["a", "x"], "m")


def test_a_model_whose_classes_are_in_another_order_scores_the_same(tiny_run, tmp_path):
    """The tiny run's model with its classes (and head rows) permuted: relabelled, it gives the same figures."""
    from vitfood.evaluate import main as evaluate
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out, ignore=shutil.ignore_patterns("checkpoint-*", "export*"))
    model, _ = load_for_inference(str(out / "model"), torch.device("cpu"))
    order = [2, 0, 3, 1]
    names = [model.config.id2label[i] for i in range(4)]
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[order])
        model.classifier.bias.copy_(model.classifier.bias[order])
    model.config.id2label = {i: names[k] for i, k in enumerate(order)}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    (out / "model" / "SHA256SUMS").unlink()  # a model a user wrote, not sealed by vitfood
    model.save_pretrained(out / "model")
    split = open_eval(resolve({}, json.loads((out / "train_config.json").read_text())), str(out / "model"),
                      lambda *_: load_for_inference(str(out / "model"), torch.device("cpu")))
    assert split.names == names and split.model_names == [names[k] for k in order] and not split.multi
    assert [split.model_names[i] for i in split.relabel] == names
    r = evaluate(["--model", str(out / "model"), "--output-dir", str(tmp_path / "e"), "--num-workers", "0"])
    assert r["eval_accuracy"] == pytest.approx(tiny_run[1]["eval_accuracy"])


def test_a_single_label_model_on_multi_label_data_is_one_line(tiny_run, tmp_path, capsys):
    from vitfood.evaluate import main as evaluate
    model = tiny_run[0] / "model"
    a, b, c, d = json.loads((model / "config.json").read_text())["id2label"].values()
    data = metadata_folder(tmp_path / "plates", [[a, b], [c], [a, d], [b]], "jsonl", "dishes", "test")
    line = error(capsys, "--model", model, "--dataset", data, "--split", "test", "--label-column", "dishes",
                 main=evaluate)
    assert line == (f"error: {model} is a single-label classifier, and the data set's label column 'dishes' holds a "
                    "list of classes per image")
