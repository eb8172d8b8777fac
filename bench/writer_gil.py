"""Does the background checkpoint writer keep the training thread from running (the GIL)?

A loop that wakes every millisecond, as a GPU loop's kernel launches would, runs while one ViT-B/16
checkpoint with its AdamW state is written in the background; the gaps between its wake-ups are the
time it could not run. Usage: python bench/writer_gil.py [--model vit-base] [--image-size 224]
"""

import argparse
import os
import tempfile
import time

import torch
import transformers

from vitfood import rundir
from vitfood.config import Config
from vitfood.model import build_model, make_optimizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit-base")
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args()
    transformers.utils.logging.disable_progress_bar()
    cfg = Config(model=args.model, image_size=args.image_size)
    model, processor = build_model(cfg, [str(i) for i in range(10)], torch.device("cpu"))
    optimizer = make_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the AdamW moments exist, as in a real checkpoint
    os.makedirs("runs", exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bench-gil-", dir="runs") as out:
        saver = rundir.Checkpoints(out, keep=2)
        saver.open()
        saver.save(1, model, processor, dict(optimizer=optimizer.state_dict()))  # allocates the host buffers
        saver.wait()
        start = time.perf_counter()
        saver.save(2, model, processor, dict(optimizer=optimizer.state_dict()))
        pause = time.perf_counter() - start
        gaps, last = [], time.perf_counter()
        while saver.writing():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        saver.wait()
        write = time.perf_counter() - start
    gaps.sort()
    print(f"pause {pause:.3f} s, background write {write:.2f} s; the waking loop's gaps: longest "
          f"{gaps[-1] * 1e3:.0f} ms, 99th percentile {gaps[int(len(gaps) * 0.99)] * 1e3:.1f} ms, "
          f"{len(gaps)} wake-ups")


if __name__ == "__main__":
    main()
