"""Where does fine-tuning time go on this machine? Throughput of each part, measured with vitfood's own builders.

    python -m vitfood.bench --preset demo --quick       # offline, under a minute on 2 CPU cores
    python -m vitfood.bench --preset demo --modes model --batch-sizes 16,32,64 --precisions fp32,bf16
    python -m vitfood.bench --model google/vit-base-patch16-224-in21k --dataset food101 --out bench.json

Modes (all by default):
  data   images/s of the training input pipeline alone (decode, augment, collate) per worker count
  model  a full training step on tensors already on the device: images/s, ms/step, peak memory,
         achieved FLOP/s and MFU against the dense matmul peak measured here, for the same dtype
  memory each way to train in a fresh process (full, frozen, LoRA, gradient checkpointing), and each process
         of a 2-process torchrun job with DDP and with --fsdp: what it holds (weights, gradients, optimizer
         state), activations, peak memory
  e2e    the real step fed by the real loader: images/s and the share of time waiting for data
  loop   vitfood.train's whole loop (a child process) against the bare step: the loop's own cost
  eval   inference images/s over the eval split
  save   how long a checkpoint save holds up the loop (the copy to host memory, and steps slowed down
         while the write runs in the background), against the time a synchronous write takes
  export the model as vitfood.export writes it (ONNX fp32 and int8, onnxruntime) against eager PyTorch
         fp32 on the CPU: latency at batch 1, images/s at batch 32, file size (needs vitfood[export])
Takes every vitfood.train option (--preset, --model, --dataset, --batch-size, ...). Warm-up is never
timed, device work is synchronized before clocks are read, figures are medians over repeats.
The table goes to stdout; its last line is one JSON document with every figure.
"""

import vitfood
import vitfood.stack

if __name__ == "__main__":
    vitfood.quiet_ctrl_c()  # before the heavy imports below
vitfood.stack.require(__name__)  # a broken install (a torchvision built for another torch) is one line, no traceback

import argparse
import datetime
import itertools
import json
import math
import os
import platform

import torch
import transformers

from vitfood import hub, measure, measure_save, onnxfile
from vitfood.common import DTYPES, UserError, env_info, num_workers, pick_device, resolve_precision, run_main
from vitfood.config import build_parser, resolve
from vitfood.data import build_data
from vitfood.images import transforms_for
from vitfood.model import build_model, hub_model, resolve_attn, vit_flops_per_image
from vitfood.sources import hub_dataset, load_splits

MODES = ("data", "model", "levers", "memory", "e2e", "loop", "eval", "save", "export")
QUICK = ("data", "model", "levers", "e2e", "eval", "save")  # --quick: the modes that start no other process
STEP_MODES = ("eager", "compile", "graph", "graph+compile")


def parse_args(argv=None):
    p = build_parser(run=False)
    p.prog, p.description = "python -m vitfood.bench", __doc__
    g = p.add_argument_group("bench")
    g.add_argument("--modes", default="all", help=f"comma list of {','.join(MODES)}, or all")
    g.add_argument("--quick", action="store_true", help="few repeats, small sweep, no compile, and of all modes those "
                   "that start no other process (not memory or loop): under a minute")
    g.add_argument("--batch-sizes", help="comma list for the model sweep (default: --batch-size; full: x1, x2, x4)")
    g.add_argument("--precisions", help=f"comma list of {','.join(DTYPES)} (default: every one the device runs)")
    g.add_argument("--compile-modes", help="comma list of how the step runs: eager, compile (torch.compile), graph "
                   "(the whole step as one CUDA graph), graph+compile (default: eager,compile, and graph on CUDA; "
                   "--quick: eager); off and on mean eager and compile")
    g.add_argument("--attns", help="comma list of sdpa,eager (default: sdpa,eager; --quick: --attn)")
    g.add_argument("--worker-counts", help="comma list of DataLoader worker counts for data mode")
    g.add_argument("--decode-modes", default="fast,full", help="comma list of fast,full: the JPEG decode path in data mode")
    g.add_argument("--steps", type=int, help="timed steps per repeat")
    g.add_argument("--repeats", type=int, help="repeats; the median is reported")
    g.add_argument("--out", help="the JSON document's file (default: runs/bench-<date>-<time>.json)")
    g.add_argument("--json", action="store_true", help="also print the JSON document as the last line, for scripts")
    g.add_argument("--profile", action="store_true", help="write a torch.profiler trace (Chrome/Perfetto JSON) of e2e steps")
    args = vars(p.parse_args(argv))
    bench = {k: args.pop(k, None) for k in ["modes", "quick", "batch_sizes", "precisions", "compile_modes", "attns",
                                             "worker_counts", "decode_modes", "steps", "repeats", "out", "json",
                                             "profile"]}
    return resolve(args), argparse.Namespace(**bench)


