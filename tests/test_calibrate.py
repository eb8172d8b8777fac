"""Calibration and the unknown answer: the temperature fitted and folded into model/, ECE as the textbook formula,
the threshold for a target accuracy or coverage, predict's "unknown", evaluate --calibrate."""

import json
import os
import shutil

import pytest
import torch
from conftest import cli, error, train
from safetensors.torch import load_file

from vitfood import calibrate, checkpoint


def test_ece_is_the_textbook_formula_on_a_worked_example():
    # 15 bins of width 1/15: 0.10 falls in bin 1, 0.55 and 0.58 in bin 8, 0.95 and 0.99 in bin 14.
    # ECE = 1/5 |0 - 0.10| + 2/5 |0.5 - 0.565| + 2/5 |1 - 0.97| = 0.020 + 0.026 + 0.012 = 0.058
    score = torch.tensor([0.10, 0.55, 0.58, 0.95, 0.99])
    right = torch.tensor([False, True, False, True, True])
    rows, ece = calibrate.reliability(score, right)
    assert ece == pytest.approx(0.058, abs=1e-9)
    assert [n for n, _, _ in rows] == [0, 1, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 2]
    assert rows[8][1:] == pytest.approx((0.565, 0.5))


@pytest.mark.parametrize("multi", [False, True])
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_at(multi):
    """Labels drawn from softmax(z / 2) (sigmoid for multi-label): the NLL's minimum is at T = 2, and there the
    scores are calibrated."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 10, generator=g) * 4
    if multi:
        labels = (torch.rand(20000, 10, generator=g) < torch.sigmoid(z / 2)).float()
    else:
        labels = torch.multinomial(torch.softmax(z / 2, -1), 1, generator=g).squeeze(1)
    cal = calibrate.calibrate(z, labels, multi)
    assert cal["temperature"] == pytest.approx(2.0, rel=0.03)
    for t in (cal["temperature"] * 0.97, cal["temperature"] * 1.03):  # a minimum
        assert calibrate.nll(z, labels, multi, t) > cal["nll_after"]
    assert cal["nll_after"] < cal["nll_before"] and cal["ece_after"] < 0.02 < cal["ece_before"]
    assert cal["kept"] and cal["nll_out_of_fold"] < cal["nll_before"] and cal["ece_out_of_fold"] < 0.02
    assert calibrate.kept(cal) == cal["temperature"] and calibrate.summary(cal).endswith(": kept")


def test_a_temperature_that_does_not_help_out_of_fold_is_not_kept():
    """Scores already calibrated (labels drawn from softmax(z)) on 40 images: the temperature fitted on them lowers
    their NLL, as a fit on its own data does, and does not hold on the images it was not fitted on."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 10, generator=g) * 3
    labels = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    cal = calibrate.calibrate(z, labels, False)
    assert cal["nll_after"] < cal["nll_before"]  # in sample, it always looks better
    assert not cal["kept"] and calibrate.kept(cal) == 1.0 and "out of fold it raised the" in cal["not_kept"]
    assert "raw scores kept, out of fold it raised the" in calibrate.summary(cal)
    # every image confidently wrong: the NLL falls all the way to the search bound (uniform scores), no minimum
    wrong = torch.eye(10)[torch.arange(60) % 10] * 5
    cal = calibrate.calibrate(wrong, (torch.arange(60) + 1) % 10, False)
    assert not cal["kept"] and "search bound" in cal["not_kept"]


def test_the_threshold_for_a_target_reaches_it_on_the_split_it_was_fitted_on():
    g = torch.Generator().manual_seed(1)
    score = torch.rand(1000, generator=g)
    right = torch.rand(1000, generator=g) < score  # more confident, more often right
    curve = calibrate.risk_coverage(score, right)
    assert curve[-1][1] == 1.0 and curve[-1][2] == pytest.approx(right.float().mean().item())
    for target in (0.7, 0.8, 0.9):
        threshold, coverage, accuracy = calibrate.threshold_for(curve, accuracy=target)
        kept = score >= threshold
        assert right[kept].float().mean().item() == pytest.approx(accuracy) and accuracy >= target
        assert kept.float().mean().item() == pytest.approx(coverage)
        lower = score[score < threshold].max()  # one more answer and the accuracy falls below the target
        assert right[score >= lower].float().mean().item() < target
    for share in (0.25, 0.5, 0.9):
        threshold, coverage, _ = calibrate.threshold_for(curve, coverage=share)
        assert (score >= threshold).float().mean().item() == pytest.approx(coverage) and coverage >= share
    assert calibrate.threshold_for(calibrate.risk_coverage(score, torch.zeros(1000, dtype=torch.bool)), 0.5) is None


