"""No run is ever trapped: a batch of damaged images, a stop during the last write, a best checkpoint that is
gone, runs started in the same second, a silent Hub, damaged checkpoint markers. Each reached as the world
reaches it, each ending in a run that finishes or one line that says what to do."""

import json
import os
import re
import shutil
import signal
import threading
import time

import pytest
import torch
from PIL import Image

from conftest import TINY, image_folder, same, start, train, weights
from vitfood import checkpoint, rundir
from vitfood.common import UserError


# ---------------------------------------------------------------- damaged images
def _folder(root, damaged):
    """root/{train,validation}/{a,b}: 8 good JPEGs per class and split, plus `damaged` = {split/class: n}
    zero-byte .jpg files."""
    image_folder(root, 8, splits=("train", "validation"), noise=True)
    for where, n in damaged.items():
        for i in range(n):
            (root / where / f"zero{i}.jpg").write_bytes(b"")
    return root


def _run(data, *args):
    return ["--dataset", str(data), "--eval-split", "validation", "--model", "vit-micro", "--precision", "fp32",
            "--num-workers", "0", "--logging-steps", "1", *map(str, args)]


def _main(*args):
    from vitfood.train import main
    return main(list(map(str, args)))


def test_an_eval_batch_of_damaged_images_is_skipped_and_counted(tmp_path, capsys):
    data = _folder(tmp_path / "c", {"validation/a": 4})  # the eval set's first four files: one whole batch of 4
    args = _run(data, "--batch-size", 2, "--eval-batch-size", 4, "--max-steps", 6, "--eval-steps", 3,
                "--save-steps", 3, "--output-dir", tmp_path / "run")
    with pytest.raises(UserError, match=r"4 of the 20 eval images cannot be decoded, more than --max-bad-share 0.1 "
                                        r"of them: .*zero0.jpg, .*zero1.jpg, .*zero2.jpg, \.\.\."):
        _main(*args)
    assert checkpoint.is_complete(tmp_path / "run" / "checkpoint-3")  # saved first: nothing is lost
    results = _main(*args, "--resume", "auto", "--max-bad-share", "0.5")  # the user's call: go on
    assert results["damaged_eval_files"] == 4 and results["global_step"] == 6
    assert "4 of the 20 eval images could not be decoded and were skipped" in capsys.readouterr().out


def test_training_batches_of_damaged_images_are_skipped_and_resume_exactly(tmp_path):
    data = _folder(tmp_path / "c", {"train/a": 12, "train/b": 12})  # 24 of 40: most batches of 2 hold no image
    args = _run(data, "--batch-size", 2, "--max-steps", 20, "--eval-steps", 4, "--save-steps", 4)  # one epoch
    with pytest.raises(UserError, match=r"of the 40 training images cannot be decoded, more than --max-bad-share"):
        _main(*args, "--output-dir", tmp_path / "stopped")
    whole = _main(*args, "--max-bad-share", "0.7", "--save-total-limit", "5", "--output-dir", tmp_path / "whole")
    assert whole["damaged_train_files"] == 24 and whole["global_step"] == 20
    part = tmp_path / "part"  # the same run as it was at step 4, resumed: the same weights
    shutil.copytree(tmp_path / "whole", part, ignore=shutil.ignore_patterns(
        "model", "all_results.json", "checkpoint-8", "checkpoint-1?", "checkpoint-20", "run.lock"))
    resumed = _main(*args, "--max-bad-share", "0.7", "--output-dir", part, "--resume", "auto")
    assert resumed["segments"] == 2 and resumed["damaged_train_files"] == 24
    assert same(weights(part), weights(tmp_path / "whole"))


# ---------------------------------------------------------------- a stop while the last checkpoint is written
@pytest.mark.slow  # 17 s: the default tier holds other SIGTERM stops (test_faults)
def test_sigterm_while_the_last_checkpoint_is_written_saves_it_and_exits_75(tmp_path, reference):
    out = tmp_path / "run"
    # RUN saves every 5 of 30 steps: its 6th write is the last; it is held there 3 s
    p = start(out, env={"VITFOOD_FAULT": "delay:weights_written:6", "VITFOOD_FAULT_DELAY": "3"})
    for line in p.stdout:
        if line.startswith("step 30: eval"):
            break
    p.send_signal(signal.SIGTERM)  # during the last eval, or the last write: both end the same way
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 75, stderr[-2000:]
    assert "stopped by SIGTERM at step 30" in stdout and checkpoint.is_complete(out / "checkpoint-30")
    assert not (out / "model").exists()
    p = start(out)  # --resume auto: nothing left but the export
    p.communicate(timeout=120)
    assert p.returncode == 0 and same(weights(out), reference)


