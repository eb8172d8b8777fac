"""Where does fine-tuning time go on this machine? Throughput of each part, measured with vitfood's own builders.

    python -m vitfood.bench --preset demo --quick       # offline, under a minute on 2 CPU cores
    python -m vitfood.bench --preset demo --modes model --batch-sizes 16,32,64 --precisions fp32,bf16
    python -m vitfood.bench --model google/vit-base-patch16-224-in21k --dataset food101 --out bench.json

Modes (all by default):
  data   images/s of the training input pipeline alone (decode, augment, collate) per worker count
  model  a full training step on tensors already on the device: images/s, ms/step, peak memory,
         achieved FLOP/s and MFU against the dense matmul peak measured here, for the same dtype
  e2e    the real step fed by the real loader: images/s and the share of time waiting for data
  loop   vitfood.train's whole loop (a child process) against the bare step: the loop's own cost
  eval   inference images/s over the eval split
  save   how long a checkpoint save holds up the loop (the copy to host memory, and steps slowed down
         while the write runs in the background), against the time a synchronous write takes
Takes every vitfood.train option (--preset, --model, --dataset, --batch-size, ...). Warm-up is never
timed, device work is synchronized before clocks are read, figures are medians over repeats.
The table goes to stdout; its last line is one JSON document with every figure.
"""

import vitfood

if __name__ == "__main__":
    vitfood.quiet_ctrl_c()  # before the heavy imports below

import argparse
import copy
import dataclasses
import tempfile
import datetime
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import transformers

from vitfood import adapt, checkpoint, hub
from vitfood.common import (DTYPES, UserError, env_info, mixed_precision, num_workers, pick_device, resolve_precision,
                            run_main, seed_everything)
from vitfood.config import Config, build_parser, resolve
from vitfood.data import EpochBatchSampler, KeptBatches, build_data, stop_workers, hub_dataset, load_splits, make_loader, normalize, transforms_for
from vitfood.model import (build_model, compiled, hub_model, make_optimizer, make_scheduler, resolve_attn,
                           vit_flops_per_image)
from vitfood.steps import EMA, GraphedStep, Mixing, eval_pass, forward_backward, optimizer_step

MODES = ("data", "model", "levers", "memory", "e2e", "loop", "eval", "save")


def parse_args(argv=None):
    p = build_parser(run=False)
    p.prog, p.description = "python -m vitfood.bench", __doc__
    g = p.add_argument_group("bench")
    g.add_argument("--modes", default="all", help=f"comma list of {','.join(MODES)}, or all")
    g.add_argument("--quick", action="store_true", help="few repeats, small sweep, no compile: under a minute")
    g.add_argument("--batch-sizes", help="comma list for the model sweep (default: --batch-size; full: x1, x2, x4)")
    g.add_argument("--precisions", help="comma list of fp32,fp16,bf16 (default: every one the device runs)")
    g.add_argument("--compile-modes", help="comma list of how the step runs: eager, compile (torch.compile), graph "
                   "(the whole step as one CUDA graph), graph+compile (default: eager,compile, and graph on CUDA; "
                   "--quick: eager); off and on mean eager and compile")
    g.add_argument("--attns", help="comma list of sdpa,eager (default: sdpa,eager; --quick: --attn)")
    g.add_argument("--worker-counts", help="comma list of DataLoader worker counts for data mode")
    g.add_argument("--decode-modes", default="fast,full", help="comma list of fast,full: the JPEG decode path in data mode")
    g.add_argument("--steps", type=int, help="timed steps per repeat")
    g.add_argument("--repeats", type=int, help="repeats; the median is reported")
    g.add_argument("--out", help="also write the JSON document to this file")
    g.add_argument("--profile", action="store_true", help="write a torch.profiler trace (Chrome/Perfetto JSON) of e2e steps")
    args = vars(p.parse_args(argv))
    bench = {k: args.pop(k, None) for k in ["modes", "quick", "batch_sizes", "precisions", "compile_modes", "attns",
                                             "worker_counts", "decode_modes", "steps", "repeats", "out", "profile"]}
    return resolve(args), argparse.Namespace(**bench)


