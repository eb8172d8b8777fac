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

if __name__ == "__main__":
    vitfood.quiet_ctrl_c()  # before the heavy imports below

import contextlib
import datetime
import math
import os
import shlex
import time
from dataclasses import dataclass

import torch
import transformers

from vitfood import adapt, checkpoint, dist, hub, metrics, report
from vitfood.phases import Phases
from vitfood.common import (UserError, env_info, first_line, mixed_precision, num_workers, resolve_precision, run_main,
                            safe_name, seconds_since_start, seed_everything, start_cuda)
from vitfood.config import FIXED_ON_RESUME, build_parser, read_config_file, resolve, to_dict
from vitfood.data import (Data, balanced_weights, build_data, check_damaged, eval_skip_warning, hub_dataset, is_multi_label,
                          load_splits, transforms_for)
from vitfood.hub import is_path
from vitfood.logs import Meter, RunLog
from vitfood.model import (build_model, compiled, hub_model, load_processor, load_weights, make_optimizer, make_scheduler,
                           skeleton)
from vitfood.state import Ledger, Progress, RNGStreams
from vitfood.steps import EMA, GraphedStep, Mixing, NonFiniteStreak, eval_pass, forward_backward, optimizer_step

EXIT_STOPPED = 75  # stopped by SIGTERM/SIGHUP/SIGINT after saving a checkpoint (sysexits' EX_TEMPFAIL: run again)


def parse_run(argv):
    """(config, output_dir, --resume value) from the command line."""
    explicit = vars(build_parser().parse_args(argv))
    resume = explicit.get("resume")
    out = explicit.get("output_dir")
    if resume == "auto" and out is None:  # the user's last run of this model and data set, never a silent fresh start
        out = newest_run(resolve(explicit))
    if resume not in (None, "auto"):
        checkpoint.check_resumable(resume)  # fails fast, with one line, when it is not an intact checkpoint
        out = out or os.path.dirname(os.path.abspath(resume))
    run_dir = os.path.dirname(os.path.abspath(resume)) if resume not in (None, "auto") else out
    saved = os.path.join(run_dir, "train_config.json") if run_dir else None
    base = None
    if resume and saved and os.path.isfile(saved):  # resuming: the run's own config, flags on top
        base = {k: v for k, v in read_config_file(saved, run=True).items() if k not in ("resume", "output_dir")}
    cfg = resolve(explicit, base)
    if base:  # what decides the data order and the weights cannot change under a resumed run
        changed = [k for k in FIXED_ON_RESUME if k in base and getattr(cfg, k) != base[k]]
        if changed:
            raise UserError(f"--{changed[0].replace('_', '-')} differs from the run being resumed "
                            f"({base[changed[0]]!r}); drop the flag, or start a new run in another --output-dir")
    if out is None:  # a new run: rank 0 claims its folder now (another run may start in the same second)
        out = os.path.join("runs", run_name(cfg))
        out = checkpoint.claim(out) if os.environ.get("RANK", "0") == "0" else out
    cfg.output_dir = out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output-dir {out} exists and is not a folder")
    return cfg, out, resume


def run_name(cfg):
    """<MMDD-HHMMSS>-<model>-<data set>: the part that tells runs apart first, as TensorBoard cuts long
    names; a path contributes its last folder, and each part is capped, so the name stays short."""
    part = lambda name: safe_name(os.path.basename(os.path.normpath(name)) if is_path(name) else name)[:40]
    return f"{datetime.datetime.now():%m%d-%H%M%S}-{part(cfg.model)}-{part(cfg.dataset)}"


