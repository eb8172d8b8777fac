import os
import subprocess
import sys

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
