"""Fine-tune an image classifier with a plain PyTorch loop.

    python -m vitfood.train --preset demo                    # offline demo: synthetic data, vit-tiny
    python -m vitfood.train                                  # the Food-101 recipe of the HF guide
    python -m vitfood.train --dataset ./my_images --model google/vit-base-patch16-224-in21k
    python -m vitfood.train --resume auto --output-dir runs/my-run
    tensorboard --logdir runs

main() reads in four parts: setup (run directory, data, model, optimizer), restore (from a
checkpoint), the loop (fetch, step, log, eval, save), finish (export and report).
"""

import vitfood
import vitfood.stack

if __name__ == "__main__":
    vitfood.quiet_ctrl_c()  # before the heavy imports below
vitfood.stack.require(__name__)  # a broken install (a torchvision built for another torch) is one line, no traceback

import contextlib
import math
import os
import shlex
import time
from dataclasses import dataclass

import torch
import transformers

from vitfood import adapt, calibrate, checkpoint, dist, fit, fsdp, hub, metrics, report, rundir, sources, synthetic
from vitfood.common import (UserError, env_info, first_line, mixed_precision, num_workers, rank_seed, resolve_precision,
                            run_main, seconds_since_start, seed_everything, start_cuda)
from vitfood.config import RUN_CONFIG, to_dict
from vitfood.data import Data, build_data, check_damaged, eval_skip_warning
from vitfood.images import transforms_for
from vitfood.logs import RunLog, Window
from vitfood.model import (build_model, compiled, hub_model, load_processor, load_weights, make_optimizer, make_scheduler,
                           skeleton)
from vitfood.phases import Phases
from vitfood.sources import balanced_weights, hub_dataset, is_multi_label, is_shards, load_splits
from vitfood.state import Ledger, Progress, RNGStreams
from vitfood.stream import Stream, StreamImages
from vitfood.steps import EMA, GraphedStep, Mixing, NonFiniteStreak, Step, eval_pass, example_batch

EXIT_STOPPED = 75  # stopped by SIGTERM/SIGHUP/SIGINT after saving a checkpoint (sysexits' EX_TEMPFAIL: run again)


@dataclass(kw_only=True)
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
    class_weight: torch.Tensor | None = None  # --class-weights balanced: each class's weight in the loss
    startup: float = 0.0  # seconds from process start to the loop
    train_model: torch.nn.Module | None = None  # what the forward calls: DDP around the model, compiled with --compile
    optimizer_step: Step | None = None  # one optimizer step: micro-batches, DDP, mixing, the CUDA graph
    log: RunLog | None = None
    stopper: dist.Stopper | None = None  # SIGTERM/SIGINT/SIGHUP: save and exit 75, until nothing is left to write

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
    if r.cfg.fsdp:
        del parts["optimizer"]
    return dict(parts, ema=r.ema) if r.ema else parts


def main(argv=None):
    phases = Phases()
    phases.add("imports", 0.0, seconds_since_start())  # the interpreter's start and the imports above
    with phases.span("arguments"):
        cfg, out, resume = rundir.parse_run(argv)
        rank, world, device = dist.setup(cfg.device, cfg.dist_timeout, group=cfg.fsdp)
        cfg.output_dir = dist.from_rank0(out)  # a default name holds a timestamp: rank 0's for all
    cuda_ready = start_cuda(device)
    checkpoints = rundir.Checkpoints(cfg.output_dir, cfg.save_total_limit, main=rank == 0, phases=phases,
                                      every=cfg.save_steps)
    r = None
    try:
        r = setup(cfg, resume, rank, world, device, checkpoints, phases, cuda_ready)
        if r is None:
            return None  # the run had already finished
        return finish(r, train_loop(r))
    except (Exception, KeyboardInterrupt) as e:
        if r is not None and r.log is not None:  # TensorBoard's HParams marks the run failed
            r.log.end("failure", r.step, first_line(e))
            r.log.close()
        if r is not None and r.main:
            with contextlib.suppress(OSError):
                phases.write(cfg.output_dir, "failure")
        if r is not None and isinstance(e, UserError):  # an exit through the interpreter's (the others leave
            r.data.close()  # at once: a dead loader worker, Ctrl-C)
        raise
    finally:
        checkpoints.discard_if_unused()  # a run that failed before writing anything leaves no empty folder