# ---------------------------------------------------------------- --export best without its checkpoint
def test_export_best_when_the_best_checkpoint_is_gone(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--max-steps", 6, "--eval-steps", 2, "--save-steps", 2, "--save-total-limit", 1, "--export", "best",
            "--output-dir", out]
    train(*args[len(TINY):])
    for name in ("model", "all_results.json", checkpoint.BEST):  # as it was before its end
        path = out / name
        checkpoint.set_aside(path) if path.is_dir() else path.unlink()
    for step, path in checkpoint.complete_checkpoints(out)[:-1]:
        checkpoint.set_aside(path)  # deleted by hand, or found damaged
    last = out / "checkpoint-6"
    state = torch.load(last / checkpoint.STATE, weights_only=True)
    state["progress"]["best"] = dict(step=2, eval_accuracy=1.0, eval_loss=0.0)  # the best was at step 2
    torch.save(state, last / checkpoint.STATE)
    (last / checkpoint.MARKER).unlink()
    checkpoint._seal(last, 6)
    capsys.readouterr()
    results = _main(*args, "--resume", "auto")
    printed = capsys.readouterr().out
    assert "checkpoint-2, the best, is missing or damaged; exporting the last weights (step 6)" in printed
    assert results["exported_step"] == 6 and (out / "model" / "model.safetensors").is_file()


def test_loading_a_checkpoint_that_is_gone_says_so_without_the_hub(tmp_path):
    from vitfood.config import Config
    from vitfood.model import build_model, load_weights
    model, _ = build_model(Config(model="vit-micro"), ["a", "b"])
    with pytest.raises(UserError, match=f"checkpoint {tmp_path / 'checkpoint-2'} does not exist"):
        load_weights(model, str(tmp_path / "checkpoint-2"))


# ---------------------------------------------------------------- runs started in the same second
def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    claimed = []
    threads = [threading.Thread(target=lambda: claimed.append(rundir.claim("runs/1127-115517-vit-micro-c")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == ["runs/1127-115517-vit-micro-c", "runs/1127-115517-vit-micro-c-2",
                               "runs/1127-115517-vit-micro-c-3"]
    monkeypatch.setattr(rundir, "run_name", lambda cfg: "0101-000000-vit-micro-synthetic")
    for _ in range(2):  # the second is not refused: the first one's folder is taken
        assert train("--max-steps", 2, "--eval-steps", 2, "--save-steps", 2)["global_step"] == 2
    assert sorted(os.listdir(tmp_path / "runs")) == [
        "0101-000000-vit-micro-synthetic", "0101-000000-vit-micro-synthetic-2", "1127-115517-vit-micro-c",
        "1127-115517-vit-micro-c-2", "1127-115517-vit-micro-c-3"]


# ---------------------------------------------------------------- damaged checkpoint markers
def _run_dir(tmp_path, reference_run):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out, ignore=shutil.ignore_patterns("model", "all_results.json", "run.lock"))
    return out


@pytest.mark.parametrize("marker", ["missing", pytest.param("unreadable", marks=pytest.mark.slow),
                                    pytest.param("empty", marks=pytest.mark.slow)])
def test_a_checkpoint_with_a_bad_marker_is_set_aside_not_deleted(tmp_path, reference_run, reference, marker):
    out = _run_dir(tmp_path, reference_run)
    path = out / "checkpoint-30" / checkpoint.MARKER
    if marker == "missing":
        path.unlink()
    elif marker == "unreadable":
        path.write_text('{"step": 30, "files": {"training_st')
    else:
        path.write_text(json.dumps(dict(step=30, files={})))  # lists nothing: complete once, never resumable
    p = start(out)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-2000:]
    assert f"warning: {out / 'checkpoint-30'} is damaged" in stdout and "resuming from the checkpoint before it" in stdout
    assert [n for n in os.listdir(out) if n.startswith("checkpoint-30.damaged-")]  # kept
    assert same(weights(out), reference)


def test_a_marker_that_lists_no_training_state_is_not_complete(tmp_path, reference_run):
    out = _run_dir(tmp_path, reference_run)
    marker = out / "checkpoint-30" / checkpoint.MARKER
    assert checkpoint.is_complete(out / "checkpoint-30")
    marker.write_text(json.dumps(dict(step=30, files={})))
    assert not checkpoint.is_complete(out / "checkpoint-30")
    assert checkpoint.damage(out / "checkpoint-30").startswith(f"no valid {checkpoint.MARKER}")


def test_when_every_checkpoint_is_damaged_the_run_starts_over_and_says_so(tmp_path, reference_run):
    out = _run_dir(tmp_path, reference_run)
    folders = checkpoint.checkpoint_folders(out)
    for _, path in folders:
        os.remove(os.path.join(path, checkpoint.MARKER))
    p = start(out, "--max-steps", "2", "--save-steps", "2")
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-2000:]
    assert "resuming from the checkpoint before it" not in stdout
    assert "no complete checkpoint is left before it" in stdout and "starting fresh" in stdout
    assert len([n for n in os.listdir(out) if ".damaged-" in n]) == len(folders) > 1  # every one kept


