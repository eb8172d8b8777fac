"""--fsdp: the weights, gradients and AdamW state sharded over the ranks (FSDP2), checkpoints written by every rank
with torch.distributed.checkpoint, resumed on the same or another number of processes, exported as one model."""

import json
import os
import shutil
import signal
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, cli, error, error_line, same, weights
from vitfood import checkpoint, fsdp

RUN = [*TINY, "--max-steps", "6", "--eval-steps", "3", "--save-steps", "3"]


def sharded(out, *args, env=None, nproc=1):
    """RUN with --fsdp in a process of its own (a process group lives in it), or under torchrun."""
    run = [*RUN, "--fsdp", "--output-dir", out, "--resume", "auto", *args]
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    if nproc == 1:
        return cli(*run, env=env)
    return cli("--standalone", f"--nproc_per_node={nproc}", "-m", "vitfood.train", *run, module="torch.distributed.run",
               env=env)


@pytest.mark.slow  # a kill and a resume, and the plain run beside it
def test_a_sharded_run_killed_and_resumed_ends_with_the_plain_run_s_weights(tmp_path, capsys):
    """On one process (a group of one) FSDP computes what the plain loop computes; its checkpoints hold the
    shards, sealed and checked like every checkpoint; a kill -9 and --resume auto change nothing; predict reads
    a sharded checkpoint as it reads a plain one."""
    plain = tmp_path / "plain"
    assert cli(*RUN, "--output-dir", plain, env={"OMP_NUM_THREADS": "1"}).returncode == 0  # the same threads
    out = tmp_path / "sharded"
    assert sharded(out, env={"VITFOOD_FAULT": "step:5"}).returncode == -signal.SIGKILL
    ckpt = out / "checkpoint-3"
    listed = json.load(open(ckpt / checkpoint.MARKER))["files"]
    assert {f"{fsdp.SHARDED_DIR}/.metadata", f"{fsdp.SHARDED_DIR}/__0_0.distcp", checkpoint.STATE, "config.json"} <= set(listed)
    assert "model.safetensors" not in listed and checkpoint.damage(ckpt) is None
    p = sharded(out)
    assert p.returncode == 0 and "resuming from" in p.stdout and "(FSDP2)" in p.stdout, p.stderr[-2000:]
    assert same(weights(out), weights(plain))  # model/: one ordinary transformers folder
    # predict takes a sharded checkpoint folder (its shards loaded in one process, with no process group)
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    from vitfood.predict import main as predict
    printed = []
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for run in (out, plain):  # in this process: no process group
            predict(["--model", str(run / "checkpoint-6"), str(tmp_path / "x.png")])
            printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and "x.png: " in printed[0]
    assert not [w for w in said if "torch.distributed" in str(w.message)]  # DCP's single-process note, silenced

    shard = ckpt / fsdp.SHARDED_DIR / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "__0_0.distcp does not match its checksum" in checkpoint.damage(ckpt)


def test_what_fsdp_refuses_is_one_line(capsys, tmp_path):
    for field, flag, _ in fsdp.REFUSED:
        value = {"ema_decay": "0.99", "lora_rank": "4", "freeze_epochs": "1", "freeze_steps": "2"}.get(field)
        args = ["--fsdp", flag, *([value] if value else []), "--output-dir", tmp_path / field]
        assert f"--fsdp with {flag}" in error(capsys, *args, alone=True)
    assert "--batch-size auto" in error(capsys, "--fsdp", "--batch-size", "auto", alone=True)


