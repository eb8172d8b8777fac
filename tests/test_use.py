"""Using a trained model: evaluate in depth, predict, the model card, and TensorBoard over HTTP."""

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, cli
from vitfood import report


def _eval_images(tmp_path):
    """The tiny run's eval split written out as files, in split order, and their labels."""
    import datasets

    from vitfood.config import build_parser, resolve
    from vitfood.sources import load_splits
    cfg = resolve(vars(build_parser().parse_args(TINY)))
    _, eval_ds, _ = load_splits(cfg, log=lambda *a: None)
    files, labels = [], []
    for i, row in enumerate(eval_ds.cast_column("image", datasets.Image(decode=False))):
        path = tmp_path / f"{i:04d}.jpg"
        path.write_bytes(row["image"]["bytes"])  # the very bytes training read: the same decode
        files.append(str(path))
        labels.append(row["label"])
    return files, labels


def test_evaluate_and_predict_count_what_training_counted(tiny_run, tmp_path):
    from vitfood.evaluate import main as evaluate_main
    from vitfood.model import load_for_inference as load
    from vitfood.predict import predict
    out, results = tiny_run
    r = evaluate_main(["--model", str(out / "model"), "--output-dir", str(tmp_path / "ev")])
    samples = r["eval_samples"]
    correct = round(results["eval_accuracy"] * samples)
    assert r["correct"] == correct and r["eval_loss"] == pytest.approx(results["eval_loss"], abs=1e-6)
    assert r["precision"] == "fp32"  # the run's own precision and eval batch size
    # checkpoint-200 is the same weights as model/ (exported at the last step)
    r200 = evaluate_main(["--model", str(out / "checkpoint-200"), "--output-dir", str(tmp_path / "ev200")])
    assert r200["correct"] == correct

    files, labels = _eval_images(tmp_path)
    assert len(files) == samples
    model, processor = load(str(out / "model"), torch.device("cpu"))
    preds = list(predict(model, processor, files, torch.device("cpu"), "fp32", top_k=1, batch_size=r["batch_size"]))
    label_of = {name: i for i, name in model.config.id2label.items()}
    assert sum(label_of[p["predictions"][0]["label"]] == y for p, y in zip(preds, labels)) == correct


def test_evaluate_writes_real_images_and_tables(tiny_run, tmp_path, capsys):
    from vitfood.evaluate import main as evaluate_main
    out, _ = tiny_run
    evaluate_main(["--model", str(out / "model"), "--output-dir", str(tmp_path / "ev"), "--mistakes", "6"])
    printed = capsys.readouterr().out
    assert "top-1" in printed and json.loads(printed.strip().splitlines()[-1])["samples"] == 48
    ev = tmp_path / "ev"
    results = json.loads((ev / "eval_results.json").read_text())
    rows = list(csv.DictReader(open(ev / "per_class.csv")))
    assert [row["label"] for row in rows] == [x["label"] for x in results["per_class"]] and len(rows) == 4
    assert sum(int(row["support"]) for row in rows) == results["eval_samples"]
    m = results["confusion_matrix"]
    assert sum(map(sum, m)) == results["eval_samples"] and sum(m[i][i] for i in range(4)) == results["correct"]
    with Image.open(ev / "confusion_matrix.png") as img:
        assert img.format == "PNG" and img.size == (report.LABEL_W + 4 * report.cell_size(4),) * 2
        assert len(np.unique(np.asarray(img.convert("L")))) > 3  # drawn, not blank
    wrong = results["eval_samples"] - results["correct"]
    assert wrong >= 6  # the tiny run is right on 0.625 of its 48 eval images: 6 mistakes drawn, 2 rows
    with Image.open(ev / "mistakes.png") as img:  # 4 per row, each 150 px wide (room for the caption), a 64 px
        assert img.size[0] == 4 * 154 and img.size[1] % 2 == 0, img.size  # image under 3+ caption lines
        assert img.size[1] // 2 >= 64 + 3 * 14 + 8, img.size