def newest_run(cfg, root="runs"):
    """The newest run directory under `root` made with cfg's model and data set, or None (saying so)."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else ():
        path = os.path.join(root, name, "train_config.json")
        if not os.path.isfile(path):
            continue  # not a run directory
        try:
            saved = read_config_file(path)
        except UserError as e:
            print(f"--resume auto without --output-dir: skipping {os.path.join(root, name)}: {e}")
            continue
        if saved.get("model") == cfg.model and saved.get("dataset") == cfg.dataset:
            found.append((os.path.getmtime(path), os.path.join(root, name)))
    what = f"{cfg.model} on {cfg.dataset}"
    if not found:
        print(f"--resume auto without --output-dir: no earlier run of {what} under {root}/; starting a new one")
        return None
    out = max(found)[1]
    print(f"--resume auto without --output-dir: continuing {out}, the newest run of {what} under {root}/ "
          "(pass --output-dir to choose another)")
    return out


def open_run(cfg, checkpoints, resume, main=True):
    """The checkpoint to resume from, or None. Rank 0 creates, locks and tidies the directory first."""
    checkpoints.open()
    if main:  # damaged checkpoints are moved aside, never deleted; --resume auto takes the newest intact one
        check_newest = resume == "auto"  # read to the byte; older ones are read when they are resumed from
        for _, path in reversed(checkpoint.checkpoint_folders(cfg.output_dir)):
            if checkpoint.is_complete(path) and not check_newest:
                continue
            problem = checkpoint.damage(path)
            if not problem:
                check_newest = False
                continue
            moved = checkpoint.set_aside(path)
            then = "not used" if resume != "auto" else "resuming from the checkpoint before it" \
                if checkpoint.complete_checkpoints(cfg.output_dir) else "no complete checkpoint is left before it"
            print(f"warning: {path} is damaged ({problem}); moved it aside to {moved}; {then}")
    dist.barrier()  # no rank lists checkpoints before the cleanup
    found = checkpoint.complete_checkpoints(cfg.output_dir)
    if resume == "auto":
        if found:
            return found[-1][1]
        if main:
            print(f"--resume auto: no complete checkpoint in {cfg.output_dir}, starting fresh")
        return None
    if resume:
        return resume
    finished = os.path.isfile(os.path.join(cfg.output_dir, "all_results.json"))
    if (found or finished) and not cfg.overwrite_output_dir:
        what = "a finished run" if finished else f"{len(found)} checkpoint(s)"
        raise UserError(f"{cfg.output_dir} already holds {what}; pass --resume auto to continue it, "
                        "or --overwrite-output-dir to start over there")
    return None


@dataclass(kw_only=True)
class Run:
    """What the set-up builds, and what the loop advances."""
    cfg: object
    rank: int
    world: int
    device: torch.device
    precision: str
    global_batch: int  # images per micro-step over all ranks; x grad_accum_steps per optimizer step
    checkpoints: checkpoint.Checkpoints
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
    ema: EMA | None = None  # --ema-decay: the moving average of the weights
    mixing: Mixing | None = None  # --mixup, --cutmix
    class_weight: torch.Tensor | None = None  # --class-weights balanced: each class's weight in the loss
    startup: float = 0.0  # seconds from process start to the loop
    ddp: torch.nn.Module | None = None  # the model as DDP sees it (the model itself for one process)
    train_model: torch.nn.Module | None = None  # what the step calls: ddp, compiled with --compile
    graph: GraphedStep | None = None  # on CUDA: the whole step as one CUDA graph (--cuda-graph)
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
    adding state to a run is a part here, or a field of one."""
    parts = dict(progress=r.progress, ledger=r.ledger, data=r.data.batches, rng=r.rng,
                 optimizer=r.optimizer, scheduler=r.scheduler, scaler=r.scaler)
    return dict(parts, ema=r.ema) if r.ema else parts


