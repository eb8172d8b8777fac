"""What `tensorboard --logdir runs` shows: the run's config as text, the per-class table at each eval, the
end status in HParams (success, stopped, failure), and images whose captions stay whole."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import ImageFont

from conftest import TINY, finish, train
from conftest import events as _events
from vitfood import report


def _texts(ea, tag):
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors(tag)]


def _end_status(ea):
    """The session end status HParams shows for the run, or None when none was written."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    content = ea.PluginTagToContent("hparams").get(metadata.SESSION_END_INFO_TAG)
    if content is None:
        return None
    return api_pb2.Status.Name(plugin_data_pb2.HParamsPluginData.FromString(content).session_end_info.status)


def test_text_records_and_the_status_of_a_finished_run(tiny_run):
    out, results = tiny_run
    ea = _events(out)
    (step, config), = _texts(ea, "setup/config")
    assert step == 0 and json.loads(config.strip("`").removeprefix("json")) == json.loads((out / "train_config.json").read_text())
    assert "torch" in _texts(ea, "setup/env")[0][1]
    tables = _texts(ea, "tables/per_class")
    assert [s for s, _ in tables] == [40, 80, 120, 160, 200]
    assert tables[-1][1].startswith("| class | precision | recall | f1 | support |") and tables[-1][1].count("\n") == 5
    assert _end_status(ea) == "STATUS_SUCCESS"
    assert _texts(ea, "run/status")[-1][1].startswith("**success** at step 200: model/ (step 200")
    summary = _texts(ea, "run/summary")[-1][1]
    assert "| training images/s |" in summary and "| peak resident memory (GB) |" in summary
    # text records under their own tags (no "/text_summary"), the run's own before the per-class tables
    texts = sorted(ea.Tags()["tensors"])
    assert texts.index("run/status") < texts.index("setup/config") < texts.index("tables/per_class"), texts


def test_every_scalar_image_and_hparams(tiny_run):
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2
    out, _ = tiny_run
    ea = _events(out)
    tags = ea.Tags()
    for tag in ("loss/train", "optim/lr", "optim/grad_norm", "speed/img_per_s", "speed/data_wait_percent",
                "loss/eval", "accuracy/top1", "metrics/top5", "metrics/balanced_accuracy", "metrics/f1_macro",
                "train/epoch", "memory/peak_rss_gb", "speed/eval_runtime_s", "speed/eval_img_per_s"):
        values = [e.value for e in ea.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), tag
    assert [int(e.step) for e in ea.Scalars("accuracy/top1")] == [40, 80, 120, 160, 200]
    epochs = [e.value for e in ea.Scalars("train/epoch")]  # 192 train images in batches of 16: 12 steps an epoch
    assert epochs[0] == pytest.approx(5 / 12) and epochs[-1] == pytest.approx(200 / 12)
    # the first logging window holds the start-up: no images/s for it, which would squash the chart's scale
    assert [int(e.step) for e in ea.Scalars("speed/img_per_s")][0] == 10
    assert all(0 <= e.value <= 100 for e in ea.Scalars("speed/data_wait_percent"))
    # groups as TensorBoard sorts them: the useful ones first
    groups = sorted({t.split("/")[0] for t in tags["scalars"] + tags["images"]})
    assert groups[:2] == ["accuracy", "loss"], groups
    assert {"train/augmented_images", "predictions/confusion_matrix", "predictions/mistakes"} <= set(tags["images"])
    # HParams: the session's start with the run's values, and its end; no experiment record, which TensorBoard
    # would take for every run's: it compares the runs' values itself and shows first the options that differ
    records = ea.PluginTagToContent("hparams")
    assert {metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG} <= records.keys()
    assert metadata.EXPERIMENT_TAG not in records
    assert sorted(tags["scalars"])[:3] == ["accuracy/top1", "loss/eval", "loss/train"]  # what Time Series shows first
    assert not {"run/end_status", "run/score"} & set(tags["scalars"])  # no one-point charts
    values = plugin_data_pb2.HParamsPluginData.FromString(records[metadata.SESSION_START_INFO_TAG]).session_start_info.hparams
    assert values["model"].string_value == "vit-micro" and values["lr"].number_value == 2e-3
    assert values["total_steps"].string_value == "200" and values["precision"].string_value == "fp32"
    assert "output_dir" not in values and "resume" not in values  # different in every run, not hyperparameters


