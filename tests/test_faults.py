"""Crash safety: real training processes killed anywhere, preempted, out of disk; then resumed to the end."""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import EVALUATED, HOLD, HOLD_S, finish, output, same, send, send_to_child_of, start, stop, train, wait_for, weights
from vitfood import checkpoint, rundir


def _only_complete_checkpoints(out):
    names = [n for n in os.listdir(out) if n.startswith("checkpoint-")]
    assert all(checkpoint.is_complete(out / n) for n in names), names


@pytest.mark.parametrize("point", ["renamed:6",  # the last save before the export; the other windows: slow tier
                                   pytest.param("weights_written:2", marks=pytest.mark.slow),
                                   pytest.param("rotating:1", marks=pytest.mark.slow),
                                   pytest.param("marker:3", marks=pytest.mark.slow),
                                   pytest.param("renamed:2", marks=pytest.mark.slow),
                                   pytest.param("weights_written:6", marks=pytest.mark.slow)])
def test_kill_inside_a_save_window_then_resume_is_exact(tmp_path, reference, point):
    out = tmp_path / "run"
    p = start(out, env={"VITFOOD_FAULT": point})
    _, err = output(p)
    assert p.returncode == -signal.SIGKILL, err[-2000:]
    _only_complete_checkpoints(out)
    finish(out)
    assert same(weights(out), reference)
    assert not [n for n in os.listdir(out) if n.startswith(".")]


