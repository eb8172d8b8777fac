"""--streaming against the data set its shards were written from: loader throughput, and the demo's accuracy.

    python bench/stream.py --out bench/stream-cpu.json      # ~10 minutes on 2 CPU cores

1. Writes the demo's splits as tar shards (vitfood.shards, 500 images each).
2. Training loader images/s (decode, augment, collate; what `vitfood.bench --modes data` counts, without the
   device copy), at 1 and 2 workers, for the generated set indexed as vitfood reads it and for the shards read as
   a stream (--streaming, shuffle buffer 1000), alternated, two runs each.
3. The demo (`--preset demo`, 300 steps) trained on the generated set and on the streamed shards, same seed:
   eval top-1 and loss of each (the order differs, so the figures agree within noise, not bit for bit).
The last line printed is one JSON document with every figure.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def loader_speed(flags, workers, batches=40, warm=4):
    """images/s of the training loader of a run with `flags` (in this process)."""
    import torch
    from vitfood.config import build_parser, resolve
    from vitfood.data import build_data
    from vitfood.images import transforms_for
    from vitfood.model import load_processor
    from vitfood.sources import load_splits
    cfg = resolve(vars(build_parser().parse_args([*flags, "--preset", "demo"])))
    train, evals, names = load_splits(cfg, log=lambda *a: None)
    tf = transforms_for(load_processor(cfg), cfg.fast_decode, cfg)
    data = build_data(cfg, train, evals, tf[:2], len(names), torch.device("cpu"), workers, cfg.batch_size)
    for _ in range(warm):
        next(data.batches)
    t0 = time.perf_counter()
    n = sum(next(data.batches)[0].shape[0] for _ in range(batches))
    speed = n / (time.perf_counter() - t0)
    data.close()
    return speed


def demo(flags, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "vitfood.train", "--preset", "demo", *flags, "--output-dir", out, "--calibrate", "none"]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE))
    if p.returncode:
        sys.exit(f"failed: {p.stderr[-2000:]}")
    with open(os.path.join(out, "all_results.json")) as fh:
        r = json.load(fh)
    return dict(eval_accuracy=r["eval_accuracy"], eval_loss=r["eval_loss"], seconds=round(time.perf_counter() - t0, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args()
    from vitfood.shards import main as write_shards
    tmp = tempfile.mkdtemp(prefix="vitfood-stream-")
    shards = os.path.join(tmp, "shards")
    t0 = time.perf_counter()
    counts = write_shards(["--preset", "demo", "--out", shards, "--shard-size", "500"])
    wrote = time.perf_counter() - t0
    last = (counts["train"] + 499) // 500 - 1
    streamed = ["--dataset", f"{shards}/train-{{000000..{last:06d}}}.tar", "--eval-split", f"{shards}/eval-000000.tar",
                "--image-column", "jpg", "--label-column", "cls", "--streaming", "--train-samples", str(counts["train"])]
    sources = {"generated set": [], "streamed shards": streamed}
    speed = {name: {w: [] for w in (1, 2)} for name in sources}
    for _ in range(2):
        for w in (1, 2):
            for name, flags in sources.items():
                speed[name][w].append(round(loader_speed(flags, w), 1))
                print(f"{name}, {w} worker(s): {speed[name][w][-1]} img/s", flush=True)
    runs = {name: demo(flags, os.path.join(tmp, name.replace(" ", "-"))) for name, flags in sources.items()}
    for name, r in runs.items():
        print(f"demo on the {name}: top-1 {r['eval_accuracy']:.4f}, loss {r['eval_loss']:.4f}, {r['seconds']} s")
    import torch
    result = dict(shards=dict(train=counts["train"], eval=counts["eval"], write_s=round(wrote, 1)),
                  loader_img_s={n: {str(w): v for w, v in s.items()} for n, s in speed.items()},
                  loader_median={n: {str(w): statistics.median(v) for w, v in s.items()} for n, s in speed.items()},
                  demo=runs, torch=torch.__version__, cpus=os.cpu_count())
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
