"""Learning checks on real images, mean of several seeds, each setting at the same number of steps.
- levers: each recipe lever alone, the plain recipe and --preset finetune; from scratch and in a
  transfer setting (a model pretrained with vitfood on digits 0-4, then fine-tuned on 5-9).
- adapt: with few labelled images (10 per class of 5-9), the pretrained model fine-tuned in full,
  with a frozen backbone, with LoRA, against the same model trained from scratch.
- unfreeze: the pretrained model on 5-9, with 10 labelled images per class and with all of them: fine-tuned in
  full, with a frozen backbone, and with the head trained alone for the first fifth of the steps then the whole
  model (--freeze-steps, fastai's fine_tune).
- trust: the pretrained model fine-tuned on 5-9 (300 steps): its calibration (ECE and NLL before and after the
  temperature, on the test split) and the share of the test split answered at 95% accuracy; then vitfood.audit
  (5 out-of-fold runs of the same fine-tune) on a copy of 5-9 whose training labels are 5% flipped to another
  digit, with 5 test images copied into train as they are and 5 as JPEG re-encodings: the precision and recall
  of the label issues on the flipped files, and how many of the 10 copies are reported as leakage.
- distill: the path from a big model to a small served one, on all 10 digits from scratch: a ResNet teacher
  (0.52 M parameters), then the vit-micro student (24 K) with --teacher and without one, each exported to int8 through
  the parity gate: top-1, int8 file size and int8 images/s of each (students: mean of the seeds).
- tune: vitfood.tune on all 10 digits from scratch (vit-micro): a 12-trial search of the learning rate and label
  smoothing with the median pruner, the same search without pruning, and the default options over the seeds: the
  best accuracy of each, and the optimizer steps each search ran.
- imbalance: the pretrained model fine-tuned on 5-9 made imbalanced (digit 5 keeps all its
  training images, each next digit fewer, digit 9 a tenth of them), evaluated on a balanced test split:
  plain, --class-weights balanced, --sampler balanced; balanced accuracy and macro F1.

The images: scikit-learn's handwritten digits (1,797 scans, 8x8 px, 16 grey levels; they ship inside the
package, so no download), written once as PNG image folders with a fixed 80/20 split per class. The lever
values are the preset's (the published ViT fine-tunes'), not tuned here.

    pip install scikit-learn
    python bench/learning.py levers --out /tmp/levers.json     # ~50 minutes on 2 CPU cores
    python bench/learning.py adapt --out /tmp/adapt.json       # ~5 minutes
    python bench/learning.py imbalance --out /tmp/imbalance.json  # ~8 minutes
    python bench/learning.py unfreeze --out /tmp/unfreeze.json    # ~4 minutes
    python bench/learning.py trust --out /tmp/trust.json          # ~12 minutes
    python bench/learning.py distill --out /tmp/distill.json      # ~10 minutes
    python bench/learning.py tune --out /tmp/tune.json            # ~20 minutes
    python bench/learning.py levers --steps 20 --seeds 0 --settings plain,preset   # a quick check
"""

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import statistics
import tempfile

import numpy as np
from PIL import Image