def test_a_failed_run_is_marked_failed(tmp_path, monkeypatch, capsys):
    from vitfood.common import run_main
    monkeypatch.setenv("VITFOOD_FAULT", "error:step:7")
    with pytest.raises(SystemExit):
        run_main(lambda: train("--max-steps", 20, "--save-steps", 5, "--eval-steps", 5, "--output-dir", tmp_path / "run"))
    ea = _events(tmp_path / "run")
    assert _end_status(ea) is None  # a failed run is resumed to its end: HParams keeps the first status it sees
    assert _texts(ea, "run/status")[-1][1].startswith("**failure** at step 7") and "fault injected" in \
        _texts(ea, "run/status")[-1][1]
    monkeypatch.delenv("VITFOOD_FAULT")
    train("--max-steps", 20, "--save-steps", 5, "--eval-steps", 5, "--output-dir", tmp_path / "run", "--resume", "auto")
    ea = _events(tmp_path / "run")
    assert _end_status(ea) == "STATUS_SUCCESS"  # resumed to its end: the status its HParams row shows
    assert [line.split(" at ")[0] for _, line in _texts(ea, "run/status")] == ["**failure**", "**success**"]


def test_a_stopped_run_says_so_and_ends_as_success_once_resumed(sigterm_stopped, tmp_path):
    stopped, code, _, stderr = sigterm_stopped  # SIGTERM at step 11
    assert code == 75, stderr[-2000:]
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    ea = _events(out)
    assert _end_status(ea) is None  # a stop is not an end: HParams keeps the first end status it sees
    assert _texts(ea, "run/status")[-1][1].startswith("**stopped** at step 11")
    finish(out)
    ea = _events(out)
    assert _end_status(ea) == "STATUS_SUCCESS"


def test_captions_wrap_at_word_ends_and_are_never_cut():
    fnt = ImageFont.load_default(size=12)
    names = ["chicken_quesadilla", "apple pie with cream", "a" * 30, "pad_thai"]
    for name in names:
        lines = report.wrap(name, fnt, 90)
        assert "".join(lines).replace(" ", "") == name.replace(" ", "")  # nothing dropped
        assert all(fnt.getlength(line) <= 90 or " " not in line and "_" not in line.rstrip("_") for line in lines)
    assert report.wrap("chicken_quesadilla", fnt, 90) == ["chicken_", "quesadilla"]
    mistakes = [dict(confidence=0.9, true=0, pred=1, image=torch.zeros(3, 64, 64, dtype=torch.uint8))]
    card = report.mistakes_card(mistakes, ["chicken_quesadilla", "beef_carpaccio"])
    assert card.size == report.CARD  # drawn at the size TensorBoard shows, so nothing is shrunk


