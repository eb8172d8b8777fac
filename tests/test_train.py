import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, train
from vitfood import checkpoint


def _events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_training_lowers_loss_and_lifts_accuracy(tiny_run):
    out, results = tiny_run
    ea = _events(out)
    loss = [e.value for e in ea.Scalars("loss/train")]
    acc = [e.value for e in ea.Scalars("accuracy/top1")]
    assert loss[-1] < loss[0] * 0.8, loss
    assert acc[-1] > 0.5 and acc[-1] > acc[0], acc  # 4 classes: chance is 0.25
    assert results["global_step"] == 200 and results["eval_accuracy"] == pytest.approx(acc[-1])
    for key in ("eval_loss", "eval_accuracy", "eval_top5", "global_step", "train_runtime", "train_samples_per_second"):
        assert key in json.loads((out / "all_results.json").read_text())


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
    checkpoint.rotate(tmp_path, keep=2, best_step=20)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [20, 40, 50]


def test_tensorboard_has_every_scalar_image_and_hparams(tiny_run):
    out, _ = tiny_run
    ea = _events(out)
    tags = ea.Tags()
    for tag in ("loss/train", "optim/lr", "optim/grad_norm", "speed/img_per_s", "speed/data_wait_percent",
                "loss/eval", "accuracy/top1", "accuracy/top5"):
        values = [e.value for e in ea.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), tag
    assert [int(e.step) for e in ea.Scalars("accuracy/top1")] == [40, 80, 120, 160, 200]
    # the first logging window holds the start-up: no images/s for it, which would squash the chart's scale
    assert [int(e.step) for e in ea.Scalars("speed/img_per_s")][0] == 10
    assert all(0 <= e.value <= 100 for e in ea.Scalars("speed/data_wait_percent"))
    # groups as TensorBoard sorts them: the useful ones first
    groups = sorted({t.split("/")[0] for t in tags["scalars"] + tags["images"]})
    assert groups[:2] == ["accuracy", "loss"], groups
    assert {"train/augmented_images", "predictions/confusion_matrix", "predictions/mistakes"} <= set(tags["images"])
    assert "hparams" in ea.PluginTagToContent("hparams") or ea.PluginTagToContent("hparams")


def test_exported_model_works_with_pipeline(tiny_run):
    out, _ = tiny_run
    from PIL import Image
    from transformers import pipeline
    clf = pipeline("image-classification", model=str(out / "model"), device="cpu")
    from vitfood.synthetic import class_names
    preds = clf(Image.new("RGB", (64, 48), (10, 200, 30)), top_k=4)
    assert {p["label"] for p in preds} == set(class_names(4))
    assert sum(p["score"] for p in preds) == pytest.approx(1.0, abs=1e-4)


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    common = ["--max-steps", 24, "--eval-steps", 8, "--save-steps", 8, "--save-total-limit", 5,
              "--grad-accum-steps", 2, "--num-workers", 2, "--warmup-steps", 4, "--weight-decay", 0.1]
    full = tmp_path / "full"
    train(*common, "--output-dir", full)
    # 192 train images / 16 = 12 micro-batches a epoch = 6 steps: step 8 is in the middle of epoch 2
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-8", part / "checkpoint-8")
    shutil.copy(full / "train_config.json", part / "train_config.json")
    train("--resume", "auto", "--output-dir", part)  # the saved config, no other flags
    a, b = load_file(full / "model" / "model.safetensors"), load_file(part / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(full / "checkpoint-24" / "training_state.pt", weights_only=True)
    sb = torch.load(part / "checkpoint-24" / "training_state.pt", weights_only=True)
    assert all(torch.equal(x["exp_avg"], y["exp_avg"]) for x, y in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()))