def setup(cfg, resume, rank, world, device, checkpoints, phases=None, cuda_ready=None):
    """The run directory, data, model, optimizer and logs, restored from a checkpoint when resuming;
    None when the run being resumed had already finished. `cuda_ready`: the thread creating the CUDA context."""
    main_rank = rank == 0
    say = print if main_rank else (lambda *args, **kwargs: None)
    phases = phases or Phases()
    with phases.span("open run"):
        hub.check_local(dataset=None if is_shards(cfg.dataset) else cfg.dataset, model=cfg.model)  # a typo in a path is named before anything else
        hub_model(cfg.model)  # and a near miss of a named config
        resume_from = checkpoints.resume_point(resume, cfg.overwrite_output_dir)
        precision = resolve_precision(cfg.precision, device)
        state = checkpoint.load_state(resume_from) if resume_from else None
    if isinstance(cfg.global_batch, int) and cfg.batch_size != "auto" and \
            cfg.global_batch != cfg.batch_size * cfg.grad_accum_steps * world:
        raise UserError(f"--global-batch {cfg.global_batch} is not --batch-size {cfg.batch_size} x --grad-accum-steps "
                        f"{cfg.grad_accum_steps} x {world} process(es); give two of them, or --batch-size auto")

    # ---- data and model (rank 0 first: it downloads or generates, the others then read its cache)
    with phases.span("checks"):  # imports the model's code, as its skeleton is built
        hub.prepare(hub_dataset(cfg.dataset), hub_model(cfg.model), cfg.trust_remote_code)  # fails fast, before the data
        if (shell := skeleton(cfg)) is not None:
            adapt.check_model(shell, cfg)  # a LoRA target or gradient checkpointing the model has not: before the data
    with phases.span("data"):
        seed_everything(cfg.seed)
        if not main_rank:
            dist.wait_for_rank0()
        train_ds, eval_ds, class_names = load_splits(cfg)
        streamed = isinstance(train_ds, Stream)  # single-label: load_splits refuses other streams
        multi_label = cfg.multi_label = not streamed and is_multi_label(train_ds, cfg.label_column)  # as detected
        calibrate.check(multi_label, cfg.target_accuracy, cfg.target_coverage)
    processor, model = load_processor(cfg), None
    if cfg.batch_size == "auto":  # the probe needs the model: built before the loader, this once
        with phases.span("model"):
            model, processor = build_model(cfg, class_names, device, multi_label, processor)
        with phases.span("batch probe"):
            fit.choose(cfg, model.to(device), device, precision, world, transforms_for(processor)[1].size,
                       len(train_ds), say)
    global_batch = cfg.batch_size * world
    with phases.span("loader"):  # the workers start decoding the first batches while the model is built
        train_tf, eval_tf, (mean, std) = transforms_for(processor, cfg.fast_decode, cfg)
        workers = num_workers(cfg.num_workers)
        data = build_data(cfg, train_ds, eval_ds, (train_tf, eval_tf), len(class_names), device, workers, global_batch,
                          rank, world, keep_eval=True)
        if state:
            data.batches.load_state_dict(state["data"])  # where the resumed run reads on (restore sets it again)
        if cuda_ready is not None:
            cuda_ready.join()  # no worker is forked while another thread is inside the CUDA driver
        data.batches.start()
    if model is None:
        with phases.span("model"):
            model, processor = build_model(cfg, class_names, device, multi_label, processor)
    if main_rank:
        dist.wait_for_rank0()
    if world > 1:  # same initial weights everywhere (above); from here, each rank its own dropout masks
        seed_everything(rank_seed(cfg.seed, rank))
    dist.same_on_all((len(train_ds), len(eval_ds), class_names), "the data set")
    transformers.utils.logging.disable_progress_bar()  # downloads are done; no bar per checkpoint write
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * data.sampler.batches_per_epoch / cfg.grad_accum_steps))
    freeze = adapt.freeze_steps(cfg, data.sampler.batches_per_epoch, max_steps) if adapt.freezes_first(cfg) else 0
    if cfg.early_stopping_patience and cfg.eval_steps >= max_steps:
        raise UserError(f"--early-stopping-patience needs evals before the end: --eval-steps {cfg.eval_steps} leaves "
                        f"none in the run's {max_steps} steps")
    judge = metrics.Judge(cfg.best_metric, multi_label)  # a figure the run's kind of eval has

    # ---- optimizer and precision
    with phases.span("device"):
        model.to(device)
        if cfg.fsdp:  # before the optimizer, which then holds each rank's shards
            fsdp.shard(model, precision, device)
        optimizer = make_optimizer(model, cfg)  # every parameter, before a --freeze-epochs phase freezes some
        scheduler = make_scheduler(optimizer, cfg.warmup_steps, max_steps, freeze, (cfg.freeze_lr or 5 * cfg.lr) / cfg.lr)
        amp, scaler = mixed_precision(precision, device, sharded=cfg.fsdp)
    progress = Progress(every=cfg.eval_steps, judge=judge, patience=cfg.early_stopping_patience,
                        min_delta=cfg.early_stopping_min_delta)
    r = Run(cfg=cfg, rank=rank, world=world, device=device, precision=precision, global_batch=global_batch,
            checkpoints=checkpoints, phases=phases, data=data, class_names=class_names, multi_label=multi_label, model=model,
            processor=processor,
            optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp=amp, mean=mean, std=std, max_steps=max_steps,
            progress=progress, ledger=Ledger(NonFiniteStreak(cfg.max_nonfinite_steps, device)), freeze_steps=freeze,
            rng=RNGStreams(rank, world, cfg.seed, progress), ema=EMA(model, cfg.ema_decay) if cfg.ema_decay else None,
            mixing=Mixing(cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.label_smoothing,
                          len(class_names), cfg.seed, rank) if cfg.mixup or cfg.cutmix else None,
            class_weight=balanced_weights(data.train_set.labels, len(class_names)).to(device)
            if cfg.class_weights == "balanced" else None)

    # ---- restore
    if state:
        with phases.span("restore"):
            checkpoint.restore(resume_from, state, model, resumable(r), optimizer if cfg.fsdp else None)
        dist.same_on_all(r.step, "the step of the checkpoint resumed from (is --output-dir on shared storage?)")
        early = r.progress.stopped_early()
        finished = (r.step >= max_steps or early) and os.path.isfile(os.path.join(cfg.output_dir, "all_results.json"))
        if finished and not checkpoint.unsound_exports(cfg.output_dir, adapt.is_lora(model), say, main_rank):
            say(f"{cfg.output_dir}: the run already finished at step {r.step} (of {max_steps}"
                f"{'; stopped early' if early else ''}); nothing to do")
            data.close()
            return None
        if r.step > max_steps:  # refused before anything in the run directory is rewritten
            raise UserError(f"the run asks for {max_steps} steps (--max-steps, --epochs), below step {r.step} of the "
                            f"checkpoint being resumed; pass --max-steps {r.step} to finish it there, or more")
        checkpoints.restore_best(r.progress.best)
        say(f"resuming from {resume_from} at step {r.step}")
    model.train()  # from_pretrained returns a model in eval mode: dropout, drop-path and BatchNorm need this
    if freeze:
        r.frozen = r.step < freeze
        adapt.backbone_trains(model, not r.frozen)
    graphed, how = step_mode(r)
    build_step(r, graphed, say)

    # ---- the run directory's records and logs (rank 0)
    with phases.span("logs"):
        out, env = cfg.output_dir, dict(env_info(device), world_size=world)
        if main_rank:
            if cfg.overwrite_output_dir and not state:
                rundir.clear_run(out)  # the user asked: the old run's checkpoints would outrank the new ones
            checkpoint.write_json_atomic(os.path.join(out, RUN_CONFIG), to_dict(cfg))
            checkpoint.write_json_atomic(os.path.join(out, "env.json"), env)
        r.log = RunLog(out, r.step, max_steps, main_rank, every=cfg.logging_steps)
        if not state:
            r.log.start(report.hparams(cfg, precision, max_steps, world, global_batch * cfg.grad_accum_steps),
                        dict(config=to_dict(cfg), env=env), multi_label)
    held_out = "" if cfg.eval_split else f" (held out of split {cfg.train_split!r}: --test-size {cfg.test_size:g})"
    train_n = f"{len(data.train_set)} streamed" if isinstance(data.train_set, StreamImages) else len(data.train_set)
    say(f"run: {out} | {train_n} train / {len(data.eval_set)} eval images{held_out}, "
        f"{len(class_names)} classes{' (multi-label)' * multi_label} | {cfg.model} on {device} in {precision}, "
        f"{f'sharded over {world} process(es) (FSDP2), ' if cfg.fsdp else ''}{model.config._attn_implementation} "
        f"attention, {workers} worker{'s' * (workers != 1)} | {max_steps} steps")
    if how:
        say(f"step: {how}")
    say(f"batch: {global_batch * cfg.grad_accum_steps} images per optimizer step = {world} process(es) x --batch-size "
        f"{cfg.batch_size} x --grad-accum-steps {cfg.grad_accum_steps}; --lr applies to the mean loss over them "
        "(not scaled by processes)")
    trains, total = adapt.trainable(model)
    if trains < total:
        say(f"trains: {trains:,} of {total:,} parameters ({trains / total:.2%}): "
            + ("the head (--freeze-backbone)" if cfg.freeze_backbone else
               f"the head alone until step {freeze} (--freeze-epochs), then every one" if r.frozen else
               f"LoRA rank {cfg.lora_rank} and the head"))
    return r