def test_a_failed_write_of_the_best_record_names_it_not_the_checkpoint(tmp_path, monkeypatch):
    from vitfood.config import Config
    from vitfood.model import build_model
    model, processor = build_model(Config(model="vit-micro"), ["a", "b"])
    saver = rundir.Checkpoints(tmp_path, keep=2)
    saver.open()
    write = checkpoint.write_json_atomic

    def full_disk_for_the_record(path, obj):
        if path.endswith(checkpoint.BEST):
            raise OSError(28, "No space left on device")
        write(path, obj)
    monkeypatch.setattr(checkpoint, "write_json_atomic", full_disk_for_the_record)
    saver.save(3, model, processor, {"step": 3}, dict(step=3, eval_accuracy=0.5, eval_loss=1.0), new_best=True)
    with pytest.raises(UserError, match=r"cannot write best_checkpoint.json \(checkpoint-3 itself is complete\)"):
        saver.wait()
    assert checkpoint.is_complete(tmp_path / "checkpoint-3")


def test_resume_auto_names_a_run_it_skips(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "broken").mkdir(parents=True)
    (tmp_path / "runs" / "broken" / "train_config.json").write_text("{ not json")
    train("--resume", "auto", "--max-steps", 2, "--eval-steps", 2, "--save-steps", 2)
    printed = capsys.readouterr().out
    assert "skipping runs/broken: config file runs/broken/train_config.json is not valid JSON" in printed


# ---------------------------------------------------------------- the Hub's edges
def test_hub_limits_that_are_not_finite_are_one_line(monkeypatch):
    from vitfood import hub
    for name, read in (("VITFOOD_HUB_PROBE_SECONDS", hub.probe_seconds), ("VITFOOD_HUB_TIMEOUT_SECONDS",
                                                                          hub.request_seconds)):
        for value in ("inf", "nan", "-1", "soon"):
            monkeypatch.setenv(name, value)
            with pytest.raises(UserError, match=f"^{name}='{value}': expected seconds, a finite number > 0"):
                read()
        monkeypatch.setenv(name, "2.5")
        assert read() == 2.5


@pytest.mark.parametrize("what", ["--model", "--dataset"])
def test_a_hub_that_never_answers_times_out_even_unprobed(tmp_path, what):
    from conftest import error_line
    from test_hub import run
    server = __import__("socket").socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()[0]) for _ in range(16)], daemon=True).start()
    hub = {"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "HF_HOME": str(tmp_path / "hf"),
           "VITFOOD_HUB_PROBE_SECONDS": "0", "VITFOOD_HUB_TIMEOUT_SECONDS": "2"}
    args = ["--model", "some/model", "--dataset", "synthetic"] if what == "--model" else \
        ["--model", "vit-micro", "--dataset", "some/dataset"]
    t0 = time.monotonic()
    seconds, p = run(*args, "--output-dir", tmp_path / "run", env=hub)
    server.close()
    line = error_line(p, alone=True)
    name = "model 'some/model'" if what == "--model" else "dataset 'some/dataset'"
    assert f"cannot load {name}: the Hugging Face Hub did not answer within 2 s (timed out)" in line, line
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------- first contact: messages that name the real cause
@pytest.mark.parametrize("args, expected", [
    (["--preset", "demo", "--model", "./my_vit"], "--model ./my_vit: no such folder"),  # not the preset's image size
    (["--dataset", "./my_images"], "--dataset ./my_images: no such folder"),  # not a Hub failure of the model
    (["--preset", "demo", "--model", "vit-tinny"], "--model vit-tinny: no such named config; did you mean vit-tiny?"),
])
def test_first_contact_mistakes_are_named(tmp_path, monkeypatch, args, expected):
    from vitfood.train import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as error:
        main(args)
    assert str(error.value).startswith(expected), str(error.value)
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")  # no empty run folder left


def test_a_folder_without_images_is_named_with_the_extensions_looked_for(tmp_path):
    (tmp_path / "photos" / "a").mkdir(parents=True)
    (tmp_path / "photos" / "b").mkdir()
    (tmp_path / "photos" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"the data set folder .*photos holds no images \(looked for \.jpg, \.jpeg"):
        _main("--dataset", tmp_path / "photos", "--model", "vit-micro", "--output-dir", tmp_path / "run")


def test_predict_names_a_model_folder_that_does_not_exist(tmp_path, monkeypatch):
    from vitfood.predict import main
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    with pytest.raises(UserError, match=r"^model path runs/nope/model does not exist"):
        main(["--model", "runs/nope/model", "x.jpg"])


