"""The measurements of vitfood.bench, each built from the pieces vitfood.train runs (the model, its optimizer and
the same `steps.Step`): the training step, its levers, the memory of each way to train, the input pipeline, the
step fed by the loader, the loop itself, inference and the exported ONNX files (a checkpoint save: measure_save.py)."""

import copy
import dataclasses
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import transformers

from vitfood import adapt, dist, fsdp
from vitfood.common import mixed_precision, seed_everything
from vitfood.config import Config
from vitfood.distill import Teacher
from vitfood.data import EpochBatchSampler, KeptBatches, make_loader, stop_workers
from vitfood.images import normalize, transforms_for
from vitfood.model import build_model, for_inference, make_optimizer, make_scheduler, resolve_attn, vit_flops_per_image
from vitfood.steps import EMA, GraphedStep, build_step, eval_pass, mixing_for


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


def training(cfg, names, device, precision, graph_batch=None, world=1):
    """(model, its processor, its Step) as vitfood.train builds them, at a flat learning rate (timing only):
    --compile, label smoothing and mixup/cutmix as `cfg` says; with `graph_batch`, (images, labels) on a CUDA
    device, the whole step as one CUDA graph of that batch's shapes. `world` > 1 (under torchrun): DDP around
    the model, or with --fsdp the model sharded."""
    seed_everything(cfg.seed)
    model, processor = build_model(cfg, names, device)
    model.to(device).train()
    if cfg.fsdp:
        fsdp.shard(model, precision, device)
    _, _, (mean, std) = transforms_for(processor)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, 0, 10 ** 9)
    amp, scaler = mixed_precision(precision, device, sharded=cfg.fsdp)
    size = (model.config.image_size,) * 2  # fixed_batch's
    teacher = Teacher(cfg, names, False, device, precision, (mean, std), size) if cfg.teacher else None
    _, step = build_step(cfg, model, optimizer, scheduler, scaler, amp, precision, mean, std, device, world,
                         mixing=mixing_for(cfg, len(names), dist.rank()), graph_batch=graph_batch,
                         divisor=graph_batch and graph_batch[1].shape[0], teacher=teacher)
    return model, processor, step


def fixed_batch(model, names, batch_size, device):
    """A batch of random uint8 images of the model's size and class ids, on the device."""
    size = model.config.image_size
    return (torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device),
            torch.randint(0, len(names), (batch_size,), device=device))


def stepping(step, batch):
    """A function that runs optimizer `step` on `batch` (images, labels), counting its steps (for mixup's draws)."""
    count = itertools.count()
    return lambda: step([batch], next(count), batch[1].shape[0])