def _list(text, cast=str):
    return [cast(v) for v in text.split(",") if v.strip()] if text else None


def plan(cfg, b, device, precision):
    """What the sweep covers: the --modes, steps, repeats, precisions, batch sizes, step modes, attentions, worker
    counts and decode paths asked for, or their defaults (a shorter set with --quick)."""
    quick = b.quick
    modes = (QUICK if quick else MODES) if b.modes == "all" else tuple(_list(b.modes))
    for m in modes:
        if m not in MODES:
            raise UserError(f"--modes: unknown mode {m!r}; use {', '.join(MODES)} or all")
    if "export" in modes:
        try:
            onnxfile.need("--modes export")
        except UserError:
            if b.modes != "all":
                raise
            modes = tuple(m for m in modes if m != "export")  # all: those this install can run
            print("note: no export mode: it needs the export extra (pip install 'vitfood[export]')")
    precisions = _list(b.precisions) or ([precision] if quick else  # fp16 runs on CUDA alone
                                         [p for p in DTYPES if device.type == "cuda" or p != "fp16"])
    for p in precisions:
        resolve_precision(p, device)  # refuses fp16 on the CPU, bf16 on old GPUs
    compiles = _list(b.compile_modes) or (["eager"] if quick else ["eager", "compile"] + ["graph"] * (device.type == "cuda"))
    compiles = [{"off": "eager", "on": "compile"}.get(m, m) for m in compiles]
    for m in compiles:
        if m not in STEP_MODES:
            raise UserError(f"--compile-modes: unknown mode {m!r}; use {', '.join(STEP_MODES)} (off/on: eager/compile)")
        if "graph" in m and device.type != "cuda":
            raise UserError(f"--compile-modes {m}: a CUDA graph needs a CUDA device")
    workers = num_workers(cfg.num_workers)
    return argparse.Namespace(
        modes=modes, quick=quick, steps=b.steps or (3 if quick else 10), repeats=b.repeats or (2 if quick else 5),
        precisions=precisions, compiles=compiles, workers=workers, decodes=[v == "fast" for v in _list(b.decode_modes)],
        batch_sizes=_list(b.batch_sizes, int) or ([cfg.batch_size] if quick else [cfg.batch_size * k for k in (1, 2, 4)]),
        attns=_list(b.attns) or ([resolve_attn(cfg.attn, device)] if quick else ["sdpa", "eager"]),
        worker_counts=_list(b.worker_counts, int) or sorted({0, workers} if quick else
                                                            {0, workers, min(os.cpu_count() or 1, 2 * workers)}),
        profile_dir=os.path.join("runs", f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}") if b.profile else None)


def data_mode(x):
    print("\n[data] training input pipeline alone (decode + augment + collate + normalize); decode: 'fast' "
          "decodes JPEGs at reduced scale when the crop allows (--fast-decode), 'full' always at full size")
    print(f"{'workers':>8} {'decode':>7} {'img/s':>10} {'img/s/core':>11}")
    rows = []
    for w, fast in itertools.product(x.sweep.worker_counts, x.sweep.decodes):
        r = dict(workers=w, decode="fast" if fast else "full", **measure.bench_data(
            x.data.train_set, x.cfg.batch_size, w, x.device, x.sweep.steps * 2, x.sweep.repeats, x.mean, x.std, fast))
        rows.append(r)
        print(f"{w:>8} {r['decode']:>7} {r['img_s']:>10.1f} {r['img_s_per_core']:>11.1f}")
    return rows


def model_mode(x):
    """The compute-only training step for every combination asked for, printed as a table; also sets the matmul
    peak of each precision in the report."""
    s = x.sweep
    print("\n[model] full training step on tensors already on the device")
    peaks = x.report["matmul_peak_flops"] = {p: measure.matmul_peak(DTYPES[p], x.device, s.quick) for p in s.precisions}
    print("matmul peak measured here: " + ", ".join(f"{p} {v / 1e12:.2f} TFLOP/s" for p, v in peaks.items()))
    print(f"{'precision':>9} {'batch':>6} {'step':>13} {'attn':>5} {'img/s':>9} {'ms/step':>9} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak MB':>8} {'1st step s':>10}")
    rows = []
    for p, bs, mode, attn in itertools.product(s.precisions, s.batch_sizes, s.compiles, s.attns):
        comp, graph = "compile" in mode, "graph" in mode
        row = dict(precision=p, batch_size=bs, compile=comp, graph=graph, step=mode, attn=attn)
        rows.append(row)
        try:
            row.update(measure.bench_model(x.cfg, x.names, x.device, p, bs, comp, attn, s.steps, s.repeats, graph))
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
            print(f"{p:>9} {bs:>6} {mode:>13} {attn:>5}  out of memory: skipped")
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        row["mfu"] = row["flops"] / peaks[p] if row["flops"] else None
        print(f"{p:>9} {bs:>6} {mode:>13} {attn:>5} {row['img_s']:>9.1f} {row['ms_step']:>9.1f} "
              f"{(row['flops'] or 0) / 1e12:>8.3f} {(row['mfu'] or 0):>6.1%} {row['peak_mem_mb']:>8.0f} "
              f"{row['first_step_s']:>10.2f}")
    return rows


def levers_mode(x):
    r = measure.bench_levers(x.cfg, x.names, x.device, x.precision, x.cfg.batch_size, x.sweep.steps, x.sweep.repeats)
    ema = f"; the EMA update alone {r['ema_ms']:.2f} ms ({r['ema_share']:.1%} of a plain step)" if r["ema_ms"] else ""
    print(f"\n[levers] {r['levers']}: step {r['levers_ms']:.1f} ms against {r['plain_ms']:.1f} ms plain "
          f"({r['cost']:+.1%}, range {r['cost_spread'][0]:+.1%} to {r['cost_spread'][1]:+.1%}){ema}")
    if r["teacher"]:
        print(f"[levers] with --teacher {r['teacher']}: step {r['teacher_ms']:.1f} ms ({r['teacher_cost']:+.1%} on the "
              "plain step: the teacher's forward and the distillation loss)")
    return r


def memory_mode(x):
    print(f"\n[memory] {x.cfg.model} at {x.cfg.image_size or 'its own'} px, {x.precision}: each way to train in a "
          f"fresh process (ddp and fsdp: each of {measure.PROCESSES} processes under torchrun), {x.sweep.steps} timed "
          f"steps; state: weights, gradients and optimizer state this process holds\n{'mode':>14} {'batch':>6} "
          f"{'trainable':>12} {'optim MB':>10} {'state MB':>10} {'activ. MB':>12} {'peak MB':>10} {'step MB':>10} "
          f"{'ms/step':>10}")
    return measure.bench_memory(x.cfg, x.names, x.device, x.precision, x.sweep.batch_sizes, x.sweep.steps)


def loop_mode(x):
    r = measure.bench_loop(x.cfg, x.names, x.device, x.precision, 20 * x.sweep.steps, max(1, x.sweep.repeats // 2),
                           3 if x.sweep.quick else 10)
    lo, hi = r["vs_bare_spread"]
    print(f"\n[loop] vitfood.train's loop, {r['steps']} steps: {r['img_s']:.1f} img/s (data wait {r['data_wait']:.1%}; "
          f"first batch at {r['first_batch_s']:.1f} s) against the bare {r['step_mode']} step's {r['bare_img_s']:.1f}: "
          f"{r['vs_bare']:.3f} (range {lo:.3f}-{hi:.3f})")
    return r


def e2e_mode(x):
    s = x.sweep
    print(f"\n[e2e] the real step fed by the real loader ({x.precision}, batch {x.cfg.batch_size}, {s.workers} workers)")
    r = measure.bench_e2e(x.cfg, x.data.train_set, x.names, x.device, x.precision, s.workers, s.steps, s.repeats,
                          s.profile_dir)
    print(f"img/s {r['img_s']:.1f} | ms/step {r['ms_step']:.1f} | data wait {r['data_wait']:.1%}")
    lo, hi = r["vs_compute_only_spread"]
    print(f"compute-only on one fixed batch, interleaved: {r['compute_only_img_s']:.1f} img/s | "
          f"e2e / compute-only {r['vs_compute_only']:.3f} (median of {s.repeats} pairs, range {lo:.3f}-{hi:.3f})")
    if s.profile_dir:
        print(f"profiler trace: {r['trace']} (open in chrome://tracing or ui.perfetto.dev)")
    return r


def eval_mode(x):
    r = measure.bench_eval(x.cfg, x.data.eval_set, x.names, x.device, x.precision, x.sweep.workers,
                           max_images=64 if x.sweep.quick else 1024)
    print(f"\n[eval] inference: {r['img_s']:.1f} img/s over {r['images']} images, batch {r['batch_size']}, the decoded "
          f"images kept ({r['kept_on']}); the first pass, decoding with {r['workers']} workers: {r['first_pass_img_s']:.1f}")
    return r


def save_mode(x):
    r = measure_save.bench_save(x.cfg, x.names, x.device, x.precision, x.sweep.steps)
    print(f"\n[save] a {r['checkpoint_mb']:.0f} MB checkpoint: the loop paused {r['pause_s']:.3f} s (copy to host "
          f"memory); {r['steps_during_write']} step(s) ran beside the background write, {r['slowdown_s']:.3f} s slower "
          f"in all; stall {r['stall_s']:.3f} s per save, against {r['sync_write_s']:.2f} s for a synchronous write")
    print(f"[save] the writer: {r['write_mb_s']:.0f} MB/s, against {r['disk_mb_s']:.0f} MB/s for one plain write and "
          f"fsync of as many bytes in the same folder: {r['writer_share']:.2f} of the disk (medians of "
          f"{measure_save.PAIRS}, in alternation)")
    return r


def export_mode(x):
    r = measure.bench_export(x.cfg, x.data.eval_set, x.names, x.mean, x.std, x.precision)
    print(f"\n[export] on the CPU ({r['cpu']}, {r['threads']} threads), {r['images']} eval images; ONNX written in "
          f"{r['export_s']:.1f} s")
    print(f"{'model':>14} {'batch 1 ms':>11} {'batch 32 img/s':>15} {'size MB':>8} {'max |logit diff|':>17}")
    for key, name in (("pytorch", "PyTorch fp32"), ("pytorch_bf16", "PyTorch bf16"), ("onnx", "ONNX fp32"),
                      ("onnx_int8", "ONNX int8")):
        row = r.get(key)
        if row is None:
            continue
        diff = f"{row['max_logit_diff']:.1e}" if "max_logit_diff" in row else "-"
        print(f"{name:>14} {row['latency_ms']:>11.2f} {row['img_s']:>15.1f} {row['size_mb']:>8.1f} {diff:>17}")
    return r


RUN = dict(data=data_mode, model=model_mode, levers=levers_mode, memory=memory_mode, loop=loop_mode, e2e=e2e_mode,
           eval=eval_mode, save=save_mode, export=export_mode)


def main(argv=None):
    cfg, b = parse_args(argv)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    sweep = plan(cfg, b, device, precision)
    report = dict(env=env_info(device), config=dict(model=cfg.model, dataset=cfg.dataset, image_size=cfg.image_size,
                  batch_size=cfg.batch_size, precision=precision, workers=sweep.workers, quick=sweep.quick,
                  steps=sweep.steps, repeats=sweep.repeats), date=datetime.datetime.now().isoformat(timespec="seconds"))
    env = report["env"]
    print(f"vitfood.bench | {env['device']} | torch {env['torch']} | transformers {env['transformers']} | "
          f"{env['cpu_count']} CPUs, {env['torch_threads']} threads | python {platform.python_version()}")
    print(f"model {cfg.model} | dataset {cfg.dataset} | batch {cfg.batch_size} | precision {precision} | "
          f"workers {sweep.workers}")

    if cfg.streaming:
        raise UserError("vitfood.bench indexes the data set: it does not take --streaming")
    hub.prepare(hub_dataset(cfg.dataset), hub_model(cfg.model), cfg.trust_remote_code)
    train_ds, eval_ds, names = load_splits(cfg)
    transformers.utils.logging.disable_progress_bar()  # no bar per checkpoint write
    model, processor = build_model(cfg, names, device)
    train_tf, eval_tf, (mean, std) = transforms_for(processor, cfg=cfg)  # the run's augmentations
    data = build_data(cfg, train_ds, eval_ds, (train_tf, eval_tf), len(names), device, sweep.workers, cfg.batch_size)
    report["flops_per_image_train"] = vit_flops_per_image(model.config) if model.config.model_type == "vit" else None
    del model
    x = argparse.Namespace(cfg=cfg, names=names, device=device, precision=precision, sweep=sweep, data=data, mean=mean,
                           std=std, report=report)
    for mode in MODES:  # in this order, whatever the order asked
        if mode in sweep.modes:
            report[mode] = RUN[mode](x)
    data.close()
    _check_finite(report)
    text = json.dumps(report, default=float)
    path = b.out or os.path.join("runs", f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text + "\n")
    print(f"\nreport: {path}")  # the tables above are for reading; the whole document is in the file
    if b.json:
        print(text)
    return report


def _check_finite(obj):
    """A figure that came out inf or nan is a measuring bug: say so rather than print it."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise RuntimeError("a benchmark figure is not finite")
    if isinstance(obj, dict):
        for v in obj.values():
            _check_finite(v)
    if isinstance(obj, list):
        for v in obj:
            _check_finite(v)


def cli():
    """Console entry point `vitfood-bench`, the same as `python -m vitfood.bench`."""
    run_main(main)


if __name__ == "__main__":
    cli()
