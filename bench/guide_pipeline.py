"""Baseline: the Hugging Face image-classification guide's input pipeline alone, per core.

One process, one thread, no workers: `dataset.with_transform(guide_transforms)` (PIL decode,
RandomResizedCrop, ToTensor, Normalize) batched by a plain DataLoader with `DefaultDataCollator`,
over vitfood's synthetic train split (its seeded 80/20 split). Prints images/s: the median of
--repeats timings of --batches batches, after --warmup batches.

    HF_HUB_OFFLINE=1 /work/venv/bin/python bench/guide_pipeline.py
    HF_HUB_OFFLINE=1 /work/venv/bin/python bench/guide_pipeline.py --flip   # + RandomHorizontalFlip after the crop

The last line of stdout is one JSON object with the figures.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torchvision
from torchvision.transforms import Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToTensor

import datasets
import transformers
from transformers import DefaultDataCollator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vitfood.config import Config  # noqa: E402
from vitfood.model import build_model  # noqa: E402
from vitfood.sources import load_splits  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--synthetic-size", type=int, default=2500)
    p.add_argument("--model", default="vit-tiny", help="only its image processor is used (size, mean, std)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=40, help="batches per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="batches before timing")
    p.add_argument("--flip", action="store_true", help="add RandomHorizontalFlip() after the crop")
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(42)
    cfg = Config(dataset=args.dataset, train_split="train", synthetic_size=args.synthetic_size, seed=42,
                 model=args.model, image_size=args.image_size)
    train_ds, _, names = load_splits(cfg)
    _, image_processor = build_model(cfg, names)

    # the guide's transforms (optionally with a flip)
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    crop = [RandomResizedCrop(image_processor.size["height"])] + ([RandomHorizontalFlip()] if args.flip else [])
    _transforms = Compose([*crop, ToTensor(), normalize])

    def transforms(examples):
        examples["pixel_values"] = [_transforms(img.convert("RGB")) for img in examples["image"]]
        del examples["image"]
        return examples

    ds = train_ds.with_transform(transforms)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=DefaultDataCollator(),
                                         num_workers=0, shuffle=True)

    def batches():  # endless: start a new epoch when one runs out
        while True:
            yield from loader

    it = batches()
    for _ in range(args.warmup):
        batch = next(it)
    shape, dtype = tuple(batch["pixel_values"].shape), batch["pixel_values"].dtype
    assert dtype == torch.float32, dtype

    rates = []
    for _ in range(args.repeats):
        n, t0 = 0, time.perf_counter()
        for _ in range(args.batches):
            n += len(next(it)["pixel_values"])
        rates.append(n / (time.perf_counter() - t0))
    rate = statistics.median(rates)

    result = {
        "bench": "guide_pipeline", "dataset": args.dataset, "train_images": len(ds),
        "image_size": image_processor.size["height"], "flip": args.flip, "batch_size": args.batch_size,
        "batches": args.batches, "repeats": args.repeats, "warmup_batches": args.warmup,
        "batch_shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
        "images_per_s": round(rate, 3), "images_per_s_runs": [round(r, 3) for r in rates],
        "threads": torch.get_num_threads(), "workers": 0,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "transformers": transformers.__version__, "datasets": datasets.__version__},
    }
    print(f"guide input pipeline{' + flip' if args.flip else ''}: {rate:.1f} images/s on 1 core "
          f"(median of {args.repeats} x {args.batches} batches of {args.batch_size}; runs {result['images_per_s_runs']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
