"""Hostile input: damaged images, bad labels, bad configs and checkpoints. One clear line, or a counted skip."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, cli, error, image_folder, train
from vitfood import checkpoint, rundir


def test_errors_are_one_clear_line(tiny_run, capsys, tmp_path):
    one = lambda *args: error(capsys, *args, alone=True)  # tiny_run: the synthetic set is made (no progress bars)
    assert "food101" in (m := one("--dataset", "food101")) and "offline" in m and "--dataset synthetic" in m
    m = one("--model", "google/vit-base-patch16-224-in21k", "--output-dir", tmp_path / "m")
    assert "google/vit-base-patch16-224-in21k" in m and "Hub" in m and "local model folder" in m
    assert "./no/such/folder: no such folder" in one("--dataset", "./no/such/folder")
    assert "columns: image, label" in one("--image-column", "img", "--output-dir", tmp_path / "c")
    assert "columns: image, label" in one("--label-column", "y", "--output-dir", tmp_path / "c")
    assert "eval split is empty" in one("--eval-split", "validation[:0]", "--output-dir", tmp_path / "e")
    assert "--max-steps must be a positive" in one("--max-steps", "-3")
    assert "--batch-size must be a positive" in one("--batch-size", "0")
    assert "invalid choice" in one("--precision", "fp8")
    assert "invalid int value" in one("--eval-steps", "ten")
    assert "not supported on the CPU" in one("--precision", "fp16", "--device", "cpu", "--output-dir", tmp_path / "f")
    assert "not a complete vitfood checkpoint" in one("--resume", tmp_path)
    assert "no such checkpoint" in one("--resume", tmp_path / "nope")


def test_errors_from_the_command_line_have_no_traceback(tmp_path):
    import subprocess
    import sys
    r = cli("--dataset", "food101", "--model", "vit-micro", "--output-dir", tmp_path / "y")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and "food101" in r.stderr
    exe = os.path.join(os.path.dirname(sys.executable), "vitfood-train")  # the console entry point
    if not os.path.exists(exe):
        pytest.skip("vitfood is on PYTHONPATH, not pip-installed: no vitfood-train entry point")
    r = subprocess.run([exe, "--preset", "demo", "--precision", "fp16", "--device", "cpu", "--output-dir", tmp_path / "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --precision fp16 is not supported on the CPU; use bf16 or fp32"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # no empty run folders left behind


def test_failed_runs_never_touch_existing_checkpoints(tiny_run, capsys):
    out, _ = tiny_run
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert "already holds" in error(capsys, "--output-dir", out, "--max-steps", 5, alone=True)
    assert "not supported on the CPU" in error(capsys, "--output-dir", out, "--resume", "auto", "--precision", "fp16",
                                                "--device", "cpu", alone=True)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


@pytest.fixture(scope="module")
def damaged_folder(tmp_path_factory):
    """An imagefolder of two classes where some files are damaged and some are odd but valid."""
    root = image_folder(tmp_path_factory.mktemp("damaged") / "imgs", 10, ("curry", "salad"), size=(80, 60), noise=True)
    rng = np.random.default_rng(0)
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(good, format="JPEG")
    (root / "curry" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    (root / "curry" / "empty.jpg").write_bytes(b"")
    (root / "salad" / "notes.jpg").write_bytes(b"this is not an image\n" * 20)
    Image.new("1", (15_000, 13_000)).save(root / "salad" / "bomb.png")  # 195 MP: past Pillow's bomb limit
    # odd but valid: a 16-bit PNG and a 1x1 image
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(root / "salad" / "deep16.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "curry" / "tiny.png")
    return root


def test_damaged_images_are_skipped_and_counted(damaged_folder, tmp_path, capsys):
    results = train("--dataset", damaged_folder, "--max-steps", 6, "--batch-size", 4, "--test-size", 0.25,
                    "--max-bad-share", 1, "--output-dir", tmp_path / "run")  # a folder made mostly of bad files
    out = capsys.readouterr().out
    assert results["global_step"] == 6
    assert "damaged training file(s)" in out and "encounters) could not be decoded and were skipped" in out


def test_damaged_images_are_an_error_on_request(damaged_folder, tmp_path):
    # raised in a loader worker (in a process of its own: in this one the workers would outlive the run)
    r = cli(*TINY, "--dataset", damaged_folder, "--max-steps", 30, "--batch-size", 4, "--bad-images", "error",
            "--num-workers", 2, "--output-dir", tmp_path / "run")
    err = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and err.startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cannot be decoded" in err and any(n in err for n in ("truncated.jpg", "empty.jpg", "notes.jpg", "bomb.png"))


def _saved(tmp_path, train_labels, eval_labels, feature=None):
    import datasets
    img = Image.new("RGB", (16, 16))
    features = datasets.Features({"image": datasets.Image(), "label": feature or datasets.Value("int64")})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": [img] * len(train_labels), "label": train_labels}, features=features),
        "validation": datasets.Dataset.from_dict({"image": [img] * len(eval_labels), "label": eval_labels}, features=features)})
    path = tmp_path / f"saved{len(os.listdir(tmp_path))}"
    dd.save_to_disk(str(path))
    return path


def test_bad_labels(tmp_path, capsys):
    import datasets
    path = _saved(tmp_path, [0, 1, 0, 1], [0, 3])
    assert "label 3 outside the 2 classes" in error(capsys, "--dataset", path, "--eval-split", "validation")
    path = _saved(tmp_path, [0.5, 1.5], [0.5], datasets.Value("float32"))  # class names (strings) are labels too
    assert "must hold integers, class names or a ClassLabel" in error(capsys, "--dataset", path, "--eval-split",
                                                                       "validation")
    path = _saved(tmp_path, [0, 0, 0], [0])
    assert "at least 2" in error(capsys, "--dataset", path, "--eval-split", "validation")


def test_eval_split_smaller_than_a_batch_works(tmp_path):
    path = _saved(tmp_path, [0, 1] * 8, [1])
    results = train("--dataset", path, "--eval-split", "validation", "--max-steps", 2, "--output-dir", tmp_path / "run")
    assert results["global_step"] == 2 and results["eval_accuracy"] in (0.0, 1.0)


def test_nonsense_values(capsys, tmp_path):
    assert "--lr must be positive" in error(capsys, "--lr", "0")
    assert "--save-steps (30) must be a multiple of --eval-steps (20)" in error(
        capsys, "--export", "best", "--save-steps", "30", "--eval-steps", "20")
    assert "invalid choice" in error(capsys, "--preset", "nope")
    assert "--epochs must be positive" in error(capsys, "--epochs", "-1")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("fin") / "run"
    train("--max-steps", 4, "--save-steps", 2, "--eval-steps", 2, "--output-dir", out)
    return out


def test_bad_checkpoints_passed_to_resume(finished, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(finished / "checkpoint-4", other / "checkpoint-4")
    # another model: the checkpoint without its run's config, resumed at another resolution
    err = error(capsys, "--resume", other / "checkpoint-4", *("--image-size", "32", "--max-steps", 8))
    assert "from another model" in err
    # with its run's config there, changing what decides the weights or data order is refused
    shutil.copy(finished / "train_config.json", other / "train_config.json")
    assert "--seed differs from the run being resumed" in error(
        capsys, "--resume", other / "checkpoint-4", "--seed", "8")
    assert "global batch of 16" in error(capsys, "--resume", other / "checkpoint-4", "--batch-size", "8")
    os.remove(other / "train_config.json")
    (other / "checkpoint-4" / "model.safetensors").write_bytes(b"\0" * os.path.getsize(other / "checkpoint-4" / "model.safetensors"))
    assert "model.safetensors does not match its checksum" in error(capsys, "--resume", other / "checkpoint-4", "--max-steps", 8)
    os.remove(other / "checkpoint-4" / "training_state.pt")
    assert "not a complete vitfood checkpoint" in error(capsys, "--resume", other / "checkpoint-4")
    assert not checkpoint.complete_checkpoints(other)  # and --resume auto would never pick it


def test_paths_never_escape_the_runs_folder(tmp_path, monkeypatch):
    from vitfood.rundir import parse_run
    monkeypatch.chdir(tmp_path)
    _, out, _ = parse_run(["--dataset", "../../etc/passwd", "--model", "../../../root/.ssh"])
    assert os.path.dirname(out) == "runs" and ".." not in out


def test_state_loads_without_pickle_code(finished):
    import torch
    state = torch.load(finished / "checkpoint-4" / "training_state.pt", weights_only=True)  # raises on pickled code
    assert state["progress"]["step"] == 4


def test_more_nonsense_values(capsys, tmp_path):
    assert "--seed must be between" in error(capsys, "--seed", "-1")
    assert "finite" in error(capsys, "--max-grad-norm", "nan")
    assert "finite" in error(capsys, "--epochs", "inf")
    assert "cannot hold out" in error(capsys, "--test-size", "0.999", "--output-dir", tmp_path / "t")


def test_a_second_run_in_the_same_directory_is_refused(finished, capsys):
    import subprocess
    import sys
    held = rundir._locks.pop(os.path.realpath(finished), None)  # this process's own run released it
    if held:
        held.close()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
                               str(finished / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:  # another live process holds the run, as a second vitfood would
        assert holder.stdout.readline().strip() == "held"
        assert "another vitfood process" in error(capsys, "--resume", "auto", "--output-dir", finished)
    finally:
        holder.kill()
        holder.wait()


def test_overwrite_output_dir_starts_clean(finished, tmp_path):
    out = tmp_path / "over"
    shutil.copytree(finished, out)
    results = train("--max-steps", 2, "--save-steps", 1, "--eval-steps", 1, "--output-dir", out, "--overwrite-output-dir")
    assert results["global_step"] == 2
    assert [s for s, _ in checkpoint.complete_checkpoints(out)] == [1, 2]  # the old step-4 checkpoint is gone


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    """An imagefolder with train/ and validation/ splits; two damaged files in each split."""
    root = image_folder(tmp_path_factory.mktemp("splits") / "imgs", dict(train=12, validation=9), ("curry", "salad"),
                        splits=("train", "validation"), size=(64, 48), noise=True, seed=1)
    rng = np.random.default_rng(1)
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(good, format="JPEG")
    for split in ("train", "validation"):
        (root / split / "curry" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
        (root / split / "salad" / "notes.jpg").write_bytes(b"this is not an image\n" * 20)
    return root


def test_damaged_files_are_counted_once_and_eval_skips_are_reported(split_folder, tmp_path, capsys):
    import json
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    # 26 train images at batch 4: 7 batches an epoch; 20 steps see each damaged file 2 or 3 times
    results = train("--dataset", split_folder, "--eval-split", "validation", "--max-steps", 20, "--batch-size", 4,
                    "--eval-steps", 10, "--save-steps", 10, "--output-dir", out)
    printed = capsys.readouterr().out
    encounters = results["damaged_train_encounters"]
    assert results["damaged_train_files"] == 2 and encounters > 2
    assert f"2 damaged training file(s) ({encounters} encounters)" in printed
    assert results["damaged_eval_files"] == 2 and "2 of the 20 eval images could not be decoded" in printed
    ea = EventAccumulator(str(out))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("skipped/damaged_eval_files")] == [(10, 2), (20, 2)]
    assert ea.Scalars("skipped/damaged_train_files")[-1].value == 2
    from vitfood.evaluate import main as evaluate_main
    r = evaluate_main(["--model", str(out / "model"), "--output-dir", str(tmp_path / "ev")])
    assert r["skipped_images"] == 2 and r["eval_samples"] == 18
    assert json.loads((tmp_path / "ev" / "eval_results.json").read_text())["skipped_images"] == 2
    assert "2 of the 20 eval images could not be decoded" in capsys.readouterr().out


def test_a_single_class_folder_is_named(tmp_path, capsys):
    (tmp_path / "imgs" / "soup").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(tmp_path / "imgs" / "soup" / f"{i}.jpg")
    err = error(capsys, "--dataset", tmp_path / "imgs", "--output-dir", tmp_path / "run")
    assert "at least 2 classes" in err and "1 class folder ('soup')" in err


def test_the_pixel_limit_is_the_documented_one_whatever_the_warnings_filters(tmp_path):
    """A 100 MP image (past 89,478,485 pixels, under Pillow's own hard limit of twice that) is refused from its
    header, in this process whose warnings filters pytest has replaced; one just under the limit opens."""
    import warnings
    from vitfood.images import MAX_PIXELS, open_image
    Image.new("1", (10_000, 10_000)).save(tmp_path / "100mp.png")
    Image.new("1", (9_000, 9_000)).save(tmp_path / "81mp.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Image.DecompressionBombError, match="100 MP, past the limit of 89.5 MP"):
            open_image({"path": str(tmp_path / "100mp.png")})
        assert open_image({"path": str(tmp_path / "81mp.png")}).size == (9_000, 9_000)
    assert MAX_PIXELS == 89_478_485


def test_a_trainer_flag_or_a_typo_is_answered_with_the_flag_it_means(capsys):
    assert "did you mean --lr?" in error(capsys, "--learning-rate", "1e-3")
    assert "did you mean --grad-accum-steps?" in error(capsys, "--gradient_accumulation_steps", "4")
    assert "did you mean --label-smoothing?" in error(capsys, "--label-smothing", "0.1")


@pytest.mark.parametrize("tool", ["train", "predict", "evaluate", "export"])
def test_no_entry_point_takes_an_abbreviated_flag(tool, capsys):
    """argparse's prefix matching read --epoch 2 as --epochs 2 without a word."""
    import importlib
    main = importlib.import_module(f"vitfood.{tool}").main
    args = {"train": ["--epoch", "2"], "predict": ["--model", "m", "x.jpg", "--top", "3"],
            "evaluate": ["--model", "m", "--mistake", "3"], "export": ["run", "--int"]}[tool]
    line = error(capsys, *args, main=None if tool == "train" else main)
    assert "unrecognized arguments" in line and "did you mean --" in line, line


def test_dangling_and_looping_links_are_said_not_dropped_unseen(tmp_path, capsys):
    root = image_folder(tmp_path / "photos", 4, classes=("a", "b"))
    os.symlink(tmp_path / "gone.jpg", root / "a" / "dangling.jpg")
    os.symlink(root / "b" / "loop.jpg", root / "b" / "loop.jpg")
    train("--dataset", root, "--max-steps", 1, "--eval-steps", 1, "--save-steps", 1, "--output-dir", tmp_path / "run")
    out = capsys.readouterr().out
    assert "warning: 2 image file(s) in" in out and "a/dangling.jpg" in out and "b/loop.jpg" in out, out
    assert json.loads((tmp_path / "run" / "all_results.json").read_text())["broken_links"] == 2
    line = error(capsys, "--dataset", root, "--bad-images", "error", "--output-dir", tmp_path / "strict")
    assert "2 image file(s)" in line and "lead nowhere" in line and "--bad-images error" in line, line
    for link in (root / "a" / "dangling.jpg", root / "b" / "loop.jpg"):
        link.unlink()
    train("--dataset", root, "--max-steps", 1, "--eval-steps", 1, "--save-steps", 1, "--output-dir", tmp_path / "fixed")
    assert json.loads((tmp_path / "fixed" / "all_results.json").read_text())["broken_links"] == 0
