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

import transformers

from vitfood import calibrate, checkpoint, hub, metrics, report
from vitfood.common import DTYPES, UserError, model_precision, num_workers, pick_device, resolve_precision, run_main, \
    safe_name
from vitfood.config import RUN_CONFIG, OneLineParser, resolve, run_config_path, saved_run
from vitfood.data import build_data, eval_skip_warning
from vitfood.exported import is_onnx
from vitfood.hub import is_path
from vitfood.images import TTA, transforms_for
from vitfood.logs import eval_records
from vitfood.model import hub_model, load_for_inference, read_config
from vitfood.rundir import model_step
from vitfood.sources import hub_dataset, is_multi_label, load_splits
from vitfood.steps import eval_pass


def main(argv=None):
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
    if a.threshold is not None and not 0 < a.threshold < 1:
        raise UserError(f"--threshold must be between 0 and 1, got {a.threshold}")
    for name in ("target_accuracy", "target_coverage"):
        if getattr(a, name) is not None and not 0 < getattr(a, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(a, name)}")
    if a.target_accuracy is not None and a.target_coverage is not None:
        raise UserError("--target-accuracy and --target-coverage exclude each other: give one")
    fits = a.calibrate or a.target_accuracy or a.target_coverage
    if fits and is_onnx(a.model):
        raise UserError("--calibrate and --target-* write a model: give the PyTorch model the export came from, then "
                        "export that")

    saved = run_config_path(a.model) if is_path(a.model) else None
    if a.dataset:
        split = a.split or "validation"
        cfg = resolve(dict(dataset=a.dataset, train_split=split, eval_split=split, image_column=a.image_column,
                           label_column=a.label_column, label_separator=a.label_separator, model=a.model))
    elif saved:
        cfg = resolve({}, saved_run(saved))
        if a.split:
            raise UserError("--split needs --dataset; without it the run's own eval split is used")
    else:
        raise UserError(f"{a.model} is not inside a vitfood run (no {RUN_CONFIG} beside it): "
                        "pass --dataset and --split")
    if is_onnx(a.model):  # onnxruntime on the CPU, in float32, as vitfood.export checked it
        if a.device not in ("auto", "cpu") or a.precision not in (None, "auto", "fp32"):
            raise UserError("an .onnx model runs on the CPU in fp32 (onnxruntime): leave --device and --precision unset")
        a.device, a.precision = "cpu", "fp32"
    device = pick_device(a.device)
    own_run = saved and not a.dataset  # the run's own eval split: its eval batch and attention
    precision = resolve_precision(a.precision, device) if a.precision else None
    batch_size = a.batch_size or (cfg.eval_batch(device) if own_run else 32)
    hub.prepare(hub_dataset(cfg.dataset), hub_model(a.model))  # before the data: a missing model fails fast
    if a.dataset:  # a multi-label model reads a data set's single labels as lists of one
        cfg.multi_label = getattr(read_config(a.model), "problem_type", None) == "multi_label_classification"
    _, eval_ds, names = load_splits(cfg, log=lambda *args: None)  # then data: a wrong split fails fast
    transformers.utils.logging.disable_progress_bar()
    model, processor = load_for_inference(a.model, device, cfg.attn if own_run else "auto")
    precision = precision or model_precision(model, device)
    model_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if names != model_names and sorted(names) != sorted(model_names):
        raise UserError(f"the model's {len(model_names)} labels ({', '.join(model_names[:5])}, ...) are not "
                        f"the data set's {len(names)} classes ({', '.join(names[:5])}, ...)")
    multi = model.config.problem_type == "multi_label_classification"
    calibrate.check(multi, a.target_accuracy, a.target_coverage)
    if multi != is_multi_label(eval_ds, cfg.label_column):
        raise UserError(f"{a.model} is a {'multi' if multi else 'single'}-label classifier, and the data set's "
                        f"label column {cfg.label_column!r} holds {'one class' if multi else 'a list of classes'} per image")
    train_tf, eval_tf, (mean, std) = transforms_for(processor, cfg.fast_decode)
    data = build_data(cfg, None, eval_ds, (train_tf, eval_tf), len(names), device, num_workers(a.num_workers),
                      eval_batch=batch_size, relabel=[model_names.index(n) for n in names])  # same classes, any order
    step = model_step(a.model) if a.tensorboard else 0  # read before a rotation can take the checkpoint away
    threshold = a.threshold if a.threshold is not None else calibrate.label_threshold(model.config, cfg.threshold)
    r = eval_pass(model, data.eval_loader, device, precision, mean, std, num_classes=len(model_names),
                  mistakes=a.mistakes, multi_label=multi, threshold=threshold, tta=a.tta, keep=True)
    data.close()
    cal, unknown = calibrate.fitted(r["logits"], r["labels"], multi, "temperature" if a.calibrate else "none",
                                    a.target_accuracy, a.target_coverage)
    scores = calibrate.probabilities(r["logits"], multi)
    raw, ece = calibrate.reliability(*calibrate.confidence(scores, r["labels"], multi))

    model_dir = os.path.abspath(os.path.expanduser(a.model))
    out = a.output_dir or (os.path.join(os.path.dirname(model_dir), f"eval-{os.path.basename(model_dir)}")
                           if is_path(a.model) else f"eval-{safe_name(a.model)}")
    os.makedirs(out, exist_ok=True)
    rows = report.per_class(r, model_names)
    report.write_csv(os.path.join(out, "per_class.csv"), rows)
    files = ["eval_results.json", "per_class.csv", "mistakes.png"]
    report.mistakes_image(r["mistakes"], model_names).save(os.path.join(out, "mistakes.png"))
    table = metrics.table(r)
    results = dict(model=a.model, dataset=cfg.dataset, split=cfg.eval_split or f"{cfg.train_split} (held out)",
                   precision=precision, batch_size=batch_size, **{m.result: r[m.key] for m in table},
                   eval_samples=r["samples"], skipped_images=r["skipped"], per_class=rows)
    results["ece"] = ece  # of the scores as the model gives them (15 bins)
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
    if fits:  # a copy of the model that scores as fitted here: nothing of the model given is touched
        if calibrate.kept(cal) != 1:
            calibrate.fold(model, calibrate.kept(cal))
        calibrate.record(model.config, cal, unknown and unknown[0], threshold if multi else None)
        checkpoint.export(out, model, processor)
        files.append("model/")
    if "tta" in r:  # the same figures, of the probabilities averaged over the views
        results["tta"] = dict(mode=a.tta, views=r["tta"]["views"], **{m.result: r["tta"][m.key] for m in table})
    if multi:
        results.update(threshold=threshold)
    else:
        report.confusion_image(r["confusion"], model_names).save(os.path.join(out, "confusion_matrix.png"))
        files.insert(2, "confusion_matrix.png")
        results.update(correct=round(r["acc1"] * r["samples"]), confusion_matrix=r["confusion"])
    checkpoint.write_json_atomic(os.path.join(out, "eval_results.json"), results)
    if a.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(a.tensorboard) as w:
            eval_records(w, step, r, model_names, mistakes=4)
    if r["skipped"]:
        print(eval_skip_warning(r["skipped"], len(data.eval_set)))
    at = f", threshold {threshold:g}" if multi else ""
    print(f"{a.model} on {cfg.dataset} ({results['split']}, {r['samples']} images, {precision}{at}): "
          + "  ".join(f"{m.heading} {r[m.key]:.4f}" for m in table))
    if "tta" in r:
        print(f"with test-time augmentation ({a.tta}, {r['tta']['views']} views per image): "
              + "  ".join(f"{m.heading} {r['tta'][m.key]:.4f}" for m in table))
    if multi:
        print(report.per_class_markdown(rows))
    print(f"expected calibration error (15 bins): {ece:.4f}" + (
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
    worst = sorted(rows, key=lambda x: x["f1"])[:3]
    print("lowest F1: " + ", ".join(f"{x['label']} {x['f1']:.3f}" for x in worst))
    print(f"results: {out}/ ({', '.join(files)})")
    if fits:  # the copy is what answers "unknown", not the model given
        print(f"use it: python -m vitfood.predict --model {shlex.quote(os.path.join(out, 'model'))} <images>")
    print(json.dumps({m.result: r[m.key] for m in table[:3]} | dict(samples=r["samples"])))
    return results


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
