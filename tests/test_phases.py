"""A run explains where its time went (phases.json), hands its last checkpoint's weights to model/ without
writing them again, keeps its decoded eval images between evals and its eval mistakes on the device, starts its
loader before the model is built, and stops its loader workers before it exits."""

import json
import os

import pytest
import torch

from vitfood import checkpoint, rundir, seal
from vitfood.data import BatchStream, EpochBatchSampler, KeptBatches, make_loader, stop_workers
from vitfood.metrics import Worst


def _segments(out):
    return json.loads((out / "phases.json").read_text())["segments"]


def test_a_finished_run_records_every_phase_in_order(tiny_run):
    out, results = tiny_run  # 200 steps, eval and save every 40
    (seg,) = _segments(out)
    assert seg["status"] == "success"
    phases = seg["phases"]
    names = [p["name"] for p in phases]
    first = lambda name: names.index(name)
    assert first("imports") < first("checks") < first("data") < first("loader") < first("model") < first("first batch")
    assert [p["step"] for p in phases if p["name"] == "eval"] == [40, 80, 120, 160, 200]
    assert [p["step"] for p in phases if p["name"] == "write"] == [40, 80, 120, 160, 200]
    assert {p["images"] for p in phases if p["name"] == "eval"} == {48}  # TINY holds out 48 of its 240 images
    loop = next(p for p in phases if p["name"] == "loop")
    assert loop["steps"] == 200 and loop["images"] == 200 * 16
    for p in phases:
        assert 0 <= p["start"] <= p["end"] <= seg["seconds"]
        if p["name"] in ("eval", "save"):  # the loop's pauses lie inside it
            assert loop["start"] <= p["start"] and p["end"] <= loop["end"]
    write = next(p for p in phases if p["name"] == "write")
    assert write["mb"] > 0 and write["files_s"] >= 0 and write["seal_s"] >= 0 and write["sha256_s"] >= 0
    # the background writes run beside the loop: the last one is what the end waits for
    assert names.index("final wait") > names.index("loop")
    assert seg["totals"]["eval"] == pytest.approx(sum(p["end"] - p["start"] for p in phases if p["name"] == "eval"), abs=0.01)
    assert results["startup_seconds"] == pytest.approx(phases[first("first batch")]["start"], abs=0.01)


def test_a_stopped_run_records_its_segment_as_stopped(sigterm_stopped):
    stopped, code, _, stderr = sigterm_stopped  # SIGTERM at step 11
    assert code == 75, stderr[-2000:]
    (seg,) = _segments(stopped)
    assert seg["status"] == "stopped"
    assert next(p for p in seg["phases"] if p["name"] == "loop")["steps"] == 11
    assert [p["step"] for p in seg["phases"] if p["name"] == "save"][-1] == 11


def test_model_takes_the_last_checkpoints_weights_file_without_writing_it_again(tmp_path):
    from conftest import train
    out = tmp_path / "run"
    train("--max-steps", 4, "--eval-steps", 4, "--save-steps", 4, "--calibrate", "none", "--output-dir", out)
    exported, saved = out / "model" / "model.safetensors", out / "checkpoint-4" / "model.safetensors"
    assert os.path.samefile(exported, saved)  # one file, two names
    assert (out / "model" / "config.json").read_text() == (out / "checkpoint-4" / "config.json").read_text()
    assert not checkpoint.damage(out / "checkpoint-4")  # its marker's SHA-256 still holds
    assert oct(exported.stat().st_mode & 0o777) == oct(0o666 & ~seal._UMASK)


def test_an_ema_export_writes_its_own_weights(tmp_path):
    from conftest import train, weights
    from safetensors.torch import load_file
    out = tmp_path / "run"
    train("--max-steps", 4, "--eval-steps", 4, "--save-steps", 4, "--ema-decay", "0.9", "--export-ema",
          "--calibrate", "none", "--output-dir", out)
    assert not os.path.samefile(out / "model" / "model.safetensors", out / "checkpoint-4" / "model.safetensors")
    ema = torch.load(out / "checkpoint-4" / checkpoint.STATE, weights_only=True)["ema"]["weights"]
    trained = load_file(out / "checkpoint-4" / "model.safetensors")
    assert torch.equal(weights(out)["classifier.weight"], ema["classifier.weight"])
    assert not torch.equal(weights(out)["classifier.weight"], trained["classifier.weight"])


class _Counted(torch.utils.data.Dataset):
    """n images 0..n-1 (each filled with its index); counts the reads."""

    def __init__(self, n):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        i = key[1] if isinstance(key, tuple) else key  # (epoch, index) from an EpochBatchSampler
        self.reads += 1
        return torch.full((3, 4, 4), i, dtype=torch.uint8), i