def build_step(r, graphed, say=print):
    """r.train_model (DDP around the model on several ranks, compiled with --compile) and r.optimizer_step, for
    the parameters that train now (DDP reduces those it was built with: built again when the backbone unfreezes)."""
    cfg, model = r.cfg, r.model
    ddp = model  # --fsdp: the sharded model reduce-scatters its gradients itself
    if r.world > 1 and not cfg.fsdp:  # PyTorch's DDP: gradients averaged across ranks during backward
        ddp = dist.data_parallel(model, r.device)
    r.train_model = compiled(ddp, r.device, r.world, graphed) if cfg.compile else ddp
    graph = None
    if graphed:
        shapes = r.data.train_set.transform.size, len(r.class_names) if r.multi_label else None
        graph = GraphedStep(r.train_model, r.optimizer, r.scaler, r.scheduler, r.precision, r.mean, r.std,
                            cfg.max_grad_norm, cfg.label_smoothing, r.class_weight,
                            *example_batch(cfg.batch_size, *shapes), r.global_batch, say)
    r.optimizer_step = Step(model, r.optimizer, r.scheduler, r.scaler, r.amp, r.mean, r.std, cfg.max_grad_norm,
                            cfg.label_smoothing, r.class_weight, r.mixing, ddp, r.train_model, r.world, graph)


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


