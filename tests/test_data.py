import io
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import image_folder, train
from vitfood import synthetic
from vitfood.config import Config
from vitfood.data import EpochBatchSampler, ImageDataset
from vitfood.images import EvalTransform, TrainTransform, normalize, to_rgb, transforms_for
from vitfood.sources import load_splits


def _png_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    else:
        img = rgb.convert(mode)
    out = TrainTransform(height=16, width=16)(img, random.Random(0))
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)


def test_16bit_png_is_scaled_not_whitened(tmp_path):
    gray = np.full((8, 8), 128 * 257, np.uint16)  # mid-gray in 16 bits
    path = tmp_path / "g16.png"
    Image.fromarray(gray).save(path)
    img = Image.open(path)
    assert img.mode.startswith("I")
    value = np.asarray(to_rgb(img))
    assert value.shape == (8, 8, 3) and np.all(np.abs(value.astype(int) - 128) <= 1)


def test_cmyk_jpeg_colours_survive():
    rgb = Image.new("RGB", (16, 16), (200, 30, 30))
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, format="JPEG", quality=95)
    out = np.asarray(to_rgb(Image.open(io.BytesIO(buf.getvalue())))).reshape(-1, 3).mean(0)
    assert out[0] > 150 and out[1] < 80 and out[2] < 80


def test_synthetic_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("VITFOOD_CACHE", str(tmp_path))
    messages = []
    a = synthetic.ensure(30, 3, 64, seed=1, log=messages.append)
    b = synthetic.ensure(30, 3, 64, seed=1, log=messages.append)
    assert a == b and len(messages) == 1  # generated once, then read from the cache
    import datasets
    ds = datasets.load_from_disk(a)["train"]
    assert ds.features["label"].names == synthetic.class_names(3)
    first = synthetic._jpeg(1, 0, ds[0]["label"], 64)["bytes"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first))), np.asarray(ds[0]["image"]))
    sizes = {ds[i]["image"].size for i in range(len(ds))}
    assert len(sizes) > 5 and max(max(s) for s in sizes) <= 64


