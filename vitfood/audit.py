"""Audit a data set before trusting it: likely label errors, exact and near duplicates (and copies across train
and eval: leakage), and images that belong to no class.

    python -m vitfood.audit --dataset ./photos --model google/vit-base-patch16-224-in21k --epochs 1 --output-dir audit
    python -m vitfood.audit --model runs/<run> --output-dir audit       # a trained run: its eval split only

Label errors come from out-of-fold predictions: --folds K short fine-tunes (ordinary vitfood runs, under
OUTPUT_DIR/folds/, each trained with the data, model and schedule flags given here on the train split less one
fold and predicting that fold, so every image is scored by a model that never saw it), ranked by confident
learning (cleanlab's find_label_issues). With --model RUN_DIR, a trained run's model scores its eval split. Killed,
it resumes where it stopped: finished folds are kept, an unfinished one resumes from its last checkpoint.

Duplicates and outliers come from the embeddings (the input of the last layer) of the model the fine-tunes start
from, --model (or the run's): not trained on these labels, it keeps apart images that a fine-tuned model would map
to one point per class. Pairs at a cosine similarity of --similarity or more, and a SHA-256 of the file for exact copies; an
outlier is an image whose mean distance to its 5 nearest neighbours lies beyond the upper Tukey fence of all
of them (Q3 + 1.5 IQR).

Writes label_issues.csv, duplicates.csv and outliers.csv (a path column first, most suspect first), audit.json
(the counts and thresholds) and a TensorBoard page of the top suspects (tensorboard --logdir OUTPUT_DIR).
Single-label data only.
"""

import vitfood
import vitfood.stack

if __name__ == "__main__":
    vitfood.quiet_ctrl_c()
vitfood.stack.require(__name__)  # a broken install (a torchvision built for another torch) is one line, no traceback

import argparse
import ctypes
import dataclasses
import hashlib
import os
import signal
import subprocess
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from vitfood import calibrate, checkpoint, hub, report, rundir
from vitfood.common import Console, UserError, autocast, num_workers, pick_device, resolve_precision, run_main
from vitfood.config import RUN_CONFIG, OneLineParser, build_parser, resolve, saved_run
from vitfood.data import ImageDataset, make_loader
from vitfood.images import DECODE_ERRORS, normalize, open_image, transforms_for
from vitfood.evalsplit import class_order, model_names
from vitfood.model import build_model, hub_model, load_for_inference
from vitfood.sources import fold_indices, is_multi_label, load_splits

NEIGHBOURS = 5
EXIT_STOPPED = 75  # vitfood.train stopped by a signal after saving (it resumes)