def train_loop(r):
    """Optimizer steps from r.step to r.max_steps, or until a stop signal. Returns the stop signal, or None."""
    cfg, log, accum, ledger = r.cfg, r.log, r.cfg.grad_accum_steps, r.ledger
    stopper = r.stopper = dist.Stopper(r.device, log.say)
    window = Window(r.device, r.world, r.step)
    ledger.begin()
    train_loss, stopped, bad_train = None, None, set()
    started, first_step, waited = seconds_since_start(), r.step, 0.0
    while r.step < r.max_steps and not r.progress.stopped_early():
        if r.frozen and r.step >= r.freeze_steps:  # the head has trained alone: now the whole model
            unfreeze(r)
        # fetch and step: the loss is summed over samples and divided by the step's global sample count, so
        # the gradient is the mean over the whole global batch, however it is split in micro-batches and ranks
        lrs = r.scheduler.get_last_lr()  # with --layer-decay, the head's is the highest
        step_samples = r.data.sampler.samples_in(r.step * accum, accum)
        batches = []
        for micro in range(accum):
            t0 = time.perf_counter()
            images, labels, damaged = next(r.data.batches)
            waited += time.perf_counter() - t0
            window.fetched(labels.shape[0], time.perf_counter() - t0)
            ledger.fetched(damaged)
            if not r.startup:
                r.startup = seconds_since_start()  # process start to the first batch in hand
                r.phases.mark("first batch", step=r.step)
            if r.step == 0 and micro == 0:
                log.augmented(images)
            batches.append((images, labels))
        loss, norm, finite = r.optimizer_step(batches, r.step, step_samples)
        if r.ema:
            r.ema.update()
        r.progress.step += 1
        ledger.stepped(step_samples)
        checkpoint.fault_point("step")
        log.stepped()
        window.stepped(loss, norm, finite)
        ledger.nonfinite.update(finite, r.step)
        last_step = r.step == r.max_steps
        stop, write_failed = dist.any_rank((stopper.signal, r.checkpoints.failed), r.device)  # all ranks alike
        if write_failed:  # a checkpoint write failed in the background (on rank 0): every rank stops here
            r.checkpoints.check()
            raise UserError("rank 0 could not write a checkpoint (its error is above); stopping with it")
        stopped = stop and not last_step and (stopper.signal or "another rank")

        if log.due(r.step, last_step):  # log: sums over ranks, read once (a sync), only here
            figures = window.close(r.step, len(ledger.damaged))
            train_loss = figures["loss"]
            bad_train = ledger.damaged_files()[0] if figures["any_damaged"] else set()  # a gather only when any
            log.train(r.step, train_loss, lrs, figures["grad_norm"], figures["img_s"], figures["data_wait"],
                      r.scaler.get_scale() if r.scaler.is_enabled() else None, len(bad_train),
                      ledger.nonfinite.check(r.checkpoints.latest))
        t_pause = time.perf_counter()
        evaluated = r.progress.due(r.step, last_step)  # also when stopping: history and best stay whole
        if evaluated:  # eval
            with r.phases.span("eval", step=r.step) as info:
                scores = evaluate(r, mistakes=8)
                info["images"] = scores["samples"] * (2 if r.ema else 1)  # with an EMA, a second pass
            log.eval(r.step, scores, r.class_names)
            r.progress.evaluated(scores, train_loss)
        early = evaluated and not last_step and r.progress.stopped_early()  # the same on every rank
        if r.checkpoints.due(r.step, last_step) or stopped or early:  # save
            with r.phases.span("save", step=r.step):
                save(r, evaluated)
        # too many damaged images: stop, naming some (after the save, so a higher --max-bad-share can resume)
        check_damaged(r.data.train_set, bad_train, "training", cfg.max_bad_share)
        if evaluated:
            check_damaged(r.data.eval_set, scores["damaged"], "eval", cfg.max_bad_share)
        window.pause(time.perf_counter() - t_pause)  # eval and save time is not training throughput
        if early:
            log.say(f"early stop at step {r.step} of {r.max_steps}: {early}")
        if stopped:
            break
    r.phases.add("loop", started, seconds_since_start(), steps=r.step - first_step, images=ledger.segment_images,
                 data_wait_s=round(waited, 3))
    return stopped