def test_synthetic_is_not_trivial_by_average_colour():
    """A nearest-class-mean classifier on each image's average colour scores at most 0.5."""
    cfg = Config(dataset="synthetic", train_split="train", synthetic_size=600, synthetic_classes=10, synthetic_max_px=96)
    train, evals, names = load_splits(cfg, log=lambda *_: None)

    def features(ds):
        x = np.stack([np.asarray(im.convert("RGB"), np.float32).reshape(-1, 3).mean(0) for im in ds["image"]])
        return x, np.asarray(ds["label"])
    xt, yt = features(train)
    xe, ye = features(evals)
    means = np.stack([xt[yt == c].mean(0) for c in range(len(names))])
    pred = np.argmin(((xe[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    acc = (pred == ye).mean()
    assert acc <= 0.5, acc


def test_sampler_resumes_mid_epoch_and_changes_order_per_epoch():
    s = EpochBatchSampler(50, seed=3, global_batch=4)
    full = list(s)
    assert [len(b) for b in full] == [4] * 12 + [2]
    s.set_position(0, 5)
    assert list(s) == full[5:]
    s.set_position(1, 0)
    assert sorted(i for b in s for _, i in b) == list(range(50)) and list(s) != full


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_batches_are_the_single_process_global_batches(world):
    # 50 samples, 4 per rank: the last global batch is short and, for 3 ranks, leaves a rank empty
    single = list(EpochBatchSampler(50, seed=3, global_batch=4 * world))
    ranks = [list(EpochBatchSampler(50, seed=3, global_batch=4 * world, rank=r, world=world)) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)
    for k, batch in enumerate(single):
        assert sum((r[k] for r in ranks), []) == batch  # rank parts, in rank order, are the global batch
    assert sorted(len(r[-1]) for r in ranks) == sorted(len(single[-1]) // world + (r < len(single[-1]) % world)
                                                        for r in range(world))


def test_imagefolder_and_save_to_disk_inputs(tmp_path):
    image_folder(tmp_path / "folder", 3, size=(40, 30))
    cfg = Config(dataset=str(tmp_path / "folder"), train_split="train", test_size=0.5)
    train, evals, names = load_splits(cfg)
    assert names == ["a", "b"] and len(train) + len(evals) == 6

    import datasets
    dd = datasets.DatasetDict({"train": train, "validation": evals})
    dd.save_to_disk(str(tmp_path / "saved"))
    cfg = Config(dataset=str(tmp_path / "saved"), train_split="train[:2]", eval_split="validation")
    train2, evals2, names2 = load_splits(cfg)
    assert names2 == names and len(train2) == 2 and len(evals2) == len(evals)
    ds = ImageDataset(train2, "image", "label", EvalTransform(resize=(24, 24), crop=(24, 24)))
    image, label = ds[0]
    assert image.shape == (3, 24, 24) and label in (0, 1)


def test_train_transform_is_keyed_on_epoch_and_index(tmp_path):
    image_folder(tmp_path / "f", 2, size=(200, 120))
    train, _, _ = load_splits(Config(dataset=str(tmp_path / "f"), train_split="train", test_size=0.25))
    ds = ImageDataset(train, "image", "label", TrainTransform(height=32, width=32), seed=5)
    assert torch.equal(ds[(0, 1)][0], ds[(0, 1)][0])
    noise = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    img = Image.fromarray(noise)
    t = TrainTransform(height=32, width=32)
    assert not torch.equal(t(img, random.Random("5-0-1")), t(img, random.Random("5-1-1")))


def test_eval_transform_matches_the_image_processor():
    from transformers import ViTImageProcessor
    processor = ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    _, eval_tf, (mean, std) = transforms_for(processor)
    rng = np.random.default_rng(0)
    for shape in [(100, 80), (64, 64), (300, 500)]:
        img = Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).filter(
            __import__("PIL.ImageFilter").ImageFilter.GaussianBlur(2))
        ours = normalize(eval_tf(img)[None], mean, std)[0]
        ref = torch.as_tensor(np.asarray(processor(images=img, return_tensors="pt")["pixel_values"][0]))
        # processors resize with their own kernels; allow a small mean difference
        assert (ours - ref).abs().mean() < 2 / 255 * 2 / 0.5, (ours - ref).abs().mean()


def test_trains_on_an_imagefolder_of_mixed_image_modes(tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    modes = ["L", "RGBA", "CMYK", "P", "LA", "RGB"]
    for c in ("soup", "cake"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i, mode in enumerate(modes * 2):
            img = Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).convert(mode)
            img.save(tmp_path / "imgs" / c / f"{i}.{'jpg' if mode in ('L', 'CMYK', 'RGB') else 'png'}")
    results = train("--dataset", tmp_path / "imgs", "--max-steps", 3, "--batch-size", 4, "--output-dir", tmp_path / "run")
    assert results["global_step"] == 3 and math.isfinite(results["eval_loss"])
    cfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert sorted(cfg["id2label"].values()) == ["cake", "soup"]



class _ConnectionDrops(torch.utils.data.Dataset):
    """Sample 1 meets a dropped connection, as the main process does when it reads a batch's tensors from a worker
    killed mid-send; with `die`, its worker is SIGKILLed 0.3 s later (a killed process's sockets close before it
    can be reaped)."""

    def __init__(self, die):
        self.die = die

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import os
        import signal
        import threading
        if i == 1:
            if self.die:
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()
            raise ConnectionResetError(104, "Connection reset by peer")
        return torch.full((4,), float(i)), i


@pytest.mark.parametrize("die", [True, False])
def test_a_connection_dropped_by_a_dying_worker_is_the_loaders_worker_error(die):
    import signal
    from vitfood.data import Loader, stop_workers
    loader = Loader(_ConnectionDrops(die), batch_size=1, num_workers=1, prefetch_factor=2, persistent_workers=True)
    batches = iter(loader)
    assert next(batches)[1].tolist() == [0]
    handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise first, anywhere
    try:
        if die:  # the worker dies after the error is read: it is the worker's death that is reported
            with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid\(s\) \d+\) exited while sending a batch"):
                next(batches)
        else:  # a live worker's own error stays what it is
            with pytest.raises(ConnectionResetError, match="Connection reset by peer"):
                next(batches)
    finally:
        stop_workers(loader)  # and forget its worker, whose death torch's handler would raise at the next SIGCHLD
        signal.signal(signal.SIGCHLD, handler)
