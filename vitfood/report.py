"""What an evaluation leaves for people: per-class metrics, a confusion matrix and a mistakes grid as
images (drawn with Pillow, no plotting library), and the model card of an exported model."""

import csv
import json

import numpy as np
from PIL import Image, ImageDraw

from vitfood.hub import is_path

LABEL_W = 150  # room for class names beside and above the matrix


def per_class(confusion, names):
    """Rows of class, precision, recall, f1, support from a [true, predicted] count matrix."""
    m = np.asarray(confusion, dtype=np.float64)
    tp, predicted, actual = np.diag(m), m.sum(0), m.sum(1)
    rows = []
    for c, name in enumerate(names):
        p = tp[c] / predicted[c] if predicted[c] else 0.0
        r = tp[c] / actual[c] if actual[c] else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        rows.append(dict(label=name, precision=round(p, 6), recall=round(r, 6), f1=round(f1, 6), support=int(actual[c])))
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def cell_size(num_classes):
    return max(6, min(48, 800 // num_classes))


def confusion_image(confusion, names):
    """The matrix as an RGB image: rows are true classes, columns predictions, each row normalized
    (white 0 to dark blue 1); counts are written in cells big enough for them. Size: LABEL_W +
    classes x cell_size(classes) on each side."""
    m = np.asarray(confusion, dtype=np.float64)
    n, s = len(names), cell_size(len(names))
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    side = LABEL_W + n * s
    img = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(img)
    for t in range(n):
        for p in range(n):
            v = share[t, p]
            colour = tuple(int(255 - v * (255 - c)) for c in (8, 48, 107))
            x, y = LABEL_W + p * s, LABEL_W + t * s
            draw.rectangle([x, y, x + s - 1, y + s - 1], fill=colour, outline=(220, 220, 220) if s >= 12 else None)
            if s >= 24 and m[t, p]:
                draw.text((x + 3, y + s // 3), str(int(m[t, p])), fill="white" if v > 0.5 else "black")
    draw.text((4, 4), "rows: true class", fill="black")
    draw.text((4, 18), "columns: predicted", fill="black")
    if s >= 10:  # names fit beside rows and, rotated, above columns
        for i, name in enumerate(names):
            draw.text((4, LABEL_W + i * s + (s - 10) // 2), name[:22], fill="black")
            label = Image.new("RGB", (LABEL_W - 46, 12), "white")
            ImageDraw.Draw(label).text((0, 0), name[:18], fill="black")
            label = label.rotate(90, expand=True)
            img.paste(label, (LABEL_W + i * s + (s - 12) // 2, 40))
    return img


def mistakes_image(mistakes, names, columns=4):
    """A grid of misclassified images (uint8 CHW tensors), each captioned 'true -> predicted (p)'."""
    if not mistakes:
        img = Image.new("RGB", (320, 40), "white")
        ImageDraw.Draw(img).text((8, 12), "no misclassified images", fill="black")
        return img
    tiles = []
    for m in mistakes:
        tile = Image.fromarray(m["image"].permute(1, 2, 0).numpy())
        canvas = Image.new("RGB", (tile.width, tile.height + 28), "white")
        canvas.paste(tile, (0, 28))
        d = ImageDraw.Draw(canvas)
        d.text((2, 2), f"true: {names[m['true']][:28]}", fill=(0, 110, 0))
        d.text((2, 14), f"pred: {names[m['pred']][:22]} ({m['confidence']:.2f})", fill=(180, 0, 0))
        tiles.append(canvas)
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (min(columns, len(tiles)) * (w + 4), rows * (h + 4)), "white")
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % columns) * (w + 4), (i // columns) * (h + 4)))
    return grid


def model_card(cfg, results, history, sizes, names, precision, world, step_batch, versions):
    """README.md for the exported model, in the Hugging Face model-card format (YAML front matter)."""
    hub_model = not is_path(cfg.model) and "/" in cfg.model
    hub_data = not is_path(cfg.dataset) and cfg.dataset != "synthetic"
    acc = results["eval_accuracy"]
    meta = ["---", "library_name: transformers", "pipeline_tag: image-classification",
            "tags:", "- image-classification", "- vision", "- vitfood"]
    if hub_model:
        meta.append(f"base_model: {cfg.model}")
    if hub_data:
        meta += ["datasets:", f"- {cfg.dataset}"]
    meta += ["metrics:", "- accuracy", "model-index:", f"- name: {json.dumps(cfg.output_dir.rstrip('/').split('/')[-1])}",
             "  results:", "  - task:", "      type: image-classification", "      name: Image Classification",
             "    dataset:", f"      name: {json.dumps(cfg.dataset)}", f"      type: {json.dumps(cfg.dataset)}",
             f"      split: {json.dumps(cfg.eval_split or f'{cfg.train_split} (held-out {cfg.test_size:g})')}",
             "    metrics:", "    - type: accuracy", f"      value: {acc:.4f}", "      name: top-1 accuracy", "---", ""]
    lines = [
        f"# {cfg.output_dir.rstrip('/').split('/')[-1]}", "",
        f"An image classifier fine-tuned from `{cfg.model}` on `{cfg.dataset}` with "
        "vitfood, a plain PyTorch training loop that follows the Hugging Face image-classification guide.",
        "",
        f"It reaches **{acc:.4f}** top-1 accuracy ({results['eval_top5']:.4f} top-5, loss "
        f"{results['eval_loss']:.4f}) on the evaluation split, at step {results['exported_step']}.", "",
        "## Data", "",
        f"- data set: `{cfg.dataset}`; train split `{cfg.train_split}`, eval split "
        f"`{cfg.eval_split or f'held out from {cfg.train_split} (test_size {cfg.test_size:g}, seed {cfg.seed})'}`",
        f"- {sizes['train']} training images, {sizes['eval']} evaluation images, {len(names)} classes", "",
        "## Training hyperparameters", "",
        f"- learning rate {cfg.lr:g} (AdamW, weight decay {cfg.weight_decay:g}, linear warmup {cfg.warmup_steps} "
        "steps then linear decay)",
        f"- global batch {step_batch} ({world} process(es) x batch {cfg.batch_size} x accumulation {cfg.grad_accum_steps})",
        f"- {results['global_step']} optimizer steps, image size {cfg.image_size or 'the processor default'}, "
        f"precision {precision}, gradient clipping {cfg.max_grad_norm:g}, seed {cfg.seed}",
        "- augmentation: random resized crop (scale 0.08-1) and horizontal flip; eval: resize and center crop", "",
        "## Training results", "",
        "| step | training loss | eval loss | top-1 | top-5 |", "| ---: | ---: | ---: | ---: | ---: |"]
    for h in history:
        train_loss = "-" if h.get("train_loss") is None else f"{h['train_loss']:.4f}"
        lines.append(f"| {h['step']} | {train_loss} | {h['loss']:.4f} | {h['acc1']:.4f} | {h['acc5']:.4f} |")
    if history:
        best = max(history, key=lambda h: h["acc1"])
        lines += ["", f"Best eval top-1 {best['acc1']:.4f} at step {best['step']}; "
                      f"training ran {results['train_runtime']:.0f} s at {results['train_samples_per_second']:.1f} images/s."]
    lines += ["", "## Use", "", "```python", "from transformers import pipeline",
              "classify = pipeline(\"image-classification\", model=\"path/to/this/folder\")",
              "classify(\"dish.jpg\")", "```", "", "## Framework versions", ""]
    lines += [f"- {k} {v}" for k, v in versions.items()]
    return "\n".join(meta + lines) + "\n"
