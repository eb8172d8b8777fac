"""Take a trained model out of PyTorch: to ONNX (and with --int8 also to int8), each export checked on the
run's own eval split before it is handed over.

    python -m vitfood.export runs/<run>                     # runs/<run>/export/, from the run's model/
    python -m vitfood.export runs/<run> --int8              # also model-int8.onnx, kept within --max-int8-drop
    python -m vitfood.export runs/<run> --checkpoint best   # or last, or checkpoint-<step>
    python -m vitfood.predict --model runs/<run>/export/model.onnx photos/

RUN_DIR/export/ holds what a deployment needs: model.onnx (input `pixel_values`, float32, (batch, 3, height,
width): the image resized, scaled to 0-1 and normalized as preprocessor_config.json says; output `logits`),
config.json and labels.txt (the classes, single- or multi-label), preprocessor_config.json, parity.json and a
README.md with the figures.

The parity gate: onnxruntime runs the file on the run's eval split through the export folder's own
preprocessing, PyTorch runs the model through the run's, and the two must pick the same class for at least
99.9% of the images (the same set of classes, for multi-label) with no probability more than 1e-3 apart. Each
one's score (top-1, or mAP), latency at batch 1, images/s at batch 32 on this CPU and file size go to
parity.json and the model card. The int8 file is refused when its score is more than --max-int8-drop below
PyTorch's beyond what the eval split's size leaves to chance: the drop's 95% interval (a paired bootstrap over the
eval images) lies wholly above --max-int8-drop. On 48 images one changed answer is a drop of 0.021, which says
little; on 500 images a drop of 0.03 is refused.

Exit status: 0 exported; 1 the fp32 model exported and the int8 file refused by --max-int8-drop (kept aside);
2 a usage error, a model that does not export, or an export the gate refused (its folder kept aside as
export-rejected-<time>/, never deleted).
"""

import vitfood
import vitfood.stack

if __name__ == "__main__":
    vitfood.quiet_ctrl_c()  # before the heavy imports below
vitfood.stack.require(__name__)  # a broken install (a torchvision built for another torch) is one line, no traceback

import argparse
import datetime
import glob
import json
import os
import shutil
import sys
import time

import torch
import transformers

from vitfood import adapt, calibrate, checkpoint, hub, measure, metrics, onnxfile
from vitfood.common import UserError, num_workers, run_main
from vitfood.config import RUN_CONFIG, OneLineParser, resolve, saved_run
from vitfood.data import build_data
from vitfood.images import normalize, transforms_for
from vitfood.model import NAMED, build_model, hub_model, load_for_inference
from vitfood.evalsplit import class_order, open_eval
from vitfood.rundir import model_step
from vitfood.seal import check_intact, seal_folder
from vitfood.sources import hub_dataset

AGREEMENT, MAX_PROB_DIFF = 0.999, 1e-3  # the gate for the fp32 file
RESAMPLES, MULTI_RESAMPLES = 1000, 200  # the int8 gate's bootstrap (single-label, multi-label)
EXPORT, FP32, INT8 = "export", "model.onnx", "model-int8.onnx"
CPU = torch.device("cpu")