def test_fp16_scaler_skips_a_step_with_inf_gradient():
    from vitfood.common import autocast
    from vitfood.model import make_scheduler
    from vitfood.steps import forward_backward, optimizer_step
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    model.forward_orig = model.forward
    model.forward = lambda pixel_values: type("Out", (), {"logits": model.forward_orig(pixel_values)})
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # as make_optimizer builds it
    sched = make_scheduler(opt, 0, 10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    amp = autocast("fp16", torch.device("cpu"))
    images, labels = torch.randint(0, 255, (4, 3, 4, 4), dtype=torch.uint8), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    forward_backward(model, images, labels, amp, scaler, [0.5] * 3, [0.5] * 3, labels.numel())
    next(model.parameters()).grad[0, 0] = float("inf")
    norm, stepped = optimizer_step(model, opt, scaler, sched, 1.0)
    assert not stepped and not math.isfinite(norm.item()) and scaler.get_scale() == 512.0
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # skipped
    forward_backward(model, images, labels, amp, scaler, [0.5] * 3, [0.5] * 3, labels.numel())
    optimizer_step(model, opt, scaler, sched, 1.0)
    assert not all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # a finite step applies


# ---------------------------------------------------------------- errors: one line, exit 2, nothing harmed

def _error(capsys, *args):
    from vitfood.common import run_main
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train(*args))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_errors_are_one_clear_line(capsys, tmp_path):
    assert "food101" in (m := _error(capsys, "--dataset", "food101")) and "offline" in m and "--preset demo" in m
    m = _error(capsys, "--model", "google/vit-base-patch16-224-in21k", "--output-dir", tmp_path / "m")
    assert "google/vit-base-patch16-224-in21k" in m and "Hub" in m and "local model folder" in m
    assert "does not exist" in _error(capsys, "--dataset", "./no/such/folder")
    assert "columns: image, label" in _error(capsys, "--image-column", "img", "--output-dir", tmp_path / "c")
    assert "columns: image, label" in _error(capsys, "--label-column", "y", "--output-dir", tmp_path / "c")
    assert "eval split is empty" in _error(capsys, "--eval-split", "validation[:0]", "--output-dir", tmp_path / "e")
    assert "--max-steps must be a positive" in _error(capsys, "--max-steps", "-3")
    assert "--batch-size must be a positive" in _error(capsys, "--batch-size", "0")
    assert "invalid choice" in _error(capsys, "--precision", "fp8")
    assert "invalid int value" in _error(capsys, "--eval-steps", "ten")
    assert "not supported on the CPU" in _error(capsys, "--precision", "fp16", "--output-dir", tmp_path / "f")
    assert "not a complete vitfood checkpoint" in _error(capsys, "--resume", tmp_path)
    assert "no such checkpoint" in _error(capsys, "--resume", tmp_path / "nope")


def test_config_file_and_flag_precedence(tmp_path, capsys):
    from vitfood.config import build_parser, resolve
    (tmp_path / "c.yaml").write_text("batch_size: 8\nlr: 0.001\nmodel: vit-micro\n")
    explicit = vars(build_parser().parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.01"]))
    cfg = resolve(explicit)
    assert (cfg.batch_size, cfg.lr, cfg.model, cfg.epochs) == (8, 0.01, "vit-micro", 4.0)
    cfg = resolve(vars(build_parser().parse_args(["--preset", "demo", "--max-steps", "7"])))
    assert (cfg.dataset, cfg.model, cfg.max_steps) == ("synthetic", "vit-tiny", 7)
    (tmp_path / "bad.json").write_text('{"batch_size": "big"}')
    assert "must be int" in _error(capsys, "--config", tmp_path / "bad.json")
    (tmp_path / "unknown.json").write_text('{"batchsize": 3}')
    assert "unknown option(s) batchsize" in _error(capsys, "--config", tmp_path / "unknown.json")


def test_failed_runs_never_touch_existing_checkpoints(tiny_run, capsys):
    out, _ = tiny_run
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert "already holds" in _error(capsys, "--output-dir", out, "--max-steps", 5)
    assert "not supported on the CPU" in _error(capsys, "--output-dir", out, "--resume", "auto", "--precision", "fp16",
                                                "--lr", "5e-3")  # the run's own lr (it cannot change on resume)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_run_directory_contents_and_names(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    cfg = json.loads((out / "train_config.json").read_text())
    env = json.loads((out / "env.json").read_text())
    assert cfg["model"] == "vit-micro" and cfg["max_steps"] == 200
    assert {"python", "torch", "transformers", "datasets", "device", "torch_threads", "git_commit"} <= env.keys()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "training_state.pt", checkpoint.MARKER):
        assert (out / "checkpoint-200" / name).is_file()
    monkeypatch.chdir(tmp_path)
    from vitfood.train import parse_run
    cfg, run_dir, _ = parse_run(["--model", "google/vit-base-patch16-224-in21k", "--dataset", "ethz/food101"])
    parts = os.path.normpath(run_dir).split(os.sep)
    assert parts[0] == "runs" and len(parts) == 2 and parts[1].endswith("google_vit-base-patch16-224-in21k-ethz_food101")