LEVERS = {  # name -> flags; each alone against plain, then the preset with all of its levers (lr 2e-3 / 1e-3)
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
ADAPT = {  # on 10 labelled images per class: the pretrained model (lr 1e-3 for all), and one from scratch
    "scratch": ["--lr", "2e-3"],
    "full": ["--lr", "1e-3"],
    "frozen": ["--lr", "1e-3", "--freeze-backbone"],
    "lora": ["--lr", "1e-3", "--lora-rank", "4", "--lora-alpha", "4"],
    # the lr peft's image-classification guide uses for LoRA, for the two that train few parameters
    "frozen-lr5e-3": ["--lr", "5e-3", "--freeze-backbone"],
    "lora-lr5e-3": ["--lr", "5e-3", "--lora-rank", "4", "--lora-alpha", "4"],
}
IMBALANCE = {"plain": [], "class-weights": ["--class-weights", "balanced"], "sampler": ["--sampler", "balanced"]}
UNFREEZE = {  # lr 1e-3 for the whole model; the head alone at 5e-3 (the frozen backbone's better rate, above)
    "full": ["--lr", "1e-3"],
    "frozen": ["--lr", "5e-3", "--freeze-backbone"],
    "head-first": ["--lr", "1e-3", "--freeze-steps", "60"],  # a fifth of 300 steps; --freeze-lr: 5x --lr
}


def write_digits(root, classes, name, per_class=None, imbalance=1):
    """An image folder root/name/{train,test}/<digit>/<n>.png of the given digits; the same split every time
    (`per_class`: only the first that many of each digit's training images; `imbalance` F: the first digit
    keeps all of its training images, the last 1/F of them, geometrically in between, and the test split
    the same number of each digit)."""
    from sklearn.datasets import load_digits
    folder = os.path.join(root, name)
    if os.path.isdir(folder):
        return folder
    digits = load_digits()
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp(dir=root)
    classes = list(classes)
    fewest = min(int(np.sum(digits.target == c)) for c in classes)
    for k, c in enumerate(classes):
        index = rng.permutation(np.flatnonzero(digits.target == c))
        cut = int(0.8 * len(index))
        train, test = index[:cut][:per_class], index[cut:]
        if imbalance > 1:
            train = train[:round(len(train) * imbalance ** (-k / (len(classes) - 1)))]
            test = test[:fewest - int(0.8 * fewest)]
        for split, part in (("train", train), ("test", test)):
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


def noisy_copy(source, dest, seed, share=0.05, copies=5):
    """`source` (an image folder with train/ and test/) copied to `dest` with `share` of the training images moved
    to another class's folder (their labels flipped), `copies` test images copied into train as they are and as
    many re-encoded as JPEG (quality 90). Returns (flipped train files, leaked (train file, test file) pairs)."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest)
    rng = np.random.default_rng(seed)
    train = sorted(os.path.join(c, f) for c in os.listdir(os.path.join(dest, "train"))
                   for f in os.listdir(os.path.join(dest, "train", c)))
    classes = sorted(os.listdir(os.path.join(dest, "train")))
    flipped = []
    for rel in rng.choice(train, round(share * len(train)), replace=False):
        c, f = rel.split(os.sep)
        other = rng.choice([k for k in classes if k != c])
        target = os.path.join(dest, "train", other, f"flipped-{c}-{f}")
        os.rename(os.path.join(dest, "train", rel), target)
        flipped.append(target)
    test = sorted(os.path.join(c, f) for c in classes for f in os.listdir(os.path.join(dest, "test", c)))
    leaked = []
    for n, rel in enumerate(rng.choice(test, 2 * copies, replace=False)):
        c, f = rel.split(os.sep)
        original = os.path.join(dest, "test", rel)
        if n < copies:
            target = os.path.join(dest, "train", c, f"copy-{f}")
            shutil.copyfile(original, target)
        else:
            target = os.path.join(dest, "train", c, f"jpeg-{os.path.splitext(f)[0]}.jpg")
            Image.open(original).save(target, quality=90)
        leaked.append((target, original))
    return flipped, leaked


def audit_figures(audit, flipped, leaked):
    """How an audit did on the planted errors: the label issues' precision and recall on the flipped files (and the
    precision of its first len(flipped) rows), the copies reported as leakage and the rank of the last of them."""
    import csv
    with open(os.path.join(audit, "label_issues.csv")) as fh:
        ranked = [row["path"] for row in csv.DictReader(fh)]
    with open(os.path.join(audit, "duplicates.csv")) as fh:
        pairs = [frozenset((row["path"], row["other_path"])) for row in csv.DictReader(fh)]
    hits = set(ranked) & set(flipped)
    ranks = [pairs.index(frozenset(pair)) + 1 for pair in leaked if frozenset(pair) in pairs]
    return dict(flipped=len(flipped), flagged=len(ranked), precision=len(hits) / max(1, len(ranked)),
                recall=len(hits) / len(flipped), precision_top=len(set(ranked[:len(flipped)]) & set(flipped)) / len(flipped),
                copies=len(leaked), copies_found=len(ranks), last_copy_rank=max(ranks, default=0),
                duplicate_pairs=len(pairs))


def trust(root, tmp, pretrained, seeds, flags, out_path):
    """Calibration and the audit on digits 5-9 (the module's docstring)."""
    import subprocess
    import sys
    from vitfood.evaluate import main as evaluate
    data = write_digits(root, range(5, 10), "5-9")
    runs = []
    for seed in seeds:
        out = os.path.join(tmp, f"trust-{seed}")
        r = train(["--dataset", data, "--seed", seed, "--model", pretrained[seed], *flags], out)
        with contextlib.redirect_stdout(io.StringIO()):
            e = evaluate(["--model", os.path.join(out, "model"), "--output-dir", os.path.join(out, "eval")])
        noisy = os.path.join(tmp, f"noisy-{seed}")
        flipped, leaked = noisy_copy(data, noisy, seed)
        audit = os.path.join(tmp, f"audit-{seed}")
        p = subprocess.run([sys.executable, "-m", "vitfood.audit", "--dataset", noisy, "--seed", str(seed), "--model",
                            pretrained[seed], *map(str, flags), "--folds", "5", "--output-dir", audit],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
        cal = r["calibration"]
        run = dict(seed=seed, accuracy=r["eval_accuracy"], temperature=cal["temperature"], ece_before=cal["ece_before"],
                   ece_after=cal["ece_after"], nll_before=cal["nll_before"], nll_after=cal["nll_after"],
                   coverage_at_95=e["coverage_at_accuracy"]["0.95"], **audit_figures(audit, flipped, leaked))
        runs.append(run)
        print(json.dumps(run), flush=True)
    keys = [k for k in runs[0] if k not in ("seed",)]
    doc = dict(experiment="trust", seeds=seeds, runs=runs, mean={k: statistics.mean(r[k] for r in runs) for k in keys})
    if out_path:
        with open(out_path, "w") as fh:
            json.dump(doc, fh, indent=1)
    print(json.dumps(doc["mean"]))


def exported(run):
    """vitfood.export --int8 of a run: (int8 top-1, int8 file MB, int8 images/s at batch 32) from its parity.json."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "vitfood.export", run, "--int8"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(run, "export", "parity.json")) as fh:
        int8 = json.load(fh)["models"]["onnx_int8"]
    return int8["score"], int8["size_mb"], int8["img_s"]


def distill(root, tmp, seeds, common, schedule, steps, out_path):
    """A big model, a small one taught by it and the small one alone, each exported to int8 (the module's docstring)."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification
    data = write_digits(root, range(10), "all")
    shape = os.path.join(tmp, "resnet-shape")  # the teacher's shape, randomly initialised: trained from scratch here
    ResNetForImageClassification(ResNetConfig(embedding_size=32, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1],
                                              num_labels=10)).save_pretrained(shape)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(shape)
    teacher = os.path.join(tmp, "teacher")
    t = train(["--dataset", data, "--model", shape, "--lr", "2e-3", "--seed", seeds[0], *common, *schedule(steps)],
              teacher)
    rows = dict(teacher=dict(top1=t["eval_accuracy"], int8=exported(teacher)))
    print(f"teacher: top-1 {t['eval_accuracy']:.4f}, int8 {rows['teacher']['int8']}", flush=True)
    for name, flags in (("student alone", []), ("student taught", ["--teacher", os.path.join(teacher, "model")])):
        runs = []
        for seed in seeds:
            out = os.path.join(tmp, f"{name.replace(' ', '-')}-{seed}")
            r = train(["--dataset", data, "--model", "vit-micro", "--image-size", "32", "--lr", "2e-3", "--seed", seed,
                       *common, *schedule(steps), *flags], out)
            runs.append(dict(seed=seed, top1=r["eval_accuracy"], agreement=r.get("eval_agreement"),
                             int8=exported(out)))
            print(f"{name}, seed {seed}: {runs[-1]}", flush=True)
        rows[name] = dict(runs=runs, top1=statistics.mean(r["top1"] for r in runs),
                          int8_top1=statistics.mean(r["int8"][0] for r in runs),
                          int8_mb=runs[0]["int8"][1], int8_img_s=statistics.mean(r["int8"][2] for r in runs))
    doc = dict(experiment="distill", steps=steps, seeds=seeds, results=rows)
    if out_path:
        with open(out_path, "w") as fh:
            json.dump(doc, fh, indent=1)
    print(json.dumps({k: {x: y for x, y in v.items() if x != "runs"} for k, v in rows.items()}))


def tune(root, tmp, seeds, common, schedule, steps, out_path):
    """Two 12-trial searches, pruned and not, against the default options (the module's docstring)."""
    import subprocess
    import sys
    data = write_digits(root, range(10), "all")
    fixed = ["--dataset", data, "--model", "vit-micro", "--image-size", "32", *common, *schedule(steps)]
    fixed[fixed.index("--eval-steps") + 1] = str(steps // 6)  # the pruner's evals
    defaults = [train([*fixed, "--seed", seed], os.path.join(tmp, f"defaults-{seed}"))["eval_accuracy"] for seed in seeds]
    print(f"default options: {statistics.mean(defaults):.4f} ({defaults})", flush=True)
    doc = dict(experiment="tune", steps=steps, defaults=defaults, studies={})
    for pruner in ("median", "none"):
        folder = os.path.join(tmp, f"study-{pruner}")
        p = subprocess.run([sys.executable, "-m", "vitfood.tune", "--study", pruner, "--trials", "12", "--study-dir",
                            folder, "--pruner", pruner, "--search", "lr=1e-4:1e-2:log", "--search",
                            "label_smoothing=0.0:0.2", *map(str, fixed)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
        with open(os.path.join(folder, "summary.json")) as fh:
            s = json.load(fh)
        doc["studies"][pruner] = dict(best=s["best"]["score"], params=s["best"]["params"], states=s["states"],
                                      steps_run=s["steps_run"], importance=s["importance"])
        print(f"pruner {pruner}: {doc['studies'][pruner]}", flush=True)
    doc["steps_saved"] = 1 - doc["studies"]["median"]["steps_run"] / doc["studies"]["none"]["steps_run"]
    if out_path:
        with open(out_path, "w") as fh:
            json.dump(doc, fh, indent=1)
    print(json.dumps({k: v for k, v in doc.items() if k != "studies"}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=["levers", "adapt", "imbalance", "unfreeze", "trust", "distill", "tune"])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, help="steps of every run (default: levers 1500, adapt 300)")
    p.add_argument("--settings", help="comma list of the experiment's settings (default: all)")
    p.add_argument("--model", default="vit-micro")
    p.add_argument("--image-size", default="32")
    p.add_argument("--out", help="also write the JSON document here")
    a = p.parse_args()
    table = dict(levers=LEVERS, adapt=ADAPT, imbalance=IMBALANCE, unfreeze=UNFREEZE, trust={}, distill={}, tune={})[a.experiment]
    steps = a.steps or dict(levers=1500, adapt=300, imbalance=600, unfreeze=300, trust=300, distill=600, tune=600)[a.experiment]
    seeds, names = [int(s) for s in a.seeds.split(",")], (a.settings.split(",") if a.settings else list(table))
    root = os.path.join(os.environ.get("VITFOOD_CACHE", os.path.expanduser("~/.cache/vitfood")), "digits")
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="vitfood-learning-")
    common = ["--train-split", "train", "--eval-split", "test", "--batch-size", "32", "--num-workers", "1"]
    schedule = lambda n: ["--max-steps", n, "--eval-steps", n, "--save-steps", n, "--warmup-steps", n // 10]
    size = ["--image-size", a.image_size]  # a pretrained model keeps the size it was trained at
    if a.experiment in ("distill", "tune"):
        return dict(distill=distill, tune=tune)[a.experiment](root, tmp, seeds, common, schedule, steps, a.out)
    pretrained = {}
    for seed in seeds:  # the transfer setting's models: the plain recipe on digits 0-4, 1,500 steps (kept)
        out = os.path.join(root, f"pretrained-{a.model}-{a.image_size}-{seed}")
        if not os.path.isfile(os.path.join(out, "all_results.json")):
            shutil.rmtree(out, ignore_errors=True)
            train(["--dataset", write_digits(root, range(5), "0-4"), "--model", a.model, "--lr", "2e-3", "--seed", seed,
                   *common, *schedule(1500), *size], out)
        pretrained[seed] = os.path.join(out, "model")
        with open(os.path.join(out, "all_results.json")) as fh:
            print(f"pretrained on 0-4, seed {seed}: accuracy {json.load(fh)['eval_accuracy']:.4f}", flush=True)

    if a.experiment == "trust":
        return trust(root, tmp, pretrained, seeds, [*common, *schedule(steps), "--lr", "1e-3"], a.out)
    if a.experiment == "levers":  # (setting, data, model, lr, flags) per run
        runs = [(f"{where}/{name}", data, model, lr, table[name]) for where, data, model, lr in (
            ("scratch", write_digits(root, range(10), "all"), None, "2e-3"),
            ("transfer", write_digits(root, range(5, 10), "5-9"), "pretrained", "1e-3")) for name in names]
    elif a.experiment == "unfreeze":
        runs = [(f"{where}/{name}", data, "pretrained", None, table[name]) for where, data in (
            ("few", write_digits(root, range(5, 10), "5-9-few", per_class=10)),
            ("all", write_digits(root, range(5, 10), "5-9"))) for name in names]
    elif a.experiment == "imbalance":
        skewed = write_digits(root, range(5, 10), "5-9-imbalanced-10x", imbalance=10)
        runs = [(name, skewed, "pretrained", "1e-3", table[name]) for name in names]
    else:
        few = write_digits(root, range(5, 10), "5-9-few", per_class=10)
        runs = [(name, few, None if name == "scratch" else "pretrained", None, table[name]) for name in names]
    results = {}
    for name, data, model, lr, flags in runs:
        accs, f1 = [], []
        for seed in seeds:
            args = ["--dataset", data, "--seed", seed, *common, *schedule(steps), *(["--lr", lr] if lr else []), *flags]
            args += ["--model", pretrained[seed]] if model else ["--model", a.model, *size]
            r = train(args, os.path.join(tmp, f"{name.replace('/', '-')}-{seed}"))
            key = "eval_balanced_accuracy" if a.experiment == "imbalance" else "eval_accuracy"
            accs.append(r["eval_ema_accuracy"] if "--ema-decay" in flags else r[key])
            if a.experiment == "imbalance":
                f1.append(r["eval_f1_macro"])
        results[name] = dict(mean=statistics.mean(accs), accuracies=accs)
        if f1:
            results[name].update(f1_macro_mean=statistics.mean(f1), f1_macro=f1)
        print(f"{name:<28} {statistics.mean(accs):.4f}  {' '.join(f'{x:.4f}' for x in accs)}"
              + (f"  macro F1 {statistics.mean(f1):.4f}" if f1 else ""), flush=True)
    doc = dict(experiment=a.experiment, steps=steps, seeds=seeds, model=a.model, image_size=a.image_size,
               results=results)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(doc, fh, indent=1)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
