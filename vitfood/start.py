"""A run's start: from the parsed options to the Run the loop advances. `setup` reads as its steps: pre-flight
checks, the data, the model and the loader (side by side), the schedule's length, the optimizer and precision
(`assemble`), the restore from a checkpoint, the step (`build_step`), the run directory's records, the first lines.
"""

import dataclasses
import math
import os

import torch
import transformers

from vitfood import adapt, autobatch, calibrate, checkpoint, dist, fsdp, hub, metrics, report, rundir, steps
from vitfood.common import (UserError, env_info, mixed_precision, num_workers, rank_seed, resolve_precision,
                            seed_everything)
from vitfood.config import RUN_CONFIG, to_dict
from vitfood.data import Data, build_data
from vitfood.images import transforms_for
from vitfood.logs import RunLog
from vitfood.model import build_model, hub_model, load_processor, make_optimizer, make_scheduler, skeleton
from vitfood.distill import Teacher, check_labels
from vitfood.phases import Phases
from vitfood.sources import balanced_weights, hub_dataset, is_multi_label, is_shards, load_splits
from vitfood.state import Ledger, Progress, RNGStreams
from vitfood.stream import Stream, StreamImages
from vitfood.steps import EMA, GraphedStep, Mixing, NonFiniteStreak, Step, example_batch


@dataclasses.dataclass(kw_only=True)
class Run:
    """What the set-up builds, and what the loop advances."""
    cfg: object
    rank: int
    world: int
    device: torch.device
    precision: str
    global_batch: int  # images per micro-step over all ranks; x grad_accum_steps per optimizer step
    checkpoints: rundir.Checkpoints
    phases: Phases  # where the time goes: phases.json
    data: Data
    class_names: list
    multi_label: bool  # a list of classes per image: binary cross-entropy, sigmoid scores, mAP
    model: torch.nn.Module
    processor: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    amp: object
    mean: list
    std: list
    max_steps: int
    progress: Progress
    ledger: Ledger
    rng: RNGStreams
    freeze_steps: int = 0  # --freeze-epochs/--freeze-steps: the head trains alone until this step
    frozen: bool = False  # the backbone is frozen now
    ema: EMA | None = None  # --ema-decay: the moving average of the weights
    mixing: Mixing | None = None  # --mixup, --cutmix
    teacher: Teacher | None = None  # --teacher: the frozen model the student learns from
    class_weight: torch.Tensor | None = None  # --class-weights balanced: each class's weight in the loss
    startup: float = 0.0  # seconds from process start to the loop
    train_model: torch.nn.Module | None = None  # what the forward calls: DDP around the model, compiled with --compile
    optimizer_step: Step | None = None  # one optimizer step: micro-batches, DDP, mixing, the CUDA graph
    kept: dict | None = None  # the last eval's logits and labels of the weights model/ gets, with its step
    log: RunLog | None = None
    stopper: dist.Stopper | None = None  # SIGTERM/SIGINT/SIGHUP: save and exit 75, until nothing is left to write
    on_eval: object = None  # vitfood.tune's: after an eval, a reason to stop the run there, or None

    @property
    def main(self):
        return self.rank == 0  # rank 0 alone writes checkpoints, TensorBoard events, the model and the console

    @property
    def step(self):
        return self.progress.step


def resumable(r):
    """Every part of a run that a checkpoint holds besides the weights, under its name in training_state.pt,
    in the order a resume loads them (RNGStreams reads the step). Each has state_dict() and load_state_dict():
    adding state to a run is a part here, or a field of one. An --fsdp run's optimizer state is sharded: it is
    written with the weights, by every rank (checkpoint.save)."""
    parts = dict(progress=r.progress, ledger=r.ledger, data=r.data.batches, rng=r.rng,
                 optimizer=r.optimizer, scheduler=r.scheduler, scaler=r.scaler)
    if r.teacher:  # first: another teacher is refused before anything else is restored
        parts = dict(teacher=r.teacher, **parts)
    if r.cfg.fsdp:
        del parts["optimizer"]
    return dict(parts, ema=r.ema) if r.ema else parts