def test_eval_batches_are_decoded_once_and_a_pass_cut_short_keeps_nothing():
    data = _Counted(10)
    loader = make_loader(data, 4, 0, torch.device("cpu"), range(10))
    kept = KeptBatches(loader, torch.device("cpu"))
    for _ in zip(range(2), kept):  # cut short after 2 of 3 batches
        pass
    assert data.reads == 8 and kept.batches is None
    first = [(images.clone(), labels.clone()) for images, labels, _ in kept]
    assert data.reads == 18 and len(first) == 3
    again = [(images, labels) for images, labels, _ in kept]  # decoded nothing
    assert data.reads == 18
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, again))
    assert [int(i) for _, labels in again for i in labels] == list(range(10))


def test_the_most_confident_mistakes_are_kept_on_the_device_across_batches():
    g = torch.Generator().manual_seed(0)
    worst, everything = Worst(3), []
    for batch in range(4):
        confidence = torch.rand(5, generator=g)
        wrong = torch.rand(5, generator=g) < 0.5
        truth, pred = torch.arange(5) + 10 * batch, torch.arange(5)
        images = truth.view(-1, 1, 1, 1).expand(-1, 3, 2, 2).to(torch.uint8)
        worst.add(confidence, wrong, truth, pred, images)
        everything += [(c.item(), t.item()) for c, t, w in zip(confidence, truth, wrong) if w]
    got = worst.result(lambda t, p: dict(true=t.item(), pred=p.item()))
    expected = sorted(everything, reverse=True)[:3]
    assert [(m["confidence"], m["true"]) for m in got] == [(pytest.approx(c), t) for c, t in expected]
    assert all(int(m["image"][0, 0, 0]) == m["true"] for m in got)
    assert Worst(3).result(lambda t, p: {}) == []


def test_the_loader_starts_before_the_model_and_a_resume_at_that_position_keeps_it():
    data = _Counted(12)
    sampler = EpochBatchSampler(12, 0, 4)
    stream = BatchStream(make_loader(data, 4, 1, torch.device("cpu"), sampler), sampler)
    stream.load_state_dict(dict(epoch=0, batch=1, global_batch=4, world_size=1))
    stream.start()  # the worker starts reading while the model is built
    started = stream._batches
    stream.load_state_dict(dict(epoch=0, batch=1, global_batch=4, world_size=1))  # the restore, at the same place
    assert stream._batches is started
    images, labels, _ = next(stream)
    assert len(labels) == 4 and stream.position == 2
    workers = stream.loader._iterator._workers
    stream.close()
    stop_workers(stream.loader)
    assert stream.loader._iterator is None and not any(w.is_alive() for w in workers)


def test_two_writes_go_on_at_once_and_their_checkpoints_appear_in_step_order(tmp_path, monkeypatch, capsys):
    import time
    from vitfood.config import Config
    from vitfood.model import build_model
    from vitfood.phases import Phases
    model, processor = build_model(Config(model="vit-micro"), ["a", "b"])
    monkeypatch.setenv("VITFOOD_FAULT", "delay:weights_written:1")  # the first write is held 6 s
    monkeypatch.setenv("VITFOOD_FAULT_DELAY", "6")
    phases = Phases()
    saver = rundir.Checkpoints(str(tmp_path), keep=5, phases=phases)
    saver.open()
    t0 = time.perf_counter()
    saver.save(1, model, processor, dict(step=1))
    saver.save(2, model, processor, dict(step=2))  # beside the first: the loop does not wait
    assert time.perf_counter() - t0 < 6 and not phases.count("save wait")  # waiting would take the 6 s hold
    written = tmp_path / f".tmp-checkpoint-2-{os.getpid()}" / checkpoint.STATE
    while not written.exists() and time.perf_counter() - t0 < 6:  # checkpoint-2's files are being written,
        time.sleep(0.05)  # but it appears only after checkpoint-1, still held
    time.sleep(0.3)
    assert written.exists() and time.perf_counter() - t0 < 6
    assert checkpoint.complete_checkpoints(tmp_path) == []
    saver.save(3, model, processor, dict(step=3))  # a third waits for the oldest, and says why, once
    assert phases.count("save wait") == 1 and [s for s, _ in checkpoint.complete_checkpoints(tmp_path)][:1] == [1]
    said = capsys.readouterr().out
    assert said.startswith("note: the loop waited ") and "MB/s), and a save every " in said and "--save-steps" in said
    saver.wait()
    saver.save(4, model, processor, dict(step=4))
    saver.save(5, model, processor, dict(step=5))
    saver.save(6, model, processor, dict(step=6))
    assert "note:" not in capsys.readouterr().out
    saver.wait()
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [2, 3, 4, 5, 6]
    assert [p["step"] for p in sorted(phases.records, key=lambda p: p["end"]) if p["name"] == "write"] == [1, 2, 3, 4, 5, 6]