def parse(argv):
    p = OneLineParser(prog="python -m vitfood.audit", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--output-dir", help="where the audit goes (its folds, CSV files and TensorBoard page)")
    p.add_argument("--folds", type=int, default=5, help="out-of-fold runs for the label scores (default 5)")
    p.add_argument("--similarity", type=float, default=0.95, help="cosine similarity of two images' embeddings from "
                                                                  "which they count as near duplicates")
    p.add_argument("--show", type=int, default=16, help="suspects drawn per TensorBoard grid")
    a, rest = p.parse_known_args(argv)
    if a.help:
        p.print_help()
        print("\nEvery other flag is vitfood.train's (python -m vitfood.train --help), for the folds.")
        raise SystemExit(0)
    if not a.output_dir:
        raise UserError("--output-dir is required: where the audit's folds and files go")
    if a.folds < 2 or not 0 < a.similarity <= 1 or a.show < 0:
        raise UserError("--folds must be at least 2, --similarity in (0, 1] and --show not negative")
    return a, rest


def main(argv=None):
    a, rest = parse(argv)
    explicit = vars(build_parser().parse_args(rest))
    for name in ("output_dir", "resume", "fold"):
        if explicit.get(name) is not None:
            raise UserError(f"--{name.replace('_', '-')} is the audit's to set: the folds are runs in "
                            f"{os.path.join(a.output_dir, 'folds')}")
    run = explicit.get("model")
    run = run if run and os.path.isfile(os.path.join(run, RUN_CONFIG)) else None
    machine = {k: explicit[k] for k in ("device", "num_workers", "precision") if explicit.get(k) is not None}
    cfg = resolve(machine, saved_run(os.path.join(run, RUN_CONFIG))) if run else resolve(explicit)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    workers = num_workers(cfg.num_workers)
    out = a.output_dir
    os.makedirs(out, exist_ok=True)

    if cfg.streaming:
        raise UserError("the audit reads every train image in every fold: it does not combine with --streaming")
    train_ds, eval_ds, names = load_splits(cfg if run else dataclasses.replace(cfg, fold=f"1/{a.folds}"))
    if is_multi_label(train_ds, cfg.label_column):
        raise UserError("the audit is for single-label data (confident learning scores one given label per image); "
                        "this data set is multi-label")
    need_cleanlab()
    if run:  # the run's own split: its eval images scored by its model
        splits = {"train": train_ds, "eval": eval_ds}
        scored = {"eval": score(load(os.path.join(run, "model"), names, device), eval_ds, cfg, device, precision,
                                workers, "scores")}
    else:
        splits, scored = out_of_fold(a, rest, cfg, names, device, precision, workers, out)
    # the embeddings of the model the fine-tunes start from: trained on these labels, a model maps each class to
    # nearly one point, and every two images of a class would look like copies
    hub.prepare(model=hub_model(cfg.model))
    base = dataclasses.replace(cfg, lora_rank=0, freeze_backbone=False, freeze_epochs=0.0, freeze_steps=None,
                               gradient_checkpointing=False)
    torch.manual_seed(cfg.seed)  # a named shape starts from the run's seeded initialisation: the same each audit
    embedder = build_model(base, names, device)

    images = [(split, i) for split, ds in splits.items() if ds is not None for i in range(len(ds))]
    sets = {split: ImageDataset(ds, cfg.image_column, cfg.label_column, None) for split, ds in splits.items() if ds}
    labels = {split: s.labels for split, s in sets.items()}
    issues = label_issues(scored, sets, names)
    feats = {split: score((*embedder, None), ds, cfg, device, precision, workers, f"embeddings ({split})", features=True)
             for split, ds in splits.items() if ds is not None}
    # centred on their mean before the cosine: what every image shares (large in transformers' embeddings, and in a
    # model not trained at all) would otherwise make any two images look alike
    ok = torch.cat([feats[s]["ok"] for s in feats])  # an image that cannot be decoded has no embedding
    emb = torch.cat([feats[s]["features"] for s in feats])[ok]
    images = [image for image, good in zip(images, ok.tolist()) if good]
    emb = torch.nn.functional.normalize(emb - emb.mean(0), dim=1)
    dups = duplicates(emb, images, sets, a.similarity)
    outs, fence = outliers(emb, images, sets, labels, names)
    for name, rows in (("label_issues.csv", issues), ("duplicates.csv", dups), ("outliers.csv", outs)):
        write_rows(os.path.join(out, name), rows)
    summary = dict(images={s: len(d) for s, d in splits.items() if d is not None}, scored_by="run" if run else
                   f"{a.folds} out-of-fold runs", label_issues=len(issues), duplicates=len(dups),
                   exact_duplicates=sum(r["exact"] for r in dups), leakage=sum(r["leakage"] for r in dups),
                   similarity=a.similarity, outliers=len(outs), outlier_distance=fence)
    checkpoint.write_json_atomic(os.path.join(out, "audit.json"), summary)
    pages(out, issues, dups, outs, sets, a.show)
    print(f"audit of {cfg.dataset}: " + ", ".join(f"{n} {split}" for split, n in summary["images"].items()) + " images")
    print(f"  {len(issues)} likely label errors ({summary['scored_by']}): {out}/label_issues.csv")
    print(f"  {len(dups)} duplicate pairs at similarity >= {a.similarity:g} ({summary['exact_duplicates']} exact, "
          f"{summary['leakage']} across train and eval): {out}/duplicates.csv")
    print(f"  {len(outs)} outliers (mean distance to {NEIGHBOURS} nearest neighbours over {fence:.4f}): "
          f"{out}/outliers.csv")
    print(f"  tensorboard --logdir {out}")
    return summary


def need_cleanlab():
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        raise UserError("the audit needs cleanlab: pip install 'vitfood[audit]'") from None


def out_of_fold(a, rest, cfg, names, device, precision, workers, out):
    """K runs, each on the train split less one fold; every train image scored by the run that did not see it."""
    held = {}
    for k in range(1, a.folds + 1):
        run = os.path.join(out, "folds", f"fold-{k}")
        if not os.path.isfile(os.path.join(run, "model", "config.json")):  # a finished fold is kept
            print(f"fold {k} of {a.folds}: {run}", flush=True)
            rundir.wait_unlocked(run, lambda line: print(line, flush=True))  # a killed audit's fold, still saving
            status = fold_run([*rest, "--fold", f"{k}/{a.folds}", "--output-dir", run, "--resume", "auto",
                               "--calibrate", "none"])
            if status == EXIT_STOPPED:  # stopped by a signal, a checkpoint saved: the same command resumes it
                print(f"audit stopped in fold {k}: the same command resumes it", file=sys.stderr)
                raise SystemExit(EXIT_STOPPED)
            if status:
                raise UserError(f"fold {k} of {a.folds} failed (exit status {status}, its error above); "
                                f"the same command resumes the audit")
        _, fold, _ = load_splits(dataclasses.replace(cfg, fold=f"{k}/{a.folds}"))
        held[k] = score(load(os.path.join(run, "model"), names, device), fold, cfg, device, precision, workers,
                        f"fold {k} predictions")
    # the train split in its own order: fold k holds the images fold_indices gives it
    n = sum(len(h["probs"]) for h in held.values())
    index = fold_indices(n, a.folds, cfg.seed)
    probs = torch.zeros(n, len(names), dtype=torch.float64)
    ok = torch.zeros(n, dtype=torch.bool)
    for k, h in held.items():
        probs[index[k - 1]], ok[index[k - 1]] = h["probs"], h["ok"]
    import datasets
    others, first, _ = load_splits(dataclasses.replace(cfg, fold=f"1/{a.folds}"))
    order = sorted(set(range(n)) - set(index[0])) + index[0]  # the original index of each row of others + first
    whole = datasets.concatenate_datasets([others, first]).select(np.argsort(order).tolist())
    eval_split = load_splits(cfg)[1] if cfg.eval_split else None
    return {"train": whole, "eval": eval_split}, {"train": dict(probs=probs, ok=ok)}


def load(model_dir, names, device):
    """(a trained model for scoring, its processor, the model's logit for each of the data set's classes)."""
    model, processor = load_for_inference(model_dir, device)
    return model, processor, class_order(model_names(model), names, model_dir)


def fold_run(args):
    """vitfood.train in a process of its own, as a user would run it; its exit status. Ctrl-C reaches it too (one
    process group): it saves and stops, and the audit waits for that. If the audit dies (kill -9), the run gets
    SIGTERM and saves."""
    def die_with_parent():
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux
            pass
    child = subprocess.Popen([sys.executable, "-m", "vitfood.train", *map(str, args)], preexec_fn=die_with_parent)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue


@torch.inference_mode()
def score(loaded, ds, cfg, device, precision, workers, desc, features=False):
    """Each image's probabilities under `loaded`, (model, processor, the model's logit for each class: None for the
    model's own order) (and with `features` the input of the model's last layer), in the data set's order and its
    classes' order; `ok`: False where the image could not be decoded."""
    model, processor, columns = loaded
    model.eval()
    _, eval_tf, (mean, std) = transforms_for(processor, cfg.fast_decode)
    images = ImageDataset(ds, cfg.image_column, cfg.label_column, eval_tf)
    loader = make_loader(images, 32, workers, device)
    kept = []
    hook = calibrate.last_layer(model).register_forward_hook(lambda m, inputs, output: kept.append(inputs[0]))
    probs = torch.zeros(len(images), model.config.num_labels, dtype=torch.float64)
    feats, ok, start = None, torch.zeros(len(images), dtype=torch.bool), 0
    try:
        for raw, _, bad in tqdm(loader, desc=desc, leave=False, file=Console(sys.stderr), dynamic_ncols=True,
                                disable=not sys.stderr.isatty()):
            size = len(raw) + len(bad)
            rows = [i for i in range(start, start + size) if i not in set(bad)]
            start += size
            if not rows:
                continue
            kept.clear()
            with autocast(precision, device):
                logits = model(pixel_values=normalize(raw.to(device), mean, std)).logits.float()
            probs[rows] = logits.softmax(-1)[:, columns or slice(None)].double().cpu()
            ok[rows] = True
            if features:
                f = kept[-1].float().flatten(1).cpu()
                feats = torch.zeros(len(images), f.shape[1]) if feats is None else feats
                feats[rows] = f
    finally:
        hook.remove()
    return dict(probs=probs, ok=ok, features=feats)


def where(sets, split, i):
    return sets[split].where(i)


def label_issues(scored, sets, names):
    """Confident learning over the scored images: those whose given label is likely wrong, the least
    self-confident first."""
    from cleanlab.filter import find_label_issues
    rows = []
    for split, s in scored.items():
        good = torch.nonzero(s["ok"]).flatten().tolist()
        labels = np.array(sets[split].labels)[good]
        probs = s["probs"][good].numpy()
        probs = probs / probs.sum(1, keepdims=True)
        found = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
        for j in found:
            i, given, suggested = good[j], int(labels[j]), int(probs[j].argmax())
            rows.append(dict(path=where(sets, split, i), split=split, given_label=names[given],
                             suggested_label=names[suggested], score=round(float(probs[j, given]), 6),
                             suggested_score=round(float(probs[j, suggested]), 6)))
    return rows


def file_hash(dataset, i):
    cell = dataset.ds[i][dataset.image_column]
    if cell.get("bytes") is not None:
        return hashlib.sha256(cell["bytes"]).hexdigest()
    digest = hashlib.sha256()
    with open(cell["path"], "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def duplicates(emb, images, sets, threshold, chunk=1024):
    """Pairs at a cosine similarity of `threshold` or more, and pairs of identical files; exact copies first,
    then the most similar."""
    pairs = {}
    for start in range(0, len(emb), chunk):
        sim = emb[start:start + chunk] @ emb.T
        for a, b in torch.nonzero(sim >= threshold - 1e-6).tolist():
            i = start + a
            if i < b:
                pairs[(i, b)] = float(sim[a, b])
    by_hash = {}
    for n, (split, i) in enumerate(images):
        by_hash.setdefault(file_hash(sets[split], i), []).append(n)
    exact = {(x, y) for same in by_hash.values() for k, x in enumerate(same) for y in same[k + 1:]}
    rows = []
    for (x, y) in set(pairs) | exact:
        (sa, ia), (sb, ib) = images[x], images[y]
        sim = pairs.get((x, y), float(emb[x] @ emb[y]))
        rows.append(dict(path=where(sets, sa, ia), split=sa, other_path=where(sets, sb, ib), other_split=sb,
                         similarity=round(min(sim, 1.0), 6), exact=(x, y) in exact, leakage=sa != sb))
    return sorted(rows, key=lambda r: (not r["exact"], -r["similarity"], r["path"]))


def outliers(emb, images, sets, labels, names):
    """Images far from every other: the mean cosine distance to their nearest neighbours, beyond the upper Tukey
    fence of those distances; with the class most of their neighbours have."""
    k = min(NEIGHBOURS, len(emb) - 1)
    dist, near = [], []
    for start in range(0, len(emb), 1024):
        sim = emb[start:start + 1024] @ emb.T
        sim[torch.arange(len(sim)), torch.arange(start, start + len(sim))] = -2  # not itself
        top = sim.topk(k, dim=1)
        dist.append(1 - top.values.mean(1))
        near.append(top.indices)
    dist, near = torch.cat(dist), torch.cat(near)
    q1, q3 = np.percentile(dist.numpy(), [25, 75])
    fence = float(q3 + 1.5 * (q3 - q1))
    rows = []
    for n in torch.nonzero(dist > fence).flatten().tolist():
        split, i = images[n]
        votes = np.bincount([labels[images[m][0]][images[m][1]] for m in near[n].tolist()], minlength=len(names))
        rows.append(dict(path=where(sets, split, i), split=split, given_label=names[labels[split][i]],
                         nearest_class=names[int(votes.argmax())], score=round(float(dist[n]), 6)))
    return sorted(rows, key=lambda r: -r["score"]), fence


def write_rows(path, rows):
    if rows:
        report.write_csv(path, rows)
    else:  # the header alone: a file that says "nothing found" the same way every time
        with open(path, "w") as fh:
            fh.write({"label_issues.csv": "path,split,given_label,suggested_label,score,suggested_score",
                      "duplicates.csv": "path,split,other_path,other_split,similarity,exact,leakage",
                      "outliers.csv": "path,split,given_label,nearest_class,score"}[os.path.basename(path)] + "\n")


def thumbnail(sets, split, i, side=96):
    dataset = sets[split]
    try:
        img = open_image(dataset.ds[i][dataset.image_column]).convert("RGB")
    except DECODE_ERRORS:
        return Image.new("RGB", (side, side), (200, 200, 200))
    with img:
        scale = side / max(img.size)  # small images drawn larger, pixels kept sharp
        return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                          Image.NEAREST if scale > 1 else Image.BICUBIC)


def grid(tiles, width=340, side=96):
    """[(images, caption lines)] as one image `width` px wide, the width of a TensorBoard card (a wider one is
    shrunk there until its captions cannot be read): a tile per row, its images side by side, the caption beside
    them, each line whole or cut in the middle (a file name keeps its start and its end)."""
    fnt, line_h = report.font(12), 15
    if not tiles:
        img = Image.new("RGB", (width, 30), "white")
        ImageDraw.Draw(img).text((8, 8), "nothing found", fill="black", font=fnt)
        return img
    tile_h = max(side, line_h * max(len(lines) for _, lines in tiles)) + 8
    out = Image.new("RGB", (width, len(tiles) * tile_h), "white")
    draw = ImageDraw.Draw(out)
    for n, (imgs, lines) in enumerate(tiles):
        y = n * tile_h
        for m, img in enumerate(imgs):
            out.paste(img, (m * (side + 4), y + 4))
        tx = len(imgs) * (side + 4) + 4
        for j, line in enumerate(lines):
            draw.text((tx, y + 4 + line_h * j), report.middle(line, fnt, width - tx - 4), fill="black", font=fnt)
    return out


def pages(out, issues, dups, outs, sets, show):
    """The top suspects as captioned image grids in a TensorBoard run in `out`."""
    from torch.utils.tensorboard import SummaryWriter
    index = {(split, s.where(i)): i for split, s in sets.items() for i in range(len(s))}
    pic = lambda split, path: thumbnail(sets, split, index[(split, path)])
    cards = {
        "audit/label_issues": [([pic(r["split"], r["path"])], [os.path.basename(r["path"]), f"given: {r['given_label']}",
                                f"p(given) {r['score']:.3f}", f"likely: {r['suggested_label']}",
                                f"p {r['suggested_score']:.3f}"]) for r in issues[:show]],
        "audit/duplicates": [([pic(r["split"], r["path"]), pic(r["other_split"], r["other_path"])],
                              [f"{r['split']} / {r['other_split']}", "exact copy" if r["exact"] else
                               f"similarity {r['similarity']:.3f}", "LEAKAGE" if r["leakage"] else ""])
                             for r in dups[:show]],
        "audit/outliers": [([pic(r["split"], r["path"])], [os.path.basename(r["path"]), f"given: {r['given_label']}",
                            f"near: {r['nearest_class']}", f"distance {r['score']:.3f}"]) for r in outs[:show]],
    }
    with SummaryWriter(out) as w:
        for tag, tiles in cards.items():
            w.add_image(tag, np.asarray(grid(tiles)), 0, dataformats="HWC")


def cli():
    run_main(main)


if __name__ == "__main__":
    cli()