def main(argv=None):
    a = parse_args(argv)
    onnxfile.need()
    run = os.path.abspath(os.path.expanduser(a.run_dir))
    if not os.path.isfile(os.path.join(run, RUN_CONFIG)):
        raise UserError(f"{a.run_dir} is not a vitfood run (no {RUN_CONFIG} in it)")
    cfg = resolve({}, saved_run(os.path.join(run, RUN_CONFIG)))
    source, step = pick(run, a.checkpoint)
    lora = is_adapter(source)
    hub.prepare(hub_dataset(cfg.dataset), hub_model(cfg.model) if lora else None, cfg.trust_remote_code)
    transformers.utils.logging.disable_progress_bar()
    split = open_eval(cfg, source, lambda names, multi: load(cfg, source, names, multi, lora), a.max_images)
    cfg, model, processor, eval_ds = split.cfg, split.model, split.processor, split.eval_ds
    names, model_names, multi = split.names, split.model_names, split.multi
    not_finite = next((k for k, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()), None)
    if not_finite:  # else the gate would compare NaN with NaN and call it a disagreement
        raise UserError(f"{shown(source)}'s weights are not finite ({not_finite} holds NaN or inf): nothing to export; "
                        "export a checkpoint from before it diverged (--checkpoint checkpoint-<step>)")
    clear_leftovers(run)
    need = room_needed(model, a.int8)
    if shutil.disk_usage(run).free < need:  # before anything is written: the run folder stays as it is
        raise UserError(disk_full(run, need))

    tmp = os.path.join(run, f"{EXPORT}.tmp-{os.getpid()}")
    os.makedirs(tmp)
    try:
        t0 = time.perf_counter()
        print(f"export: {shown(source)} (step {step}) to ONNX opset {a.opset}, torch.onnx's dynamo exporter")
        try:
            write_files(tmp, model, processor, model_names, a)
        except (UserError, OSError) as e:
            # a disk filled while writing surfaces as the exporter's error, or as onnxruntime's on a file cut short
            shutil.rmtree(tmp, ignore_errors=True)
            if "No space left on device" in str(e) or shutil.disk_usage(run).free < need:
                raise UserError(disk_full(run, need)) from None
            raise
        print(f"written in {time.perf_counter() - t0:.1f} s; the parity gate on the eval split ({len(eval_ds)} images)")
        parity = gate(cfg, model, processor, tmp, eval_ds, names, model_names, multi, a)
        parity.update(source=shown(source, run), step=step, opset=a.opset, exporter="torch.onnx.export, dynamo=True")
        checkpoint.write_json_atomic(os.path.join(tmp, "parity.json"), parity)
        card = os.path.join(source, "README.md")  # the run's model card, and the export's figures after it
        head = open(card).read() if os.path.isfile(card) else f"# {os.path.basename(run)}\n"
        write_text(os.path.join(tmp, "README.md"), head.rstrip("\n") + "\n\n" + card_section(parity))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print_table(parity)
    hand_over(run, tmp, parity, a.max_int8_drop)
    return parity


def parse_args(argv):
    p = OneLineParser(prog="python -m vitfood.export", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a vitfood run's folder (runs/<run>)")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--int8", action="store_true", help="also an int8 model-int8.onnx (onnxruntime's dynamic quantization)")
    p.add_argument("--opset", type=int, default=onnxfile.OPSET, help="ONNX opset (default: %(default)s)")
    p.add_argument("--checkpoint", default="model",
                   help="what to export: model (the run's model/ folder, default), best, last, or checkpoint-<step>")
    p.add_argument("--max-int8-drop", type=float, default=0.01,
                   help="the int8 file is refused when its score (top-1, or mAP) is more than this below PyTorch's "
                        "with 95%% confidence over the eval images (a paired bootstrap)")
    p.add_argument("--max-images", type=int, help="check on the first N images of the eval split (default: all)")
    p.add_argument("--num-workers", type=int, default=-1)
    a = p.parse_args(argv)
    if not 9 <= a.opset <= 23:
        raise UserError(f"--opset {a.opset}: the exporter writes opsets 9 to 23")
    if not 0 <= a.max_int8_drop <= 1 or (a.max_images is not None and a.max_images < 1):
        raise UserError("--max-int8-drop must be between 0 and 1, and --max-images positive")
    return a


def write_files(folder, model, processor, model_names, a):
    """model.onnx (and model-int8.onnx), the config, the labels and the image processor, into `folder`."""
    size = transforms_for(processor)[1].size  # what the eval transform gives the model
    onnxfile.to_onnx(model, os.path.join(folder, FP32), size, a.opset)
    if a.int8:
        onnxfile.to_int8(os.path.join(folder, FP32), os.path.join(folder, INT8))
    model.config.save_pretrained(folder)  # the labels and the problem type
    processor.save_pretrained(folder)
    with open(os.path.join(folder, "labels.txt"), "w") as fh:
        fh.write("".join(f"{n}\n" for n in model_names))


def room_needed(model, int8):
    """Bytes an export writes, about: model.onnx holds the fp32 weights, model-int8.onnx a quarter of them, and
    the configs, labels and figures 1 MB at most."""
    weights = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    return int(weights * (1.25 if int8 else 1.0)) + 2 ** 20


def disk_full(run, need):
    free = shutil.disk_usage(run).free
    return (f"cannot export into {shown(run)}: the disk holding it is full ({free / 2 ** 20:.1f} MB free; the export "
            f"needs about {need / 2 ** 20:.1f} MB); nothing was written, the run folder is as it was")