def test_output_for_logs_has_no_bars_or_cursor_moves(tmp_path, tiny_run):
    from conftest import cli
    p = cli(*TINY, "--max-steps", 10, "--eval-steps", 5, "--logging-steps", 5, "--output-dir", tmp_path / "run")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "\x1b[" not in p.stderr and "\r" not in p.stderr and "\n\n" not in p.stderr.strip(), repr(p.stderr[-500:])
    assert "step 5/10: loss" in p.stdout and "step 10/10: loss" in p.stdout
    out, _ = tiny_run
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    p = cli("--model", out / "model", tmp_path / "x.jpg", module="vitfood.predict")
    assert p.returncode == 0 and p.stderr == "" and p.stdout.startswith(str(tmp_path / "x.jpg")), p.stderr


def test_bench_help_lists_what_bench_uses():
    from conftest import cli
    p = cli("--help", module="vitfood.bench")
    flags = set(re.findall(r"^\s+(--[a-z-]+)", p.stdout, re.M))
    assert {"--model", "--dataset", "--batch-size", "--modes", "--precision"} <= flags
    assert not flags & {"--resume", "--export", "--overwrite-output-dir", "--output-dir", "--save-steps", "--max-steps"}
    assert "data,model,levers,memory,e2e,loop,eval,save" in p.stdout


def test_the_run_folder_done_prints_is_taken_for_its_model_and_its_checkpoints(tiny_run, tmp_path, capsys):
    """`done: runs/<run>` is what a user copies: predict and evaluate read its model/, --resume its newest
    checkpoint."""
    import json as _json
    from vitfood.predict import main as predict
    out, _ = tiny_run
    assert not (out / "run.lock").exists()  # a finished run leaves no lock file
    Image.new("RGB", (24, 24), (200, 30, 30)).save(tmp_path / "x.jpg")
    predict(["--model", str(out), str(tmp_path / "x.jpg"), "--json"])
    by_run = _json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    predict(["--model", str(out / "model"), str(tmp_path / "x.jpg"), "--json"])
    assert _json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == by_run
    from vitfood.rundir import parse_run
    cfg, where, resume = parse_run(["--resume", str(out)])
    assert (where, resume) == (str(out), "auto")


# ---------------------------------------------------------------- a damaged model/ (sealed with SHA256SUMS)
def _flip(path):
    """One bit changed in the middle of the file, as a disk or a careless tool would change it."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_a_changed_byte_in_model_is_named_by_every_tool_and_resume_exports_it_again(tiny_run, tmp_path, capsys):
    from conftest import error
    from vitfood import audit, evaluate, export, predict
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)  # copied: model/'s weights no longer share the checkpoint's bytes
    sealed = (out / "model" / "SHA256SUMS").read_text()
    assert "  model.safetensors\n" in sealed and "  config.json\n" in sealed
    original = (out / "model" / "model.safetensors").read_bytes()
    _flip(out / "model" / "model.safetensors")
    mend = f"export it again from the run's newest checkpoint: python -m vitfood.train --resume auto --output-dir {out}"
    for main, args in ((predict.main, ["--model", out / "model", out]), (predict.main, ["--model", out, out]),
                       (evaluate.main, ["--model", out / "model", "--output-dir", tmp_path / "eval"]),
                       (export.main, [out]), (audit.main, ["--model", out, "--output-dir", tmp_path / "audit"])):
        line = error(capsys, *args, main=main)
        assert line == f"error: {out / 'model'} is damaged: model.safetensors does not match its SHA-256 (changed " \
                       f"after it was written); {mend}", (main.__module__, line)
    assert not (out / "export").exists()
    train("--resume", "auto", "--output-dir", out)
    said = capsys.readouterr().out
    assert "the run finished, but model/ is damaged" in said and "exporting it again" in said
    assert (out / "model" / "model.safetensors").read_bytes() == original  # the same model, sealed again
    again = (out / "model" / "SHA256SUMS").read_text().splitlines()  # the model card's figures differ, not the model
    assert [r for r in again if "README" not in r] == [r for r in sealed.splitlines() if "README" not in r]
    aside = [p for p in out.iterdir() if p.name.startswith("model.damaged-")]
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() != original  # moved, not deleted
    (out / "model" / "config.json").unlink()
    assert error(capsys, "--model", out / "model", out, main=predict.main).endswith(
        f"is damaged: config.json is missing; {mend}")


def test_a_sealed_folder_outside_its_run_says_to_restore_it(tiny_run, tmp_path, capsys):
    from conftest import error
    from vitfood import predict
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_run[0] / "model", copy)
    (copy / "SHA256SUMS").write_text("not a list\n")
    assert error(capsys, "--model", copy, tiny_run[0] / "samples", main=predict.main) == (
        f"error: {copy} is damaged: its list of checksums cannot be read (SHA256SUMS is not a list of SHA-256 sums); "
        "restore it from a copy, or export it again from its run")