def _list(text, cast=str):
    return [cast(v) for v in text.split(",") if v.strip()] if text else None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, steps, repeats, warmup):
    """Median seconds per call of fn over `repeats` runs of `steps` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times), times


def matmul_peak(dtype, device, quick):
    """Dense matmul FLOP/s measured here: the ceiling MFU is reported against. The best repeat over a few
    sizes, through F.linear (x @ W.T, the kernel a model's layers call: on a CPU without bf16 units, bf16
    torch.mm takes a far slower path than bf16 linear, and would make MFU exceed 100%)."""
    sizes = (4096, 8192) if device.type == "cuda" else ((1024, 2048) if quick else (1024, 2048, 4096))
    best = 0.0
    for n in sizes:
        x = torch.randn(n, n, device=device).to(dtype)
        w = torch.randn(n, n, device=device).to(dtype)
        _, times = timed(lambda: torch.nn.functional.linear(x, w), device, steps=10 if device.type == "cuda" else 1,
                         repeats=3 if quick else 5, warmup=2)
        best = max(best, 2 * n ** 3 / min(times))
    return best


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def _training_setup(cfg, names, device, precision):
    """The model, optimizer, scheduler, scaler and autocast exactly as vitfood.train builds them."""
    seed_everything(cfg.seed)
    model, processor = build_model(cfg, names, device)
    model.to(device).train()
    _, _, (mean, std) = transforms_for(processor)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, 0, 10 ** 9)  # a flat learning rate: timing only
    amp, scaler = mixed_precision(precision, device)
    return model, (mean, std), opt, sched, scaler, amp


def bench_save(cfg, names, device, precision, steps):
    """How long one checkpoint save (the model with its AdamW state) holds up the loop. The save call copies
    the state to host memory (the pause); the write then runs in the background while steps go on, each a
    little slower (the slowdown). A synchronous save of the same checkpoint is timed for comparison."""
    model, (mean, std), opt, sched, scaler, amp = _training_setup(cfg, names, device, precision)
    _, processor = build_model(cfg, names, device)
    batch = cfg.batch_size if device.type == "cuda" else min(cfg.batch_size, 2)  # on a CPU: a short step
    size = model.config.image_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, len(names), (batch,), device=device)

    def step():
        forward_backward(model, images, labels, amp, scaler, mean, std, labels.shape[0])
        optimizer_step(model, opt, scaler, sched, cfg.max_grad_norm)

    step_s, _ = timed(step, device, steps, 1, warmup=2)  # the warm-up also makes the optimizer state
    state = lambda: dict(step=1, optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=scaler.state_dict())
    os.makedirs("runs", exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bench-save-", dir="runs") as out:  # on disk, as a run writes
        saver = checkpoint.Checkpoints(out, keep=2)
        saver.open()
        saver.save(1, model, processor, state())  # the first save of a run also allocates the host buffers
        saver.wait()
        sync(device)
        t0 = time.perf_counter()
        saver.save(2, model, processor, state())
        pause = time.perf_counter() - t0
        n, t1 = 0, time.perf_counter()
        while saver.writing():
            step()
            n += 1
        sync(device)
        overlapped = time.perf_counter() - t1
        saver.wait()
        t2 = time.perf_counter()
        saver.save(3, model, processor, state())
        saver.wait()
        write = time.perf_counter() - t2
        mb = sum(f.stat().st_size for f in os.scandir(os.path.join(out, "checkpoint-3"))) / 2 ** 20
    slowdown = max(0.0, overlapped - n * step_s)  # what the steps lost to the write beside them
    return dict(pause_s=pause, slowdown_s=slowdown, stall_s=pause + slowdown, sync_write_s=write,
                steps_during_write=n, step_ms=1000 * step_s, batch_size=batch, checkpoint_mb=mb)


def bench_model(cfg, names, device, precision, batch_size, compile_it, attn, steps, repeats, graph=False):
    """One training step on synthetic uint8 tensors already on the device; with `graph` (CUDA), the whole step
    replayed as one CUDA graph, as vitfood.train runs it there."""
    c = dataclasses.replace(cfg, attn=attn)
    model, (mean, std), opt, sched, scaler, amp = _training_setup(c, names, device, precision)
    size = model.config.image_size
    step_model = compiled(model, device, graphed=graph) if compile_it else model
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, len(names), (batch_size,), device=device)
    if graph:
        graphed = GraphedStep(step_model, opt, scaler, sched, precision, mean, std, c.max_grad_norm, 0.0, None, images,
                              labels, batch_size)
        step = lambda: graphed(images, labels, batch_size)
    else:
        def step():
            forward_backward(step_model, images, labels, amp, scaler, mean, std, labels.shape[0])
            optimizer_step(model, opt, scaler, sched, c.max_grad_norm)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(GraphedStep.WARMUP if graph else 1):  # a graph is captured after its eager warm-up steps
        step()
    sync(device)
    first = time.perf_counter() - t0  # includes compilation when compiled, and the capture with `graph`
    if graph and graphed.failed:
        raise RuntimeError("the step could not be captured as a CUDA graph (its reason is above)")
    sec, times = timed(step, device, steps, repeats, warmup=2)
    flops = vit_flops_per_image(model.config, training=True) * batch_size / sec if model.config.model_type == "vit" else None
    return dict(img_s=batch_size / sec, ms_step=1000 * sec, spread_ms=[1000 * min(times), 1000 * max(times)],
                first_step_s=first, peak_mem_mb=peak_memory_mb(device), flops=flops)


def bench_loop(cfg, names, device, precision, steps, repeats):
    """vitfood.train's loop itself against the bare step, alternated (bare, loop, bare, ...): a run of `steps`
    optimizer steps in a child process (evaluating and saving once, at its end), its training images/s taken
    from its phases.json (from its first batch to its last step, eval and save left out); the bare step on the
    same model, batch and precision as that loop runs it (one CUDA graph on CUDA unless --no-cuda-graph)."""
    graph = device.type == "cuda" and cfg.cuda_graph
    attn = resolve_attn(cfg.attn, device)
    bare, loops = [], []
    bare_step = lambda: bench_model(cfg, names, device, precision, cfg.batch_size, cfg.compile, attn, 10, 3,
                                    graph)["img_s"]
    with tempfile.TemporaryDirectory(prefix="vitfood-loop-") as tmp:
        config = os.path.join(tmp, "config.json")
        with open(config, "w") as fh:
            json.dump({k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("output_dir", "resume", "preset")}, fh)
        for i in range(repeats):
            bare.append(bare_step())
            out = os.path.join(tmp, f"run{i}")
            child = subprocess.run([sys.executable, "-m", "vitfood.train", "--config", config, "--max-steps", str(steps),
                                    "--eval-steps", str(steps), "--save-steps", str(steps), "--output-dir", out],
                                   capture_output=True, text=True)
            if child.returncode:
                raise RuntimeError(f"loop mode: the training run failed: {child.stderr.strip()[-600:]}")
            loops.append(loop_rate(out, cfg.batch_size))
        bare.append(bare_step())
    rates = [r["img_s"] for r in loops]
    ratios = sorted(loop["img_s"] / ((a + b) / 2) for loop, a, b in zip(loops, bare, bare[1:]))
    return dict(img_s=statistics.median(rates), bare_img_s=statistics.median(bare), vs_bare=statistics.median(ratios),
                vs_bare_spread=[ratios[0], ratios[-1]], data_wait=statistics.median(r["data_wait"] for r in loops),
                first_batch_s=statistics.median(r["first_batch_s"] for r in loops), steps=steps,
                step_mode="graph" if graph else "eager")


def loop_rate(run_dir, batch_size):
    """A finished run's training images/s from its phases.json: from its first batch to the end of its loop,
    eval and save pauses left out; its data wait; its start-up."""
    with open(os.path.join(run_dir, "phases.json")) as fh:
        seg = json.load(fh)["segments"][-1]
    get = lambda name: [p for p in seg["phases"] if p["name"] == name]
    loop, first = get("loop")[0], get("first batch")[0]
    paused = sum(p["end"] - p["start"] for p in get("eval") + get("save"))
    seconds = loop["end"] - first["start"] - paused
    return dict(img_s=loop["images"] / seconds, data_wait=loop["data_wait_s"] / seconds, first_batch_s=first["start"])


def bench_levers(cfg, names, device, precision, batch_size, steps, repeats):
    """The training step with the recipe levers that act in it (label smoothing, mixup/cutmix, layer decay,
    EMA) against the plain step, timed in alternation; and the EMA update alone. The levers are those asked
    for, or --preset finetune's with an EMA when none were."""
    plain = dataclasses.replace(cfg, label_smoothing=0.0, mixup=0.0, cutmix=0.0, layer_decay=1.0, ema_decay=0.0)
    asked = cfg.label_smoothing or cfg.mixup or cfg.cutmix or cfg.ema_decay or cfg.layer_decay < 1
    levers = cfg if asked else dataclasses.replace(cfg, label_smoothing=0.1, mixup=0.8, cutmix=1.0, layer_decay=0.65,
                                                   ema_decay=0.9999)

    def make(c):
        model, (mean, std), opt, sched, scaler, amp = _training_setup(c, names, device, precision)
        size = model.config.image_size
        images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)
        labels = torch.randint(0, len(names), (batch_size,), device=device)
        ema = EMA(model, c.ema_decay) if c.ema_decay else None
        mixing = Mixing(c.mixup, c.cutmix, c.mixup_prob, c.mixup_switch_prob, c.label_smoothing, len(names),
                        c.seed) if c.mixup or c.cutmix else None
        count = itertools.count()

        def step():
            forward_backward(model, images, labels, amp, scaler, mean, std, labels.shape[0], c.label_smoothing,
                             mixing and mixing.at(next(count), 0))
            optimizer_step(model, opt, scaler, sched, c.max_grad_norm)
            if ema:
                ema.update()
        return step, ema

    (plain_step, _), (lever_step, ema) = make(plain), make(levers)
    pairs = [(timed(plain_step, device, steps, 1, warmup=2)[0], timed(lever_step, device, steps, 1, warmup=2)[0])
             for _ in range(repeats)]
    ratios = sorted(b / a for a, b in pairs)
    plain_s = statistics.median(a for a, _ in pairs)
    ema_s = timed(ema.update, device, steps, repeats, warmup=2)[0] if ema else None
    return dict(plain_ms=1000 * plain_s, levers_ms=1000 * statistics.median(b for _, b in pairs),
                cost=statistics.median(ratios) - 1, cost_spread=[ratios[0] - 1, ratios[-1] - 1],
                ema_ms=ema_s and 1000 * ema_s, ema_share=ema_s and ema_s / plain_s, batch_size=batch_size,
                levers=dict(label_smoothing=levers.label_smoothing, mixup=levers.mixup, cutmix=levers.cutmix,
                            layer_decay=levers.layer_decay, ema_decay=levers.ema_decay))


