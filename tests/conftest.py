import codecs
import os
import select
import signal
import subprocess
import sys
import time

import pytest

# Tests never reach the Hub, and share one generated data set cache per session.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A tiny run: vit-micro (64 px, 2 layers) on a small synthetic set, fp32, no workers.
TINY = ["--dataset", "synthetic", "--train-split", "train", "--synthetic-size", "240", "--synthetic-classes", "4",
        "--synthetic-max-px", "128", "--model", "vit-micro", "--precision", "fp32", "--batch-size", "16",
        "--num-workers", "0", "--lr", "2e-3", "--logging-steps", "5"]


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    os.environ["VITFOOD_CACHE"] = str(path)
    return path


@pytest.fixture(autouse=True)
def fault_counts_from_zero():
    """checkpoint.fault_point counts, per process, how often each point was reached: a test that sets
    VITFOOD_FAULT in this process counts from zero, whatever the tests before it reached."""
    from vitfood import checkpoint
    checkpoint._reached.clear()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_dir):
    """One short training run shared by the tests that only read its outputs: (run dir, all_results)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    # TINY's lr 2e-3: at 5e-3 one seed in five, and the CUDA run, stayed at chance
    results = train("--max-steps", 200, "--eval-steps", 40, "--save-steps", 40, "--output-dir", out)
    return out, results


def train(*args):
    """Run vitfood.train in this process; returns all_results (or None)."""
    from vitfood.train import main
    return main([*TINY, *map(str, args)])


def cli(*args, module="vitfood.train", timeout=300):
    """Run a vitfood command as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


# ---------------------------------------------------------------- crash tests: a run killed, stopped, resumed
# 240 synthetic images -> 192 train = 12 micro-batches an epoch; checkpoints every 5 steps, 2 workers
RUN = [*TINY, "--max-steps", "30", "--eval-steps", "10", "--save-steps", "5", "--num-workers", "2",
       "--logging-steps", "5"]

# Where a test's signal lands: RUN prints EVALUATED after its eval at step 10, then holds HOLD_S seconds at the
# end of step 11 (the fault point "step", its 11th time). A signal sent when the line is read arrives inside
# the loop, before step 11 is over, so the run stops at step 11 exactly; the hold only has to outlast the
# test's reading of one line, not the run.
HOLD_S = 2
HOLD = {"VITFOOD_FAULT": "delay:step:11", "VITFOOD_FAULT_DELAY": str(HOLD_S)}
EVALUATED = "step 10: eval"


def start(out, *extra, env=None):
    """A training process on RUN in `out` with --resume auto, as a job scheduler would start it."""
    cmd = [sys.executable, "-m", "vitfood.train", *RUN, "--output-dir", str(out), "--resume", "auto", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", **(env or {})},
                            start_new_session=True)


def wait_for(proc, prefix="run:", timeout=120):
    """Read the process's stdout up to a line that starts with `prefix` ("run:": set-up is done, the loop
    starts) and return that line. Fails, showing what the process printed, when it exits first or the line
    does not come within `timeout` seconds. output(proc) gives the whole of stdout later."""
    if not hasattr(proc, "seen"):
        proc.seen, proc.unread, proc.decoder = "", "", codecs.getincrementaldecoder("utf-8")("replace")
    fd, deadline = proc.stdout.fileno(), time.monotonic() + timeout
    while True:
        *lines, proc.unread = proc.unread.split("\n")
        for i, line in enumerate(lines):
            if line.split("\r")[-1].startswith(prefix):
                proc.unread = "\n".join([*lines[i + 1:], proc.unread])
                return line
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line starting with {prefix!r} in {timeout} s; it printed:\n{proc.seen[-2000:]}")
        text = proc.decoder.decode(os.read(fd, 1 << 16))
        if not text:
            out, err = proc.communicate(timeout=60)
            raise AssertionError(f"the process ended ({proc.returncode}) before a line starting with {prefix!r}:\n"
                                 f"{(proc.seen + out)[-2000:]}\n{err[-2000:]}")
        proc.seen += text
        proc.unread += text


def stop(out, sig, *extra):
    """RUN in `out`, sent `sig` while it is held in its loop at step 11: (exit status, stdout, stderr). Ctrl-C
    (SIGINT) reaches the terminal's whole process group; SIGTERM the main process (kill, docker stop, Kubernetes)."""
    p = start(out, *extra, env=HOLD)
    wait_for(p, EVALUATED)
    os.killpg(p.pid, sig) if sig == signal.SIGINT else os.kill(p.pid, sig)
    stdout, stderr = output(p)
    return p.returncode, stdout, stderr


@pytest.fixture(scope="session")
def sigterm_stopped(tmp_path_factory, cache_dir):
    """RUN stopped by SIGTERM at step 11, as a scheduler preempts a job, and not resumed: (run dir, exit status,
    stdout, stderr). Copy the run directory before resuming it."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    return (out, *stop(out, signal.SIGTERM))


def output(proc, timeout=300):
    """(stdout, stderr) of a process started with start(), once it has ended; stdout whole, with what
    wait_for read."""
    out, err = proc.communicate(timeout=timeout)
    return getattr(proc, "seen", "") + out, err


def finish(out, *extra):
    """Resume the run in `out` to its end with --resume auto, in this process (it then holds the run's lock:
    no other process may run there afterwards); returns all_results (None: it had ended already).

    Without loader workers: the data a step sees does not depend on them (augmentations are keyed on seed, epoch
    and index), and a run's workers would outlive it here, mid-epoch, until a garbage collection that waits
    5 s for each of them (torch's shutdown of a persistent worker holding prefetched batches)."""
    from vitfood.train import main
    results = main([*RUN, "--output-dir", str(out), "--resume", "auto", "--num-workers", "0", *map(str, extra)])
    assert (out / "all_results.json").is_file()
    return results


def resumed_copy(out, dest, *args, later=("checkpoint-6",)):
    """The run in `out` resumed in a copy at `dest`, as if killed after its first checkpoint: what came
    later (`later` checkpoints, the export, the results) removed, then --resume auto with `args`."""
    import shutil
    from vitfood import adapt, checkpoint
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("run.lock"))
    for name in ("model", adapt.ADAPTER, *later):
        shutil.rmtree(dest / name, ignore_errors=True)
    for name in ("all_results.json", checkpoint.BEST):
        (dest / name).unlink(missing_ok=True)
    train(*args, "--resume", "auto", "--output-dir", dest)
    return dest


def weights(out):
    from safetensors.torch import load_file
    return load_file(out / "model" / "model.safetensors")


def same(a, b):
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, cache_dir):
    """RUN, never interrupted: its run directory (copy it before changing anything in it)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    p = start(out)
    _, err = output(p)
    assert p.returncode == 0, err[-2000:]
    return out


@pytest.fixture(scope="session")
def reference(reference_run):
    """The final weights of RUN never interrupted: what every killed and resumed run must end with."""
    return weights(reference_run)


def events(out):
    """The TensorBoard events of run directory `out`, every record kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out), size_guidance={"tensors": 0, "scalars": 0, "images": 0})
    ea.Reload()
    return ea
