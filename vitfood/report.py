"""What an evaluation leaves for people: per-class metrics, a confusion matrix and a mistakes grid as
images (drawn with Pillow, no plotting library), and the model card of an exported model."""

import csv
import json

import numpy as np
from PIL import Image, ImageDraw

from vitfood import calibrate, metrics
from vitfood.config import to_dict
from vitfood.hub import is_path

LABEL_W = 150  # room for class names beside and above the matrix


def per_class(result, names):
    """Rows of class, precision, recall, f1, support of an eval: from its [true, predicted] count matrix, or
    for multi-label from its per-class counts at the threshold, with each class's average precision (ap;
    None for a class the split does not hold)."""
    if "confusion" in result:
        m = np.asarray(result["confusion"], dtype=np.float64)
        tp, predicted, actual, ap = np.diag(m), m.sum(0), m.sum(1), None
    else:
        c = result["per_class"]
        tp, fp, fn, ap = (np.asarray(c[k], dtype=np.float64) for k in ("tp", "fp", "fn", "ap"))
        predicted, actual = tp + fp, tp + fn
    rows = []
    for c, name in enumerate(names):
        p = tp[c] / predicted[c] if predicted[c] else 0.0
        r = tp[c] / actual[c] if actual[c] else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        row = dict(label=name) if ap is None else dict(label=name, ap=None if np.isnan(ap[c]) else round(ap[c], 6))
        rows.append(dict(row, precision=round(p, 6), recall=round(r, 6), f1=round(f1, 6), support=int(actual[c])))
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def per_class_markdown(rows):
    """The per-class table as Markdown, for TensorBoard's text view."""
    ap = "ap" in rows[0]
    lines = ["| class |" + " AP |" * ap + " precision | recall | f1 | support |", "|---|" + "---:|" * (4 + ap)]
    lines += [f"| {r['label']} |" + (f" {'-' if r['ap'] is None else format(r['ap'], '.3f')} |" if ap else "") +
              f" {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |" for r in rows]
    return "\n".join(lines)