def main(argv=None):
    phases = Phases()
    phases.add("imports", 0.0, seconds_since_start())  # the interpreter's start and the imports above
    with phases.span("arguments"):
        cfg, out, resume = parse_run(argv)
        rank, world, device = dist.setup(cfg.device, cfg.dist_timeout)
        cfg.output_dir = dist.from_rank0(out)  # a default name holds a timestamp: rank 0's for all
    cuda_ready = start_cuda(device)
    checkpoints = checkpoint.Checkpoints(cfg.output_dir, cfg.save_total_limit, main=rank == 0, phases=phases)
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
        hub.check_local(dataset=cfg.dataset, model=cfg.model)  # a typo in a path is named before anything else
        hub_model(cfg.model)  # and a near miss of a named config
        resume_from = open_run(cfg, checkpoints, resume, main_rank)
        precision = resolve_precision(cfg.precision, device)
        state = checkpoint.load_state(resume_from) if resume_from else None
    global_batch = cfg.batch_size * world

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
        multi_label = is_multi_label(train_ds, cfg.label_column)
    with phases.span("loader"):  # the workers start decoding the first batches while the model is built
        processor = load_processor(cfg)
        train_tf, eval_tf, (mean, std) = transforms_for(processor, cfg.fast_decode, cfg)
        workers = num_workers(cfg.num_workers)
        data = build_data(cfg, train_ds, eval_ds, (train_tf, eval_tf), len(class_names), device, workers, global_batch,
                          rank, world, keep_eval=True)
        if state:
            data.batches.load_state_dict(state["data"])  # where the resumed run reads on (restore sets it again)
        if cuda_ready is not None:
            cuda_ready.join()  # no worker is forked while another thread is inside the CUDA driver
        data.batches.start()
    with phases.span("model"):
        model, processor = build_model(cfg, class_names, device, multi_label, processor)
    if main_rank:
        dist.wait_for_rank0()
    if world > 1:  # same initial weights everywhere (above); from here, each rank its own dropout masks
        seed_everything(cfg.seed + 7919 * rank)
    dist.same_on_all((len(train_ds), len(eval_ds), class_names), "the data set")
    transformers.utils.logging.disable_progress_bar()  # downloads are done; no bar per checkpoint write
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * data.sampler.batches_per_epoch / cfg.grad_accum_steps))

    # ---- optimizer and precision
    with phases.span("device"):
        model.to(device)
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg.warmup_steps, max_steps)
        amp, scaler = mixed_precision(precision, device)
    progress = Progress()
    r = Run(cfg=cfg, rank=rank, world=world, device=device, precision=precision, global_batch=global_batch,
            checkpoints=checkpoints, phases=phases, data=data, class_names=class_names, multi_label=multi_label, model=model,
            processor=processor,
            optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp=amp, mean=mean, std=std, max_steps=max_steps,
            progress=progress, ledger=Ledger(NonFiniteStreak(cfg.max_nonfinite_steps, device)),
            rng=RNGStreams(rank, world, cfg.seed, progress), ema=EMA(model, cfg.ema_decay) if cfg.ema_decay else None,
            mixing=Mixing(cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.label_smoothing,
                          len(class_names), cfg.seed, rank) if cfg.mixup or cfg.cutmix else None,
            class_weight=balanced_weights(data.train_set.labels, len(class_names)).to(device)
            if cfg.class_weights == "balanced" else None)

    # ---- restore
    if state:
        with phases.span("restore"):
            checkpoint.restore(resume_from, state, model, resumable(r))
        dist.same_on_all(r.step, "the step of the checkpoint resumed from (is --output-dir on shared storage?)")
        if r.step >= max_steps and os.path.isfile(os.path.join(cfg.output_dir, "all_results.json")):
            say(f"{cfg.output_dir}: the run already finished at step {r.step} (of {max_steps}); nothing to do")
            data.close()
            return None
        if r.step > max_steps:  # refused before anything in the run directory is rewritten
            raise UserError(f"the run asks for {max_steps} steps (--max-steps, --epochs), below step {r.step} of the "
                            f"checkpoint being resumed; pass --max-steps {r.step} to finish it there, or more")
        checkpoints.restore_best(r.progress.best)
        say(f"resuming from {resume_from} at step {r.step}")
    model.train()  # from_pretrained returns a model in eval mode: dropout, drop-path and BatchNorm need this
    r.ddp = model
    if world > 1:  # PyTorch's DDP: gradients averaged across ranks during backward
        r.ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    graphed, how = step_mode(r)
    r.train_model = compiled(r.ddp, device, world, graphed) if cfg.compile else r.ddp
    if graphed:
        size = data.train_set.transform.size
        r.graph = GraphedStep(r.train_model, optimizer, scaler, scheduler, precision, mean, std, cfg.max_grad_norm,
                              cfg.label_smoothing, r.class_weight, torch.empty((cfg.batch_size, 3, *size), dtype=torch.uint8),
                              torch.empty((cfg.batch_size, len(class_names)) if multi_label else (cfg.batch_size,),
                                          dtype=torch.uint8 if multi_label else torch.int64), global_batch, say)

    # ---- the run directory's records and logs (rank 0)
    with phases.span("logs"):
        out, env = cfg.output_dir, dict(env_info(device), world_size=world)
        if main_rank:
            if cfg.overwrite_output_dir and not state:
                checkpoint.clear_run(out)  # the user asked: the old run's checkpoints would outrank the new ones
            checkpoint.write_json_atomic(os.path.join(out, "train_config.json"), to_dict(cfg))
            checkpoint.write_json_atomic(os.path.join(out, "env.json"), env)
        r.log = RunLog(out, r.step, max_steps, main_rank)
        if not state:
            r.log.start(hparams(cfg, precision, max_steps, world, global_batch * cfg.grad_accum_steps),
                        dict(config=to_dict(cfg), env=env), multi_label)
    held_out = "" if cfg.eval_split else f" (held out of split {cfg.train_split!r}: --test-size {cfg.test_size:g})"
    say(f"run: {out} | {len(data.train_set)} train / {len(data.eval_set)} eval images{held_out}, "
        f"{len(class_names)} classes{' (multi-label)' * multi_label} | {cfg.model} on {device} in {precision}, {model.config._attn_implementation} "
        f"attention, {workers} worker{'s' * (workers != 1)} | {max_steps} steps")
    say(f"step: {how}")
    say(f"batch: {global_batch * cfg.grad_accum_steps} images per optimizer step = {world} process(es) x --batch-size "
        f"{cfg.batch_size} x --grad-accum-steps {cfg.grad_accum_steps}; --lr applies to the mean loss over them "
        "(not scaled by processes)")
    trains, total = adapt.trainable(model)
    if trains < total:
        say(f"trains: {trains:,} of {total:,} parameters ({trains / total:.2%}): "
            + ("the head (--freeze-backbone)" if cfg.freeze_backbone else f"LoRA rank {cfg.lora_rank} and the head"))
    return r


