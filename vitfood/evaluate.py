"""Evaluate a trained model in depth: loss, top-1/top-5, per-class precision/recall/F1, a confusion
matrix and the most confident mistakes.

    python -m vitfood.evaluate --model runs/<run>/model                 # on the eval split that run used
    python -m vitfood.evaluate --model runs/<run>/checkpoint-300 --tensorboard runs/<run>/eval
    python -m vitfood.evaluate --model google/vit-base-patch16-224 --dataset ./photos --split train
    python -m vitfood.evaluate --model runs/<run>/export/model-int8.onnx      # an export, with onnxruntime

    python -m vitfood.evaluate --model runs/<run>/model --calibrate --target-accuracy 0.95  # writes a model copy

Writes eval_results.json, per_class.csv, confusion_matrix.png, mistakes.png and (single-label) risk_coverage.csv
to --output-dir; with --calibrate reliability.png, and with --calibrate or --target-* a model/ folder: the model
with the temperature folded in and the unknown threshold in its config.
"""

import vitfood
import vitfood.stack

if __name__ == "__main__":
    vitfood.quiet_ctrl_c()  # before the heavy imports below
vitfood.stack.require(__name__)  # a broken install (a torchvision built for another torch) is one line, no traceback

import argparse
import json
import os
import shlex
import time

import transformers

from vitfood import calibrate, checkpoint, hub, metrics, report
from vitfood.common import DTYPES, UserError, model_precision, num_workers, pick_device, resolve_precision, run_main, \
    safe_name
from vitfood.config import RUN_CONFIG, OneLineParser, check_option, check_targets, resolve, run_config_path, saved_run
from vitfood.data import build_data, eval_skip_warning
from vitfood.onnxfile import is_onnx
from vitfood.hub import is_path
from vitfood.images import TTA, transforms_for
from vitfood.logs import eval_records, text
from vitfood.evalsplit import open_eval
from vitfood.model import hub_model, load_for_inference
from vitfood.rundir import model_step
from vitfood.sources import hub_dataset
from vitfood.steps import eval_pass


def main(argv=None):
    a = parse_args(argv)
    cfg, own_run = data_options(a)
    device = pick_device(a.device)
    hub.prepare(hub_dataset(cfg.dataset), hub_model(a.model))  # before the data: a missing model fails fast
    transformers.utils.logging.disable_progress_bar()
    split = open_eval(cfg, a.model, lambda *_: load_for_inference(a.model, device, cfg.attn if own_run else "auto"))
    cfg, model, multi = split.cfg, split.model, split.multi
    precision = resolve_precision(a.precision, device) if a.precision else model_precision(model, device)
    batch_size = a.batch_size or (cfg.eval_batch(device) if own_run else 32)
    calibrate.check(multi, a.target_accuracy, a.target_coverage)
    step = model_step(a.model) if a.tensorboard else 0  # read before a rotation can take the checkpoint away
    threshold = a.threshold if a.threshold is not None else calibrate.label_threshold(model.config, cfg.threshold)
    t0 = time.perf_counter()
    r, skipped_of = scored(a, split, device, precision, batch_size, threshold)
    seconds = time.perf_counter() - t0
    cal, unknown = calibrate.fitted(r["logits"], r["labels"], multi, "temperature" if a.calibrate else "none",
                                    a.target_accuracy, a.target_coverage)
    out = output_dir(a)
    results, files = write_results(a, out, split, r, cal, unknown, precision, batch_size, threshold)
    if a.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        calibrated = calibrate.kept(getattr(getattr(model, "config", None), calibrate.KEY, None)) != 1
        with SummaryWriter(a.tensorboard) as w:
            eval_records(w, step, r, split.model_names, mistakes=4, calibrated=calibrated, seconds=seconds)
            text(w, "run/status", f"**evaluated** {a.model} (step {step}{', calibrated' if calibrated else ''}) in "
                 f"{precision}: {r['samples']} images", step)
    summarize(a, out, split, r, results, files, cal, unknown, precision, threshold, skipped_of, own_run)
    return results


