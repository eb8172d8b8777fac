import codecs
import csv
import json
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

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
    """faults.at counts, per process, how often each point was reached: a test that sets
    VITFOOD_FAULT in this process counts from zero, whatever the tests before it reached."""
    from vitfood import faults
    faults._reached.clear()


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


def cli(*args, module="vitfood.train", timeout=300, env=None):
    """Run a vitfood command as a user would (`env`: over this process's environment, a None removing a
    variable); returns the CompletedProcess."""
    environ = {k: v for k, v in {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=environ)


def error_line(p, alone=False):
    """The `error:` line a command (a CompletedProcess) ended with: exit status 2, no traceback; `alone`: the only
    line on stderr (else progress lines may come before it)."""
    lines = [line for line in p.stderr.strip().splitlines() if line.strip() and "it/s" not in line and "s/it" not in line]
    assert p.returncode == 2 and lines and lines[-1].startswith("error: ") and "Traceback" not in p.stderr, \
        p.stderr[-3000:]
    assert len(p.stderr.strip().splitlines()) == 1 or not alone, p.stderr[-3000:]
    return lines[-1]


def error(capsys, *args, main=None, alone=False):
    """The `error:` line of a command run in this process (vitfood.train with TINY, or `main`) that exits 2
    through run_main, with no traceback; `alone`: the only line on stderr."""
    from vitfood.common import run_main
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(list(map(str, args))) if main else train(*args))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and lines[-1].startswith("error: ") and not any("Traceback" in l for l in lines), lines
    assert len(lines) == 1 or not alone, lines
    return lines[-1]


def image_folder(root, per_class, classes=("a", "b"), splits=None, size=(40, 40), noise=False, seed=0):
    """An imagefolder: root[/split]/<class>/<i>.jpg, `per_class` JPEGs of `size` (w, h) per class (per split:
    a dict {split: n} with `splits`), each class its own colour; with `noise`, random pixels in the other
    channels."""
    rng = np.random.default_rng(seed)
    for split in splits or [None]:
        n = per_class[split] if isinstance(per_class, dict) else per_class
        for k, c in enumerate(classes):
            folder = root / split / c if split else root / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8) if noise else \
                    np.full((size[1], size[0], 3), (i * 40 % 255, 10, 200), dtype=np.uint8)
                pixels[..., k % 3] = 255  # the classes differ in colour
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def metadata_folder(root, labels, fmt, column, split="train", size=(24, 24)):
    """An imagefolder split whose labels are in a metadata file: root/split/p<i>.jpg, one image per entry of
    `labels` (each label as the file writes it), listed in metadata.csv or metadata.jsonl (`fmt`) under
    `column`."""
    (root / split).mkdir(parents=True, exist_ok=True)
    for i in range(len(labels)):
        Image.new("RGB", size, (40 * i % 255, 60, 90)).save(root / split / f"p{i}.jpg")
    if fmt == "csv":
        with open(root / split / "metadata.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file_name", column])
            w.writerows([f"p{i}.jpg", label] for i, label in enumerate(labels))
    else:
        (root / split / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": f"p{i}.jpg", column: label}) + "\n" for i, label in enumerate(labels)))
    return root


def killed_and_resumed(tmp_path, *args):
    """The same run twice: never stopped (tmp_path/ref), and killed -9 as checkpoint-5 is renamed into place then
    restarted with --resume auto (tmp_path/killed); each of 12 steps, saving every 5, with 2 loader workers.
    Returns the two run directories."""
    go = lambda out, env=None: cli(*TINY, "--max-steps", 12, "--save-steps", 5, "--eval-steps", 5, "--num-workers", 2,
                                   *args, "--output-dir", out, "--resume", "auto", env=env)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert go(ref).returncode == 0
    assert go(killed, env={"VITFOOD_FAULT": "renamed:1"}).returncode == -signal.SIGKILL
    p = go(killed)
    assert p.returncode == 0 and "resuming from" in p.stdout, p.stderr[-2000:]
    return ref, killed


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
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", **(env or {})},
                         start_new_session=True)
    p.pidfd = os.pidfd_open(p.pid)  # now, while it cannot have been reaped: this process and no other, ever
    return p


def send(proc, sig, group=False):
    """`sig` to a process started here, never to one that took its pid later (Linux recycles pids, and a kill(2)
    of a recycled pid that is now a thread of this very process signals this process): through its pidfd, or to
    its process group while it is not reaped (the unreaped leader keeps the group's id from being reused).
    A process already gone is not signalled."""
    if group:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        return
    fd = getattr(proc, "pidfd", None)
    if fd is None:
        proc.send_signal(sig)  # Popen polls first and never signals a child it has reaped
        return
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass


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
    send(p, sig, group=sig == signal.SIGINT)
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
    if getattr(proc, "pidfd", None) is not None:
        os.close(proc.pidfd)
        proc.pidfd = None
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


@pytest.fixture
def small_disk(tmp_path):
    """A real 1.2 MB filesystem (tmpfs), where the platform lets us mount one."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def send_to_child_of(parent, pid, sig):
    """`sig` to `pid`, read from /proc as a child of process `parent` (a loader worker), only while it still is:
    pinned by a pidfd first, so that a pid freed and reused since the listing is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with open(f"/proc/{pid}/stat") as fh:
            if int(fh.read().rsplit(")", 1)[1].split()[1]) == parent:
                signal.pidfd_send_signal(fd, sig)
    except (FileNotFoundError, ProcessLookupError):
        pass
    finally:
        os.close(fd)
