"""Classify images with a trained model: top-k labels and probabilities for each image (for a multi-label
model, every class whose sigmoid score reaches --threshold).

    python -m vitfood.predict --model runs/<run>/model photo.jpg more_photos/
    python -m vitfood.predict --model runs/<run>/checkpoint-300 --json --top-k 3 dish.png
    python -m vitfood.predict --model google/vit-base-patch16-224 photo.jpg

    python -m vitfood.predict --model runs/<run>/export/model.onnx photos/ --output preds.csv

--model takes a run's model/ folder, any checkpoint-<step>/ folder, a Hub model id, or an .onnx file of
vitfood.export (run by onnxruntime on the CPU). Images go through the eval transform of training, batched, on
the best available device. A file that cannot be read gets its own error line; the others are still classified.
--output writes every prediction to a file as it goes (.csv: one row per image; .jsonl: one JSON object per
line), unreadable files with the reason. A single-label model trained with --target-accuracy (or coverage)
answers "unknown (best: X 0.41)" where its top score is below the threshold stored with it (--threshold sets
another; 0 answers every image).

Exit status: 0 when every image was classified, 1 when a file could not be read (missing or
damaged; the others are still classified), 2 for a usage error (no such model, no images).
"""

import vitfood
import vitfood.stack

if __name__ == "__main__":
    vitfood.quiet_ctrl_c()  # before the heavy imports below
vitfood.stack.require(__name__)  # a broken install (a torchvision built for another torch) is one line, no traceback

import argparse
import csv
import json
import os
import sys

import torch

from vitfood import calibrate, hub
from vitfood.common import DTYPES, UserError, model_precision, pick_device, resolve_precision, run_main
from vitfood.onnxfile import is_onnx
from vitfood.config import OneLineParser
from vitfood.images import DECODE_ERRORS, IMAGE_EXTENSIONS, TTA, averaged, normalize, open_image, transforms_for, views
from vitfood.model import for_inference, hub_model, load_for_inference