def parse_args(argv):
    p = OneLineParser(prog="python -m vitfood.evaluate", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run's model/ or checkpoint-<step>/ folder, a Hub model id, or an "
                                                  ".onnx file of vitfood.export")
    p.add_argument("--dataset", help="data set (Hub id, folder, or 'synthetic'); unset: the eval split of the "
                                     "model's own training run")
    p.add_argument("--split", help="split to evaluate, with --dataset (default: validation)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    p.add_argument("--label-separator", default=";", help="with --dataset: the character between an image's classes "
                                                          "in a text label column (multi-label)")
    p.add_argument("--batch-size", type=int, help="images per batch (unset: the run's eval batch, else 32)")
    p.add_argument("--precision", choices=["auto", *DTYPES], help="unset: the model's own (fp32 for a run's model/), "
                   "as transformers.pipeline and the ONNX export run it; auto: bf16 on a CPU with bf16 units, fp16 on "
                   "CUDA, faster")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=-1)
    p.add_argument("--mistakes", type=int, default=16, help="most confident mistakes to draw")
    p.add_argument("--threshold", type=float, help="multi-label: a class is predicted at a sigmoid score of at least "
                                                   "this (unset: the threshold the model holds, else the run's --threshold, else 0.5)")
    p.add_argument("--tta", default="none", choices=TTA, help="also score the probabilities averaged over views of each "
                   "image: flip (and its mirror image), flip+crops (and the four corner and the centre crops, 7/8 of "
                   "the side); the report gives the figures with and without")
    p.add_argument("--calibrate", action="store_true", help="fit one temperature on this split (minimising its NLL): "
                   "the ECE and NLL before and after, reliability.png, and in --output-dir/model a copy of the model "
                   "with the temperature folded into its last layer")
    p.add_argument("--target-accuracy", type=float, help="single-label: the top-score threshold whose answers reach "
                   "this accuracy on this split (the most answers that do), stored in the --output-dir/model copy "
                   "for vitfood.predict's 'unknown'")
    p.add_argument("--target-coverage", type=float, help="single-label: the same, for the threshold that keeps this "
                   "share of the answers")
    p.add_argument("--output-dir", help="where the results go (unset: eval-<model folder> beside it)")
    p.add_argument("--tensorboard", metavar="DIR", help="also log the results as a TensorBoard run in DIR")
    a = p.parse_args(argv)
    a.model = hub.run_model(a.model)  # a run folder stands for its model
    if a.batch_size is not None and a.batch_size < 1 or a.mistakes < 0:
        raise UserError("--batch-size must be positive and --mistakes not negative")
    check_option("threshold", a.threshold)  # vitfood.train's rules for the flags of the same names
    check_targets(a.target_accuracy, a.target_coverage)
    a.fits = a.calibrate or a.target_accuracy or a.target_coverage
    if a.fits and is_onnx(a.model):
        raise UserError("--calibrate and --target-* write a model: give the PyTorch model the export came from, then "
                        "export that")
    if is_onnx(a.model):  # onnxruntime on the CPU, in float32, as vitfood.export checked it
        if a.device not in ("auto", "cpu") or a.precision not in (None, "auto", "fp32"):
            raise UserError("an .onnx model runs on the CPU in fp32 (onnxruntime): leave --device and --precision unset")
        a.device, a.precision = "cpu", "fp32"
    return a


def data_options(a):
    """(the options the split is read with, whether it is the model's own run's eval split): --dataset's, or
    those of the run the model comes from."""
    saved = run_config_path(a.model) if is_path(a.model) else None
    if a.dataset:
        split = a.split or "validation"
        return resolve(dict(dataset=a.dataset, train_split=split, eval_split=split, image_column=a.image_column,
                            label_column=a.label_column, label_separator=a.label_separator, model=a.model)), False
    if not saved:
        raise UserError(f"{a.model} is not inside a vitfood run (no {RUN_CONFIG} beside it): pass --dataset and --split")
    if a.split:
        raise UserError("--split needs --dataset; without it the run's own eval split is used")
    return resolve({}, saved_run(saved)), True


def scored(a, split, device, precision, batch_size, threshold):
    """eval_pass's figures of the model on the split, the logits kept; and the split's size (for the warning about
    images that could not be read)."""
    train_tf, eval_tf, (mean, std) = transforms_for(split.processor, split.cfg.fast_decode)
    data = build_data(split.cfg, None, split.eval_ds, (train_tf, eval_tf), len(split.names), device,
                      num_workers(a.num_workers), eval_batch=batch_size, relabel=split.relabel)
    try:
        return eval_pass(split.model, data.eval_loader, device, precision, mean, std,
                         num_classes=len(split.model_names), mistakes=a.mistakes, multi_label=split.multi,
                         threshold=threshold, tta=a.tta, keep=True), len(data.eval_set)
    finally:
        data.close()


def output_dir(a):
    model_dir = os.path.abspath(os.path.expanduser(a.model))
    out = a.output_dir or (os.path.join(os.path.dirname(model_dir), f"eval-{os.path.basename(model_dir)}")
                           if is_path(a.model) else f"eval-{safe_name(a.model)}")
    os.makedirs(out, exist_ok=True)
    return out