def hand_over(run, tmp, parity, max_int8_drop):
    """The gate's verdict: `tmp` becomes RUN_DIR/export/, or is kept aside when the fp32 file failed (exit 2);
    an int8 file beyond `max_int8_drop` is kept aside and the rest handed over (exit 1)."""
    fp32, int8 = parity["models"]["onnx"], parity["models"].get("onnx_int8")
    if not fp32["passed"]:
        aside = set_aside(run)
        os.replace(tmp, aside)
        raise UserError(f"the ONNX model disagrees with PyTorch on the eval split (agreement {fp32['agreement']:.2%}, "
                        f"need {AGREEMENT:.1%}; largest probability difference {fp32['max_prob_diff']:.2g}, "
                        f"allowed {MAX_PROB_DIFF:g}): not exported; the files are in {shown(aside)}/")
    refused = int8 is not None and not int8["passed"]
    if refused:
        aside = set_aside(run)
        os.makedirs(aside)
        os.replace(os.path.join(tmp, INT8), os.path.join(aside, INT8))
        shutil.copy(os.path.join(tmp, "parity.json"), aside)
    final = os.path.join(run, EXPORT)
    install(tmp, final)
    print(f"exported: {shown(final)}/ ({', '.join(sorted(os.listdir(final)))})")
    if int8 is not None and not refused:
        print(int8_verdict(parity))
    if refused:
        low = int8["drop_interval"][0]
        print(f"error: the int8 model's {parity['score_name']} is {int8['accuracy_drop']:.4f} below PyTorch's on "
              f"{parity['images']} images (at least {low:.4f} with 95% confidence), more than --max-int8-drop "
              f"{max_int8_drop:g}: not kept in {EXPORT}/; the file is in {shown(aside)}/", file=sys.stderr)
        sys.exit(1)