def find_images(paths):
    """Files named, and image files under folders named, in a stable order; a file named twice (alone and in its
    folder, or through a link) once, where it first came."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in sorted(os.walk(path)):
                found += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
        else:
            found.append(path)
    once, seen = [], set()
    for f in found:
        if os.path.realpath(f) not in seen:
            seen.add(os.path.realpath(f))
            once.append(f)
    return once


@torch.inference_mode()
def predict(model, processor, files, device, precision, top_k=5, batch_size=32, threshold=None, tta="none"):
    """Yield one dict per file: {'file', 'predictions': [{'label', 'score'}...]} or {'file', 'error'}. The
    top `top_k` by softmax, and with a `threshold` 'unknown': whether the top score is below it; for a multi-label
    model (its config's problem_type), every class whose sigmoid score is at least `threshold` (unset: 0.5),
    highest first, as transformers' pipeline scores them. `tta` (images.TTA): the probabilities averaged over views
    of each image."""
    _, eval_tf, (mean, std) = transforms_for(processor)
    model, amp = for_inference(model, precision, device, keep=False)
    multi = model.config.problem_type == "multi_label_classification"
    threshold = 0.5 if multi and threshold is None else threshold
    k = model.config.num_labels if multi else min(top_k, model.config.num_labels)
    for start in range(0, len(files), batch_size):
        batch, names, results = [], [], {}
        for f in files[start:start + batch_size]:
            try:
                with open_image({"path": f}) as img:  # the same pixel limit as training
                    batch.append(eval_tf(img))
                names.append(f)
            except (*DECODE_ERRORS, FileNotFoundError) as e:
                results[f] = dict(file=f, error=f"{type(e).__name__}: {e}")
        if batch:
            with amp:
                logits = averaged([model(pixel_values=x).logits.float() for x in
                                   views(normalize(torch.stack(batch).to(device), mean, std), tta)], multi)
            probs = logits.sigmoid() if multi else logits.softmax(-1)
            scores, ids = probs.topk(k, dim=-1)
            for f, s, i in zip(names, scores.tolist(), ids.tolist()):
                results[f] = dict(file=f, predictions=[dict(label=model.config.id2label[j], score=round(p, 6))
                                                       for p, j in zip(s, i) if not multi or p >= threshold])
                if threshold is not None and not multi:
                    results[f]["unknown"] = s[0] < threshold
                if multi:
                    results[f]["highest"] = dict(label=model.config.id2label[i[0]], score=round(s[0], 6))
        for f in files[start:start + batch_size]:
            yield results[f]


def main(argv=None):
    p = OneLineParser(prog="python -m vitfood.predict", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model/ or checkpoint-<step>/ folder, a Hub model id, or an .onnx "
                                                  "file of vitfood.export")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, help="single-label models: the k most likely classes (default 5)")
    p.add_argument("--threshold", type=float,
                   help="multi-label models: every class whose sigmoid score is at least this (unset: the threshold the "
                        "model holds, its run's --threshold on its own scores, else 0.5); single-label "
                        "models: answer 'unknown' below this top score (unset: the threshold stored in the model by "
                        "--target-accuracy or --target-coverage, if any; 0: always answer)")
    p.add_argument("--tta", default="none", choices=TTA, help="average the probabilities over views of each image: "
                   "flip (and its mirror image), flip+crops (and four corner and the centre crops)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=["auto", *DTYPES], help="unset: the model's own (fp32 for a run's model/), "
                   "the scores transformers.pipeline and the ONNX export give; auto: bf16 on a CPU with bf16 units, "
                   "fp16 on CUDA, faster and within about 1e-2 of them")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    p.add_argument("--output", metavar="FILE", help="write the predictions to FILE (.csv or .jsonl) as they come, "
                                                    "instead of printing them")
    a = p.parse_args(argv)
    a.model = hub.run_model(a.model)  # a run folder stands for its model
    asked_k, a.top_k = a.top_k is not None, 5 if a.top_k is None else a.top_k
    if a.top_k < 1 or a.batch_size < 1:
        raise UserError("--top-k and --batch-size must be positive")
    if a.threshold is not None and not 0 <= a.threshold <= 1:
        raise UserError(f"--threshold must be between 0 and 1, got {a.threshold}")
    if a.output and not a.output.lower().endswith((".csv", ".jsonl")):
        raise UserError(f"--output {a.output}: name a .csv or a .jsonl file")
    if a.output and not os.path.isdir(os.path.dirname(os.path.abspath(a.output))):
        raise UserError(f"--output {a.output}: no such folder {os.path.dirname(a.output)}")
    if is_onnx(a.model):  # onnxruntime on the CPU, in float32, as vitfood.export checked it
        if a.device not in ("auto", "cpu") or a.precision not in (None, "auto", "fp32"):
            raise UserError("an .onnx model runs on the CPU in fp32 (onnxruntime): leave --device and --precision unset")
        a.device, a.precision = "cpu", "fp32"
    device = pick_device(a.device)
    precision = resolve_precision(a.precision, device) if a.precision else None
    files = find_images(a.images)
    if not files:
        raise UserError("no image files found in " + ", ".join(a.images))
    hub.prepare(model=hub_model(a.model))
    model, processor = load_for_inference(a.model, device)
    precision = precision or model_precision(model, device)
    multi = model.config.problem_type == "multi_label_classification"
    if multi and asked_k:
        print(f"note: --top-k is for single-label models; {a.model} is multi-label: every class scoring at least "
              "--threshold is listed", file=sys.stderr)
    threshold = a.threshold if a.threshold is not None else (calibrate.label_threshold(model.config) if multi else
                                                             calibrate.stored(model.config))
    results = predict(model, processor, files, device, precision, a.top_k, a.batch_size, threshold, a.tta)
    if a.output:
        failed = write(results, a.output, multi, min(a.top_k, model.config.num_labels), threshold is not None)
    else:
        failed = show(results, a.json, threshold)
    if failed:
        sys.exit(1)  # every image that could be read was classified all the same


def show(results, as_json, threshold):
    """Print each result as it comes (a line, or a JSON object); returns the count of unreadable files."""
    failed = 0
    for r in results:
        if "error" in r:
            failed += 1
            print(f"error: {r['file']}: {r['error']}", file=sys.stderr)
            if as_json:
                print(json.dumps(r))
        elif as_json:
            print(json.dumps(r))
        else:
            best = "  ".join(f"{p['label']} {p['score']:.3f}" for p in r["predictions"])
            if r.get("unknown"):  # single-label, the top score below the model's (or --threshold's) threshold
                top = r["predictions"][0]
                best = f"unknown (best: {top['label']} {top['score']:.2f})"
            elif not r["predictions"]:  # multi-label, no class at the threshold
                best = f"(no class at {threshold:g}; highest {r['highest']['label']} {r['highest']['score']:.3f})"
            print(f"{r['file']}: {best}")
    return failed


def write(results, path, multi, k, unknown=False):
    """Write each result to `path` as it comes, as JSON lines or CSV: one row per image, `file`, then for a
    single-label model label_1, score_1, ... label_k, score_k (and with a threshold `unknown`: true where the top
    score is below it), for a multi-label one the classes at the threshold and their scores (each separated by
    ';'), then `error` (why a file could not be read). The file
    appears under its name once the last image is done: a killed job leaves no half file that looks whole.
    Returns the count of unreadable files."""
    tmp, failed, rows = f"{path}.partial", 0, 0
    with open(tmp, "w", newline="") as fh:
        table = csv.writer(fh)
        if not path.lower().endswith(".jsonl"):
            table.writerow(["file", "labels", "scores", "error"] if multi else
                           ["file", *(f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "score")),
                            *["unknown"] * unknown, "error"])
        for r in results:
            rows += 1
            failed += "error" in r
            found = r.get("predictions", [])
            if path.lower().endswith(".jsonl"):
                fh.write(json.dumps(r) + "\n")
            elif multi:
                table.writerow([r["file"], ";".join(p["label"] for p in found),
                                ";".join(f"{p['score']:.6f}" for p in found), r.get("error", "")])
            else:
                pairs = [v for p in found for v in (p["label"], f"{p['score']:.6f}")]
                answer = [str(r["unknown"]).lower() if "unknown" in r else ""] * unknown
                table.writerow([r["file"], *pairs, *[""] * (2 * k - len(pairs)), *answer, r.get("error", "")])
    os.replace(tmp, path)
    print(f"{rows} images, {rows - failed} classified, {failed} unreadable: {path}")
    return failed


def cli():
    """Console entry point `vitfood-predict`, the same as `python -m vitfood.predict`."""
    run_main(main)


if __name__ == "__main__":
    cli()
