"""A whole training run, end to end: it learns, and leaves in its run directory what it promises (results,
config, environment, a complete last checkpoint) under a short default name."""

import json
import os

import pytest

from conftest import events as _events
from vitfood import checkpoint


def test_training_lowers_loss_and_lifts_accuracy(tiny_run):
    out, results = tiny_run
    ea = _events(out)
    loss = [e.value for e in ea.Scalars("loss/train")]
    acc = [e.value for e in ea.Scalars("accuracy/top1")]
    assert loss[-1] < loss[0] * 0.8, loss
    assert acc[-1] > 0.5 and acc[-1] > acc[0], acc  # 4 classes: chance is 0.25
    assert results["global_step"] == 200 and results["eval_accuracy"] == pytest.approx(acc[-1])
    for key in ("eval_loss", "eval_accuracy", "eval_top5", "eval_balanced_accuracy", "eval_f1_macro", "global_step",
                "train_runtime", "train_samples_per_second"):
        assert key in json.loads((out / "all_results.json").read_text())


def test_run_directory_contents_and_names(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    cfg = json.loads((out / "train_config.json").read_text())
    env = json.loads((out / "env.json").read_text())
    assert cfg["model"] == "vit-micro" and cfg["max_steps"] == 200
    assert {"python", "torch", "transformers", "datasets", "device", "torch_threads", "git_commit"} <= env.keys()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "training_state.pt", checkpoint.MARKER):
        assert (out / "checkpoint-200" / name).is_file()
    monkeypatch.chdir(tmp_path)
    from vitfood.rundir import parse_run
    cfg, run_dir, _ = parse_run(["--model", "google/vit-base-patch16-224-in21k", "--dataset", "ethz/food101"])
    parts = os.path.normpath(run_dir).split(os.sep)
    assert parts[0] == "runs" and len(parts) == 2 and parts[1].endswith("google_vit-base-patch16-224-in21k-ethz_food101")
