"""Issue #20's learning check: do the recipe levers help on real images? Mean of several seeds, each lever
alone, the plain recipe and --preset finetune, at the same number of steps; from scratch and in a transfer
setting (a model pretrained with vitfood on digits 0-4, then fine-tuned on 5-9).

The images: scikit-learn's handwritten digits (1,797 scans, 8x8 px, 16 grey levels; they ship inside the
package, so no download), written once as PNG image folders with a fixed 80/20 split per class. The lever
values are the preset's (the published ViT fine-tunes'), not tuned here.

    pip install scikit-learn
    python bench/levers_learning.py --out /tmp/levers.json            # ~35 minutes on 2 CPU cores
    python bench/levers_learning.py --steps 20 --seeds 0 --levers plain,preset   # a quick check
"""

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import tempfile

import numpy as np
from PIL import Image

LEVERS = {  # name -> flags; each alone against plain, then the preset with all of its levers
    "plain": [],
    "label-smoothing": ["--label-smoothing", "0.1"],
    "mixup": ["--mixup", "0.8"],
    "cutmix": ["--cutmix", "1.0"],
    "randaugment": ["--auto-augment", "randaugment"],
    "random-erasing": ["--random-erasing", "0.25"],
    "layer-decay": ["--layer-decay", "0.65"],
    "ema": ["--ema-decay", "0.9998"],
    "preset": ["--preset", "finetune"],
}


def write_digits(root, classes, name):
    """An image folder root/name/{train,test}/<digit>/<n>.png of the given digits; the same split every time."""
    from sklearn.datasets import load_digits
    folder = os.path.join(root, name)
    if os.path.isdir(folder):
        return folder
    digits = load_digits()
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp(dir=root)
    for c in classes:
        index = rng.permutation(np.flatnonzero(digits.target == c))
        cut = int(0.8 * len(index))
        for split, part in (("train", index[:cut]), ("test", index[cut:])):
            os.makedirs(os.path.join(tmp, split, str(c)))
            for i in part:
                pixels = (digits.images[i] * 255 / 16).round().astype(np.uint8)
                Image.fromarray(pixels, "L").convert("RGB").save(os.path.join(tmp, split, str(c), f"{i}.png"))
    os.replace(tmp, folder)
    return folder


def train(args, out):
    """vitfood.train in this process (no start-up per run); its all_results."""
    from vitfood.train import main
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        results = main([*map(str, args), "--output-dir", out])
    gc.collect()  # the run's loader workers end with it, not at some later collection
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--levers", default=",".join(LEVERS))
    p.add_argument("--model", default="vit-micro")
    p.add_argument("--image-size", default="32")
    p.add_argument("--out", help="also write the JSON document here")
    a = p.parse_args()
    seeds, levers = [int(s) for s in a.seeds.split(",")], a.levers.split(",")
    root = os.path.join(os.environ.get("VITFOOD_CACHE", os.path.expanduser("~/.cache/vitfood")), "digits")
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="vitfood-levers-")
    common = ["--train-split", "train", "--eval-split", "test", "--batch-size", "32", "--max-steps", a.steps,
              "--eval-steps", a.steps, "--save-steps", a.steps, "--warmup-steps", a.steps // 10, "--num-workers", "1",
              "--image-size", a.image_size]
    settings = {
        "scratch": dict(data=write_digits(root, range(10), "all"), lr="2e-3", model=lambda seed: a.model),
        "transfer": dict(data=write_digits(root, range(5, 10), "5-9"), lr="1e-3",
                         model=lambda seed: pretrained[seed]),
    }
    pretrained = {}
    source = write_digits(root, range(5), "0-4")
    for seed in seeds:  # the transfer setting's models: the plain recipe on digits 0-4
        out = os.path.join(tmp, f"pretrain-{seed}")
        r = train(["--dataset", source, "--model", a.model, "--lr", "2e-3", "--seed", seed, *common], out)
        pretrained[seed] = os.path.join(out, "model")
        print(f"pretrained on 0-4, seed {seed}: accuracy {r['eval_accuracy']:.4f}", flush=True)

    results = {}
    for setting, s in settings.items():
        for lever in levers:
            accs = []
            for seed in seeds:
                out = os.path.join(tmp, f"{setting}-{lever}-{seed}")
                args = ["--dataset", s["data"], "--lr", s["lr"], "--seed", seed, *common, *LEVERS[lever]]
                if "--image-size" in args and setting == "transfer":  # a local model keeps its own size
                    i = args.index("--image-size")
                    del args[i:i + 2]
                r = train(["--model", s["model"](seed), *args], out)
                accs.append(r.get("eval_ema_accuracy", r["eval_accuracy"]) if lever == "ema" else r["eval_accuracy"])
            results[f"{setting}/{lever}"] = dict(mean=statistics.mean(accs), accuracies=accs)
            print(f"{setting:<9} {lever:<16} {statistics.mean(accs):.4f}  {' '.join(f'{x:.4f}' for x in accs)}",
                  flush=True)
    doc = dict(steps=a.steps, seeds=seeds, model=a.model, image_size=a.image_size, results=results)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(doc, fh, indent=1)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