def step_mode(r):
    """(whether the step is one CUDA graph, how the step runs, in words)."""
    cfg = r.cfg
    compiled_model = ", the model compiled (--compile)" if cfg.compile else ""
    why = ("not on CUDA" if r.device.type != "cuda" else "--no-cuda-graph" if not cfg.cuda_graph else
           "several processes" if r.world > 1 else "--grad-accum-steps" if cfg.grad_accum_steps > 1 else
           "--mixup/--cutmix" if r.mixing else None)
    if why:
        return False, f"eager{compiled_model} (no CUDA graph of the whole step: {why})"
    return True, (f"one CUDA graph of the whole step (forward, backward, clipping, AdamW{compiled_model}), captured "
                  f"after {GraphedStep.WARMUP} eager steps; --no-cuda-graph for eager")


def train_loop(r):
    """Optimizer steps from r.step to r.max_steps, or until a stop signal. Returns the stop signal, or None."""
    cfg, log, accum, ledger = r.cfg, r.log, r.cfg.grad_accum_steps, r.ledger
    stopper = r.stopper = dist.Stopper(r.device, log.say)
    meter = Meter()
    ledger.begin()
    loss_sum, norm_sum, kept = (torch.zeros((), device=r.device) for _ in range(3))
    last_log, train_loss, stopped, bad_train = r.step, None, None, set()
    started, first_step, waited = seconds_since_start(), r.step, 0.0
    while r.step < r.max_steps:
        # fetch and step: the loss is summed over samples and divided by the step's global sample count, so
        # the gradient is the mean over the whole global batch, however it is split in micro-batches and ranks
        lrs = r.scheduler.get_last_lr()  # with --layer-decay, the head's is the highest
        step_samples = r.data.sampler.samples_in(r.step * accum, accum)
        batches = []
        for micro in range(accum):
            t0 = time.perf_counter()
            images, labels, damaged = next(r.data.batches)
            waited += time.perf_counter() - t0
            meter.fetched(labels.shape[0], time.perf_counter() - t0)
            ledger.fetched(damaged)
            if not r.startup:
                r.startup = seconds_since_start()  # process start to the first batch in hand
                r.phases.mark("first batch", step=r.step)
            if r.step == 0 and micro == 0:
                log.augmented(images)
            batches.append((images, labels))
        if r.graph is not None:  # the whole step, replayed as one CUDA graph
            loss, norm, finite = r.graph(images, labels, step_samples)
            loss_sum += loss
        else:
            for micro, (images, labels) in enumerate(batches):
                sync = r.world == 1 or micro == accum - 1  # all-reduce gradients once, on the last micro-batch
                with contextlib.nullcontext() if sync else r.ddp.no_sync():  # DDP averages over ranks: / world
                    loss_sum += forward_backward(r.train_model, images, labels, r.amp, r.scaler, r.mean, r.std,
                                                 step_samples / r.world, cfg.label_smoothing,
                                                 r.mixing and r.mixing.at(r.step, micro), r.class_weight)
            norm, finite = optimizer_step(r.model, r.optimizer, r.scaler, r.scheduler, cfg.max_grad_norm)
        if r.ema:
            r.ema.update()
        r.progress.step += 1
        ledger.stepped(step_samples)
        checkpoint.fault_point("step")
        log.stepped()
        norm_sum += torch.where(finite, norm, 0.0)  # a skipped step (non-finite) left the weights as they were:
        kept += finite  # the norm is the mean over the steps that were taken
        ledger.nonfinite.update(finite, r.step)
        last_step = r.step == r.max_steps
        stop, write_failed = dist.any_rank((stopper.signal, r.checkpoints.failed), r.device)  # all ranks alike
        if write_failed:  # a checkpoint write failed in the background (on rank 0): every rank stops here
            r.checkpoints.check()
            raise UserError("rank 0 could not write a checkpoint (its error is above); stopping with it")
        stopped = stop and not last_step and (stopper.signal or "another rank")

        if r.step % cfg.logging_steps == 0 or last_step:  # log: sums over ranks; .item() syncs, only here
            n, last_log = r.step - last_log, r.step
            counts = torch.tensor([meter.images, len(ledger.damaged)], dtype=torch.float32, device=r.device)
            totals = dist.all_sum(torch.cat([torch.stack([loss_sum, norm_sum, kept]) / r.world, counts]))
            train_loss = round((totals[0] / n).item(), 6)
            img_s, wait = meter.window(int(totals[3].item()))
            bad_train = ledger.damaged_files()[0] if totals[4].item() else set()  # a gather only when there are any
            skipped = ledger.nonfinite.check(r.checkpoints.latest)
            taken = totals[2].item()  # none: every step of the window was skipped, and there is no norm to log
            log.train(r.step, train_loss, lrs, (totals[1] / taken).item() if taken else None, img_s, wait,
                      r.scaler.get_scale() if r.scaler.is_enabled() else None, len(bad_train), skipped)
            for total in (loss_sum, norm_sum, kept):
                total.zero_()
        t_pause = time.perf_counter()
        evaluated = r.step % cfg.eval_steps == 0 or last_step  # also when stopping: history and best stay whole
        if evaluated:  # eval
            with r.phases.span("eval", step=r.step) as info:
                scores = evaluate(r, mistakes=8)
                info["images"] = scores["samples"] * (2 if r.ema else 1)  # with an EMA, a second pass
            log.eval(r.step, scores, r.class_names)
            r.progress.evaluated(scores, train_loss)
        if r.step % cfg.save_steps == 0 or last_step or stopped:  # save
            with r.phases.span("save", step=r.step):
                save(r, evaluated)
        # too many damaged images: stop, naming some (after the save, so a higher --max-bad-share can resume)
        check_damaged(r.data.train_set, bad_train, "training", cfg.max_bad_share)
        if evaluated:
            check_damaged(r.data.eval_set, scores["damaged"], "eval", cfg.max_bad_share)
        meter.pause(time.perf_counter() - t_pause)  # eval and save time is not training throughput
        if stopped:
            break
    r.phases.add("loop", started, seconds_since_start(), steps=r.step - first_step, images=ledger.segment_images,
                 data_wait_s=round(waited, 3))
    return stopped


