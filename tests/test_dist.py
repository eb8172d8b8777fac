"""torchrun on the CPU: 2 processes with gloo against 1 process with the same global batch."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, cli

pytestmark = pytest.mark.slow  # several processes each: the slow tier (-m slow)

# 161 training images in global batches of 32: each epoch ends with a batch of 1, so rank 1's share of
# it is empty; 8 steps of 2 micro-batches cross the epoch boundary.
RUN = [*TINY, "--max-train-samples", "161", "--grad-accum-steps", "2", "--max-steps", "8", "--eval-steps", "4",
       "--save-steps", "4"]
# Float tolerance between world sizes: DDP sums gradients across ranks in another order than one
# process sums a batch; AdamW then amplifies the last bits a little each step. Measured: 2.5e-5 after 12 steps.
ATOL = 2e-4


def launch(out, *args, nproc=2, env=None, timeout=300):
    """RUN under torchrun with `nproc` processes (1: a plain process, as users start it)."""
    run = [*RUN, "--output-dir", out, *args]
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    if nproc == 1:
        return cli(*run, env=env, timeout=timeout)
    return cli("--standalone", f"--nproc_per_node={nproc}", "-m", "vitfood.train", *run, module="torch.distributed.run",
               env=env, timeout=timeout)


def weights(run):
    return load_file(os.path.join(run, "model", "model.safetensors"))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    one = launch(root / "one", "--batch-size", "32", nproc=1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch(root / "two", "--batch-size", "16", "--num-workers", "1")  # a worker builds the empty share
    assert two.returncode == 0, two.stderr[-2000:]
    return root / "one", root / "two"


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    one, two = runs
    assert max_diff(weights(one), weights(two)) < ATOL
    r1, r2 = (json.load(open(r / "all_results.json")) for r in runs)
    assert r1["eval_accuracy"] == r2["eval_accuracy"]  # the split evaluated once, whole, across ranks
    assert abs(r1["eval_loss"] - r2["eval_loss"]) < 1e-4
    env = json.load(open(two / "env.json"))
    assert env["world_size"] == 2
    state = torch.load(two / "checkpoint-8" / "training_state.pt", weights_only=True)
    assert state["data"]["global_batch"] == 32 and state["data"]["world_size"] == 2


def test_resume_under_two_processes_is_exact_and_across_world_sizes_close(runs, tmp_path):
    one, two = runs
    for name, nproc, bs in [("same", 2, 16), ("single", 1, 32)]:
        run = tmp_path / name
        shutil.copytree(two, run, ignore=shutil.ignore_patterns("checkpoint-8", "model", "all_results.json"))
        r = launch(run, "--resume", "auto", "--batch-size", bs, nproc=nproc)
        assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-2000:]
        if nproc == 2:
            assert max_diff(weights(run), weights(two)) == 0  # same world size: bit for bit
        else:
            assert max_diff(weights(run), weights(two)) < ATOL


def test_resume_with_another_global_batch_is_refused(runs, tmp_path):
    _, two = runs
    run = tmp_path / "run"
    shutil.copytree(two, run, ignore=shutil.ignore_patterns("checkpoint-8", "model", "all_results.json"))
    r = launch(run, "--resume", "auto", "--batch-size", "16", nproc=1)
    assert r.returncode == 2 and "--batch-size 32" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_failing_rank_ends_the_job_with_its_message(tmp_path):
    r = launch(tmp_path / "run", "--batch-size", "16", env={"VITFOOD_FAULT": "error:step:2", "VITFOOD_FAULT_RANK": "1"},
               timeout=120)  # a hang would time out
    assert r.returncode != 0
    assert "error: [rank 1] fault injected at step" in r.stderr, r.stderr[-3000:]
    r = launch(tmp_path / "killed", "--batch-size", "16", env={"VITFOOD_FAULT": "step:2", "VITFOOD_FAULT_RANK": "1"},
               timeout=120)  # SIGKILL: no message of its own; torchrun names it
    assert r.returncode != 0 and "SIGKILL" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("extra, score", [(["--synthetic-dishes", "3"], "eval_map"),
                                          (["--sampler", "balanced"], "eval_balanced_accuracy"),
                                          # dropout draws per rank: no LoRA dropout, or 1 and 2 processes differ
                                          (["--lora-rank", "4", "--lora-dropout", "0"], "eval_accuracy"),
                                          (["--freeze-backbone"], "eval_accuracy"),
                                          (["--freeze-steps", "3"], "eval_accuracy"),  # DDP built again at step 3
                                          (["--eval-steps", "2", "--early-stopping-patience", "1",
                                            "--early-stopping-min-delta", "1"], "eval_accuracy")],  # stops at 4
                         ids=["multi-label", "balanced-sampler", "lora", "frozen", "head-first", "early-stop"])
def test_levers_under_two_processes(extra, score, tmp_path):
    """The same global batches on 1 and 2 processes (multi-hot labels, balanced draws, LoRA adapters, a frozen
    backbone), the eval whole across ranks, and a resume under 2 processes bit for bit."""
    one = launch(tmp_path / "one", "--batch-size", "32", *extra, nproc=1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch(tmp_path / "two", "--batch-size", "16", "--num-workers", "1", *extra)
    assert two.returncode == 0, two.stderr[-2000:]
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < ATOL
    r1, r2 = (json.load(open(tmp_path / r / "all_results.json")) for r in ("one", "two"))
    assert r1[score] == pytest.approx(r2[score], abs=1e-3) and r1["eval_loss"] == pytest.approx(r2["eval_loss"], abs=1e-4)
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", run, ignore=shutil.ignore_patterns("checkpoint-8", "model", "all_results.json"))
    r = launch(run, "--resume", "auto", "--batch-size", "16", *extra)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-2000:]
    assert max_diff(weights(run), weights(tmp_path / "two")) == 0