def unfreeze(r):
    """The switch of --freeze-epochs: the backbone trains from here, on the configured schedule."""
    adapt.backbone_trains(r.model, True)
    r.frozen = False
    build_step(r, False, r.log.say)
    trains, total = adapt.trainable(r.model)
    r.log.note("run/schedule", f"step {r.step}: the backbone unfreezes; {trains:,} of {total:,} parameters train from "
                               "here, on the configured schedule", r.step)


def save(r, evaluated):
    """checkpoint-<step>: the weights and every resumable part. Rank 0 copies them and writes in the
    background; the barrier keeps the ranks in step (none reads a checkpoint during training)."""
    new_best = evaluated and r.progress.consider_best()
    state = checkpoint.state_of(resumable(r))  # every rank: the RNG streams and the ledger gather over ranks
    r.log.flush()  # what was logged up to this checkpoint survives a kill; a resumed run purges the rest
    if r.cfg.fsdp:
        r.checkpoints.save_sharded(r.step, r.model, r.optimizer, r.processor, state, r.progress.best, new_best)
    else:
        r.checkpoints.save(r.step, r.model, r.processor, state, r.progress.best, new_best)
    dist.barrier()


def finish(r, stopped):
    """Export the model and write the results; or, after a stop signal, say how to continue and exit 75.
    The last checkpoint's write goes on while the export is prepared; model/ then takes its weights file
    (a hard link: the same bytes are not written twice)."""
    cfg, out, log, phases = r.cfg, r.cfg.output_dir, r.log, r.phases
    log.pbar.close()
    # a signal during the last eval or the last checkpoint's write: that checkpoint is complete; stop there
    stopped = stopped or (dist.any_rank([r.stopper.signal], r.device)[0] and (r.stopper.signal or "another rank"))
    if stopped:
        stop(r, stopped)
    ledger = r.ledger.state_dict()  # every rank: it adds up over ranks
    bad_train, bad_eval = len(ledger["damaged_files"]), (r.progress.metrics or {}).get("skipped", 0)
    if bad_train:
        log.say(f"warning: {bad_train} damaged training file(s) ({ledger['damaged_encounters']} encounters) could "
                "not be decoded and were skipped (--bad-images error to stop instead)")
    if bad_eval:
        log.say(eval_skip_warning(bad_eval, len(r.data.eval_set)))

    if cfg.export == "best" or cfg.export_ema:  # maybe other weights than the last write's: no overlap with
        r.checkpoints.wait()  # it (nor its rotation beside the reading of an older checkpoint)
    final, export_step = r.progress.current(), r.checkpoints.to_export(r.step, r.progress, cfg.export, log.say)
    if export_step != r.step:
        load_weights(r.model, os.path.join(out, f"checkpoint-{export_step}"))
        final = None
    if final is None or not metrics.complete(final):  # the best's weights, or a run resumed at its last step
        # from a save between evals (or written by a vitfood without some of today's metrics)
        with phases.span("final eval"):
            final = evaluate(r)
    rows = metrics.table(final)  # what the eval measured: single-label or multi-label
    if cfg.export_ema:  # the EMA's weights and eval stand for the model
        r.model.load_state_dict(r.ema.model.state_dict())
        final = dict(final, **{m.key: final[f"ema_{m.key}"] for m in rows})
    if not math.isfinite(final["loss"]):
        raise UserError(f"the final eval loss is {final['loss']}: the weights at step {export_step} are not finite "
                        f"(a damaged checkpoint?); nothing exported. The checkpoints in {out} are untouched")
    cal, unknown = None, None
    if cfg.calibrate != "none" or cfg.target_accuracy or cfg.target_coverage:  # on the weights model/ gets
        with phases.span("calibration"):
            seen = eval_pass(r.model, r.data.eval_loader, r.device, r.precision, r.mean, r.std, progress=r.main,
                             num_classes=len(r.class_names), multi_label=r.multi_label, keep=True)
            if len(seen["labels"]) >= calibrate.FEWEST:
                cal, unknown = calibrate.fitted(seen["logits"], seen["labels"], r.multi_label, cfg.calibrate,
                                                cfg.target_accuracy, cfg.target_coverage)
                log.calibration(export_step, cal, unknown, cfg.target_accuracy)
            else:  # the one reason: a second warning about the target would blame the threshold
                log.say(f"warning: {len(seen['labels'])} eval image(s): too few to calibrate or set an unknown "
                        f"threshold on (at least {calibrate.FEWEST}); model/ keeps the raw scores")
        if cal and cal["kept"]:  # the exported model's loss: its scores are the calibrated ones (the rest is the same)
            final = dict(final, loss=cal["nll_after"])
    early = r.progress.stopped_early()
    results = report.results(final, r.step, export_step, ledger, r.startup, r.precision, ema=r.ema is not None,
                             best_metric=r.progress.judging().name, stopped_early=early, calibration=cal,
                             unknown=unknown, broken_links=len(sources.broken_links(cfg.dataset)))
    export = None
    whole = fsdp.gathered(r.model, r.main) if cfg.fsdp else None  # every rank sends its shards to rank 0
    if r.main:
        env = env_info(r.device)
        card = report.model_card(cfg, results, r.progress.history, dict(train=len(r.data.train_set), eval=len(r.data.eval_set)),
                                 r.class_names, r.precision, r.world, r.global_batch * cfg.grad_accum_steps,
                                 {k: env[k] for k in ("torch", "transformers", "datasets")})
        with phases.span("export"):
            if adapt.is_lora(r.model):  # the adapter as it trained, then the model with it merged in
                checkpoint.export(out, r.model, r.processor, name=adapt.ADAPTER)
            exported = whole or adapt.merged(r.model)
            if calibrate.kept(cal) != 1:  # model/ scores calibrated wherever it is loaded; checkpoints keep the raw
                calibrate.fold(exported, calibrate.kept(cal))
            calibrate.record(exported.config, cal, unknown and unknown[0], cfg.threshold if r.multi_label else None)
            # the checkpoint of the exported step holds these very weights, unless they are merged, the EMA's or
            # calibrated
            same = not (adapt.is_lora(r.model) or cfg.export_ema or calibrate.kept(cal) != 1 or whole)
            export = checkpoint.Export(out, exported, r.processor, card,
                                       weights_of=os.path.join(out, f"checkpoint-{export_step}") if same else None,
                                       own_config=cal is not None or unknown is not None)
    with phases.span("final wait"):
        r.checkpoints.wait()  # the last checkpoint is complete before its weights are linked or the process ends
    if dist.any_rank([r.stopper.signal], r.device)[0]:  # a signal while it was written: stop, as during the eval
        if export:
            export.discard()
        stop(r, r.stopper.signal or "another rank")
    if r.main:
        with phases.span("export"):
            model_dir = export.seal()
            checkpoint.write_json_atomic(os.path.join(out, "all_results.json"), results)
        print(f"\ndone: {out}")
        segments = f" in {ledger['segments']} segments" if ledger["segments"] > 1 else ""
        print("  " + "  ".join(f"{m.result} {results[m.result]:.4f}" for m in rows[:3]) +
              f"  ({r.step} steps, {ledger['train_runtime']:.0f} s{segments})")
        if early:
            print(f"  stopped early at step {r.step} of {r.max_steps}: {early}")
        print(f"  model: {model_dir}")
        if cfg.dataset == "synthetic":  # a few images to try the model on, where the next command finds them
            samples = synthetic.write_samples(out, r.data.eval_set, r.class_names)
            print(f"  try it: python -m vitfood.predict --model {shlex.quote(out)} {shlex.quote(samples)}")
        print(f"  tensorboard --logdir {shlex.quote(out)}")
        print(f"  {phases.summary()}")
        phases.write(out, "success")
    log.end("early stop" if early else "success", r.step, f"eval {metrics.scored(rows).heading} "
            f"{metrics.score(final):.4f}, loss {final['loss']:.4f} (the exported model, step {export_step})"
            + (f"; stopped early: {early}" if early else ""))
    log.close()
    r.data.close()
    dist.barrier()
    dist.close()
    r.stopper.close()  # nothing left to write: signals act as usual again
    return results