def test_cli_error_has_no_traceback(tmp_path):
    r = cli("--preset", "demo", "--precision", "fp16", "--output-dir", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    r = cli("--dataset", "food101", "--model", "vit-micro", "--output-dir", tmp_path / "y")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "food101" in r.stderr, r.stderr


def test_export_best_and_resume_auto_on_a_fresh_dir(tmp_path, capsys):
    out = tmp_path / "best"
    results = train("--max-steps", 40, "--eval-steps", 10, "--save-steps", 10, "--lr", "5e-2",
                    "--export", "best", "--resume", "auto", "--output-dir", out)
    assert "no complete checkpoint" in capsys.readouterr().out
    best = json.loads((out / checkpoint.BEST).read_text())
    assert results["exported_step"] == best["step"] and results["eval_accuracy"] == pytest.approx(best["eval_accuracy"])
    a = load_file(out / "model" / "model.safetensors")
    b = load_file(out / f"checkpoint-{best['step']}" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train("--resume", "auto", "--output-dir", out, "--lr", "5e-2") is None  # finished: nothing to do
    assert "already finished" in capsys.readouterr().out


def test_trains_on_an_imagefolder_of_mixed_image_modes(tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    modes = ["L", "RGBA", "CMYK", "P", "LA", "RGB"]
    for c in ("soup", "cake"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i, mode in enumerate(modes * 2):
            img = Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).convert(mode)
            img.save(tmp_path / "imgs" / c / f"{i}.{'jpg' if mode in ('L', 'CMYK', 'RGB') else 'png'}")
    results = train("--dataset", tmp_path / "imgs", "--max-steps", 3, "--batch-size", 4, "--output-dir", tmp_path / "run")
    assert results["global_step"] == 3 and math.isfinite(results["eval_loss"])
    cfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert sorted(cfg["id2label"].values()) == ["cake", "soup"]


def test_console_entry_point(tmp_path):
    import subprocess
    import sys
    exe = os.path.join(os.path.dirname(sys.executable), "vitfood-train")
    r = subprocess.run([exe, "--preset", "demo", "--precision", "fp16", "--output-dir", tmp_path / "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --precision fp16 is not supported on the CPU; use bf16 or fp32"


def test_predict_on_a_run_model_and_a_checkpoint(tiny_run, tmp_path, capsys):
    from PIL import Image
    from vitfood.predict import main as predict_main
    from vitfood.synthetic import class_names
    Image.new("RGB", (70, 50), (200, 20, 20)).save(tmp_path / "a.png")
    Image.new("L", (30, 90), 128).save(tmp_path / "b.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    out, _ = tiny_run
    for model in (out / "model", out / "checkpoint-200"):
        predict_main(["--model", str(model), "--json", "--top-k", "3", str(tmp_path)])
        captured = capsys.readouterr()
        rows = [json.loads(line) for line in captured.out.splitlines()]
        assert [os.path.basename(r["file"]) for r in rows] == ["a.png", "b.jpg", "broken.jpg"]
        for r in rows[:2]:
            assert len(r["predictions"]) == 3 and {p["label"] for p in r["predictions"]} <= set(class_names(4))
            assert r["predictions"][0]["score"] >= r["predictions"][-1]["score"]
        assert "error" in rows[2] and "broken.jpg" in captured.err


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
    assert results["train_samples_per_second"] == pytest.approx(6 * 16 / results["train_runtime"], rel=1e-3)
    shutil.rmtree(tmp_path / "runs")
    train("--resume", "auto", "--max-steps", 2)
    assert "no earlier run of vit-micro on synthetic under runs/; starting a new one" in capsys.readouterr().out