def bench_model(cfg, names, device, precision, batch_size, compile_it, attn, steps, repeats, graph=False):
    """One training step on synthetic uint8 tensors already on the device; with `graph` (CUDA), the whole step
    replayed as one CUDA graph, as vitfood.train runs it there."""
    c = dataclasses.replace(cfg, attn=attn, compile=compile_it)
    model, _, _ = training(c, names, device, precision)  # the batch's shapes
    batch = fixed_batch(model, names, batch_size, device)
    model, _, optimizer_step = training(c, names, device, precision, batch if graph else None)
    step = stepping(optimizer_step, batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(GraphedStep.WARMUP if graph else 1):  # a graph is captured after its eager warm-up steps
        step()
    sync(device)
    first = time.perf_counter() - t0  # includes compilation when compiled, and the capture with `graph`
    if graph and optimizer_step.graph.failed:
        raise RuntimeError("the step could not be captured as a CUDA graph (its reason is above)")
    sec, times = timed(step, device, steps, repeats, warmup=2)
    flops = vit_flops_per_image(model.config, training=True) * batch_size / sec if model.config.model_type == "vit" else None
    return dict(img_s=batch_size / sec, ms_step=1000 * sec, spread_ms=[1000 * min(times), 1000 * max(times)],
                first_step_s=first, peak_mem_mb=peak_memory_mb(device), flops=flops)


def bench_loop(cfg, names, device, precision, steps, repeats, bare_steps=10):
    """vitfood.train's loop itself against the bare step, alternated (bare, loop, bare, ...): a run of `steps`
    optimizer steps in a child process (evaluating and saving once, at its end), its training images/s taken
    from its phases.json (from its first batch to its last step, eval and save left out); the bare step on the
    same model, batch and precision as that loop runs it (one CUDA graph on CUDA unless --no-cuda-graph)."""
    graph = device.type == "cuda" and cfg.cuda_graph
    attn = resolve_attn(cfg.attn, device)
    bare, loops = [], []
    bare_step = lambda: bench_model(cfg, names, device, precision, cfg.batch_size, cfg.compile, attn, bare_steps, 3,
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
    for, or --preset finetune's with an EMA when none were. With --teacher, the plain step with the teacher's
    forward and loss too, in the same alternation."""
    plain = dataclasses.replace(cfg, label_smoothing=0.0, mixup=0.0, cutmix=0.0, layer_decay=1.0, ema_decay=0.0,
                                teacher=None)
    asked = cfg.label_smoothing or cfg.mixup or cfg.cutmix or cfg.ema_decay or cfg.layer_decay < 1
    levers = cfg if asked else dataclasses.replace(cfg, label_smoothing=0.1, mixup=0.8, cutmix=1.0, layer_decay=0.65,
                                                   ema_decay=0.9999)

    def make(c):
        model, _, optimizer_step = training(c, names, device, precision)
        ema = EMA(model, c.ema_decay) if c.ema_decay else None
        run = stepping(optimizer_step, fixed_batch(model, names, batch_size, device))

        def step():
            run()
            if ema:
                ema.update()
        return step, ema

    levers = dataclasses.replace(levers, teacher=None)
    (plain_step, _), (lever_step, ema) = make(plain), make(levers)
    taught_step = make(dataclasses.replace(plain, teacher=cfg.teacher))[0] if cfg.teacher else None
    pairs, taught = [], []
    for _ in range(repeats):
        pairs.append((timed(plain_step, device, steps, 1, warmup=2)[0], timed(lever_step, device, steps, 1, warmup=2)[0]))
        if taught_step:
            taught.append(timed(taught_step, device, steps, 1, warmup=2)[0] / pairs[-1][0])
    ratios = sorted(b / a for a, b in pairs)
    plain_s = statistics.median(a for a, _ in pairs)
    ema_s = timed(ema.update, device, steps, repeats, warmup=2)[0] if ema else None
    return dict(plain_ms=1000 * plain_s, levers_ms=1000 * statistics.median(b for _, b in pairs),
                cost=statistics.median(ratios) - 1, cost_spread=[ratios[0] - 1, ratios[-1] - 1],
                ema_ms=ema_s and 1000 * ema_s, ema_share=ema_s and ema_s / plain_s, batch_size=batch_size,
                levers=dict(label_smoothing=levers.label_smoothing, mixup=levers.mixup, cutmix=levers.cutmix,
                            layer_decay=levers.layer_decay, ema_decay=levers.ema_decay),
                teacher=cfg.teacher, teacher_ms=taught and 1000 * plain_s * statistics.median(taught),
                teacher_cost=taught and statistics.median(taught) - 1)


# the ways to train that memory mode compares: LoRA as peft's image-classification guide sets it up
_PLAIN = dict(freeze_backbone=False, lora_rank=0, gradient_checkpointing=False)  # whatever flags were given
ADAPTATIONS = {"full": _PLAIN, "frozen": dict(_PLAIN, freeze_backbone=True),
               "lora": dict(_PLAIN, lora_rank=16, lora_alpha=16.0, lora_targets=None),
               "checkpointing": dict(_PLAIN, gradient_checkpointing=True)}
SHARED = {"ddp": dict(_PLAIN, fsdp=False), "fsdp": dict(_PLAIN, fsdp=True)}  # full fine-tuning over PROCESSES ranks
PROCESSES = 2


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
            p = subprocess.run([sys.executable, "-c", "import json, sys; from vitfood.measure import memory_child; "
                                "print(json.dumps(memory_child(json.loads(sys.argv[1]))))", json.dumps(spec)],
                               capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(f"memory mode, {name} at batch {batch}: {p.stderr.strip()[-600:]}")
            rows.append(dict(mode=name, batch_size=batch, **json.loads(p.stdout.strip().splitlines()[-1])))
            _print_row(rows[-1])
        if device.type == "cuda" and torch.cuda.device_count() < PROCESSES:
            print(f"{'ddp, fsdp':>14}: need {PROCESSES} GPUs (one process each); skipped")
            continue
        for name, change in SHARED.items():  # under torchrun, each rank's own figures
            spec = dict(cfg=dataclasses.asdict(dataclasses.replace(cfg, batch_size=batch, **change)), names=names,
                        device=str(device).split(":")[0], precision=precision, steps=steps)
            with tempfile.TemporaryDirectory() as folder:  # each rank writes its row to a file of its own
                p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    f"--nproc_per_node={PROCESSES}", "--no-python", sys.executable, "-c",
                                    "import json, os, sys; from vitfood.measure import memory_child; "
                                    "row = memory_child(json.loads(sys.argv[1])); "
                                    "json.dump(row, open(os.path.join(sys.argv[2], str(row['rank'])), 'w'))",
                                    json.dumps(spec), folder], capture_output=True, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // PROCESSES))})
                found = [] if p.returncode else [json.load(open(os.path.join(folder, name)))
                                                 for name in sorted(os.listdir(folder))]
            if len(found) != PROCESSES:
                raise RuntimeError(f"memory mode, {name} on {PROCESSES} processes at batch {batch}: "
                                   f"{p.stderr.strip()[-600:]}")
            for row in found:
                rows.append(dict(mode=f"{name} r{row['rank']}/{PROCESSES}", batch_size=batch, **row))
                _print_row(rows[-1])
    return rows


def _print_row(row):
    print(f"{row['mode']:>14} {row['batch_size']:>6} {row['trainable']:>12,} {row['optimizer_mb']:>10.1f} "
          f"{row['state_mb']:>10.1f} {row['activations_mb']:>12.1f} {row['peak_mb']:>10.0f} {row['step_mb']:>10.0f} "
          f"{row['ms_step']:>10.0f}", flush=True)


def _local_bytes(t):
    """Bytes a tensor takes on this rank: a sharded one's (FSDP's DTensor) own shard."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def memory_child(spec):
    """One row of bench_memory, measured in this (fresh) process; under torchrun, this rank's."""
    cfg = Config(**spec["cfg"])
    rank, world, device = dist.setup(spec["device"], 600, group=cfg.fsdp)
    transformers.utils.logging.set_verbosity_error()
    model, _, optimizer_step = training(cfg, spec["names"], device, spec["precision"], world=world)
    images, labels = batch = fixed_batch(model, spec["names"], cfg.batch_size, device)
    step = stepping(optimizer_step, batch)

    before = _memory_mb(device)  # weights (and on a GPU nothing else yet)
    step()  # from here the gradients and the optimizer's state exist
    params = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):  # each storage once; the weights themselves are not activations
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), optimizer_step.amp:
        model(pixel_values=normalize(images, optimizer_step.mean, optimizer_step.std))  # as the step's, then dropped
    sec, _ = timed(step, device, 1, spec["steps"], warmup=0)
    trains, total = adapt.trainable(model)
    state = sum(_local_bytes(t) for s in optimizer_step.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    weights = sum(_local_bytes(p) for p in model.parameters())
    grads = sum(_local_bytes(p) for p in model.parameters() if p.requires_grad)  # the size of what trains
    peak = _memory_mb(device, peak=True)
    dist.close()
    return dict(trainable=trains, parameters=total, optimizer_mb=state / 2 ** 20,
                state_mb=(weights + grads + state) / 2 ** 20,
                activations_mb=sum(kept.values()) / 2 ** 20, peak_mb=peak, step_mb=peak - before, ms_step=1000 * sec,
                rank=rank, world=world)


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
    _, _, optimizer_step = training(cfg, names, device, precision)
    count = itertools.count()
    loader = make_loader(train_set, cfg.batch_size, workers, device, EpochBatchSampler(len(train_set), cfg.seed, cfg.batch_size))
    it = _endless(loader)
    wait = [0.0]
    fixed = [t.to(device) for t in next(it)[:2]]

    def train_on(images, labels):
        optimizer_step([(images, labels)], next(count), labels.shape[0])

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


@torch.inference_mode()
def inference_speed(model, images, repeats=5):
    """Latency per image at batch 1 (ms) and images/s at batch 32 of `model` (called as a transformers
    classifier: a PyTorch model, or an onnxfile.OnnxClassifier) on the CPU, on `images` (normalized, repeated
    to fill the batch): the medians over `repeats` runs, after warm-up."""
    one = images[:1]
    batch = images.repeat((32 + len(images) - 1) // len(images), 1, 1, 1)[:32]
    latency, _ = timed(lambda: model(pixel_values=one), torch.device("cpu"), steps=10, repeats=repeats, warmup=3)
    per_batch, _ = timed(lambda: model(pixel_values=batch), torch.device("cpu"), steps=1, repeats=repeats, warmup=2)
    return dict(latency_ms=latency * 1000, img_s=32 / per_batch)


def bench_export(cfg, eval_set, names, mean, std, precision):
    """The model as vitfood.export writes it (ONNX fp32 and int8, run by onnxruntime) against eager PyTorch fp32
    (and in `precision`, as vitfood.predict runs it there, when that is bf16), on the CPU with as many threads,
    on the same eval images: latency at batch 1, images/s at batch 32, size."""
    from vitfood import onnxfile
    seed_everything(cfg.seed)
    cpu = torch.device("cpu")
    model, _ = build_model(cfg, names, cpu)
    model = adapt.merged(model).eval()
    decoded = (eval_set[i][0] for i in range(min(64, len(eval_set))))
    images = normalize(torch.stack([x for x in decoded if x is not None][:32]), mean, std)
    threads = torch.get_num_threads()
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    rows = dict(pytorch=dict(size_mb=weights / 2 ** 20, **inference_speed(model, images)))
    if precision == "bf16":
        net, amp = for_inference(model, "bf16", cpu)
        with amp:
            rows["pytorch_bf16"] = dict(size_mb=weights / 2 ** 21, **inference_speed(net, images))
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "model-int8.onnx")
        t0 = time.perf_counter()
        onnxfile.to_onnx(model, fp32, tuple(images.shape[-2:]))
        rows["export_s"] = time.perf_counter() - t0
        onnxfile.to_int8(fp32, int8)
        model.config.save_pretrained(tmp)
        for key, path in (("onnx", fp32), ("onnx_int8", int8)):
            session = onnxfile.OnnxClassifier(path, threads)
            with torch.inference_mode():
                diff = (session(pixel_values=images).logits - model(pixel_values=images).logits).abs().max().item()
            rows[key] = dict(size_mb=os.path.getsize(path) / 2 ** 20, max_logit_diff=diff,
                             **inference_speed(session, images))
    return dict(rows, threads=threads, cpu=onnxfile.cpu_name(), images=len(images))