def test_long_class_names_keep_every_caption_line_on_the_cards():
    """Food-101's grilled_cheese_sandwich, a 47-character plant disease: each card keeps the true class, the
    predicted one and the score, a name cut with an ellipsis where it must be."""
    import numpy as np
    fnt = ImageFont.load_default(size=12)
    long = ["grilled_cheese_sandwich", "Tomato___Tomato_Yellow_Leaf_Curl_Virus_disease", "apple pie with whipped cream",
            "x" * 60]
    for name in long:
        lines = report.wrap_lines(name, fnt, 90, 2)
        assert len(lines) <= 2 and all(fnt.getlength(line) <= 90 for line in lines), lines
        assert lines[-1].endswith("…") == (len(report.wrap(name, fnt, 90)) > 2 or fnt.getlength(name) > 180)
    mistakes = [dict(confidence=0.9, true=i, pred=(i + 1) % 4, image=torch.zeros(3, 64, 64, dtype=torch.uint8))
                for i in range(4)]
    for mk in mistakes:  # the card's tiles hold 7 lines: the score's is the last of them
        lines = [line for line, _ in report.card_caption(mk, long, fnt, 90)]
        assert len(lines) <= 7 and lines[-1] == "p(pred)=0.90" and "true" in lines and "pred" in lines, lines
    assert report.mistakes_card(mistakes, long).size == report.CARD
    m = np.zeros((20, 20), dtype=int)
    m[1, 3], m[3, 1] = 50, 40  # the two longest names confused: the pair is shortened, the count keeps its place
    card = np.asarray(report.confusion_card(m.tolist(), long + [f"c{i}" for i in range(16)]).convert("L"))
    row = card[24:44]
    text = np.flatnonzero((row < 100).any(0))  # dark text (the bar is light) across the row
    gaps = np.flatnonzero(np.diff(text) > 8)  # the pair's text, then a gap, then the count at the right
    assert len(gaps) >= 1 and text[-1] >= report.CARD[0] - 12


@pytest.mark.parametrize("classes", [4, 11, 20, 101])
def test_confusion_card_fits_a_tensorboard_card(classes):
    import numpy as np
    m = np.eye(classes, dtype=int) * 5 + (np.arange(classes)[:, None] + np.arange(classes)) % 3
    card = report.confusion_card(m.tolist(), [f"class_{i}" for i in range(classes)])
    assert card.size == report.CARD and len(set(card.getdata())) > 3


def test_evaluate_logs_at_the_step_of_the_checkpoint_or_exported_model(tiny_run, tmp_path):
    from vitfood.evaluate import main as evaluate_main
    out, results = tiny_run
    calibrated = "eval_loss_uncalibrated" in results  # model/ holds a temperature: its loss is the calibrated one
    run = _events(out)
    if calibrated:  # the training run logs it too, under the same name, at the exported step
        assert [(e.step, round(e.value, 4)) for e in run.Scalars("loss/eval_calibrated")] == [
            (200, round(results["eval_loss"], 4))]
    for folder, step, loss in (("checkpoint-160", 160, "loss/eval"),
                               ("model", 200, "loss/eval_calibrated" if calibrated else "loss/eval")):
        evaluate_main(["--model", str(out / folder), "--output-dir", str(tmp_path / folder),
                       "--tensorboard", str(tmp_path / f"tb-{folder}")])
        ea = _events(tmp_path / f"tb-{folder}")
        assert [int(e.step) for e in ea.Scalars("accuracy/top1")] == [step]
        assert [int(e.step) for e in ea.Scalars(loss)] == [step]
        assert [s for s, _ in _texts(ea, "tables/per_class")] == [step]
        assert _texts(ea, "run/status")[0][1].startswith(f"**evaluated** {out / folder} (step {step}")


def test_curves_are_whole_after_a_kill_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["--max-steps", "20", "--save-steps", "10", "--eval-steps", "10", "--output-dir", str(out), "--resume", "auto"]
    p = subprocess.run([sys.executable, "-m", "vitfood.train", *TINY, *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore", "VITFOOD_FAULT": "step:18"}, timeout=300)
    assert p.returncode == -signal.SIGKILL  # killed at step 18: steps 11-15 were logged, checkpoint-10 is the last
    # TensorBoard reads event files in name order, which starts with the second a file was opened in: the
    # resumed run's file must come after the killed run's, as a process restarted seconds later always does
    opened = max(int(name.split(".")[3]) for name in os.listdir(out) if name.startswith("events.out.tfevents."))
    time.sleep(max(0.0, opened + 1 - time.time()))
    train(*args)
    ea = _events(out)
    assert [e.step for e in ea.Scalars("loss/train")] == [5, 10, 15, 20]  # each once: none lost, none doubled
    assert [e.step for e in ea.Scalars("loss/eval")] == [10, 20]