def save(r, evaluated):
    """checkpoint-<step>: the weights and every resumable part. Rank 0 copies them and writes in the
    background; the barrier keeps the ranks in step (none reads a checkpoint during training)."""
    new_best = evaluated and r.progress.consider_best()
    state = checkpoint.state_of(resumable(r))  # every rank: the RNG streams and the ledger gather over ranks
    r.log.flush()  # what was logged up to this checkpoint survives a kill; a resumed run purges the rest
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
    final, export_step = r.progress.current(), step_to_export(r)
    if export_step != r.step:
        load_weights(r.model, os.path.join(out, f"checkpoint-{export_step}"))
        final = None
    if final is None or "f1_macro" not in final:  # the best's weights, or a run resumed at its last step
        # from a save between evals (or written by a vitfood without these metrics)
        with phases.span("final eval"):
            final = evaluate(r)
    rows = metrics.table(final)  # what the eval measured: single-label or multi-label
    if cfg.export_ema:  # the EMA's weights and eval stand for the model
        r.model.load_state_dict(r.ema.model.state_dict())
        final = dict(final, **{k: final[f"ema_{k}"] for k, *_ in rows})
    if not math.isfinite(final["loss"]):
        raise UserError(f"the final eval loss is {final['loss']}: the weights at step {export_step} are not finite "
                        f"(a damaged checkpoint?); nothing exported. The checkpoints in {out} are untouched")
    runtime = ledger["train_runtime"]
    results = dict({key: final[k] for k, key, *_ in rows}, global_step=r.step, exported_step=export_step, train_runtime=round(runtime, 3),
                   train_samples_per_second=round(ledger["images"] / runtime, 3), segments=ledger["segments"],
                   damaged_train_files=bad_train, damaged_train_encounters=ledger["damaged_encounters"],
                   damaged_eval_files=final["skipped"], startup_seconds=round(r.startup, 2))
    if r.ema:  # eval_ema_loss, and eval_ema_accuracy or eval_ema_map
        results.update({key.replace("eval_", "eval_ema_"): final[f"ema_{k}"] for k, key, *_ in rows[:2]})
    export = None
    if r.main:
        env = env_info(r.device)
        card = report.model_card(cfg, results, r.progress.history, dict(train=len(r.data.train_set), eval=len(r.data.eval_set)),
                                 r.class_names, r.precision, r.world, r.global_batch * cfg.grad_accum_steps,
                                 {k: env[k] for k in ("torch", "transformers", "datasets")})
        with phases.span("export"):
            if adapt.is_lora(r.model):  # the adapter as it trained, then the model with it merged in
                checkpoint.export(out, r.model, r.processor, name=adapt.ADAPTER)
            # the checkpoint of the exported step holds these very weights, unless they are merged or the EMA's
            same = not (adapt.is_lora(r.model) or cfg.export_ema)
            export = checkpoint.Export(out, adapt.merged(r.model), r.processor, card,
                                       weights_of=os.path.join(out, f"checkpoint-{export_step}") if same else None)
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
        print("  " + "  ".join(f"{key} {results[key]:.4f}" for _, key, *_ in rows[:3]) +
              f"  ({r.step} steps, {runtime:.0f} s{segments})")
        print(f"  model: {model_dir}")
        print(f"  tensorboard --logdir {shlex.quote(out)}")
        print(f"  {phases.summary()}")
        phases.write(out, "success")
    log.end("success", r.step, f"eval {rows[1][4]} {metrics.score(final):.4f}, loss {final['loss']:.4f} (the "
            f"exported model, step {export_step})")
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
        result.update({f"ema_{k}": ema[k] for k, *_ in metrics.table(ema)})
    return result


