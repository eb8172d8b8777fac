"""What a careful operator runs into: a real full disk, a damaged newest checkpoint, odd config files, a
lowered --max-steps, phone photos turned by EXIF, a closed terminal, Ctrl-C in evaluate, odd paths."""

import io
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EVALUATED, HOLD, RUN, error, error_line, finish, output, same, start, train, wait_for, weights
from vitfood import checkpoint


def test_a_real_full_disk_is_one_line_and_the_run_resumes_exactly_after(small_disk, reference):
    out = small_disk / "run"
    p = start(out)
    _, p.stderr = output(p)
    line = error_line(p)
    assert "is full" in line and str(out) in line, line
    names = os.listdir(out)
    assert not [n for n in names if n.startswith(".")]  # no temporary folders or files left
    saved = checkpoint.complete_checkpoints(out)
    assert saved and all(checkpoint.damage(path) is None for _, path in saved)
    subprocess.run(["mount", "-o", "remount,size=50m", str(small_disk)], check=True)  # space freed
    finish(out)
    assert same(weights(out), reference)


def test_max_steps_below_the_checkpoint_is_refused_and_equal_finishes_there(tmp_path, capsys):
    from vitfood.common import run_main
    out = tmp_path / "run"
    train("--max-steps", 12, "--save-steps", 3, "--eval-steps", 6, "--output-dir", out)
    for name in ("checkpoint-12", "model", "all_results.json"):  # as if killed after checkpoint-9... and -12 lost
        shutil.rmtree(out / name) if (out / name).is_dir() else os.remove(out / name)
    config = (out / "train_config.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train("--resume", "auto", "--output-dir", out, "--max-steps", 6))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "below step 9" in err and "--max-steps 9" in err, err
    assert (out / "train_config.json").read_bytes() == config  # nothing rewritten
    results = train("--resume", "auto", "--output-dir", out, "--max-steps", 9)  # saved between evals: evaluated now
    assert results["global_step"] == results["exported_step"] == 9 and np.isfinite(results["eval_loss"])
    assert train("--resume", "auto", "--output-dir", out, "--max-steps", 9) is None  # and later resumes see it done


def _damage(path):
    """Flip bytes in the middle of a file, keeping its size: what a bad disk or a stray write does."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["model.safetensors", pytest.param("training_state.pt", marks=pytest.mark.slow)])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumed(tmp_path, reference_run, victim,
                                                                             capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out, ignore=shutil.ignore_patterns("model", "all_results.json", "run.lock"))
    _damage(out / "checkpoint-30" / victim)
    assert checkpoint.is_complete(out / "checkpoint-30")  # same sizes: only the checksum tells
    from vitfood.train import main
    line = error(capsys, "--resume", out / "checkpoint-30", main=main)
    assert "checkpoint is damaged" in line and victim in line
    finish(out)
    printed = capsys.readouterr().out
    assert "checkpoint-30 is damaged" in printed and "moved it aside" in printed, printed[-2000:]
    assert "resuming from" in printed and "checkpoint-25 at step 25" in printed
    assert [n for n in os.listdir(out) if n.startswith("checkpoint-30.damaged-")]  # kept, never deleted
    assert same(weights(out), weights(reference_run))


def test_nonfinite_final_weights_do_not_exit_0(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from vitfood.common import run_main
    out = tmp_path / "run"
    train("--max-steps", 4, "--save-steps", 2, "--eval-steps", 4, "--output-dir", out)
    for name in ("checkpoint-4", "model", "all_results.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else os.remove(out / name)
    ckpt = out / "checkpoint-2"
    tensors = load_file(ckpt / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, ckpt / "model.safetensors",
              metadata={"format": "pt"})
    marker = json.loads((ckpt / checkpoint.MARKER).read_text())  # resealed with sizes only, as older versions did
    marker["files"] = {n: os.path.getsize(ckpt / n) for n in marker["files"]}
    (ckpt / checkpoint.MARKER).write_text(json.dumps(marker))
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train("--resume", "auto", "--output-dir", out, "--max-steps", 2))
    assert e.value.code == 2 and "not finite" in capsys.readouterr().err
    assert not (out / "model").exists() and not (out / "all_results.json").exists()


def test_config_files_in_other_encodings_yaml_floats_and_edited_run_configs(tmp_path, capsys):
    from vitfood.config import build_parser, resolve
    from vitfood.evaluate import main as evaluate_main
    fails = lambda *args: error(capsys, *args)
    (tmp_path / "utf16.yaml").write_bytes("lr: 1e-3\nbatch_size: 8\n".encode("utf-16"))  # PowerShell's > does this
    cfg = resolve(vars(build_parser().parse_args(["--config", str(tmp_path / "utf16.yaml")])))
    assert (cfg.lr, cfg.batch_size) == (1e-3, 8)  # and YAML 1.1's string "1e-3" is a float
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    assert str(tmp_path / "binary.json") in fails("--config", tmp_path / "binary.json")
    (tmp_path / "typed.yaml").write_text("batch_size: big\n")
    assert str(tmp_path / "typed.yaml") in fails("--config", tmp_path / "typed.yaml")
    assert fails("--config", tmp_path).endswith(f"config file {tmp_path} is a folder: give a JSON or YAML file")
    out = tmp_path / "run"
    train("--max-steps", 4, "--save-steps", 2, "--eval-steps", 2, "--output-dir", out)
    capsys.readouterr()
    saved = json.loads((out / "train_config.json").read_text())
    del saved["max_steps"]
    (out / "train_config.json").write_text(json.dumps(saved))
    line = fails("--resume", "auto", "--output-dir", out)
    assert "lacks max_steps" in line and "train_config.json" in line
    (out / "train_config.json").write_bytes(b"\xff\xfe\x00garbage")
    assert "train_config.json" in fails("--resume", "auto", "--output-dir", out)
    assert "train_config.json" in error(capsys, "--model", out / "model", main=evaluate_main)


def test_config_file_and_flag_precedence(tmp_path, capsys):
    from vitfood.config import build_parser, resolve
    (tmp_path / "c.yaml").write_text("batch_size: 8\nlr: 0.001\nmodel: vit-micro\n")
    explicit = vars(build_parser().parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.01"]))
    cfg = resolve(explicit)
    assert (cfg.batch_size, cfg.lr, cfg.model, cfg.epochs) == (8, 0.01, "vit-micro", 4.0)
    cfg = resolve(vars(build_parser().parse_args(["--preset", "demo", "--max-steps", "7"])))
    assert (cfg.dataset, cfg.model, cfg.max_steps) == ("synthetic", "vit-tiny", 7)
    (tmp_path / "bad.json").write_text('{"batch_size": "big"}')
    assert "must be int" in error(capsys, "--config", tmp_path / "bad.json")
    (tmp_path / "unknown.json").write_text('{"batchsize": 3}')
    assert "unknown option(s) batchsize" in error(capsys, "--config", tmp_path / "unknown.json")


def test_an_explicit_epochs_flag_wins_over_the_preset():
    from vitfood.config import build_parser, resolve
    cfg = resolve(vars(build_parser().parse_args(["--preset", "demo", "--epochs", "1"])))
    assert cfg.max_steps is None and cfg.epochs == 1.0
    cfg = resolve(vars(build_parser().parse_args(["--preset", "demo", "--epochs", "1", "--max-steps", "7"])))
    assert cfg.max_steps == 7  # both given: --max-steps decides, as documented


def test_exif_orientation_is_applied_in_training_eval_and_predict(tmp_path):
    import random
    from vitfood.images import EvalTransform, TrainTransform
    picture = np.zeros((60, 90, 3), np.uint8)  # 90 wide: red left, blue right, a green band on top
    picture[:, :45], picture[:, 45:], picture[:15] = (200, 30, 30), (30, 30, 200), (30, 200, 30)
    upright = Image.fromarray(picture)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a phone stores it: sideways, 60 wide x 90 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view"
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    plain = io.BytesIO()
    upright.save(plain, format="JPEG", quality=95)
    for tf in (EvalTransform(resize=(32, 48), crop=(32, 48), fast=False), TrainTransform(height=32, width=48, fast=False)):
        a = tf(Image.open(io.BytesIO(buf.getvalue())), random.Random(1)).float()
        b = tf(Image.open(io.BytesIO(plain.getvalue())), random.Random(1)).float()
        assert a.shape == b.shape == (3, 32, 48) and (a - b).abs().mean() < 8, (a - b).abs().mean()
        sideways = tf(stored, random.Random(1)).float() if isinstance(tf, EvalTransform) else None
        if sideways is not None:
            assert (sideways - b).abs().mean() > 30  # not turned: another picture entirely


@pytest.mark.slow  # the default tier keeps one of its kind (a kill or a signal, then an exact resume)
def test_a_closed_terminal_saves_and_stops_like_sigterm(tmp_path):
    """SIGHUP as the kernel sends it: the run's controlling terminal (a pty) goes away."""
    import fcntl
    import termios
    out = tmp_path / "run"
    master, slave = pty.openpty()

    def own_terminal():
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", **HOLD}
    p = subprocess.Popen([sys.executable, "-m", "vitfood.train", *RUN, "--output-dir", str(out)], stdin=slave,
                         stdout=slave, stderr=slave, env=env, preexec_fn=own_terminal, close_fds=True)
    os.close(slave)
    seen, deadline = b"", time.monotonic() + 120
    while EVALUATED.encode() not in seen:  # then held at step 11
        assert select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0], seen[-2000:]
        seen += os.read(master, 4096)
    os.close(master)  # the terminal closes: the kernel sends SIGHUP
    assert p.wait(timeout=120) == 75
    assert [s for s, _ in checkpoint.complete_checkpoints(out)][-1] == 11  # the stop's own checkpoint


