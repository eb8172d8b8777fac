"""vitfood.export: ONNX files checked on the run's eval split (the parity gate), refused in one line when they
disagree, and run by predict and evaluate as the PyTorch model is."""

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from conftest import error, error_line
from vitfood import export, onnxfile, seal
from vitfood.common import run_main


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the tiny run (an export writes into the run's folder), exported with --int8, kept whatever this
    CPU's int8 kernels do to a 200-step model on 48 images (the gate itself: test_the_int8_gate_...)."""
    out = tmp_path_factory.mktemp("export") / "tiny"
    shutil.copytree(tiny_run[0], out)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        parity = export.main([str(out), "--int8", "--max-int8-drop", "1"])
    return out, tiny_run[1], parity, printed.getvalue()


def photos(folder, n=6):
    """`n` photos of odd sizes and one file that is not an image."""
    folder.mkdir()
    for i in range(n):
        Image.effect_noise((40 + 9 * i, 30 + 5 * i), 60 + 10 * i).convert("RGB").save(folder / f"p{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def predicted(capsys, *args):
    """vitfood.predict's JSON lines, by file (exit status 1: the broken file)."""
    from vitfood.predict import main
    with pytest.raises(SystemExit) as e:
        main([*map(str, args), "--json"])
    assert e.value.code == 1
    return {r["file"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}


def test_the_export_passes_the_gate_and_writes_a_folder_a_deployment_can_use(run):
    out, results, parity, _ = run
    folder = out / "export"
    assert sorted(os.listdir(folder)) == ["README.md", "SHA256SUMS", "config.json", "labels.txt", "model-int8.onnx",
                                          "model.onnx", "parity.json", "preprocessor_config.json"]
    assert seal.damaged_file(folder) is None and "  model-int8.onnx\n" in (folder / "SHA256SUMS").read_text()
    assert json.loads((folder / "parity.json").read_text()) == json.loads(json.dumps(parity))
    fp32, int8, torch_row = parity["models"]["onnx"], parity["models"]["onnx_int8"], parity["models"]["pytorch"]
    assert parity["images"] == 48 and parity["source"] == "model" and parity["step"] == 200
    assert fp32["passed"] and fp32["agreement"] >= 0.999 and fp32["max_prob_diff"] <= 1e-3
    assert torch_row["score"] == pytest.approx(results["eval_accuracy"])  # the model/ the run evaluated last
    low, high = int8["drop_interval"]
    assert int8["passed"] and low <= int8["accuracy_drop"] <= high
    verdict, = [line for line in run[3].splitlines() if line.startswith("int8 gate: ")]
    assert f"on 48 images (95% interval {low:+.4f} to {high:+.4f}): kept" in verdict
    assert int8["size_mb"] < fp32["size_mb"]
    assert all(r["latency_ms"] > 0 and r["img_s"] > 0 for r in parity["models"].values())
    labels = json.loads((folder / "config.json").read_text())["id2label"]
    # model/'s calibration goes with it: the ONNX file computes the calibrated logits, and says so
    assert json.loads((folder / "config.json").read_text())["vitfood_calibration"] == results["calibration"]
    assert (folder / "labels.txt").read_text().split() == [labels[str(i)] for i in range(len(labels))]
    card = (folder / "README.md").read_text()  # the run's model card, with the export's figures
    assert card.startswith((out / "model" / "README.md").read_text().rstrip("\n"))
    assert card.count("## ONNX export") == 1 and "| ONNX int8 | model-int8.onnx |" in card
    assert "ONNX export" not in (out / "model" / "README.md").read_text()  # model/ is as training left it
    assert not [p for p in os.listdir(out) if p.startswith("export") and p != "export"]  # nothing left over


def test_onnxruntime_alone_reproduces_pytorch_from_the_export_folder(run):
    """A deployment without vitfood: onnxruntime, numpy and the processor's numbers in preprocessor_config.json."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    out = run[0]
    cfg = json.loads((out / "export" / "preprocessor_config.json").read_text())
    h, w = cfg["size"]["height"], cfg["size"]["width"]
    image = Image.effect_noise((w, h), 80).convert("RGB")  # at the model's size: no resize to reimplement
    pixels = np.asarray(image, dtype=np.float32) * cfg["rescale_factor"]
    pixels = ((pixels - cfg["image_mean"]) / cfg["image_std"]).transpose(2, 0, 1)[None].astype(np.float32)
    logits = ort.InferenceSession(str(out / "export" / "model.onnx")).run(None, {"pixel_values": pixels})[0]
    processor = AutoImageProcessor.from_pretrained(out / "model")
    model = AutoModelForImageClassification.from_pretrained(out / "model").eval()
    with torch.no_grad():
        expected = model(**processor(image, return_tensors="pt")).logits.numpy()
    assert np.abs(logits - expected).max() < 1e-3


def test_predict_and_evaluate_run_the_onnx_file_as_they_run_the_model(run, tmp_path, capsys):
    out, results, _, _ = run
    folder = photos(tmp_path / "photos")
    ours = predicted(capsys, "--model", out / "model", "--precision", "fp32", folder)
    theirs = predicted(capsys, "--model", out / "export" / "model.onnx", folder)
    assert ours.keys() == theirs.keys() and "error" in theirs[str(folder / "broken.jpg")]
    for f, r in ours.items():
        if "error" in r:
            continue
        a, b = r["predictions"], theirs[f]["predictions"]
        assert [p["label"] for p in a] == [p["label"] for p in b]
        assert max(abs(p["score"] - q["score"]) for p, q in zip(a, b)) <= 1e-3
    from vitfood.evaluate import main as evaluate
    with contextlib.redirect_stdout(io.StringIO()):
        evaluated = evaluate(["--model", str(out / "export" / "model.onnx"), "--output-dir", str(tmp_path / "eval")])
    assert evaluated["eval_accuracy"] == pytest.approx(results["eval_accuracy"])
    assert evaluated["eval_loss"] == pytest.approx(results["eval_loss"], abs=1e-4)
    assert "fp32" in error(capsys, "--model", out / "export" / "model.onnx", "--precision", "bf16", folder,
                           main=__import__("vitfood.predict").predict.main)


def test_predict_writes_every_prediction_to_csv_and_jsonl(run, tmp_path, capsys):
    out = run[0]
    folder = photos(tmp_path / "photos")
    from vitfood.predict import main
    for name in ("preds.csv", "preds.jsonl"):
        with pytest.raises(SystemExit) as e:
            main(["--model", str(out / "export" / "model.onnx"), str(folder), "--top-k", "3", "--output",
                  str(tmp_path / name)])
        assert e.value.code == 1  # the broken file; the others are all written
        assert capsys.readouterr().out.strip() == f"7 images, 6 classified, 1 unreadable: {tmp_path / name}"
    rows = list(csv.DictReader(open(tmp_path / "preds.csv")))
    lines = [json.loads(line) for line in open(tmp_path / "preds.jsonl")]
    assert list(rows[0]) == ["file", "label_1", "score_1", "label_2", "score_2", "label_3", "score_3", "error"]
    assert [r["file"] for r in rows] == [r["file"] for r in lines] and len(rows) == 7
    for row, line in zip(rows, lines):
        if "error" in line:
            assert row["error"].startswith("UnidentifiedImageError") and row["label_1"] == ""
        else:
            assert [row[f"label_{i}"] for i in (1, 2, 3)] == [p["label"] for p in line["predictions"]]
            assert float(row["score_1"]) == pytest.approx(line["predictions"][0]["score"], abs=1e-6)
    assert not list(tmp_path.glob("*.partial"))


def test_an_export_with_the_wrong_normalisation_fails_the_gate_and_is_kept_aside(run, tmp_path, monkeypatch, capsys):
    """The exporters' classic failure: the file is right and the preprocessing shipped with it is not."""
    out = tmp_path / "tiny"
    shutil.copytree(run[0], out)
    real = export.gate

    def wrong_normalisation(cfg, model, processor, folder, *args):
        path = os.path.join(folder, "preprocessor_config.json")
        spec = json.load(open(path))
        spec["image_mean"], spec["image_std"] = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's, not ViT's
        json.dump(spec, open(path, "w"))
        return real(cfg, model, processor, folder, *args)

    monkeypatch.setattr(export, "gate", wrong_normalisation)
    line = error(capsys, out, main=export.main)
    assert "disagrees with PyTorch" in line and "export-rejected-" in line
    aside = [p for p in os.listdir(out) if p.startswith("export-rejected-")]
    assert len(aside) == 1 and {"model.onnx", "parity.json"} <= set(os.listdir(out / aside[0]))
    assert not json.load(open(out / aside[0] / "parity.json"))["models"]["onnx"]["passed"]
    assert json.load(open(out / "export" / "parity.json")) == json.loads(json.dumps(run[2]))  # the good one stays


def test_an_int8_file_beyond_the_accepted_drop_is_refused_and_the_fp32_export_kept(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tiny"
    shutil.copytree(run[0], out)
    shutil.rmtree(out / "export")
    # a quantization gone wrong: the head's weights lost, every image given the same class
    import torch
    from transformers import AutoModelForImageClassification
    broken = AutoModelForImageClassification.from_pretrained(out / "model").eval()
    torch.nn.init.zeros_(broken.classifier.weight)
    onnxfile.to_onnx(broken, str(tmp_path / "broken.onnx"), (64, 64))
    monkeypatch.setattr(onnxfile, "to_int8", lambda source, path: shutil.copy(tmp_path / "broken.onnx", path))
    with pytest.raises(SystemExit) as e:
        run_main(lambda: export.main([str(out), "--int8", "--max-int8-drop", "0.05"]))
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "with 95% confidence), more than --max-int8-drop 0.05" in err[0], err
    assert sorted(os.listdir(out / "export")) == ["README.md", "SHA256SUMS", "config.json", "labels.txt", "model.onnx",
                                                  "parity.json", "preprocessor_config.json"]
    assert seal.damaged_file(out / "export") is None  # sealed without the int8 file it kept aside
    assert "ONNX int8 (refused)" in (out / "export" / "README.md").read_text()
    aside = next(out.glob("export-rejected-*"))
    assert sorted(os.listdir(aside)) == ["model-int8.onnx", "parity.json"]


def _answers(n, wrong):
    """Logits of n images in 3 classes, all labelled 0, the first `wrong` of them answered 2."""
    import torch
    logits = torch.zeros(n, 3)
    logits[:, 0] = 1
    logits[:wrong, 2] = 2
    return logits, torch.zeros(n, dtype=torch.long)


def test_the_int8_gate_refuses_a_drop_the_eval_split_can_show_and_keeps_one_it_cannot():
    import torch
    score = lambda logits, labels: export.scored_by(logits, labels, False, 0.5, 3)
    ref, labels = _answers(48, 0)
    two_of_48, _ = _answers(48, 2)  # 0.042 below, as two images flipped by a CPU's int8 kernels
    low, high = export.drop_interval(ref, two_of_48, labels, score, False)
    assert low <= 0.01 < 2 / 48 <= high  # so few images cannot show a drop beyond 0.01: kept
    ref, labels = _answers(500, 0)
    low, high = export.drop_interval(ref, _answers(500, 15)[0], labels, score, False)
    assert 0.01 < low < 0.03 < high  # 500 images can: refused
    assert export.drop_interval(ref, ref, labels, score, False) == [0, 0]
    low, high = export.drop_interval(_answers(500, 15)[0], ref, labels, score, False)  # int8 better: below 0
    assert low < high < 0
    assert export.drop_interval(ref, _answers(500, 15)[0], labels, score, False) == export.drop_interval(
        ref, _answers(500, 15)[0], labels, score, False)  # seeded: the verdict depends on the images and models only
    multi = lambda logits, truth: export.scored_by(logits, truth, True, 0.5, 3)  # macro mAP, scored per resample
    hot = torch.nn.functional.one_hot(torch.arange(60) % 3, 3).float()
    assert export.drop_interval(hot * 4 - 2, hot * 4 - 2, hot, multi, True) == [0, 0]
    low, high = export.drop_interval(hot * 4 - 2, -(hot * 4 - 2), hot, multi, True)  # every class inverted
    assert 0.3 < low <= high


def test_weights_that_are_not_finite_are_named_not_called_a_disagreement(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    out = tmp_path / "tiny"
    shutil.copytree(run[0], out, ignore=shutil.ignore_patterns("export"))
    weights = load_file(out / "model" / "model.safetensors")
    weights["classifier.bias"][1] = float("nan")
    os.remove(out / "model" / "model.safetensors")
    save_file(weights, out / "model" / "model.safetensors", metadata={"format": "pt"})
    seal.seal_folder(out / "model")  # as a run that diverged would have written and sealed it
    line = error(capsys, out, main=export.main, alone=True)
    assert "weights are not finite (classifier.bias holds NaN or inf)" in line and "agreement" not in line, line
    assert not (out / "export").exists() and not list(out.glob("export*"))


def test_a_changed_byte_in_an_export_is_named_with_the_command_that_writes_it_again(run, tmp_path, capsys):
    from vitfood import predict
    out = tmp_path / "tiny"
    shutil.copytree(run[0], out)
    onnx = out / "export" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 1
    onnx.write_bytes(bytes(data))
    line = error(capsys, "--model", onnx, out / "samples", main=predict.main, alone=True)
    assert line == (f"error: {out / 'export'} is damaged: model.onnx does not match its SHA-256 (changed after it was "
                    f"written); export it again: python -m vitfood.export {out}")


def test_what_to_export_and_bad_input_are_one_line(run, tmp_path, capsys):
    out = run[0]
    assert export.pick(str(out), "best") == (str(out / "checkpoint-200"), 200)
    assert export.pick(str(out), "last") == (str(out / "checkpoint-200"), 200)
    assert export.pick(str(out), "checkpoint-160") == (str(out / "checkpoint-160"), 160)
    assert "complete: checkpoint-160, checkpoint-200" in error(capsys, out, "--checkpoint", "checkpoint-7",
                                                               main=export.main, alone=True)
    assert "use model, best, last or checkpoint-<step>" in error(capsys, out, "--checkpoint", "first",
                                                                 main=export.main, alone=True)
    assert "not a vitfood run" in error(capsys, tmp_path, main=export.main, alone=True)
    assert "opset" in error(capsys, out, "--opset", "5", main=export.main, alone=True)
    # without the extra: one line that says how to install it, from the command line as a user meets it
    blocker = tmp_path / "no_onnx"
    blocker.mkdir()
    (blocker / "onnxruntime.py").write_text("raise ImportError('blocked', name='onnxruntime')\n")
    p = subprocess.run([sys.executable, "-m", "vitfood.export", str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), *sys.path])})
    assert "pip install 'vitfood[export]'" in error_line(p, alone=True)


def test_an_export_killed_midway_leaves_the_run_as_it_was(run, tmp_path):
    """A folder half written (export.tmp-<pid>) is cleared, and an earlier export renamed away for the swap
    (export.old-<pid>) is put back when the new one never arrived."""
    out = tmp_path / "tiny"
    shutil.copytree(run[0], out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.rename(out / "export", out / f"export.old-{dead.pid}")
    (out / f"export.tmp-{dead.pid}").mkdir()
    (out / f"export.tmp-{os.getpid()}").mkdir()  # a live export's: not touched
    export.clear_leftovers(str(out))
    assert sorted(p for p in os.listdir(out) if p.startswith("export")) == ["export", f"export.tmp-{os.getpid()}"]
    assert (out / "export" / "model.onnx").is_file()


@pytest.mark.slow
def test_the_demo_model_exports_to_int8_within_the_default_drop(tmp_path):
    """The demo as a user runs it, then `vitfood.export --int8` with the default --max-int8-drop (0.01)."""
    from vitfood.train import main as train
    out = tmp_path / "demo"
    results = train(["--preset", "demo", "--output-dir", str(out)])
    with contextlib.redirect_stdout(io.StringIO()):
        parity = export.main([str(out), "--int8"])
    models = parity["models"]
    assert models["pytorch"]["score"] == pytest.approx(results["eval_accuracy"]) and parity["images"] == 500
    assert models["onnx"]["passed"] and models["onnx"]["agreement"] >= 0.999
    assert models["onnx_int8"]["passed"]  # on 500 images the gate refuses a real drop beyond 0.01
    assert models["onnx_int8"]["size_mb"] < models["onnx"]["size_mb"] / 3


@pytest.mark.slow
def test_an_export_onto_a_full_disk_says_so_and_leaves_the_run_as_it_was(run, small_disk, monkeypatch, capsys):
    """A real 1.2 MB tmpfs holding the run's model/: refused before writing; and a disk that fills while writing
    (the check before it fooled) is the same line, not the exporter's or onnxruntime's error about a cut file."""
    out = small_disk / "run"
    out.mkdir()
    shutil.copy(run[0] / "train_config.json", out)
    shutil.copytree(run[0] / "model", out / "model")
    before = sorted(os.listdir(out))
    line = error(capsys, out, "--int8", main=export.main, alone=True)
    assert "the disk holding it is full" in line and "nothing was written" in line, line
    assert sorted(os.listdir(out)) == before
    monkeypatch.setattr(export, "room_needed", lambda model, int8: 1)  # let it start writing
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 60 * 1024))  # 60 kB left
    line = error(capsys, out, "--int8", main=export.main, alone=True)
    assert "the disk holding it is full" in line and "ONNX" not in line and "Wire format" not in line, line
    assert sorted(os.listdir(out)) == before