def set_aside(run):
    """A new folder name for an export the gate refused: export-rejected-<time>."""
    base = os.path.join(run, f"{EXPORT}-rejected-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base, 1
    while os.path.exists(path):
        path, n = f"{base}-{n}", n + 1
    return path


def pick(run, which):
    """(folder, step) of what to export: the run's model/, its best or last checkpoint, or checkpoint-<step>."""
    if which == "model":
        path = os.path.join(run, checkpoint.MODEL)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{run} has no finished model/ folder yet: export a checkpoint (--checkpoint last or best)")
        return path, model_step(path)
    found = dict(checkpoint.complete_checkpoints(run))
    if which == "last":
        if not found:
            raise UserError(f"{run} holds no complete checkpoint")
        step = max(found)
    elif which == "best":
        try:
            with open(os.path.join(run, checkpoint.BEST)) as fh:
                step = int(json.load(fh)["step"])
        except (OSError, ValueError, KeyError):
            raise UserError(f"{run} has no best checkpoint recorded ({checkpoint.BEST}): no eval has run") from None
    else:
        m = checkpoint.NAME.match(which)
        if not m:
            raise UserError(f"--checkpoint {which}: use model, best, last or checkpoint-<step>")
        step = int(m.group(1))
    if step not in found:
        have = ", ".join(f"checkpoint-{s}" for s in sorted(found)) or "none"
        raise UserError(f"--checkpoint {which}: checkpoint-{step} is not a complete checkpoint of {run} (complete: {have})")
    return found[step], step


def is_adapter(path):
    """A LoRA run's checkpoint: the adapters and the head, no whole model."""
    return os.path.isfile(os.path.join(path, "adapter_model.safetensors")) and \
        not os.path.isfile(os.path.join(path, "config.json"))


def load(cfg, path, names, multi, lora):
    """(fp32 model in eval mode on the CPU, processor). A LoRA checkpoint is loaded into its base model as it
    trained and the adapters merged, as the run's model/ is."""
    if not lora:
        return load_for_inference(path, CPU)
    check_intact(path)
    if cfg.model in NAMED:
        raise UserError(f"{shown(path)} holds LoRA adapters over {cfg.model}, a randomly initialised base that no file "
                        "keeps: export the run's model/ (the adapters merged by training) instead")
    model, processor = build_model(cfg, names, CPU, multi_label=multi)
    adapt.load_adapter(model, path)
    return adapt.merged(model).eval(), processor


@torch.inference_mode()
def outputs(models, processor, cfg, eval_ds, names, model_names, workers):
    """Each of `models`' logits over the eval split, decoded and normalized as `processor` says, and the labels
    (in the models' class order)."""
    _, eval_tf, (mean, std) = transforms_for(processor)
    # the run's eval batch, as vitfood.evaluate reads it: int8's activations are scaled per batch, so its
    # figures depend on the batch
    data = build_data(cfg, None, eval_ds, (None, eval_tf), len(names), CPU, workers, eval_batch=cfg.eval_batch(CPU),
                      relabel=class_order(model_names, names))
    logits, labels = [[] for _ in models], []
    try:
        for raw, y, _ in data.eval_loader:
            if not len(y):
                continue
            x = normalize(raw, mean, std)
            for out, model in zip(logits, models):
                out.append(model(pixel_values=x).logits.float())
            labels.append(y)
    finally:
        data.close()
    if not labels:
        raise UserError("no readable image in the eval split to check the export on")
    return [torch.cat(out) for out in logits], torch.cat(labels), x


def gate(cfg, model, processor, folder, eval_ds, names, model_names, multi, a):
    """parity.json's figures: PyTorch against each ONNX file in `folder`, on the eval split."""
    import onnxruntime
    threads = torch.get_num_threads()
    files = [f for f in (FP32, INT8) if os.path.isfile(os.path.join(folder, f))]
    sessions = [onnxfile.load(os.path.join(folder, f), threads)[0] for f in files]
    workers = num_workers(a.num_workers)
    (ref,), labels, images = outputs([model], processor, cfg, eval_ds, names, model_names, workers)
    # the export folder's own preprocessing, as a deployment reads it
    onnx_processor = transformers.AutoImageProcessor.from_pretrained(folder)
    outs, _, onnx_images = outputs(sessions, onnx_processor, cfg, eval_ds, names, model_names, workers)
    threshold = calibrate.label_threshold(model.config, cfg.threshold)  # the model's own, on its own scores
    score = lambda logits, truth=labels: scored_by(logits, truth, multi, threshold, len(model_names))
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    models = dict(pytorch=dict(file=None, score=score(ref), size_mb=weights / 2 ** 20,
                               **measure.inference_speed(model, images)))
    for f, session, out in zip(files, sessions, outs):
        row = dict(file=f, score=score(out), size_mb=os.path.getsize(os.path.join(folder, f)) / 2 ** 20,
                   **agreement(ref, out, multi, threshold), **measure.inference_speed(session, onnx_images))
        row["accuracy_drop"] = models["pytorch"]["score"] - row["score"]
        if f == FP32:
            row["passed"] = row["agreement"] >= AGREEMENT and row["max_prob_diff"] <= MAX_PROB_DIFF
        else:
            row["drop_interval"] = drop_interval(ref, out, labels, score, multi)
            row["passed"] = row["drop_interval"][0] <= a.max_int8_drop
        models["onnx" if f == FP32 else "onnx_int8"] = row
    return dict(models=models, score_name=metrics.scored(metrics.rows_for(multi)).heading, images=len(labels),
                skipped=len(eval_ds) - len(labels), dataset=cfg.dataset,
                split=cfg.eval_split or f"{cfg.train_split} (held out)", multi_label=multi,
                threshold=threshold if multi else None,
                gate=dict(agreement=AGREEMENT, max_prob_diff=MAX_PROB_DIFF, max_int8_drop=a.max_int8_drop),
                machine=dict(cpu=onnxfile.cpu_name(), threads=threads, torch=torch.__version__,
                             onnxruntime=onnxruntime.__version__, transformers=transformers.__version__),
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def drop_interval(ref, out, labels, score, multi):
    """The 95% interval of score(ref) - score(out) over the images the two were run on: a paired bootstrap (each
    resample the same images for both models), seeded, so the verdict depends on the images and the models only.
    Top-1 is a mean over images, so its resamples are one gather; a multi-label mAP is scored again per resample
    (MULTI_RESAMPLES of them: about 20 ms each on 500 images)."""
    g = torch.Generator().manual_seed(0)
    n = len(labels)
    if not multi:
        right = lambda logits: (logits.argmax(1) == labels).double()
        picks = torch.randint(0, n, (RESAMPLES, n), generator=g)
        drops = (right(ref) - right(out))[picks].mean(1)
    else:
        picks = torch.randint(0, n, (MULTI_RESAMPLES, n), generator=g)
        drops = torch.tensor([score(ref[i], labels[i]) - score(out[i], labels[i]) for i in picks], dtype=torch.float64)
    low, high = torch.quantile(drops, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [low, high]


def int8_verdict(parity):
    """One line for a kept int8 file: what the gate measured (a refused one has its error line)."""
    int8, allowed = parity["models"]["onnx_int8"], parity["gate"]["max_int8_drop"]
    low, high = int8["drop_interval"]
    return (f"int8 gate: {parity['score_name']} {int8['accuracy_drop']:+.4f} below PyTorch's on {parity['images']} "
            f"images (95% interval {low:+.4f} to {high:+.4f}): kept, no evidence of a drop beyond --max-int8-drop "
            f"{allowed:g}")


def scored_by(logits, labels, multi, threshold, k):
    """The eval's score of these logits: top-1 accuracy, or for multi-label the macro mAP."""
    meter = metrics.MultiLabel(k, CPU, threshold) if multi else metrics.SingleLabel(k, CPU)
    meter.add(logits, labels, None)
    return metrics.score(meter.result(len(labels)))


def agreement(ref, out, multi, threshold):
    """The share of images on which both models decide alike (the top class; for multi-label the set of classes
    at `threshold`) and the largest difference between their probabilities."""
    p, q = (x.sigmoid() if multi else x.softmax(-1) for x in (ref, out))
    same = ((p >= threshold) == (q >= threshold)).all(1) if multi else p.argmax(1) == q.argmax(1)
    return dict(agreement=same.double().mean().item(), max_prob_diff=(p - q).abs().max().item())


NAMES = dict(pytorch="PyTorch fp32", onnx="ONNX fp32", onnx_int8="ONNX int8")


def card_section(parity):
    """The model card's section on the export: one row per model."""
    m = parity["machine"]
    lines = ["## ONNX export", "",
             f"`export/` holds the model as ONNX (opset {parity['opset']}, {parity['exporter']}), from "
             f"`{parity['source']}` (step {parity['step']}), checked on the eval split ({parity['images']} images of "
             f"`{parity['dataset']}`, {parity['split']}) against the PyTorch model. Latency and throughput on "
             f"{m['cpu']}, {m['threads']} threads (onnxruntime {m['onnxruntime']}, torch {m['torch']}).", "",
             f"| model | file | {parity['score_name']} | agreement | largest probability difference | "
             "latency, batch 1 | images/s, batch 32 | size |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, r in parity["models"].items():
        kept = "" if r.get("passed", True) else " (refused)"
        compared = f"{r['agreement']:.2%} | {r['max_prob_diff']:.1e}" if "agreement" in r else "- | -"
        lines.append(f"| {NAMES[key]}{kept} | {r['file'] or 'model.safetensors'} | {r['score']:.4f} | {compared} | "
                     f"{r['latency_ms']:.1f} ms | {r['img_s']:.0f} | {r['size_mb']:.1f} MB |")
    return "\n".join(lines) + "\n"


def print_table(parity):
    print(f"parity on {parity['dataset']} ({parity['split']}, {parity['images']} images):")
    for key, r in parity["models"].items():
        vs = f"  agreement {r['agreement']:.2%}  max |dp| {r['max_prob_diff']:.1e}" if "agreement" in r else ""
        print(f"  {NAMES[key]:<13} {parity['score_name']} {r['score']:.4f}{vs}  batch 1 {r['latency_ms']:.1f} ms  "
              f"batch 32 {r['img_s']:.0f} img/s  {r['size_mb']:.1f} MB")


def shown(path, start=None):
    """`path` for a message: relative to `start` (default: the working folder) when inside it, else absolute."""
    rel = os.path.relpath(path, start)
    return path if rel.startswith("..") else rel


def write_text(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def clear_leftovers(run):
    """What an export killed midway left: its unfinished folder, or a finished one it had not yet swapped in."""
    for path in glob.glob(os.path.join(run, f"{EXPORT}.*-*")):
        pid = path.rsplit("-", 1)[1]
        if pid.isdigit() and not alive(int(pid)):
            if ".old-" in path and not os.path.isdir(os.path.join(run, EXPORT)):
                os.replace(path, os.path.join(run, EXPORT))  # killed between the two renames of install()
            else:
                shutil.rmtree(path, ignore_errors=True)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def install(tmp, final):
    """`tmp` becomes `final`, its files synced and listed in SHA256SUMS; an earlier export there is replaced (its
    folder renamed away first, so that a kill leaves one of the two whole)."""
    seal_folder(tmp)
    old = f"{final}.old-{os.getpid()}"
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def cli():
    """Console entry point `vitfood-export`, the same as `python -m vitfood.export`."""
    run_main(main)


if __name__ == "__main__":
    cli()