def test_evaluate_refuses_bad_input_in_one_line(tiny_run, tmp_path, capsys):
    from vitfood.common import run_main
    from vitfood.evaluate import main as evaluate_main
    out, _ = tiny_run
    assert evaluate_main(["--model", str(out / "model"), "--mistakes", "0", "--output-dir", str(tmp_path / "ev")])
    capsys.readouterr()
    (tmp_path / "lonely").mkdir()
    for args, says in ((["--model", tmp_path / "lonely"], "not inside a vitfood run"),  # not a model folder
                       (["--model", out / "model", "--split", "test"], "--split needs --dataset"),
                       (["--model", out / "model", "--dataset", tmp_path / "no-such-folder"], "does not exist"),
                       (["--model", out / "model", "--batch-size", "0"], "--batch-size must be positive")):
        with pytest.raises(SystemExit) as e:
            run_main(lambda: evaluate_main(list(map(str, args))))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and says in err and "\n" not in err, err
    r = cli("--model", tmp_path / "lonely", module="vitfood.evaluate")  # and as a user runs it
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "Traceback" not in r.stderr, r.stderr


def test_model_card(tiny_run):
    out, results = tiny_run
    card = (out / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "pipeline_tag: image-classification" in card
    assert f"value: {results['eval_accuracy']:.4f}" in card
    assert re.search(r"\n- \d+ training images, \d+ evaluation images, 4 classes\n", card)
    history = [line for line in card.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(line.split("|")[1]) for line in history] == [40, 80, 120, 160, 200]


def test_exported_model_works_with_pipeline(tiny_run):
    out, _ = tiny_run
    from PIL import Image
    from transformers import pipeline
    clf = pipeline("image-classification", model=str(out / "model"), device="cpu")
    from vitfood.synthetic import class_names
    preds = clf(Image.new("RGB", (64, 48), (10, 200, 30)), top_k=4)
    assert {p["label"] for p in preds} == set(class_names(4))
    assert sum(p["score"] for p in preds) == pytest.approx(1.0, abs=1e-4)


def test_predict_on_a_run_model_and_a_checkpoint(tiny_run, tmp_path, capsys):
    from PIL import Image
    from vitfood.predict import main as predict_main
    from vitfood.synthetic import class_names
    Image.new("RGB", (70, 50), (200, 20, 20)).save(tmp_path / "a.png")
    Image.new("L", (30, 90), 128).save(tmp_path / "b.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    out, _ = tiny_run
    for model in (out / "model", out / "checkpoint-200"):
        with pytest.raises(SystemExit) as exit_status:  # one file could not be read: 1, the others classified
            predict_main(["--model", str(model), "--json", "--top-k", "3", str(tmp_path)])
        assert exit_status.value.code == 1
        captured = capsys.readouterr()
        rows = [json.loads(line) for line in captured.out.splitlines()]
        assert [os.path.basename(r["file"]) for r in rows] == ["a.png", "b.jpg", "broken.jpg"]
        for r in rows[:2]:
            assert len(r["predictions"]) == 3 and {p["label"] for p in r["predictions"]} <= set(class_names(4))
            assert r["predictions"][0]["score"] >= r["predictions"][-1]["score"]
        assert "error" in rows[2] and "broken.jpg" in captured.err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, data=None):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


def test_tensorboard_serves_the_run(tiny_run):
    out, results = tiny_run
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(out), "--host", "127.0.0.1",
                               "--port", str(port), "--reload_interval", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while True:
            try:
                runs = json.loads(_get(f"{base}/data/runs"))
                if runs:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, server.stderr.read().decode()[-2000:]
            time.sleep(0.5)
        run = runs[0]
        q = urllib.parse.urlencode
        loss = json.loads(_get(f"{base}/data/plugin/scalars/scalars?{q(dict(run=run, tag='loss/train'))}"))
        assert [step for _, step, _ in loss][-1] == 200 and loss[-1][2] < loss[0][2]
        acc = json.loads(_get(f"{base}/data/plugin/scalars/scalars?{q(dict(run=run, tag='accuracy/top1'))}"))
        assert acc[-1][2] == pytest.approx(results["eval_accuracy"], abs=1e-6)
        for tag in ("predictions/confusion_matrix", "predictions/mistakes", "train/augmented_images"):
            images = json.loads(_get(f"{base}/data/plugin/images/images?{q(dict(run=run, tag=tag, sample=0))}"))
            assert images, tag
            png = _get(f"{base}/data/plugin/images/individualImage?{images[-1]['query']}")
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
        confusion_steps = [im["step"] for im in json.loads(_get(
            f"{base}/data/plugin/images/images?{q(dict(run=run, tag='predictions/confusion_matrix', sample=0))}"))]
        assert confusion_steps[-1] == 200  # one per eval; TensorBoard may thin older ones
        experiment = json.loads(_get(f"{base}/data/plugin/hparams/experiment",
                                     json.dumps({"experimentName": ""}).encode()))
        hparams = [h["name"] for h in experiment["hparamInfos"]]
        metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
        assert {"lr", "batch_size", "global_batch", "world_size"} <= set(hparams) and "output_dir" not in hparams
        # the metric columns are the run's scalars by name: the score and the losses are the five shown first
        assert metrics[:5] == ["accuracy/top1", "loss/eval", "loss/eval_calibrated", "loss/train", "memory/peak_rss_gb"] \
            if "eval_loss_uncalibrated" in results else metrics[:3] == ["accuracy/top1", "loss/eval", "loss/train"]
        groups = json.loads(_get(f"{base}/data/plugin/hparams/session_groups", json.dumps(dict(
            experimentName="", allowedStatuses=["STATUS_SUCCESS"], colParams=[], startIndex=0, sliceSize=10)).encode()))
        assert [s["status"] for g in groups["sessionGroups"] for s in g["sessions"]] == ["STATUS_SUCCESS"]
        types = {h["name"]: h["type"] for h in experiment["hparamInfos"]}
        assert (types["lr"], types["compile"], types["model"]) == ("DATA_TYPE_FLOAT64", "DATA_TYPE_BOOL", "DATA_TYPE_STRING")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_pipeline_on_the_exported_model_scores_as_predict_does(tiny_run, tmp_path, monkeypatch, capsys):
    """model/'s image processor is what transformers.pipeline runs: it must see images as vitfood's eval does."""
    from transformers import pipeline
    from vitfood.predict import main
    from PIL import Image
    rng = np.random.default_rng(0)
    files = []
    for i in range(8):  # photos larger than the model's input: a reduced-scale decode would change their pixels
        pixels = rng.integers(0, 255, (200, 256, 3), dtype=np.uint8)
        pixels[..., i % 3] = 30 * i
        files.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(pixels).save(files[-1], quality=90)
    out, _ = tiny_run
    # vitfood.predict as a user runs it, with no --precision, on a CPU whose `auto` is bf16 (AMX, AVX512-BF16)
    monkeypatch.setenv("VITFOOD_CPU_PRECISION", "bf16")
    main(["--model", str(out / "model"), *files, "--top-k", "2", "--json"])
    ours = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    clf = pipeline("image-classification", model=str(out / "model"), device="cpu")
    for f, o in zip(files, ours):
        theirs = clf(f, top_k=2)
        assert [p["label"] for p in theirs] == [p["label"] for p in o["predictions"]]
        assert [p["score"] for p in theirs] == pytest.approx([p["score"] for p in o["predictions"]], abs=2e-6)


def test_auto_precision_on_a_cpu_can_be_set_to_either_kind_of_cpu(monkeypatch):
    """VITFOOD_CPU_PRECISION: what --precision auto picks on a CPU, so one machine runs both kinds' numbers."""
    from vitfood.common import UserError, model_precision, resolve_precision
    cpu = torch.device("cpu")
    for forced in ("fp32", "bf16"):
        monkeypatch.setenv("VITFOOD_CPU_PRECISION", forced)
        assert resolve_precision("auto", cpu) == forced and resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setenv("VITFOOD_CPU_PRECISION", "fp16")
    with pytest.raises(UserError, match="use fp32 or bf16"):
        resolve_precision("auto", cpu)
    layer = torch.nn.Linear(2, 2)
    assert model_precision(layer, cpu) == "fp32" and model_precision(layer.to(torch.bfloat16), cpu) == "bf16"
    assert model_precision(layer.to(torch.float16), cpu) == "fp32"  # fp16 weights run in fp32 on a CPU


def test_an_image_named_alone_and_in_its_folder_is_predicted_once(tmp_path):
    from vitfood.predict import find_images
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.png", "sub/c.jpg", "notes.txt"):
        (tmp_path / "photos" / name).write_bytes(b"x")
    os.symlink(tmp_path / "photos" / "b.png", tmp_path / "link.png")
    photos = tmp_path / "photos"
    assert find_images([str(photos / "b.png"), str(photos), str(tmp_path / "link.png"), str(photos / "a.jpg")]) == \
        [str(photos / "b.png"), str(photos / "a.jpg"), str(photos / "sub" / "c.jpg")]
    assert find_images([str(tmp_path / "missing.jpg")] * 2) == [str(tmp_path / "missing.jpg")]  # said once