def setup(cfg, resume, rank, world, device, checkpoints, phases=None, cuda_ready=None):
    """The run directory, data, model, optimizer and logs, restored from a checkpoint when resuming;
    None when the run being resumed had already finished. `cuda_ready`: the thread creating the CUDA context."""
    say = print if rank == 0 else (lambda *args, **kwargs: None)
    phases = phases or Phases()
    resume_from, precision, state = preflight(cfg, resume, world, device, checkpoints, phases)
    cfg, train_ds, eval_ds, class_names = open_data(cfg, rank, phases)
    multi_label = cfg.multi_label
    cfg, model, processor, data, normalization = model_and_loader(cfg, train_ds, eval_ds, class_names, multi_label,
                                                                  rank, world, device, precision, state, phases,
                                                                  cuda_ready, say)
    max_steps, freeze = schedule_length(cfg, data)
    r = assemble(cfg, rank, world, device, precision, checkpoints, phases, data, class_names, multi_label, model,
                 processor, normalization, max_steps, freeze)
    if state and not restore(r, resume_from, state, say):
        return None  # the run had already finished
    model.train()  # from_pretrained returns a model in eval mode: dropout, drop-path and BatchNorm need this
    if freeze:
        r.frozen = r.step < freeze
        adapt.backbone_trains(model, not r.frozen)
    graphed, how = step_mode(r)
    build_step(r, graphed, say)
    open_records(r, state)
    announce(r, how, say)
    return r


def preflight(cfg, resume, world, device, checkpoints, phases):
    """What is checked before any data is read: paths, the checkpoint resumed from, the batch arithmetic, the
    model's own limits. Returns (the checkpoint resumed from or None, the precision, its training state)."""
    with phases.span("open run"):
        hub.check_local(dataset=None if is_shards(cfg.dataset) else cfg.dataset, model=cfg.model,
                        teacher=cfg.teacher)  # a typo in a path is named before anything else
        hub_model(cfg.model)  # and a near miss of a named config
        resume_from = checkpoints.resume_point(resume, cfg.overwrite_output_dir)
        precision = resolve_precision(cfg.precision, device)
        state = checkpoint.load_state(resume_from) if resume_from else None
    if isinstance(cfg.global_batch, int) and cfg.batch_size != "auto" and \
            cfg.global_batch != cfg.batch_size * cfg.grad_accum_steps * world:
        raise UserError(f"--global-batch {cfg.global_batch} is not --batch-size {cfg.batch_size} x --grad-accum-steps "
                        f"{cfg.grad_accum_steps} x {world} process(es); give two of them, or --batch-size auto")
    with phases.span("checks"):  # imports the model's code, as its skeleton is built
        hub.prepare(hub_dataset(cfg.dataset), hub_model(cfg.model), cfg.trust_remote_code)  # fails fast, before the data
        if cfg.teacher:
            hub.prepare(model=hub_model(cfg.teacher))
        if (shell := skeleton(cfg)) is not None:
            adapt.check_model(shell, cfg)  # a LoRA target or gradient checkpointing the model has not: before the data
    return resume_from, precision, state


def open_data(cfg, rank, phases):
    """(the options with what the data says, train split, eval split, class names), rank 0 first: it downloads
    or generates, the others then read its cache. What the data says, recorded in train_config.json: whether it
    is multi-label, and a stream's samples in an epoch."""
    with phases.span("data"):
        seed_everything(cfg.seed)
        if rank:
            dist.wait_for_rank0()
        train_ds, eval_ds, class_names = load_splits(cfg)
        streamed = isinstance(train_ds, Stream)  # single-label: load_splits refuses other streams
        cfg = dataclasses.replace(cfg, multi_label=not streamed and is_multi_label(train_ds, cfg.label_column),
                                  train_samples=len(train_ds) if streamed else cfg.train_samples)
        calibrate.check(cfg.multi_label, cfg.target_accuracy, cfg.target_coverage)
        if cfg.teacher:  # its config alone, before any image is decoded
            check_labels(cfg.teacher, class_names, cfg.multi_label)
    return cfg, train_ds, eval_ds, class_names


def model_and_loader(cfg, train_ds, eval_ds, class_names, multi_label, rank, world, device, precision, state, phases,
                     cuda_ready, say):
    """(the options with the batch chosen, model, processor, Data, the (mean, std) its images are normalized with).
    The loader's workers start decoding the first batches while the model is built; with --batch-size auto the
    probe needs the model first, and chooses the batch."""
    processor, model = load_processor(cfg), None
    if cfg.batch_size == "auto":  # the probe needs the model: built before the loader, this once
        with phases.span("model"):
            model, processor = build_model(cfg, class_names, device, multi_label, processor)
        with phases.span("batch probe"):
            cfg = dataclasses.replace(cfg, **autobatch.choose(cfg, model.to(device), device, precision, world,
                                                        transforms_for(processor)[1].size, len(train_ds), say))
    with phases.span("loader"):
        transforms = transforms_for(processor, cfg.fast_decode, cfg)
        data = build_data(cfg, train_ds, eval_ds, transforms[:2], len(class_names), device, num_workers(cfg.num_workers),
                          cfg.batch_size * world, rank, world, keep_eval=True)
        if state:
            data.batches.load_state_dict(state["data"])  # where the resumed run reads on (restore sets it again)
        if cuda_ready is not None:
            cuda_ready.join()  # no worker is forked while another thread is inside the CUDA driver
        data.batches.start()
    if model is None:
        with phases.span("model"):
            model, processor = build_model(cfg, class_names, device, multi_label, processor)
    if rank == 0:
        dist.wait_for_rank0()
    if world > 1:  # same initial weights everywhere (above); from here, each rank its own dropout masks
        seed_everything(rank_seed(cfg.seed, rank))
    dist.same_on_all((len(train_ds), len(eval_ds), class_names), "the data set")
    transformers.utils.logging.disable_progress_bar()  # downloads are done; no bar per checkpoint write
    return cfg, model, processor, data, transforms[2]