@pytest.mark.slow  # the default tier keeps one of its kind (a kill or a signal, then an exact resume)
def test_kill_while_swapping_a_resaved_checkpoint(tmp_path, reference_run):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)  # checkpoint-10, -25 and -30
    # an explicit resume from step 25 re-saves step 30 over the existing one; die between the two renames
    p = subprocess.run([sys.executable, "-m", "vitfood.train", "--resume", str(out / "checkpoint-25")],
                       env={**os.environ, "VITFOOD_FAULT": "swapping"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not (out / "checkpoint-30").exists() and any(n.startswith(".old-checkpoint-30") for n in os.listdir(out))
    assert finish(out) is None  # put back, then found finished
    assert checkpoint.is_complete(out / "checkpoint-30") and not [n for n in os.listdir(out) if n.startswith(".")]
    assert same(load_file(out / "checkpoint-30" / "model.safetensors"),
                load_file(reference_run / "checkpoint-30" / "model.safetensors"))


def _kill_at_random_times(tmp_path, reference, trials, seed):
    rng = random.Random(seed)
    for trial in range(trials):
        out = tmp_path / f"run{trial}"
        for _ in range(rng.randint(1, 3)):  # one to three kills in a trial
            if (out / "all_results.json").exists():
                break  # the run ended before this kill
            p = start(out)
            wait_for(p)
            time.sleep(rng.uniform(0.0, 2.5))
            send(p, signal.SIGKILL, group=True)
            p.communicate(timeout=60)
            _only_complete_checkpoints(out)
        finish(out)
        assert same(weights(out), reference), f"trial {trial}"


@pytest.mark.slow
def test_kill_at_random_moments_then_resume_is_exact(tmp_path, reference):
    _kill_at_random_times(tmp_path, reference, trials=2, seed=0)


@pytest.mark.slow
def test_kill_at_twenty_random_moments(tmp_path, reference):
    _kill_at_random_times(tmp_path, reference, trials=20, seed=1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_preemption_saves_and_resumes_exactly(tmp_path, reference, sig, request):
    # sent in the loop, while it is held at step 11: the signal surely arrives before the run ends
    if sig == signal.SIGTERM:
        stopped, code, stdout, stderr = request.getfixturevalue("sigterm_stopped")  # shared with test_tensorboard
    else:
        stopped = tmp_path / "stopped"
        code, stdout, stderr = stop(stopped, sig)
    assert code == 75, stderr[-2000:]
    assert [s for s, _ in checkpoint.complete_checkpoints(stopped)][-1] == 11  # it finished its step and saved it
    assert f"stopped by {sig.name} at step 11: saved {stopped / 'checkpoint-11'}" in stdout
    assert "Traceback" not in stderr
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    finish(out)
    assert same(weights(out), reference)


@pytest.mark.slow  # the default tier keeps one of its kind (a kill or a signal, then an exact resume)
def test_second_ctrl_c_exits_at_once_without_harm(tmp_path):
    out = tmp_path / "run"
    p = start(out, env=HOLD)
    wait_for(p, EVALUATED)
    send(p, signal.SIGINT, group=True)
    wait_for(p, "SIGINT: finishing this step")  # the first asked for a stop; the run is still held at step 11
    t0 = time.monotonic()
    send(p, signal.SIGINT, group=True)
    p.wait(timeout=60)
    waited = time.monotonic() - t0
    _, stderr = output(p)
    # at once: before the hold of step 11 is over, without its stop checkpoint (that way would exit 75)
    assert p.returncode == 130 and waited < HOLD_S, (waited, stderr[-2000:])
    assert not (out / "checkpoint-11").exists()
    _only_complete_checkpoints(out)  # a write in flight may be cut short: never left half there
    (step, newest), = checkpoint.complete_checkpoints(out)[-1:]
    assert step in (5, 10) and checkpoint.damage(newest) is None


def test_disk_full_while_saving_keeps_earlier_checkpoints(tmp_path, monkeypatch, capsys):
    from vitfood.common import run_main
    out = tmp_path / "run"
    monkeypatch.setenv("VITFOOD_FAULT", "enospc:weights_written:3")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train("--max-steps", 30, "--save-steps", 5, "--eval-steps", 5, "--output-dir", out))
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert e.value.code == 2 and err.startswith("error: ") and "No space left on device" in err and "checkpoint-15" in err
    assert [s for s, _ in checkpoint.complete_checkpoints(out)] == [5, 10]
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    monkeypatch.delenv("VITFOOD_FAULT")
    results = train("--resume", "auto", "--output-dir", out)
    assert results["global_step"] == 30


def test_nonfinite_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path, capsys):
    from vitfood.common import run_main
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        run_main(lambda: train("--max-steps", 40, "--lr", "1e30", "--max-grad-norm", "0", "--save-steps", 2,
                               "--eval-steps", 2, "--max-nonfinite-steps", 3, "--output-dir", out))
    err = capsys.readouterr().err
    # counted on the device and read at logging steps (every 5): the run stops at the first one after 3 in a row
    streak = re.search(r"not finite for (\d+) consecutive steps \((\d+) to 5\)", err)
    assert streak and int(streak[1]) >= 3 and int(streak[2]) == 6 - int(streak[1]), err[-500:]
    assert "Last good checkpoint" in err
    for _, path in checkpoint.complete_checkpoints(out):
        state = load_file(os.path.join(path, "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in state.values())
    with open(out / "train_config.json") as fh:
        assert json.load(fh)["max_nonfinite_steps"] == 3


def test_a_logging_window_of_skipped_steps_logs_no_gradient_norm(tmp_path):
    from vitfood.common import run_main
    from conftest import events
    out = tmp_path / "run"
    with pytest.raises(SystemExit):  # the first step is taken; from the second on, every step is skipped
        run_main(lambda: train("--max-steps", 10, "--lr", "1e30", "--max-grad-norm", "0", "--logging-steps", 1,
                               "--max-nonfinite-steps", 4, "--output-dir", out))
    logged = {int(e.step): e.value for e in events(out).Scalars("optim/grad_norm")}
    assert logged and all(v > 0 for v in logged.values()) and max(logged) < 5, logged


def test_a_killed_loader_worker_is_a_clear_error_not_a_hang(tmp_path):
    out = tmp_path / "run"
    p = start(out, "--save-steps", "7", env=HOLD)  # saves at steps 7 and 14: none at the kill
    wait_for(p, EVALUATED)
    _held(p.pid)  # asleep at the end of step 11, not reading a batch: the loader's workers are alive (persistent)
    send_to_child_of(p.pid, _children(p.pid)[0], signal.SIGKILL)  # as the kernel's OOM killer would
    _, stderr = output(p, timeout=120)
    last = stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith("error: DataLoader worker") and "Traceback" not in stderr, stderr[-1500:]
    _only_complete_checkpoints(out)
    assert [s for s, _ in checkpoint.complete_checkpoints(out)] == [7]


def _held(pid, timeout=60):
    """Until the main thread of process `pid` sleeps in a fault point's hold (VITFOOD_FAULT=delay:...)."""
    deadline = time.monotonic() + timeout
    task = f"/proc/{pid}/task/{pid}"
    while "nanosleep" not in open(f"{task}/wchan").read() and open(f"{task}/syscall").read().split()[0] not in ("35", "230"):
        assert time.monotonic() < deadline, f"process {pid} was not held within {timeout} s"
        time.sleep(0.01)


def _children(pid, timeout=60):
    """The child processes of `pid` (its loader workers), once it has some; none when it has ended (a run can
    reach its last step between two looks)."""
    deadline = time.monotonic() + timeout
    while not (children := [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]):
        if not _alive(pid):
            return []
        assert time.monotonic() < deadline, f"process {pid} started no loader worker in {timeout} s"
        time.sleep(0.02)
    return children


def _alive(pid):
    try:
        return "zombie" not in open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False


def _restart_right_after_kill_9(tmp_path, reference, trials):
    """A scheduler restarts a job the moment its main process is SIGKILLed (OOM killer, node drain): with
    the default worker count, the restart is never refused by the dying run's loader workers."""
    out = tmp_path / "run"
    for trial in range(trials):
        if (out / "all_results.json").exists():
            break  # killed so often that the run has ended
        p = start(out, "--num-workers", "-1")
        wait_for(p)
        _children(p.pid)  # the loop has started its loader worker
        time.sleep(0.3 + 0.05 * (trial % 10))
        workers = _children(p.pid)
        send(p, signal.SIGKILL)  # the main process only, as the kernel's OOM killer does
        p.wait(timeout=60)  # the main process, not its output pipes, which its workers hold open
        time.sleep(0.1)
        alive = [w for w in workers if _alive(w)]
        if (out / "all_results.json").exists():
            break  # it ended before the kill
        again = start(out, "--num-workers", "-1")
        wait_for(again)  # not refused ("another vitfood process is running")
        send(again, signal.SIGKILL, group=True)
        again.communicate(timeout=60)
        p.communicate(timeout=60)
        assert workers and not alive, (workers, alive)  # the workers died with their process, not seconds later
        _only_complete_checkpoints(out)
    finish(out)  # restarted so often, the run still ends where an uninterrupted one does
    assert same(weights(out), reference)


@pytest.mark.slow  # a kill loop of one; test_kill_inside_a_save_window_... restarts after a kill -9 in the default tier
def test_restart_right_after_kill_9_is_not_refused(tmp_path, reference):
    _restart_right_after_kill_9(tmp_path, reference, trials=1)


@pytest.mark.slow
def test_restart_right_after_kill_9_twenty_times(tmp_path, reference):
    _restart_right_after_kill_9(tmp_path, reference, trials=20)


def test_a_save_returns_before_its_write_and_keeps_the_weights_of_its_step(tmp_path, monkeypatch):
    from vitfood.config import Config
    from vitfood.model import build_model, load_weights
    model, processor = build_model(Config(model="vit-micro"), ["a", "b"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saver = rundir.Checkpoints(tmp_path, keep=2)
    saver.open()
    monkeypatch.setenv("VITFOOD_FAULT", "delay:weights_written")  # the write is held there 1.5 s
    monkeypatch.setenv("VITFOOD_FAULT_DELAY", "1.5")
    t0 = time.monotonic()
    saver.save(7, model, processor, {"step": 7, "numbers": torch.arange(3)})
    assert time.monotonic() - t0 < 1.0  # save returned before the write could end
    assert saver.writing() and not (tmp_path / "checkpoint-7").exists()  # the write goes on in the background
    with torch.no_grad():  # training goes on meanwhile
        for p in model.parameters():
            p.add_(1.0)
    saver.wait()
    assert time.monotonic() - t0 >= 1.5  # wait() waited for the held write
    assert checkpoint.is_complete(tmp_path / "checkpoint-7")
    fresh, _ = build_model(Config(model="vit-micro"), ["a", "b"])
    load_weights(fresh, tmp_path / "checkpoint-7")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())  # not the weights changed after
    assert torch.load(tmp_path / "checkpoint-7" / checkpoint.STATE, weights_only=True)["numbers"].tolist() == [0, 1, 2]


@pytest.mark.slow  # the default tier keeps one of its kind (a kill or a signal, then an exact resume)
def test_kill_while_a_background_write_is_in_flight_then_resume_is_exact(tmp_path, reference):
    out = tmp_path / "run"
    p = start(out, env={"VITFOOD_FAULT": "delay:weights_written:2", "VITFOOD_FAULT_DELAY": "2"})
    deadline = time.time() + 120
    while not any(n.startswith(".tmp-checkpoint-10-") for n in (os.listdir(out) if out.exists() else ())):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.02)
    time.sleep(0.5)  # the loop trains on while the write of checkpoint-10 waits (2 s)
    send(p, signal.SIGKILL, group=True)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    _only_complete_checkpoints(out)
    assert [s for s, _ in checkpoint.complete_checkpoints(out)] == [5]
    finish(out)
    assert same(weights(out), reference)


@pytest.mark.slow
def test_vit_base_killed_while_its_checkpoint_is_written_in_the_background_resumes_exactly(tmp_path):
    """ViT-B/16 (86M parameters: a 1 GB checkpoint with its AdamW state): kill -9 while a background write is
    in flight (held there a few seconds, so a fast disk cannot finish it first); the resumed run ends with the
    same weights."""
    run = ("--model", "vit-base", "--image-size", "32", "--batch-size", "4", "--max-steps", "6", "--save-steps", "2",
           "--eval-steps", "6", "--num-workers", "0")
    p = start(tmp_path / "ref", *run)
    p.communicate(timeout=600)
    assert p.returncode == 0
    out = tmp_path / "run"
    p = start(out, *run, env={"VITFOOD_FAULT": "delay:weights_written:2", "VITFOOD_FAULT_DELAY": "5"})
    deadline = time.time() + 600
    while not any(n.startswith(".tmp-checkpoint-4-") for n in (os.listdir(out) if out.exists() else ())):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.01)
    time.sleep(0.5)  # checkpoint-4 is being written while the loop trains on
    send(p, signal.SIGKILL, group=True)
    p.communicate(timeout=60)
    _only_complete_checkpoints(out)
    assert [s for s, _ in checkpoint.complete_checkpoints(out)] == [2]
    finish(out, *run)
    assert same(weights(out), weights(tmp_path / "ref"))


def _stderr_or_where_it_waits(p, timeout):
    """The stderr of process `p` once it ends; if it does not end within `timeout` seconds, fail with the stack of
    each of its threads (SIGABRT makes faulthandler print them) and the processes it still has."""
    try:
        return output(p, timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        children = subprocess.run(["ps", "-o", "pid,stat,wchan:24,cmd", "--ppid", str(p.pid)], capture_output=True,
                                  text=True).stdout
        send(p, signal.SIGABRT)
        try:
            stacks = p.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            stacks = "(no exit on SIGABRT either)"
        with contextlib.suppress(ProcessLookupError):
            send(p, signal.SIGKILL, group=True)  # its workers
        raise AssertionError(f"no exit {timeout} s after its worker was killed; its children:\n{children}\n"
                             f"{stacks[-6000:]}")


@pytest.mark.slow
def test_a_worker_killed_at_random_moments_is_one_line_every_time_and_resumes_exactly(tmp_path, reference):
    """Runs until 30 of them had one loader worker SIGKILLed (as the OOM killer does) at a random moment of the
    loop, unheld: whatever the main process was doing (waiting on the queue, unpickling a batch, starting a
    save, evaluating), one `error:` line naming the worker and exit 2, never a traceback, a hang or another
    cause. A kill after the last batch may let the run end well (exit 0: nothing it made is lost). The last
    killed run is then resumed and ends with the weights of a run never stopped."""
    timing = start(tmp_path / "timing")  # how long this machine takes from the loop's start to its last step
    wait_for(timing)
    began = time.monotonic()
    wait_for(timing, "step 30/30")
    loop = time.monotonic() - began
    output(timing)
    rng, killed, ended_well = random.Random(), [], 0
    for i in range(60):
        if len(killed) == 30:
            break
        out = tmp_path / f"run{i}"
        p = start(out, "--save-steps", "7", env={"PYTHONFAULTHANDLER": "1"})
        wait_for(p)
        time.sleep(rng.uniform(0, loop))
        workers = _children(p.pid)
        if not workers:  # it got past its loop first
            output(p)
            continue
        send_to_child_of(p.pid, rng.choice(workers), signal.SIGKILL)
        stderr = _stderr_or_where_it_waits(p, timeout=120)
        if p.returncode == 0:  # the kill came after the last batch was taken
            ended_well += 1
            continue
        last = (stderr.strip().splitlines() or [""])[-1]
        assert p.returncode == 2 and last.startswith("error: DataLoader worker") and "Traceback" not in stderr, \
            (i, stderr[-1500:])
        _only_complete_checkpoints(out)
        killed.append(out)
    assert len(killed) == 30, f"only {len(killed)} of 60 kills stopped a run ({ended_well} came after its last batch)"
    finish(killed[-1])
    assert same(weights(killed[-1]), reference)