def stop(r, by):
    """After a stop signal: the last checkpoint complete, say how to continue, exit 75."""
    out, log = r.cfg.output_dir, r.log
    r.checkpoints.wait()
    log.end("stopped", r.step, f"by {by}; resume with --resume auto")
    log.close()
    log.say(f"stopped by {by} at step {r.step}: saved {os.path.join(out, f'checkpoint-{r.step}')}; "
            f"continue with --resume auto --output-dir {shlex.quote(out)}")
    if r.main:
        r.phases.write(out, "stopped")
    r.data.close()
    dist.close()
    raise SystemExit(EXIT_STOPPED)


def evaluate(r, **details):
    """The eval of the weights, and with --ema-decay of the EMA weights too (keys ema_loss, ema_acc1, ...);
    `details`: how many mistakes to keep, for the weights."""
    def run(model, **more):
        return eval_pass(model, r.data.eval_loader, r.device, r.precision, r.mean, r.std, progress=r.main,
                         num_classes=len(r.class_names), multi_label=r.multi_label, threshold=r.cfg.threshold, **more)
    result = run(r.train_model, **details)
    if r.ema:
        ema = run(r.ema.model)
        result.update({f"ema_{m.key}": ema[m.key] for m in metrics.table(ema)})
    return result


def cli():
    """Console entry point `vitfood-train`, the same as `python -m vitfood.train`."""
    run_main(main)


if __name__ == "__main__":
    cli()