def schedule_length(cfg, data):
    """(optimizer steps of the run, steps the head trains alone first): --max-steps, or --epochs of the sampler."""
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * data.sampler.batches_per_epoch / cfg.grad_accum_steps))
    freeze = adapt.freeze_steps(cfg, data.sampler.batches_per_epoch, max_steps) if adapt.freezes_first(cfg) else 0
    if cfg.early_stopping_patience and cfg.eval_steps >= max_steps:
        raise UserError(f"--early-stopping-patience needs evals before the end: --eval-steps {cfg.eval_steps} leaves "
                        f"none in the run's {max_steps} steps")
    return max_steps, freeze


def assemble(cfg, rank, world, device, precision, checkpoints, phases, data, class_names, multi_label, model,
             processor, normalization, max_steps, freeze):
    """The Run: the model on its device (sharded with --fsdp), optimizer, schedule, precision and every part
    a checkpoint holds."""
    with phases.span("device"):
        model.to(device)
        if cfg.fsdp:  # before the optimizer, which then holds each rank's shards
            fsdp.shard(model, precision, device)
        optimizer = make_optimizer(model, cfg)  # every parameter, before a --freeze-epochs phase freezes some
        scheduler = make_scheduler(optimizer, cfg.warmup_steps, max_steps, freeze, (cfg.freeze_lr or 5 * cfg.lr) / cfg.lr)
        amp, scaler = mixed_precision(precision, device, sharded=cfg.fsdp)
    teacher = None
    if cfg.teacher:
        with phases.span("teacher"):  # replicated on every rank, also with --fsdp: it holds no gradients or state
            teacher = Teacher(cfg, class_names, multi_label, device, precision, normalization,
                              data.train_set.transform.size)
    judge = metrics.Judge(cfg.best_metric, multi_label)  # a figure the run's kind of eval has
    progress = Progress(every=cfg.eval_steps, judge=judge, patience=cfg.early_stopping_patience,
                        min_delta=cfg.early_stopping_min_delta)
    return Run(cfg=cfg, rank=rank, world=world, device=device, precision=precision, global_batch=cfg.batch_size * world,
               checkpoints=checkpoints, phases=phases, data=data, class_names=class_names, multi_label=multi_label,
               model=model, processor=processor, optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp=amp,
               mean=normalization[0], std=normalization[1], max_steps=max_steps, progress=progress,
               ledger=Ledger(NonFiniteStreak(cfg.max_nonfinite_steps, device)), freeze_steps=freeze,
               rng=RNGStreams(rank, world, cfg.seed, progress), ema=EMA(model, cfg.ema_decay) if cfg.ema_decay else None,
               mixing=steps.mixing_for(cfg, len(class_names), rank), teacher=teacher,
               class_weight=balanced_weights(data.train_set.labels, len(class_names)).to(device)
               if cfg.class_weights == "balanced" else None)


def restore(r, resume_from, state, say):
    """The run put back as it was at checkpoint `resume_from`; False when it had already finished (and its model/
    is intact: a damaged or missing one is exported again)."""
    cfg = r.cfg
    with r.phases.span("restore"):
        checkpoint.restore(resume_from, state, r.model, resumable(r), r.optimizer if cfg.fsdp else None)
    dist.same_on_all(r.step, "the step of the checkpoint resumed from (is --output-dir on shared storage?)")
    early = r.progress.stopped_early()
    finished = (r.step >= r.max_steps or early) and os.path.isfile(os.path.join(cfg.output_dir, "all_results.json"))
    if finished and not checkpoint.unsound_exports(cfg.output_dir, adapt.is_lora(r.model), say, r.main):
        say(f"{cfg.output_dir}: the run already finished at step {r.step} (of {r.max_steps}"
            f"{'; stopped early' if early else ''}); nothing to do")
        r.data.close()
        return False
    if r.step > r.max_steps:  # refused before anything in the run directory is rewritten
        raise UserError(f"the run asks for {r.max_steps} steps (--max-steps, --epochs), below step {r.step} of the "
                        f"checkpoint being resumed; pass --max-steps {r.step} to finish it there, or more")
    r.checkpoints.restore_best(r.progress.best)
    say(f"resuming from {resume_from} at step {r.step}")
    return True