def write_results(a, out, split, r, cal, unknown, precision, batch_size, threshold):
    """eval_results.json, per_class.csv, mistakes.png, and as they apply confusion_matrix.png, risk_coverage.csv,
    reliability.png and the calibrated model/ copy; returns (the results, the files written)."""
    cfg, names, multi, model = split.cfg, split.model_names, split.multi, split.model
    rows = report.per_class(r, names)
    report.write_csv(os.path.join(out, "per_class.csv"), rows)
    files = ["eval_results.json", "per_class.csv", "mistakes.png"]
    report.mistakes_image(r["mistakes"], names).save(os.path.join(out, "mistakes.png"))
    table = metrics.table(r)
    results = dict(model=a.model, dataset=cfg.dataset, split=cfg.eval_split or f"{cfg.train_split} (held out)",
                   precision=precision, batch_size=batch_size, **{m.result: r[m.key] for m in table},
                   eval_samples=r["samples"], skipped_images=r["skipped"], per_class=rows)
    scores = calibrate.probabilities(r["logits"], multi)
    results["ece"] = calibrate.reliability(*calibrate.confidence(scores, r["labels"], multi))[1]  # 15 bins
    if not multi:  # the risk-coverage curve: the answers kept above each top-score threshold, and their accuracy
        curve = calibrate.risk_coverage(*calibrate.confidence(scores, r["labels"], False))
        report.write_csv(os.path.join(out, "risk_coverage.csv"),
                         [dict(threshold=t, coverage=c, accuracy=acc) for t, c, acc in curve])
        files.append("risk_coverage.csv")
        results["coverage_at_accuracy"] = {f"{target:g}": (row[1] if (row := calibrate.threshold_for(curve, target))
                                                           else 0.0) for target in (0.9, 0.95, 0.99)}
    if cal:
        results["calibration"] = {k: v for k, v in cal.items() if not k.startswith("bins_")}
        calibrate.diagram(cal).save(os.path.join(out, "reliability.png"))
        files.append("reliability.png")
    if unknown:
        results.update(unknown_threshold=unknown[0], unknown_coverage=unknown[1], unknown_accuracy=unknown[2])
    if a.fits:  # a copy of the model that scores as fitted here: nothing of the model given is touched
        if calibrate.kept(cal) != 1:
            calibrate.fold(model, calibrate.kept(cal))
        calibrate.record(model.config, cal, unknown and unknown[0], threshold if multi else None)
        checkpoint.write_model(out, model, split.processor)
        files.append("model/")
    if "tta" in r:  # the same figures, of the probabilities averaged over the views
        results["tta"] = dict(mode=a.tta, views=r["tta"]["views"], **{m.result: r["tta"][m.key] for m in table})
    if multi:
        results.update(threshold=threshold)
    else:
        report.confusion_image(r["confusion"], names).save(os.path.join(out, "confusion_matrix.png"))
        files.insert(2, "confusion_matrix.png")
        results.update(correct=round(r["acc1"] * r["samples"]), confusion_matrix=r["confusion"])
    checkpoint.write_json_atomic(os.path.join(out, "eval_results.json"), results)
    return results, files


def summarize(a, out, split, r, results, files, cal, unknown, precision, threshold, split_size, own_run):
    """The console's account: the figures, per class for multi-label, calibration, the weakest classes, the files."""
    table, multi = metrics.table(r), split.multi
    if r["skipped"]:
        print(eval_skip_warning(r["skipped"], split_size))
    at = f", threshold {threshold:g}" if multi else ""
    print(f"{a.model} on {split.cfg.dataset} ({results['split']}, {r['samples']} images, {precision}{at}): "
          + "  ".join(f"{m.heading} {r[m.key]:.4f}" for m in table))
    if "tta" in r:
        print(f"with test-time augmentation ({a.tta}, {r['tta']['views']} views per image): "
              + "  ".join(f"{m.heading} {r['tta'][m.key]:.4f}" for m in table))
    if multi:
        print(report.per_class_markdown(results["per_class"]))
    print(f"expected calibration error (15 bins): {results['ece']:.4f}" + (
        "  coverage at accuracy " + ", ".join(f"{k}: {v:.1%}" for k, v in results["coverage_at_accuracy"].items())
        if not multi else ""))
    if cal:
        print(f"calibrated: {calibrate.summary(cal)}")
    if unknown:
        print(f"unknown below a top score of {unknown[0]:.4f}: {unknown[1]:.1%} of the images answered, "
              f"{unknown[2]:.1%} of them right (stored in {out}/model)")
    elif a.target_accuracy:
        print(f"no threshold reaches accuracy {a.target_accuracy:g} on this split: every image is answered")
    note = run_precision_differs(a.model, precision) if own_run else None
    if note:
        print(note)
    worst = sorted(results["per_class"], key=lambda x: x["f1"])[:3]
    print("lowest F1: " + ", ".join(f"{x['label']} {x['f1']:.3f}" for x in worst))
    print(f"results: {out}/ ({', '.join(files)})")
    if a.fits:  # the copy is what answers "unknown", not the model given
        print(f"use it: python -m vitfood.predict --model {shlex.quote(os.path.join(out, 'model'))} <images>")
    print(json.dumps({m.result: r[m.key] for m in table[:3]} | dict(samples=r["samples"])))


def run_precision_differs(model, precision):
    """For a run's model/ evaluated in another precision than its run's final eval ran in: the line that says
    why the figures differ from all_results.json's (in the third decimal, typically), and how to get the run's."""
    folder = os.path.normpath(os.path.abspath(os.path.expanduser(model)))
    try:
        with open(os.path.join(os.path.dirname(folder), "all_results.json")) as fh:
            theirs = json.load(fh).get("eval_precision")
    except (OSError, ValueError, AttributeError):
        return None
    if os.path.basename(folder) != checkpoint.MODEL or theirs in (None, precision):
        return None
    return (f"note: the run measured its figures (all_results.json) in {theirs}, these are in {precision}; "
            f"--precision {theirs} gives the run's")


def cli():
    run_main(main)


if __name__ == "__main__":
    cli()