def test_model_is_the_checkpoint_with_its_last_layer_divided_by_the_temperature(tiny_run):
    """tiny_run calibrates (the default): model/ is checkpoint-200 but for the classifier, divided by T; the
    argmax is unchanged, and transformers.pipeline gives softmax(z / T) with no code of vitfood's."""
    import transformers
    from PIL import Image
    out, results = tiny_run
    cal = results["calibration"]
    t = calibrate.kept(cal)  # the fitted temperature, or 1 where it did not help out of fold (the raw weights)
    assert json.loads((out / "model" / "config.json").read_text())[calibrate.KEY] == cal
    assert cal["nll_after"] <= cal["nll_before"] and 0 <= cal["ece_after"] <= 1 and cal["folds"] == 5
    raw, folded = load_file(out / "checkpoint-200" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    for key in raw:
        assert torch.equal(folded[key], raw[key] / t if key.startswith("classifier.") else raw[key]), key
    assert not checkpoint.damage(out / "checkpoint-200")  # the checkpoint keeps the raw weights, its seal holds
    image = Image.new("RGB", (64, 48), (200, 120, 40))
    plain = transformers.AutoModelForImageClassification.from_pretrained(out / "checkpoint-200").eval()
    processor = transformers.AutoImageProcessor.from_pretrained(out / "model")
    with torch.no_grad():
        z = plain(**processor(image, return_tensors="pt")).logits[0]
    scores = {s["label"]: s["score"] for s in transformers.pipeline("image-classification", model=str(out / "model"),
                                                                     device="cpu")(image, top_k=None)}
    expected = torch.softmax(z / t, -1)
    assert scores == pytest.approx({plain.config.id2label[i]: p for i, p in enumerate(expected.tolist())}, abs=1e-5)
    assert max(scores, key=scores.get) == plain.config.id2label[int(z.argmax())]
    card = (out / "model" / "README.md").read_text()
    assert f"T = {cal['temperature']:.3f}" in card and f"{cal['ece_before']:.4f} raw" in card
    assert ("Scores are calibrated" if cal["kept"] else "Scores are the raw ones") in card


def test_none_keeps_the_raw_model_and_a_target_stores_the_unknown_threshold(tmp_path, tiny_run):
    out = tmp_path / "raw"
    results = train("--max-steps", 10, "--eval-steps", 10, "--save-steps", 10, "--calibrate", "none",
                    "--target-coverage", "0.5", "--output-dir", out)
    assert "calibration" not in results
    assert os.path.samefile(out / "model" / "model.safetensors", out / "checkpoint-10" / "model.safetensors")
    config = json.loads((out / "model" / "config.json").read_text())
    assert calibrate.KEY not in config and config[calibrate.UNKNOWN] == results["unknown_threshold"]
    assert results["unknown_coverage"] >= 0.5


def test_predict_answers_unknown_below_the_stored_threshold(tiny_run, tmp_path, capsys):
    from vitfood.predict import main as predict
    model = tmp_path / "model"
    shutil.copytree(tiny_run[0] / "model", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, calibrate.UNKNOWN: 0.999}))
    from PIL import Image
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "a.png")
    predict(["--model", str(model), str(tmp_path / "a.png")])
    printed = capsys.readouterr()
    assert ": unknown (best: " in printed.out, printed
    assert f"note: config.json in {model} changed after it was written (edited?): read as it is now" in printed.err
    predict(["--model", str(model), str(tmp_path / "a.png"), "--threshold", "0", "--output", str(tmp_path / "p.csv")])
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].endswith(",unknown,error") and lines[1].endswith(",false,")


def test_evaluate_calibrate_writes_a_calibrated_copy_and_leaves_the_model_alone(tiny_run, tmp_path):
    out, results = tiny_run
    before = (out / "model" / "config.json").read_text()
    p = cli("--model", out / "model", "--calibrate", "--target-accuracy", "0.9", "--output-dir", tmp_path / "e",
            "--num-workers", 0, module="vitfood.evaluate")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((tmp_path / "e" / "eval_results.json").read_text())
    # model/ is calibrated already (T near 1 again), or kept its raw scores (the run's T again)
    run_t = results["calibration"]["temperature"]
    assert r["calibration"]["temperature"] == pytest.approx(1.0 if results["calibration"]["kept"] else run_t, abs=0.02)
    assert f"use it: python -m vitfood.predict --model {tmp_path / 'e' / 'model'} <images>" in p.stdout
    assert 0 <= r["ece"] <= 1 and (tmp_path / "e" / "reliability.png").is_file()
    assert (tmp_path / "e" / "risk_coverage.csv").read_text().startswith("threshold,coverage,accuracy")
    copy = json.loads((tmp_path / "e" / "model" / "config.json").read_text())
    if "unknown_threshold" in r:
        assert copy[calibrate.UNKNOWN] == r["unknown_threshold"] and r["unknown_accuracy"] >= 0.9
    assert (out / "model" / "config.json").read_text() == before


def test_bad_calibration_options_are_one_line(capsys, tmp_path):
    assert "exclude each other" in error(capsys, "--target-accuracy", "0.9", "--target-coverage", "0.5")
    assert "must be in (0, 1]" in error(capsys, "--target-accuracy", "1.5")
    assert "for single-label models" in error(capsys, "--synthetic-dishes", "3", "--target-accuracy", "0.9",
                                              "--output-dir", tmp_path / "m")


def test_one_eval_image_is_one_warning_with_its_one_reason(tmp_path, capsys):
    results = train("--eval-split", "validation[:1]", "--max-steps", 1, "--eval-steps", 1, "--save-steps", 1,
                    "--target-accuracy", "0.9", "--output-dir", tmp_path / "run")
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 1 eval image(s): too few to calibrate or set an unknown threshold on (at least 2); "
                        "model/ keeps the raw scores"]
    assert "calibration" not in results and "unknown_threshold" not in results


def test_the_moved_threshold_predicts_on_calibrated_scores_the_classes_the_raw_ones_did():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 3, generator=g, dtype=torch.float64) * 3
    for t, temperature in ((0.4, 0.7), (0.3, 2.5), (0.5, 1.7), (0.9, 0.2)):
        own = calibrate.moved(t, temperature)
        assert torch.equal(torch.sigmoid(z) >= t, torch.sigmoid(z / temperature) >= own), (t, temperature)
    assert calibrate.moved(0.5, 3.0) == 0.5 and calibrate.moved(0.3, 1.0) == pytest.approx(0.3)
