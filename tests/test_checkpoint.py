"""Checkpoints: which ones a run keeps (the newest and the best), the best exported, and resuming from them:
bit for bit from the middle of an epoch, and with --resume auto (a fresh directory, a finished run, the newest
run of the same model and data set)."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, train
from conftest import events as _events
from vitfood import checkpoint, rundir


def test_rotation_keeps_newest_two_plus_best(tiny_run):
    out, _ = tiny_run
    steps = [s for s, _ in checkpoint.complete_checkpoints(out)]
    acc = {int(e.step): e.value for e in _events(out).Scalars("accuracy/top1")}
    best_step = min(s for s in acc if acc[s] == max(acc.values()))  # the first to reach the best is kept
    assert json.loads((out / checkpoint.BEST).read_text())["step"] == best_step
    assert set(steps) == {160, 200} | {best_step}
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary leftovers


def test_rotation_never_deletes_the_best(tmp_path):
    from transformers import ViTImageProcessor
    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda path, state_dict=None: (os.makedirs(path, exist_ok=True), torch.save({}, os.path.join(path, "w.pt")))
    processor = ViTImageProcessor()
    for step in (10, 20, 30, 40, 50):
        checkpoint.save(tmp_path, step, model, processor, {"step": step})
    (tmp_path / "checkpoint-60").mkdir()  # incomplete: no marker; never counted, never picked
    rundir.rotate(tmp_path, keep=2, best_step=20)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [20, 40, 50]


def test_export_best_and_resume_auto_on_a_fresh_dir(tmp_path, capsys):
    out = tmp_path / "best"
    results = train("--max-steps", 40, "--eval-steps", 10, "--save-steps", 10, "--lr", "5e-2",
                    "--export", "best", "--resume", "auto", "--calibrate", "none", "--output-dir", out)
    assert "no complete checkpoint" in capsys.readouterr().out
    best = json.loads((out / checkpoint.BEST).read_text())
    assert results["exported_step"] == best["step"] and results["eval_accuracy"] == pytest.approx(best["eval_accuracy"])
    a = load_file(out / "model" / "model.safetensors")
    b = load_file(out / f"checkpoint-{best['step']}" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train("--resume", "auto", "--output-dir", out, "--lr", "5e-2") is None  # finished: nothing to do
    assert "already finished" in capsys.readouterr().out


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    common = ["--max-steps", 24, "--eval-steps", 8, "--save-steps", 8, "--save-total-limit", 5,
              "--grad-accum-steps", 2, "--num-workers", 0, "--warmup-steps", 4, "--weight-decay", 0.1]
    full = tmp_path / "full"
    train(*common, "--output-dir", full)
    # 192 train images / 16 = 12 micro-batches a epoch = 6 steps: step 8 is in the middle of epoch 2
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-8", part / "checkpoint-8")
    shutil.copy(full / "train_config.json", part / "train_config.json")
    # the saved config; with 2 persistent loader workers, which start mid-epoch and cross two epoch ends (in a
    # process of its own: in this one they would outlive the run, their shutdown waiting seconds at a later GC)
    r = cli("--resume", "auto", "--output-dir", part, "--num-workers", 2)
    assert r.returncode == 0 and "2 workers" in r.stdout, r.stderr[-2000:]
    a, b = load_file(full / "model" / "model.safetensors"), load_file(part / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(full / "checkpoint-24" / "training_state.pt", weights_only=True)
    sb = torch.load(part / "checkpoint-24" / "training_state.pt", weights_only=True)
    assert all(torch.equal(x["exp_avg"], y["exp_avg"]) for x, y in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()))


def test_resume_auto_without_output_dir_continues_the_newest_matching_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train("--max-steps", 4, "--save-steps", 2, "--eval-steps", 2)  # runs/<timestamp>-vit-micro-synthetic
    (tmp_path / "runs" / "other").mkdir()  # another model's run: never chosen
    (tmp_path / "runs" / "other" / "train_config.json").write_text('{"model": "vit-tiny", "dataset": "synthetic"}')
    (first,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "other"]
    capsys.readouterr()
    results = train("--resume", "auto", "--max-steps", 6)
    printed = capsys.readouterr().out
    assert f"continuing {os.path.join('runs', first.name)}" in printed and "resuming from" in printed
    assert results["global_step"] == 6 and results["segments"] == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([first.name, "other"])  # no new run
    first_segment = torch.load(first / "checkpoint-4" / "training_state.pt", weights_only=True)["ledger"]
    assert first_segment["segments"] == 1 and first_segment["images"] == 4 * 16
    # all_results covers both segments: all the time and every image, not only the last part's
    assert results["train_runtime"] > first_segment["train_runtime"]
    # over all 6 * 16 images. Both figures are rounded to 3 decimals: the rate by up to 0.0005 itself, and by what
    # the runtime's 0.0005 s moves it (n / t^2 of it), at any speed of the machine
    runtime, n = results["train_runtime"], 6 * 16
    assert results["train_samples_per_second"] == pytest.approx(n / runtime, abs=0.0006 + n * 0.0006 / runtime ** 2)
    # a run of the same model and data set with another option that is fixed on resume is never continued
    train("--resume", "auto", "--max-steps", 2, "--label-smoothing", 0.1)
    assert (f"no earlier run of vit-micro on synthetic with these options (the newest, "
            f"{os.path.join('runs', first.name)}, differs in --label-smoothing)") in capsys.readouterr().out
    shutil.rmtree(tmp_path / "runs")
    train("--resume", "auto", "--max-steps", 2)
    assert "no earlier run of vit-micro on synthetic under runs/; starting a new one" in capsys.readouterr().out