def open_records(r, state):
    """The run directory's records (rank 0: train_config.json, env.json) and the log (TensorBoard, console)."""
    cfg, out = r.cfg, r.cfg.output_dir
    with r.phases.span("logs"):
        env = dict(env_info(r.device), world_size=r.world)
        if r.main:
            if cfg.overwrite_output_dir and not state:
                rundir.clear_run(out)  # the user asked: the old run's checkpoints would outrank the new ones
            checkpoint.write_json_atomic(os.path.join(out, RUN_CONFIG), to_dict(cfg))
            checkpoint.write_json_atomic(os.path.join(out, "env.json"), env)
        r.log = RunLog(out, r.step, r.max_steps, r.main, every=cfg.logging_steps, multi_label=r.multi_label,
                       device=r.device)
        if not state:
            r.log.start(report.hparams(cfg, r.precision, r.max_steps, r.world, r.global_batch * cfg.grad_accum_steps),
                        dict(config=to_dict(cfg), env=env))


def announce(r, how, say):
    """The run's first lines: what trains on what, how the step runs, the batch arithmetic, what trains."""
    cfg, data, world = r.cfg, r.data, r.world
    workers = num_workers(cfg.num_workers)
    held_out = "" if cfg.eval_split else f" (held out of split {cfg.train_split!r}: --test-size {cfg.test_size:g})"
    train_n = f"{len(data.train_set)} streamed" if isinstance(data.train_set, StreamImages) else len(data.train_set)
    say(f"run: {cfg.output_dir} | {train_n} train / {len(data.eval_set)} eval images{held_out}, "
        f"{len(r.class_names)} classes{' (multi-label)' * r.multi_label} | {cfg.model} on {r.device} in {r.precision}, "
        f"{f'sharded over {world} process(es) (FSDP2), ' if cfg.fsdp else ''}{r.model.config._attn_implementation} "
        f"attention, {workers} worker{'s' * (workers != 1)} | {r.max_steps} steps")
    if how:
        say(f"step: {how}")
    say(f"batch: {r.global_batch * cfg.grad_accum_steps} images per optimizer step = {world} process(es) x "
        f"--batch-size {cfg.batch_size} x --grad-accum-steps {cfg.grad_accum_steps}; --lr applies to the mean loss "
        "over them (not scaled by processes)")
    trains, total = adapt.trainable(r.model)
    if trains < total:
        say(f"trains: {trains:,} of {total:,} parameters ({trains / total:.2%}): "
            + ("the head (--freeze-backbone)" if cfg.freeze_backbone else
               f"the head alone until step {r.freeze_steps} (--freeze-epochs), then every one" if r.frozen else
               f"LoRA rank {cfg.lora_rank} and the head"))


def build_step(r, graphed, say=print):
    """r.train_model and r.optimizer_step (steps.build_step), for the parameters that train now (DDP reduces those
    it was built with: built again when the backbone unfreezes)."""
    shapes = r.data.train_set.transform.size, len(r.class_names) if r.multi_label else None
    r.train_model, r.optimizer_step = steps.build_step(
        r.cfg, r.model, r.optimizer, r.scheduler, r.scaler, r.amp, r.precision, r.mean, r.std, r.device, r.world,
        r.class_weight, r.mixing, example_batch(r.cfg.batch_size, *shapes) if graphed else None, r.global_batch, say,
        r.teacher)


def step_mode(r):
    """(whether the step is one CUDA graph, how the step runs in words, or None on a CPU where it is plain)."""
    cfg = r.cfg
    compiled_model = ", the model compiled (--compile)" if cfg.compile else ""
    why = ("not on CUDA" if r.device.type != "cuda" else "--no-cuda-graph" if not cfg.cuda_graph else
           "--fsdp" if cfg.fsdp else "several processes" if r.world > 1 else "--grad-accum-steps" if cfg.grad_accum_steps > 1 else
           "--mixup/--cutmix" if r.mixing else "--freeze-epochs (what trains changes midway)" if r.freeze_steps
           else None)
    if why == "not on CUDA":
        return False, "eager" + compiled_model if cfg.compile else None
    if why:
        return False, f"eager{compiled_model} (no CUDA graph of the whole step: {why})"
    return True, (f"one CUDA graph of the whole step (forward, backward, clipping, AdamW{compiled_model}), captured "
                  f"after {GraphedStep.WARMUP} eager steps; --no-cuda-graph for eager")