def font(size):
    """Pillow's own TrueType font at `size` px (its bitmap font, far smaller, where FreeType is missing)."""
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def wrap(text, fnt, width):
    """`text` in lines no wider than `width` px, broken after spaces and underscores, never inside a word
    (a single word wider than `width` keeps a line of its own)."""
    import re
    lines, line = [], ""
    for piece in re.findall(r"[^ _]+[ _]*", text) or [text]:
        if line and fnt.getlength((line + piece).rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    return lines + [line.rstrip()] if line else lines


def shorten(text, fnt, width):
    """`text`, cut at the end with an ellipsis where it is wider than `width` px."""
    if fnt.getlength(text) <= width:
        return text
    while len(text) > 1 and fnt.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip(" _") + "…"


def middle(text, fnt, width):
    """`text` no wider than `width` px, cut in the middle with an ellipsis where it is wider: the start and the end
    stay, so that names sharing a long start ("grilled_cheese_sandwich", "grilled_cheese_toast") stay apart."""
    if fnt.getlength(text) <= width:
        return text
    head, tail = text[:len(text) // 2], text[len(text) // 2:]
    while len(head) + len(tail) > 2 and fnt.getlength(head + "…" + tail) > width:
        if len(head) >= len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
    return head + "…" + tail


def wrap_lines(text, fnt, width, max_lines):
    """`text` wrapped into at most `max_lines` lines no wider than `width` px; what does not fit is cut with
    an ellipsis, so that a long class name never pushes the lines after it off a card."""
    lines = wrap(text, fnt, width)
    if len(lines) > max_lines:  # the rest did not fit on one line, so shorten ends it with the ellipsis
        rest = "".join(line if line.endswith("_") else line + " " for line in lines[max_lines - 1:])
        lines = lines[:max_lines - 1] + [rest.rstrip()]
    return [shorten(line, fnt, width) for line in lines]


def shade(share):
    """White (0) to dark blue (1)."""
    return tuple(int(255 - share * (255 - c)) for c in (8, 48, 107))


# TensorBoard draws an image card about 340 px wide and 210 px tall and shrinks larger images to fit:
# the cards below are drawn at that size, with type that stays readable there.
CARD = (340, 210)


def confusion_card(confusion, names):
    """The confusion matrix for a TensorBoard card. Up to 11 classes: the whole matrix (rows: true class,
    numbered; columns: predicted, by number; counts in the cells, shaded by the share of the row).
    More classes: the 8 most frequent confusions ("<true> as <predicted>") ranked, with counts and share of the class."""
    m = np.asarray(confusion, dtype=np.int64)
    n = len(names)
    img = Image.new("RGB", CARD, "white")
    draw = ImageDraw.Draw(img)
    small, text = font(11), font(13)
    if n <= 11:
        cell = min(28, (CARD[1] - 30) // n)
        label_w = max(int(small.getlength(f"{i + 1} {name}")) for i, name in enumerate(names)) + 8
        left, top = min(label_w, CARD[0] - n * cell - 4), 30  # the labels take all the room the matrix leaves
        draw.text((4, 2), "rows: true class, columns: predicted", fill="black", font=text)
        share = m / np.maximum(m.sum(1, keepdims=True), 1)
        for i, name in enumerate(names):
            number = f"{i + 1} "  # a label that cannot fit keeps its number, the start and the end of its name
            label = number + middle(name, small, left - 6 - small.getlength(number))
            draw.text((4, top + i * cell + (cell - 12) // 2), label, fill="black", font=small)
            draw.text((left + i * cell + cell // 2, top - 13), str(i + 1), fill="black", font=small, anchor="mt")
            for j in range(n):
                x, y = left + j * cell, top + i * cell
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=shade(share[i, j]), outline=(220, 220, 220))
                if m[i, j]:
                    draw.text((x + cell // 2, y + cell // 2), str(m[i, j]), font=small, anchor="mm",
                              fill="white" if share[i, j] > 0.5 else "black")
        return img
    off = [(int(m[i, j]), i, j) for i in range(n) for j in range(n) if i != j and m[i, j]]
    top8 = sorted(off, reverse=True)[:8]
    draw.text((4, 2), f"most frequent confusions, of {n} classes", fill="black", font=text)
    if not top8:
        draw.text((4, 30), "none: every image was classified correctly", fill="black", font=text)
    biggest = top8[0][0] if top8 else 1
    for k, (count, i, j) in enumerate(top8):
        y = 24 + k * 23
        of_class = count / max(1, m[i].sum())
        draw.rectangle([4, y, 4 + int((CARD[0] - 8) * count / biggest), y + 20], fill=shade(0.25))
        figure = f"{count} ({of_class:.0%})"
        room = CARD[0] - 8 - small.getlength(figure) - 14 - small.getlength("  as  ")  # the count keeps its place
        true, pred = names[i], names[j]
        while small.getlength(true) + small.getlength(pred) > room and max(len(true), len(pred)) > 2:
            if len(true) >= len(pred):  # shorten the longer name of the pair, in its middle, a character at a time
                true = middle(true, small, small.getlength(true) - 1)
            else:
                pred = middle(pred, small, small.getlength(pred) - 1)
        draw.text((8, y + 10), f"{true}  as  {pred}", fill="black", font=small, anchor="lm")
        draw.text((CARD[0] - 6, y + 10), figure, fill="black", font=small, anchor="rm")
    return img


def mistakes_card(mistakes, names, count=4):
    """The `count` most confident mistakes for a TensorBoard card: 2 x 2 tiles, each the image as the model
    saw it, its true and predicted class (wrapped; a name longer than two lines cut with an ellipsis) and
    the confidence, which always stays on the card."""
    img = Image.new("RGB", CARD, "white")
    draw = ImageDraw.Draw(img)
    small = font(12)
    if not mistakes:
        draw.text((8, 8), "no misclassified images", fill="black", font=font(13))
        return img
    tile_w, tile_h, thumb = CARD[0] // 2, CARD[1] // 2, 64
    for k, mk in enumerate(mistakes[:count]):
        x, y = (k % 2) * tile_w, (k // 2) * tile_h
        picture = Image.fromarray(mk["image"].permute(1, 2, 0).numpy()).resize((thumb, thumb), Image.BILINEAR)
        img.paste(picture, (x + 2, y + 4))
        for i, (line, colour) in enumerate(card_caption(mk, names, small, tile_w - thumb - 10)):
            draw.text((x + thumb + 8, y + 3 + i * 14), line, fill=colour, font=small)
    return img


def named(ids, names):
    """A mistake's class (an id) or classes (multi-label: a list of ids) as text."""
    return names[ids] if isinstance(ids, int) else ", ".join(names[i] for i in ids) or "(none)"


def card_caption(mistake, names, fnt, width):
    """[(line, colour)] beside a mistake's thumbnail: at most 7 lines of 14 px, the tile's height. Single-label: the
    true and the predicted class, and the predicted class's probability. Multi-label: the classes missed and those
    predicted but absent (with their count when several), as a card has no room for whole sets; then the class of
    the most confident wrong decision with the score the model gave it."""
    green, red, grey = (0, 110, 0), (180, 0, 0), (60, 60, 60)
    if isinstance(mistake["true"], int):
        parts = [("true", mistake["true"], green), ("pred", mistake["pred"], red)]
        last = f"p(pred)={mistake['confidence']:.2f}"
    else:
        true, pred = set(mistake["true"]), set(mistake["pred"])
        parts = [(title, sorted(ids), colour) for title, ids, colour in
                 (("missed", true - pred, green), ("not there", pred - true, red)) if ids]
        parts = [(f"{title} ({len(ids)})" if len(ids) > 1 else title, ids, colour) for title, ids, colour in parts]
        worst = mistake["surest"]  # a missed class scored 1 - confidence, one predicted wrongly the confidence
        score = 1 - mistake["confidence"] if worst in true else mistake["confidence"]
        last = f"p({middle(names[worst], fnt, width - fnt.getlength('p()=0.00'))})={score:.2f}"
    lines = []
    for title, ids, colour in parts:
        lines += [(title, colour)] + [(t, colour) for t in wrap_lines(named(ids, names), fnt, width, 2)]
    return lines + [(last, grey)]


def cell_size(num_classes):
    return max(6, min(48, 800 // num_classes))


def confusion_image(confusion, names):
    """The matrix as an RGB image, for the file evaluate writes: rows are true classes, columns predictions,
    each row normalized (white 0 to dark blue 1); counts are written in cells big enough for them. Size:
    LABEL_W + classes x cell_size(classes) on each side."""
    m = np.asarray(confusion, dtype=np.float64)
    n, s = len(names), cell_size(len(names))
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    side = LABEL_W + n * s
    img = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(img)
    small = font(12)
    for t in range(n):
        for p in range(n):
            v = share[t, p]
            x, y = LABEL_W + p * s, LABEL_W + t * s
            draw.rectangle([x, y, x + s - 1, y + s - 1], fill=shade(v), outline=(220, 220, 220) if s >= 12 else None)
            if s >= 24 and m[t, p]:
                draw.text((x + s // 2, y + s // 2), str(int(m[t, p])), fill="white" if v > 0.5 else "black",
                          font=small, anchor="mm")
    draw.text((4, 4), "rows: true class", fill="black", font=small)
    draw.text((4, 20), "columns: predicted", fill="black", font=small)
    if s >= 12:  # names fit beside rows and, rotated, above columns
        for i, name in enumerate(names):
            draw.text((4, LABEL_W + i * s + s // 2), name if small.getlength(name) < LABEL_W - 8 else name[:16] + "…",
                      fill="black", font=small, anchor="lm")
            label = Image.new("RGB", (LABEL_W - 46, 14), "white")
            ImageDraw.Draw(label).text((0, 0), name, fill="black", font=small)
            img.paste(label.rotate(90, expand=True), (LABEL_W + i * s + (s - 14) // 2, 40))
    return img


def mistakes_image(mistakes, names, columns=4):
    """A grid of misclassified images (uint8 CHW tensors), for the file evaluate writes: each captioned with
    its true and predicted class, wrapped at word ends (never cut), and the confidence."""
    small = font(12)
    if not mistakes:
        img = Image.new("RGB", (320, 40), "white")
        ImageDraw.Draw(img).text((8, 12), "no misclassified images", fill="black", font=small)
        return img
    tiles = []
    for m in mistakes:
        tile = Image.fromarray(m["image"].permute(1, 2, 0).numpy())
        width = max(tile.width, 150)
        lines = [(f"true: {t}" if i == 0 else t, (0, 110, 0))
                 for i, t in enumerate(wrap(named(m["true"], names), small, width - 40))]
        lines += [(f"pred: {t}" if i == 0 else t, (180, 0, 0))
                  for i, t in enumerate(wrap(named(m["pred"], names), small, width - 40))]
        lines += [(f"p = {m['confidence']:.2f}", (60, 60, 60))]
        canvas = Image.new("RGB", (width, tile.height + 14 * len(lines) + 4), "white")
        canvas.paste(tile, (0, 14 * len(lines) + 4))
        d = ImageDraw.Draw(canvas)
        for i, (line, colour) in enumerate(lines):
            d.text((2, 2 + 14 * i), line, fill=colour, font=small)
        tiles.append(canvas)
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (min(columns, len(tiles)) * (w + 4), rows * (h + 4)), "white")
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % columns) * (w + 4), (i // columns) * (h + 4)))
    return grid


def augmentation(cfg):
    """The training augmentations beyond crop and flip, as a phrase for the card."""
    parts = []
    if cfg.auto_augment == "randaugment":
        parts.append(f"RandAugment ({cfg.randaugment_ops} ops, magnitude {cfg.randaugment_magnitude})")
    elif cfg.auto_augment != "none":
        parts.append("TrivialAugmentWide")
    if cfg.random_erasing:
        parts.append(f"random erasing (p {cfg.random_erasing:g})")
    return "".join(", " + p for p in parts)


def distilled(cfg, results, rows):
    """The card's line on --teacher (a list of one line, or none): the teacher, its score, the agreement, the loss."""
    if not results.get("teacher"):
        return []
    score = metrics.scored(rows)
    return [f"- distilled from `{cfg.teacher}` (eval {score.heading} "
            f"{results[score.result.replace('eval_', 'teacher_eval_')]:.4f} on the images this model sees; it agrees "
            f"with it on {results['eval_agreement']:.1%} of the eval answers): --distill {cfg.distill}, alpha "
            f"{cfg.distill_alpha:g}" + (f", temperature {cfg.distill_temperature:g}" if cfg.distill == "soft" else "")]


def trained(cfg):
    if cfg.freeze_backbone:
        what = "the classification head only (frozen backbone: a linear probe)"
    elif cfg.lora_rank:
        what = (f"LoRA adapters (rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g}, dropout {cfg.lora_dropout:g}, on "
                f"{cfg.lora_targets or 'q_proj,v_proj'}) and the head; the adapters are merged into these weights, "
                "and saved as they trained in `../adapter` (peft's format)")
    else:
        what = "every weight (full fine-tune)"
    return what + ("; gradient checkpointing" if cfg.gradient_checkpointing else "")


def card_front_matter(cfg, multi, score):
    """The model card's YAML front matter: the Hub's tags, base model, data set and model index with the score."""
    meta = ["---", "library_name: transformers", "pipeline_tag: image-classification",
            "tags:", "- image-classification", "- vision", "- vitfood"]
    if not is_path(cfg.model) and "/" in cfg.model:
        meta.append(f"base_model: {cfg.model}")
    if not is_path(cfg.dataset) and cfg.dataset != "synthetic":
        meta += ["datasets:", f"- {cfg.dataset}"]
    meta += ["metrics:", "- accuracy", "model-index:", f"- name: {json.dumps(cfg.output_dir.rstrip('/').split('/')[-1])}",
             "  results:", "  - task:", "      type: image-classification", "      name: Image Classification",
             "    dataset:", f"      name: {json.dumps(cfg.dataset)}", f"      type: {json.dumps(cfg.dataset)}",
             f"      split: {json.dumps(cfg.eval_split or f'{cfg.train_split} (held-out {cfg.test_size:g})')}",
             "    metrics:", f"    - type: {'map' if multi else 'accuracy'}", f"      value: {score:.4f}",
             f"      name: {'macro mAP' if multi else 'top-1 accuracy'}", "---", ""]
    return meta


def model_card(cfg, results, history, sizes, names, precision, world, step_batch, versions):
    """README.md for the exported model, in the Hugging Face model-card format (YAML front matter)."""
    rows = metrics.table(results)
    multi = rows is metrics.MULTI
    figure = {m.key: results[m.result] for m in rows}  # by name, from metrics' one list
    acc = figure[metrics.scored(rows).key]
    meta = card_front_matter(cfg, multi, acc)
    # a multi-label class is predicted from the run's --threshold on the raw scores: on the scores the exported
    # model gives, with a temperature folded in, that is calibrate.moved(...), the threshold it holds
    own = calibrate.moved(cfg.threshold, calibrate.kept(results.get("calibration"))) if multi else None
    at = f"{cfg.threshold:g}" + (f", {own:.4f} on its calibrated scores" if multi and own != cfg.threshold else "")
    lines = [
        f"# {cfg.output_dir.rstrip('/').split('/')[-1]}", "",
        f"An image classifier fine-tuned from `{cfg.model}` on `{cfg.dataset}` with "
        "vitfood, a plain PyTorch training loop that follows the Hugging Face image-classification guide.",
        "",
        (f"It reaches a macro mAP of **{acc:.4f}** (F1 micro {figure['f1_micro']:.4f}, macro "
         f"{figure['f1_macro']:.4f} and exact match {figure['exact_match']:.4f} at threshold {at}; "
         f"loss {figure['loss']:.4f})" if multi else
         f"It reaches **{acc:.4f}** top-1 accuracy ({figure['acc5']:.4f} top-5, loss "
         f"{figure['loss']:.4f})") + f" on the evaluation split, at step {results['exported_step']}.", "",
        "## Data", "",
        f"- data set: `{cfg.dataset}`; train split `{cfg.train_split}`, eval split "
        f"`{cfg.eval_split or f'held out from {cfg.train_split} (test_size {cfg.test_size:g}, seed {cfg.seed})'}`",
        f"- {sizes['train']} training images, {sizes['eval']} evaluation images, {len(names)} classes"
        + (" (multi-label: a list of classes per image; binary cross-entropy, sigmoid scores)" if multi else ""), "",
        "## Training hyperparameters", "",
        f"- learning rate {cfg.lr:g} (AdamW, weight decay {cfg.weight_decay:g}, linear warmup {cfg.warmup_steps} "
        "steps then linear decay)",
        f"- global batch {step_batch} ({world} process(es) x batch {cfg.batch_size} x accumulation {cfg.grad_accum_steps})",
        f"- {results['global_step']} optimizer steps, image size {cfg.image_size or 'the processor default'}, "
        f"precision {precision}, gradient clipping {cfg.max_grad_norm:g}, seed {cfg.seed}",
        f"- label smoothing {cfg.label_smoothing:g}; mixup {cfg.mixup:g}, cutmix {cfg.cutmix:g} (probability "
        f"{cfg.mixup_prob:g}, cutmix share {cfg.mixup_switch_prob:g}); "
        + (f"EMA of the weights, decay {cfg.ema_decay:g}; exported: the {'EMA' if cfg.export_ema else 'trained'} weights"
           if cfg.ema_decay else "no EMA") + f"; layer decay {cfg.layer_decay:g}; drop path {cfg.drop_path:g}",
        "- what trained: " + trained(cfg),
        *distilled(cfg, results, rows),
        f"- class balance: loss weights {cfg.class_weights}, sampler {cfg.sampler}",
        "- augmentation: random resized crop (scale 0.08-1) and horizontal flip" + augmentation(cfg) +
        "; eval: the image processor's resize "
        "(and center crop, where it has one) of the whole decoded image, as `transformers.pipeline` applies it", "",
        "## Training results", "",
        "| step | training loss | eval " + " | ".join(m.heading for m in rows) + " |",
        "| ---: | ---: |" + " ---: |" * len(rows)]
    cell = lambda h, k: "-" if h.get(k) is None else f"{h[k]:.4f}"  # older runs lack some
    for h in history:
        lines.append(f"| {h['step']} | {cell(h, 'train_loss')} | " + " | ".join(cell(h, m.key) for m in rows) + " |")
    if history:
        judge = metrics.Judge(cfg.best_metric, multi)
        best = (min if judge.lower else max)(history, key=judge.value)
        lines += ["", f"Best eval {judge.row.heading} {judge.value(best):.4f} at step {best['step']}; "
                      f"training ran {results['train_runtime']:.0f} s at {results['train_samples_per_second']:.1f} images/s."]
    if results.get("calibration"):
        c = results["calibration"]
        judged = (f"Judged out of fold ({c['folds']} folds: each part of the eval split scored with the temperature "
                  f"fitted on the others), the expected calibration error (15 bins) is {c['ece_before']:.4f} raw and "
                  f"{c['ece_out_of_fold']:.4f} calibrated; NLL {c['nll_before']:.4f} -> {c['nll_out_of_fold']:.4f}.")
        if c["kept"]:
            lines += ["", f"Scores are calibrated: the last layer is divided by the temperature T = {c['temperature']:.3f}, "
                          f"fitted on the eval split ({c['samples']} images). {judged}"]
        else:
            lines += ["", f"Scores are the raw ones: a temperature T = {c['temperature']:.3f} was fitted on the eval split "
                          f"({c['samples']} images) and not kept, since {c['not_kept']}. {judged}"]
    if results.get("unknown_threshold") is not None:
        lines += ["", f"vitfood.predict answers \"unknown\" below a top score of {results['unknown_threshold']:.4f}: on "
                      f"the eval split it answers {results['unknown_coverage']:.1%} of the images, "
                      f"{results['unknown_accuracy']:.1%} of them right."]
    if results.get("stopped_early"):
        lines += ["", f"Training stopped early at step {results['global_step']}: {results['stopped_early']} "
                      f"(--early-stopping-patience {cfg.early_stopping_patience})."]
    lines += ["", "## Use", "", "```python", "from transformers import pipeline",
              "classify = pipeline(\"image-classification\", model=\"path/to/this/folder\")",
              "classify(\"dish.jpg\"" + (", top_k=None)  # every class's sigmoid score; those from "
                                          f"{own:.4g} are its labels" if multi else ")"),
              "```", "", "## Framework versions", ""]
    lines += [f"- {k} {v}" for k, v in versions.items()]
    return "\n".join(meta + lines) + "\n"


def results(final, step, exported_step, ledger, startup, precision, ema=False, best_metric=None, stopped_early=None,
            calibration=None, unknown=None, broken_links=0, teacher=None):
    """all_results.json: the final eval (`final`, of the exported weights, in `precision`) under metrics' names, with
    how the run went (`ledger`: state.Ledger's state_dict over every segment; `startup`: seconds from process start to the
    first batch; `stopped_early`: why the run stopped before --max-steps, or None; `calibration` and `unknown`:
    calibrate.fitted's; `broken_links`: image files of the data set folder that are links leading nowhere, so in
    no split); with `ema`, the EMA's loss and score too; with `teacher` (--teacher), its name, its score on the eval
    split and the share of the eval answers the model shares with it."""
    rows = metrics.table(final)
    runtime = ledger["train_runtime"]
    record = dict({m.result: final[m.key] for m in rows}, eval_precision=precision, global_step=step,
                  exported_step=exported_step,
                  train_runtime=round(runtime, 3), train_samples_per_second=round(ledger["images"] / runtime, 3),
                  segments=ledger["segments"], damaged_train_files=len(ledger["damaged_files"]),
                  damaged_train_encounters=ledger["damaged_encounters"], damaged_eval_files=final["skipped"],
                  broken_links=broken_links,
                  startup_seconds=round(startup, 2), best_metric=best_metric, stopped_early=stopped_early)
    if "loss_uncalibrated" in final:  # eval_loss is model/'s, its temperature folded in; this, the weights' before it
        record["eval_loss_uncalibrated"] = final["loss_uncalibrated"]
    if calibration:  # of model/'s scores on the eval split: its temperature, ECE and NLL before and after
        record["calibration"] = {k: v for k, v in calibration.items() if not k.startswith("bins_")}
    if unknown:  # the unknown threshold: the share of the eval split answered above it, and their accuracy
        record.update(unknown_threshold=unknown[0], unknown_coverage=unknown[1], unknown_accuracy=unknown[2])
    if teacher and "agreement" in final:  # teacher_eval_accuracy (or _map), eval_agreement
        score = metrics.scored(rows)
        record.update(teacher=teacher, **{score.result.replace("eval_", "teacher_eval_"): final["teacher"][score.key]},
                      eval_agreement=final["agreement"])
    if ema:  # eval_ema_loss, and eval_ema_accuracy or eval_ema_map
        record.update({m.result.replace("eval_", "eval_ema_"): final[f"ema_{m.key}"] for m in rows[:2]})
    return record


def hparams(cfg, precision, max_steps, world, step_batch):
    """Every option of the run and what it resolved to, for TensorBoard's HParams table."""
    values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in to_dict(cfg).items()}
    values.update(precision=precision, precision_requested=cfg.precision, total_steps=max_steps, world_size=world,
                  global_batch=step_batch)
    return values