# ---------------------------------------------------------------- two processes (slow tier)
ATOL = 2e-4  # another order of summation between world sizes, as tests/test_dist.py measures


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_sharded_processes_match_ddp_resume_exactly_and_on_one_process(tmp_path, precision):
    """2 processes with --fsdp against DDP: the same weights within float tolerance; rank 1 killed -9 at step 5,
    resumed on 2 processes bit for bit, on 1 process within tolerance; the export runs in transformers.pipeline
    and vitfood.export's parity gate on a sharded checkpoint."""
    import transformers
    # 41 eval images in batches of 5: rank 0 has 5 batches, rank 1 four (its sharded model forwards once more idle)
    args = ("--precision", precision, "--batch-size", "8", "--grad-accum-steps", "2", "--max-eval-samples", "41",
            "--eval-batch-size", "5")
    ddp = tmp_path / "ddp"
    p = cli("--standalone", "--nproc_per_node=2", "-m", "vitfood.train", *RUN, *args, "--output-dir", ddp,
            module="torch.distributed.run", env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    ref = tmp_path / "ref"
    assert sharded(ref, *args, nproc=2).returncode == 0
    assert max_diff(weights(ref), weights(ddp)) < (ATOL if precision == "fp32" else 2e-2)

    killed = tmp_path / "killed"
    p = sharded(killed, *args, nproc=2, env={"VITFOOD_FAULT": "step:5", "VITFOOD_FAULT_RANK": "1"})
    assert p.returncode != 0 and os.path.isdir(killed / "checkpoint-3") and not os.path.exists(killed / "checkpoint-6")
    one = tmp_path / "one"
    shutil.copytree(killed, one, ignore=shutil.ignore_patterns("run.lock"))
    p = sharded(killed, *args, nproc=2)
    assert p.returncode == 0 and "resuming from" in p.stdout, p.stderr[-2000:]
    assert same(weights(killed), weights(ref))
    p = sharded(one, *args[:2], "--batch-size", "16", *args[4:])  # 1 x 16 x 2: the same global batch
    assert p.returncode == 0 and "resuming from" in p.stdout, p.stderr[-2000:]
    assert max_diff(weights(one), weights(ref)) < (ATOL if precision == "fp32" else 2e-2)

    classify = transformers.pipeline("image-classification", model=str(ref / "model"))
    assert len(classify(Image.new("RGB", (64, 64)), top_k=2)) == 2
    if precision == "fp32":
        p = cli(ref, "--checkpoint", "last", module="vitfood.export")
        assert p.returncode == 0 and "agreement 100.00%" in p.stdout, p.stderr[-2000:]


@pytest.mark.slow
def test_a_full_disk_under_a_sharded_write_is_one_line_and_leaves_no_partial_checkpoint(small_disk):
    out = small_disk / "run"
    p = cli(*TINY, "--max-steps", "30", "--save-steps", "5", "--eval-steps", "10", "--fsdp", "--output-dir", out,
            env={"OMP_NUM_THREADS": "1"})
    line = error_line(p)
    assert "cannot write checkpoint-" in line and "is full" in line, line
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary folder left
    saved = checkpoint.complete_checkpoints(out)
    assert saved and all(checkpoint.damage(path) is None for _, path in saved)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["swin", "convnext", "resnet", "beit"])
def test_other_families_shard_resume_bit_exact_and_equal_the_plain_loop_in_fp32(family, tmp_path):
    """Families other than ViT, in fp32 and bf16 (ResNet's BatchNorm units keep fp32 weights): killed -9 and
    resumed ends bit for bit as a run never stopped; in fp32 that is the plain loop's weights too."""
    import torch
    from test_adapt import FAMILIES
    cls, config, processor = FAMILIES[family]
    model = tmp_path / family
    torch.manual_seed(0)
    cls(config()).save_pretrained(model)
    processor().save_pretrained(model)
    for precision in ("fp32", "bf16"):
        args = ("--model", model, "--precision", precision, "--calibrate", "none")
        ref, killed = tmp_path / f"ref-{precision}", tmp_path / f"killed-{precision}"
        assert sharded(ref, *args).returncode == 0
        assert sharded(killed, *args, env={"VITFOOD_FAULT": "step:5"}).returncode == -signal.SIGKILL
        p = sharded(killed, *args)
        assert p.returncode == 0 and "resuming from" in p.stdout, p.stderr[-2000:]
        assert same(weights(killed), weights(ref))
    plain = tmp_path / "plain"
    assert cli(*RUN, "--model", model, "--calibrate", "none", "--output-dir", plain,
               env={"OMP_NUM_THREADS": "1"}).returncode == 0
    assert same(weights(plain), weights(tmp_path / "ref-fp32"))
