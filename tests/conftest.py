import os
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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_dir):
    """One short training run shared by the tests that only read its outputs: (run dir, all_results)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    results = train("--max-steps", 200, "--eval-steps", 40, "--save-steps", 40, "--lr", "5e-3", "--output-dir", out)
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


def start(out, *extra, env=None):
    """A training process on RUN in `out` with --resume auto, as a job scheduler would start it."""
    cmd = [sys.executable, "-m", "vitfood.train", *RUN, "--output-dir", str(out), "--resume", "auto", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", **(env or {})},
                            start_new_session=True)


def wait_for_training(proc, timeout=120):
    """Block until the run prints its 'run:' line (set-up done, the loop starts)."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        if line.startswith("run:") or time.time() > deadline:
            return True
    return False


def finish(out, *extra, tries=6):
    """Rerun with --resume auto until the run is complete; returns the last process."""
    for _ in range(tries):
        p = start(out, *extra)
        p.communicate(timeout=300)
        if p.returncode == 0 and (out / "all_results.json").exists():
            return p
    raise AssertionError(f"run in {out} did not complete: {p.returncode}")


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
    p.communicate(timeout=300)
    assert p.returncode == 0
    return out


@pytest.fixture(scope="session")
def reference(reference_run):
    """The final weights of RUN never interrupted: what every killed and resumed run must end with."""
    return weights(reference_run)