def step_to_export(r):
    """The step whose weights go to model/: the last, or with --export best the best checkpoint's; when that
    folder is gone or damaged, the best evaluated checkpoint left, or else the last step (with a warning)."""
    best = r.progress.best
    if r.cfg.export != "best" or not best or best["step"] == r.step:
        return r.step
    scores = {h["step"]: metrics.score(h) for h in r.progress.history}
    left = dict(checkpoint.complete_checkpoints(r.cfg.output_dir))
    for step in sorted(scores, key=lambda s: (s != best["step"], -scores[s])):  # the best first
        if step == r.step or (step in left and not checkpoint.damage(left[step])):
            break
    else:
        step = r.step
    if step != best["step"]:
        instead = f"checkpoint-{step}, the best of those left" if step != r.step else f"the last weights (step {step})"
        r.log.say(f"warning: --export best: checkpoint-{best['step']}, the best, is missing or damaged; exporting "
                  f"{instead}")
    return step


def hparams(cfg, precision, max_steps, world, step_batch):
    """Every option of the run and what it resolved to, for TensorBoard's HParams table."""
    values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in to_dict(cfg).items()}
    values.update(precision=precision, precision_requested=cfg.precision, total_steps=max_steps, world_size=world,
                  global_batch=step_batch)
    return values


def cli():
    """Console entry point `vitfood-train`, the same as `python -m vitfood.train`."""
    run_main(main)


if __name__ == "__main__":
    cli()
