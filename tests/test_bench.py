import json
import math

import pytest

from conftest import TINY


def test_flop_count_matches_a_hand_count():
    from transformers import ViTConfig
    from vitfood.model import vit_flops_per_image
    cfg = ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                    patch_size=4, image_size=8, num_labels=2)
    # by hand, in multiply-adds: 4 patches of 4x4x3 pixels -> 8 dims; 5 tokens (4 + CLS) through one layer
    patch = 4 * (4 * 4 * 3) * 8          # 1536
    qkvo = 4 * (5 * 8 * 8)               # 1280
    attention = 5 * 5 * 8 + 5 * 5 * 8    # scores + weighted values: 400
    mlp = 5 * 8 * 16 + 5 * 16 * 8        # 1280
    head = 8 * 2                         # CLS token only: 16
    macs = patch + qkvo + attention + mlp + head
    assert vit_flops_per_image(cfg, training=False) == 2 * macs == 9024
    assert vit_flops_per_image(cfg, training=True) == 3 * 2 * macs


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_quick_bench_reports_every_mode(capsys, tmp_path, monkeypatch):
    from vitfood.bench import main
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    main([*TINY, "--quick", "--out", str(out), "--precisions", "fp32,bf16", "--profile"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"report: {out}" and max(map(len, printed)) < 400  # tables to read; the JSON in the file
    report = json.loads(out.read_text())
    assert {"env", "config", "data", "model", "e2e", "eval", "matmul_peak_flops", "flops_per_image_train"} <= report.keys()
    assert not {"memory", "loop"} & report.keys()  # --quick starts no other process
    assert {r["precision"] for r in report["model"]} == {"fp32", "bf16"}
    for row in report["model"]:
        assert row["img_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_mem_mb"] > 0
    assert report["data"][0]["img_s"] > 0 and report["e2e"]["img_s"] > 0 and 0 <= report["e2e"]["data_wait"] <= 1
    assert report["eval"]["img_s"] > 0 and report["eval"]["images"] > 0 and report["eval"]["first_pass_img_s"] > 0
    levers = report["levers"]  # none asked for: --preset finetune's that act in the step, and an EMA
    assert levers["levers"]["mixup"] == 0.8 and levers["levers"]["ema_decay"] > 0
    assert levers["plain_ms"] > 0 and levers["levers_ms"] > 0 and 0 < levers["ema_ms"] < levers["levers_ms"]
    assert all(math.isfinite(v) for v in _numbers(report))
    trace = json.loads(open(report["e2e"]["trace"]).read())  # Chrome/Perfetto trace format
    assert trace["traceEvents"]


def test_the_export_mode_times_the_onnx_files_against_eager_pytorch_on_the_same_images(capsys, tmp_path, monkeypatch):
    from vitfood.bench import main
    monkeypatch.chdir(tmp_path)  # its report goes to runs/bench-<date>-<time>.json
    report = main([*TINY, "--modes", "export", "--precision", "bf16", "--json"])["export"]
    written, = (tmp_path / "runs").glob("bench-*.json")
    assert json.loads(written.read_text())["export"] == json.loads(capsys.readouterr().out.splitlines()[-1])["export"]
    assert report["images"] == 32 and report["threads"] >= 1 and report["export_s"] > 0
    rows = {k: report[k] for k in ("pytorch", "pytorch_bf16", "onnx", "onnx_int8")}
    assert all(r["latency_ms"] > 0 and r["img_s"] > 0 and r["size_mb"] > 0 for r in rows.values())
    assert report["onnx"]["max_logit_diff"] < 1e-4 < report["onnx_int8"]["max_logit_diff"]  # int8 rounds
    assert rows["pytorch_bf16"]["size_mb"] == rows["pytorch"]["size_mb"] / 2


@pytest.mark.slow
def test_the_loop_and_memory_modes_run_child_processes(capsys, tmp_path, monkeypatch):
    from vitfood.bench import main
    monkeypatch.chdir(tmp_path)
    report = main([*TINY, "--modes", "loop,memory", "--steps", "3", "--repeats", "2", "--batch-sizes", "8"])
    loop = report["loop"]  # vitfood.train's own loop, in a child process, against the bare step
    assert loop["steps"] == 60 and loop["img_s"] > 0 and loop["bare_img_s"] > 0 and 0 <= loop["data_wait"] <= 1
    assert loop["vs_bare"] == pytest.approx(loop["img_s"] / loop["bare_img_s"]) and loop["step_mode"] == "eager"
    rows = {r["mode"]: r for r in report["memory"]}  # each way to train, each in a fresh process
    assert rows.keys() == {"full", "frozen", "lora", "checkpointing", "ddp r0/2", "ddp r1/2", "fsdp r0/2", "fsdp r1/2"}
    assert rows["frozen"]["trainable"] < rows["lora"]["trainable"] < rows["full"]["trainable"]
    for rank in (0, 1):  # DDP holds every weight, gradient and moment on each rank; FSDP about half of them
        assert rows[f"ddp r{rank}/2"]["state_mb"] == pytest.approx(rows["full"]["state_mb"])
        assert rows[f"fsdp r{rank}/2"]["state_mb"] < 0.75 * rows["full"]["state_mb"]
    total = rows["fsdp r0/2"]["state_mb"] + rows["fsdp r1/2"]["state_mb"]  # shards of an odd dim are padded
    assert total == pytest.approx(rows["full"]["state_mb"], rel=1e-3)
    assert rows["checkpointing"]["activations_mb"] < rows["full"]["activations_mb"]