# the ways to train that issue #21 compares: LoRA as peft's image-classification guide sets it up
_PLAIN = dict(freeze_backbone=False, lora_rank=0, gradient_checkpointing=False)  # whatever flags were given
ADAPTATIONS = {"full": _PLAIN, "frozen": dict(_PLAIN, freeze_backbone=True),
               "lora": dict(_PLAIN, lora_rank=16, lora_alpha=16.0, lora_targets=None),
               "checkpointing": dict(_PLAIN, gradient_checkpointing=True)}


def bench_memory(cfg, names, device, precision, batch_sizes, steps):
    """Per way to train (full fine-tune, frozen backbone, LoRA r16, gradient checkpointing) and batch size,
    each in a fresh process: parameters that train, the optimizer's state, what a forward pass keeps for the
    backward (activations, counted through saved-tensor hooks), peak memory (the process's peak resident
    memory on a CPU; torch's allocator peak on a GPU) and the step time."""
    rows = []
    for batch in batch_sizes:
        for name, change in ADAPTATIONS.items():
            spec = dict(cfg=dataclasses.asdict(dataclasses.replace(cfg, batch_size=batch, **change)), names=names,
                        device=str(device), precision=precision, steps=steps)
            p = subprocess.run([sys.executable, "-c", "import json, sys; from vitfood.bench import memory_child; "
                                "print(json.dumps(memory_child(json.loads(sys.argv[1]))))", json.dumps(spec)],
                               capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(f"memory mode, {name} at batch {batch}: {p.stderr.strip()[-600:]}")
            row = dict(mode=name, batch_size=batch, **json.loads(p.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(f"{name:>14} {batch:>6} {row['trainable']:>12,} {row['optimizer_mb']:>10.1f} "
                  f"{row['activations_mb']:>12.1f} {row['peak_mb']:>10.0f} {row['step_mb']:>10.0f} "
                  f"{row['ms_step']:>10.0f}", flush=True)
    return rows


def memory_child(spec):
    """One row of bench_memory, measured in this (fresh) process."""
    cfg, device = Config(**spec["cfg"]), torch.device(spec["device"])
    transformers.utils.logging.set_verbosity_error()
    model, (mean, std), opt, sched, scaler, amp = _training_setup(cfg, spec["names"], device, spec["precision"])
    size = model.config.image_size
    images = torch.randint(0, 256, (cfg.batch_size, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, len(spec["names"]), (cfg.batch_size,), device=device)

    def step():
        forward_backward(model, images, labels, amp, scaler, mean, std, labels.shape[0])
        optimizer_step(model, opt, scaler, sched, cfg.max_grad_norm)

    before = _memory_mb(device)  # weights (and on a GPU nothing else yet)
    step()  # from here the gradients and the optimizer's state exist
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):  # each storage once; the weights themselves are not activations
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(pixel_values=normalize(images, mean, std))  # a forward pass as the step's, its graph then dropped
    sec, _ = timed(step, device, 1, spec["steps"], warmup=0)
    trains, total = adapt.trainable(model)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    peak = _memory_mb(device, peak=True)
    return dict(trainable=trains, parameters=total, optimizer_mb=state / 2 ** 20, activations_mb=sum(kept.values()) / 2 ** 20,
                peak_mb=peak, step_mb=peak - before, ms_step=1000 * sec)


def _memory_mb(device, peak=False):
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2 ** 20
    field = "VmHWM" if peak else "VmRSS"
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024


def bench_data(train_set, batch_size, workers, device, steps, repeats, mean, std, fast_decode):
    """Loader images/s, counting the uint8 -> normalized float conversion the step does on the device."""
    train_set, transform = copy.copy(train_set), copy.copy(train_set.transform)
    transform.fast, train_set.transform = fast_decode, transform
    loader = make_loader(train_set, batch_size, workers, device, EpochBatchSampler(len(train_set), 0, batch_size))
    need = steps * repeats + 2
    it = iter(_endless(loader))
    next(it), next(it)  # warm-up: worker start, first batches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(normalize(next(it)[0].to(device), mean, std).shape[0] for _ in range(steps))
        times.append(n / (time.perf_counter() - t0))
    stop_workers(loader)
    del it, loader
    img_s = statistics.median(times)
    return dict(img_s=img_s, img_s_per_core=img_s / max(1, workers), batches=need)


def _endless(loader):
    while True:
        yield from loader


def bench_e2e(cfg, train_set, names, device, precision, workers, steps, repeats, profile_dir=None):
    """The real step fed by the real loader, interleaved with the same step on one fixed batch.

    Blocks of e2e steps and compute-only steps alternate, so machine noise hits both alike and
    their ratio is measured side by side, not across runs.
    """
    model, (mean, std), opt, sched, scaler, amp = _training_setup(cfg, names, device, precision)
    step_model = compiled(model, device) if cfg.compile else model
    loader = make_loader(train_set, cfg.batch_size, workers, device, EpochBatchSampler(len(train_set), cfg.seed, cfg.batch_size))
    it = _endless(loader)
    wait = [0.0]
    fixed = [t.to(device) for t in next(it)[:2]]

    def train_on(images, labels):
        forward_backward(step_model, images, labels, amp, scaler, mean, std, labels.shape[0])
        optimizer_step(model, opt, scaler, sched, cfg.max_grad_norm)

    def e2e_step():
        t0 = time.perf_counter()
        images, labels, _ = next(it)
        wait[0] += time.perf_counter() - t0
        train_on(images, labels)

    for _ in range(3):
        e2e_step()
        train_on(*fixed)
    sync(device)
    wait[0] = 0.0
    e2e, compute = [], []
    for _ in range(repeats):
        e2e.append(timed(e2e_step, device, steps, 1, warmup=0)[0])
        compute.append(timed(lambda: train_on(*fixed), device, steps, 1, warmup=0)[0])
    sec, ref = statistics.median(e2e), statistics.median(compute)
    ratios = sorted(r / e for e, r in zip(e2e, compute))
    result = dict(img_s=cfg.batch_size / sec, ms_step=1000 * sec, spread_ms=[1000 * min(e2e), 1000 * max(e2e)],
                  compute_only_img_s=cfg.batch_size / ref, vs_compute_only=statistics.median(ratios),
                  vs_compute_only_spread=[ratios[0], ratios[-1]],
                  data_wait=wait[0] / (sum(e2e) * steps), workers=workers)
    if profile_dir:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=False) as prof:
            for _ in range(3):
                e2e_step()
            sync(device)
        os.makedirs(profile_dir, exist_ok=True)
        result["trace"] = os.path.join(profile_dir, "trace.json")
        prof.export_chrome_trace(result["trace"])
    stop_workers(loader)
    return result


def bench_eval(cfg, eval_set, names, device, precision, workers, max_images):
    """Inference images/s over (part of) the eval split at the run's eval batch: the first pass, which decodes,
    and the passes after it, which find the decoded images kept (KeptBatches), as a training run's evals do."""
    seed_everything(cfg.seed)
    model, processor = build_model(cfg, names, device)
    model.to(device)
    _, _, (mean, std) = transforms_for(processor)
    subset = range(min(len(eval_set), max_images))
    loader = make_loader(eval_set, cfg.eval_batch(device), workers, device, subset)
    room = torch.cuda.get_device_properties(device).total_memory // 20 if device.type == "cuda" else 0
    kept = KeptBatches(loader, device, room)
    run = lambda data: eval_pass(model, data, device, precision, mean, std, progress=False, num_classes=len(names),
                                 multi_label=eval_set.multi_hot is not None)["samples"]
    run(loader)  # warm-up: workers, kernels
    t0 = time.perf_counter()
    first = run(kept) / (time.perf_counter() - t0)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        n = run(kept)
        times.append(n / (time.perf_counter() - t0))
    stop_workers(loader)
    return dict(img_s=statistics.median(times), first_pass_img_s=first, images=len(subset), batch_size=loader.batch_size,
                workers=workers, kept_on=str(kept.device or "host"))


def model_mode(cfg, names, device, precisions, batch_sizes, compiles, attns, steps, repeats, quick):
    """The compute-only training step for every combination asked for, printed as a table: (the matmul peak
    of each precision, the rows)."""
    print("\n[model] full training step on tensors already on the device")
    peaks = {p: matmul_peak(DTYPES[p], device, quick) for p in precisions}
    print("matmul peak measured here: " + ", ".join(f"{p} {v / 1e12:.2f} TFLOP/s" for p, v in peaks.items()))
    print(f"{'precision':>9} {'batch':>6} {'step':>13} {'attn':>5} {'img/s':>9} {'ms/step':>9} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak MB':>8} {'1st step s':>10}")
    rows = []
    for p, bs, mode, attn in itertools.product(precisions, batch_sizes, compiles, attns):
        comp, graph = "compile" in mode, "graph" in mode
        row = dict(precision=p, batch_size=bs, compile=comp, graph=graph, step=mode, attn=attn)
        rows.append(row)
        try:
            row.update(bench_model(cfg, names, device, p, bs, comp, attn, steps, repeats, graph))
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
            print(f"{p:>9} {bs:>6} {mode:>13} {attn:>5}  out of memory: skipped")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        row["mfu"] = row["flops"] / peaks[p] if row["flops"] else None
        print(f"{p:>9} {bs:>6} {mode:>13} {attn:>5} {row['img_s']:>9.1f} {row['ms_step']:>9.1f} "
              f"{(row['flops'] or 0) / 1e12:>8.3f} {(row['mfu'] or 0):>6.1%} {row['peak_mem_mb']:>8.0f} "
              f"{row['first_step_s']:>10.2f}")
    return peaks, rows


def main(argv=None):
    cfg, b = parse_args(argv)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    modes = MODES if b.modes == "all" else tuple(_list(b.modes))
    for m in modes:
        if m not in MODES:
            raise UserError(f"--modes: unknown mode {m!r}; use {', '.join(MODES)} or all")
    quick = b.quick
    steps = b.steps or (3 if quick else 10)
    repeats = b.repeats or (2 if quick else 5)
    cpu_precisions = ["fp32", "bf16"]
    all_precisions = ["fp32", "fp16", "bf16"] if device.type == "cuda" else cpu_precisions
    precisions = _list(b.precisions) or ([precision] if quick else all_precisions)
    for p in precisions:
        resolve_precision(p, device)  # refuses fp16 on the CPU, bf16 on old GPUs
    batch_sizes = _list(b.batch_sizes, int) or ([cfg.batch_size] if quick else [cfg.batch_size * k for k in (1, 2, 4)])
    steps_modes = ["eager", "compile", "graph", "graph+compile"]
    compiles = _list(b.compile_modes) or (["eager"] if quick else ["eager", "compile"] + ["graph"] * (device.type == "cuda"))
    compiles = [{"off": "eager", "on": "compile"}.get(m, m) for m in compiles]
    for m in compiles:
        if m not in steps_modes:
            raise UserError(f"--compile-modes: unknown mode {m!r}; use {', '.join(steps_modes)} (off/on: eager/compile)")
        if "graph" in m and device.type != "cuda":
            raise UserError(f"--compile-modes {m}: a CUDA graph needs a CUDA device")
    attns = _list(b.attns) or ([resolve_attn(cfg.attn, device)] if quick else ["sdpa", "eager"])
    workers = num_workers(cfg.num_workers)
    worker_counts = _list(b.worker_counts, int) or sorted({0, workers, min(os.cpu_count() or 1, 2 * workers)} if not quick else {0, workers})
    decodes = [v == "fast" for v in _list(b.decode_modes)]

    report = dict(env=env_info(device), config=dict(model=cfg.model, dataset=cfg.dataset, image_size=cfg.image_size,
                  batch_size=cfg.batch_size, precision=precision, workers=workers, quick=quick, steps=steps,
                  repeats=repeats), date=datetime.datetime.now().isoformat(timespec="seconds"))
    env = report["env"]
    print(f"vitfood.bench | {env['device']} | torch {env['torch']} | transformers {env['transformers']} | "
          f"{env['cpu_count']} CPUs, {env['torch_threads']} threads | python {platform.python_version()}")
    print(f"model {cfg.model} | dataset {cfg.dataset} | batch {cfg.batch_size} | precision {precision} | workers {workers}")

    hub.prepare(hub_dataset(cfg.dataset), hub_model(cfg.model), cfg.trust_remote_code)
    train_ds, eval_ds, names = load_splits(cfg)
    transformers.utils.logging.disable_progress_bar()  # no bar per checkpoint write
    model0, processor = build_model(cfg, names, device)
    train_tf, eval_tf, (mean, std) = transforms_for(processor, cfg=cfg)  # the run's augmentations
    data = build_data(cfg, train_ds, eval_ds, (train_tf, eval_tf), len(names), device, workers, cfg.batch_size)
    train_set, eval_set = data.train_set, data.eval_set
    report["flops_per_image_train"] = vit_flops_per_image(model0.config) if model0.config.model_type == "vit" else None
    del model0

    if "data" in modes:
        print("\n[data] training input pipeline alone (decode + augment + collate + normalize); decode: 'fast' "
              "decodes JPEGs at reduced scale when the crop allows (--fast-decode), 'full' always at full size")
        print(f"{'workers':>8} {'decode':>7} {'img/s':>10} {'img/s/core':>11}")
        report["data"] = []
        for w in worker_counts:
            for fast in decodes:
                r = dict(workers=w, decode="fast" if fast else "full",
                         **bench_data(train_set, cfg.batch_size, w, device, steps * 2, repeats, mean, std, fast))
                report["data"].append(r)
                print(f"{w:>8} {r['decode']:>7} {r['img_s']:>10.1f} {r['img_s_per_core']:>11.1f}")

    if "model" in modes:
        report["matmul_peak_flops"], report["model"] = model_mode(cfg, names, device, precisions, batch_sizes, compiles,
                                                                  attns, steps, repeats, quick)

    if "levers" in modes:
        r = report["levers"] = bench_levers(cfg, names, device, precision, cfg.batch_size, steps, repeats)
        ema = f"; the EMA update alone {r['ema_ms']:.2f} ms ({r['ema_share']:.1%} of a plain step)" if r["ema_ms"] else ""
        print(f"\n[levers] {r['levers']}: step {r['levers_ms']:.1f} ms against {r['plain_ms']:.1f} ms plain "
              f"({r['cost']:+.1%}, range {r['cost_spread'][0]:+.1%} to {r['cost_spread'][1]:+.1%}){ema}")

    profile_dir = None
    if b.profile:
        profile_dir = os.path.join("runs", f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    if "memory" in modes:
        print(f"\n[memory] {cfg.model} at {cfg.image_size or 'its own'} px, {precision}: each way to train in a fresh "
              f"process, {steps} timed steps\n{'mode':>14} {'batch':>6} {'trainable':>12} {'optim MB':>10} "
              f"{'activ. MB':>12} {'peak MB':>10} {'step MB':>10} {'ms/step':>10}")
        report["memory"] = bench_memory(cfg, names, device, precision, batch_sizes, steps)

    if "loop" in modes:
        r = report["loop"] = bench_loop(cfg, names, device, precision, 20 * steps, max(1, repeats // 2))
        lo, hi = r["vs_bare_spread"]
        print(f"\n[loop] vitfood.train's loop, {r['steps']} steps: {r['img_s']:.1f} img/s (data wait {r['data_wait']:.1%}; "
              f"first batch at {r['first_batch_s']:.1f} s) against the bare {r['step_mode']} step's {r['bare_img_s']:.1f}: "
              f"{r['vs_bare']:.3f} (range {lo:.3f}-{hi:.3f})")

    if "e2e" in modes:
        print(f"\n[e2e] the real step fed by the real loader ({precision}, batch {cfg.batch_size}, {workers} workers)")
        r = bench_e2e(cfg, train_set, names, device, precision, workers, steps, repeats, profile_dir)
        report["e2e"] = r
        print(f"img/s {r['img_s']:.1f} | ms/step {r['ms_step']:.1f} | data wait {r['data_wait']:.1%}")
        lo, hi = r["vs_compute_only_spread"]
        print(f"compute-only on one fixed batch, interleaved: {r['compute_only_img_s']:.1f} img/s | "
              f"e2e / compute-only {r['vs_compute_only']:.3f} (median of {repeats} pairs, range {lo:.3f}-{hi:.3f})")
        if profile_dir:
            print(f"profiler trace: {r['trace']} (open in chrome://tracing or ui.perfetto.dev)")

    if "eval" in modes:
        r = bench_eval(cfg, eval_set, names, device, precision, workers, max_images=64 if quick else 1024)
        report["eval"] = r
        print(f"\n[eval] inference: {r['img_s']:.1f} img/s over {r['images']} images, batch {r['batch_size']}, the decoded "
              f"images kept ({r['kept_on']}); the first pass, decoding with {r['workers']} workers: {r['first_pass_img_s']:.1f}")

    if "save" in modes:
        r = bench_save(cfg, names, device, precision, steps)
        report["save"] = r
        print(f"\n[save] a {r['checkpoint_mb']:.0f} MB checkpoint: the loop paused {r['pause_s']:.3f} s (copy to host "
              f"memory); {r['steps_during_write']} step(s) ran beside the background write, {r['slowdown_s']:.3f} s slower "
              f"in all; stall {r['stall_s']:.3f} s per save, against {r['sync_write_s']:.2f} s for a synchronous write")

    data.close()
    _check_finite(report)
    text = json.dumps(report, default=float)
    if b.out:
        with open(b.out, "w") as fh:
            fh.write(text + "\n")
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