# `python -m vitfood.evaluate`, where the first image it decodes says so on stdout and then waits
HELD_EVALUATE = """
import runpy, sys, time
from vitfood import data
decode = data.ImageDataset.__getitem__
def held(self, key):
    print("decoding", flush=True)
    time.sleep(60)
    return decode(self, key)
data.ImageDataset.__getitem__ = held
sys.argv[0] = "vitfood.evaluate"
runpy.run_module("vitfood.evaluate", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_in_evaluate_is_one_line_and_exit_130(tiny_run, tmp_path):
    out, _ = tiny_run
    p = subprocess.Popen([sys.executable, "-c", HELD_EVALUATE, "--model", str(out / "model"), "--num-workers", "0",
                          "--output-dir", str(tmp_path / "ev")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(p, "decoding")  # imports, data and model done: inside the evaluation
    p.send_signal(signal.SIGINT)
    _, err = output(p, timeout=30)
    lines = [line for line in err.strip().splitlines() if "it/s" not in line and "s/it" not in line and line.strip()]
    assert p.returncode == 130 and lines[-1] == "error: interrupted (Ctrl-C)" and "Traceback" not in err, err[-2000:]


def test_odd_paths_short_names_quoted_commands_and_shared_files(tmp_path, monkeypatch, capsys):
    from vitfood.rundir import parse_run
    monkeypatch.chdir(tmp_path)
    deep = tmp_path.joinpath(*["a_long_folder_name_of_a_deep_data_set_tree"] * 8, "food photos")  # 350+ chars
    deep.mkdir(parents=True)
    _, out, _ = parse_run(["--dataset", str(deep), "--model", "vit-micro"])
    assert len(os.path.basename(out)) < 100 and out.endswith("-vit-micro-food_photos")
    spaced = tmp_path / "my runs" / "one"
    train("--max-steps", 2, "--save-steps", 2, "--eval-steps", 2, "--output-dir", spaced)
    assert f"tensorboard --logdir '{spaced}'" in capsys.readouterr().out  # pastes into a shell as it is
    umask = os.umask(0)
    os.umask(umask)
    for folder in ("model", "checkpoint-2"):
        mode = os.stat(spaced / folder / "model.safetensors").st_mode & 0o777
        assert mode == 0o666 & ~umask, oct(mode)  # what the umask allows, as for every other file


def test_a_full_disk_under_the_event_writer_is_one_line_not_a_traceback(tmp_path):
    """TensorBoard's writer thread meets ENOSPC (in a process of its own, with Python's own thread-exception
    report): no traceback from the thread; the error comes back at the main thread's next write, one line."""
    import subprocess
    import sys
    script = f"""
import errno, time
from torch.utils.tensorboard import SummaryWriter
from vitfood.common import run_main

def main():
    w = SummaryWriter({str(tmp_path)!r})
    worker = w.file_writer.event_writer._async_writer._worker

    def full(data):
        raise OSError(errno.ENOSPC, "No space left on device")
    worker._record_writer.write = full
    w.add_scalar("loss/train", 1.0, 1)
    while worker.is_alive():  # the thread takes the record, fails and ends
        time.sleep(0.05)
    w.add_scalar("loss/train", 1.0, 2)
    w.flush()

run_main(main)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and lines == ["error: No space left on device"], p.stderr[-2000:]


@pytest.mark.slow
def test_a_full_disk_never_shows_a_traceback_in_20_runs(small_disk):
    """The real full disk 20 times over (the TensorBoard writer thread and the checkpoint writers race to fill
    it): one `error:` line naming the disk every time, no traceback."""
    for i in range(20):
        out = small_disk / f"run{i}"
        p = start(out)
        _, p.stderr = output(p)
        line = error_line(p)  # exit 2, no traceback anywhere on stderr
        assert "is full" in line, (i, line)
        shutil.rmtree(out)
