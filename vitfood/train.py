"""Fine-tune an image classifier with a plain PyTorch loop.

    python -m vitfood.train --preset demo                    # offline demo: synthetic data, vit-tiny
    python -m vitfood.train                                  # the Food-101 recipe of the HF guide
    python -m vitfood.train --dataset ./my_images --model google/vit-base-patch16-224-in21k
    python -m vitfood.train --resume auto --output-dir runs/my-run
    tensorboard --logdir runs
"""

import contextlib
import datetime
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

from vitfood import checkpoint, dist, report
from vitfood.common import (UserError, autocast, default_num_workers, env_info, resolve_precision, run_main,
                            safe_name, seed_everything)
from vitfood.config import build_parser, read_config_file, resolve, to_dict
from vitfood.data import EpochBatchSampler, ImageDataset, check_labels, load_splits, make_loader, normalize, transforms_for
from vitfood.evaluate import evaluate
from vitfood.model import build_model, load_weights, make_optimizer, make_scheduler

FIXED_ON_RESUME = ("dataset", "train_split", "eval_split", "test_size", "max_train_samples", "max_eval_samples",
                   "image_column", "label_column", "synthetic_size", "synthetic_classes", "synthetic_max_px",
                   "model", "image_size", "grad_accum_steps", "seed")  # and the global batch, checked in main
EXIT_STOPPED = 75  # stopped by SIGTERM/SIGINT after saving a checkpoint (sysexits' EX_TEMPFAIL: run it again)


def parse_run(argv):
    """(config, output_dir, --resume value) from the command line."""
    explicit = vars(build_parser().parse_args(argv))
    resume = explicit.get("resume")
    out = explicit.get("output_dir")
    if resume not in (None, "auto"):
        checkpoint.load_state(resume)  # fails fast, with one line, when it is not a complete checkpoint
        out = out or os.path.dirname(os.path.abspath(resume))
    run_dir = os.path.dirname(os.path.abspath(resume)) if resume not in (None, "auto") else out
    saved = os.path.join(run_dir, "train_config.json") if run_dir else None
    base = None
    if resume and saved and os.path.isfile(saved):  # resuming: the run's own config, flags on top
        base = {k: v for k, v in read_config_file(saved).items() if k not in ("resume", "output_dir")}
    cfg = resolve(explicit, base)
    if base:  # what decides the data order and the weights cannot change under a resumed run
        changed = [k for k in FIXED_ON_RESUME if k in base and getattr(cfg, k) != base[k]]
        if changed:
            raise UserError(f"--{changed[0].replace('_', '-')} differs from the run being resumed "
                            f"({base[changed[0]]!r}); drop the flag, or start a new run in another --output-dir")
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join("runs", f"{stamp}-{safe_name(cfg.model)}-{safe_name(cfg.dataset)}")
    cfg.output_dir = out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output-dir {out} exists and is not a folder")
    return cfg, out, resume


def open_run(cfg, out, resume, main=True):
    """The checkpoint to resume from, or None. Rank 0 locks and tidies the directory first."""
    if main:
        checkpoint.lock(out)  # one run per directory, held until this process ends
        checkpoint.cleanup(out)  # what a killed run left: temporary folders, a checkpoint moved aside for a re-save
    dist.barrier()  # no rank lists checkpoints before the cleanup
    ckpts = checkpoint.complete_checkpoints(out)
    if resume == "auto":
        if ckpts:
            return ckpts[-1][1]
        if main:
            print(f"--resume auto: no complete checkpoint in {out}, starting fresh")
        return None
    if resume:
        return resume
    finished = os.path.isfile(os.path.join(out, "all_results.json"))
    if (ckpts or finished) and not cfg.overwrite_output_dir:
        what = "a finished run" if finished else f"{len(ckpts)} checkpoint(s)"
        raise UserError(f"{out} already holds {what}; pass --resume auto to continue it, "
                        "or --overwrite-output-dir to start over there")
    return None


def main(argv=None):
    cfg, out, resume = parse_run(argv)
    rank, world, device = dist.setup(cfg.device, cfg.dist_timeout)
    out = cfg.output_dir = dist.from_rank0(out)  # a default name holds a timestamp: rank 0's for all
    main_rank = rank == 0  # rank 0 alone writes checkpoints, TensorBoard events, the model and the console
    say = print if main_rank else (lambda *args, **kwargs: None)
    resume_from = open_run(cfg, out, resume, main_rank)
    precision = resolve_precision(cfg.precision, device)
    state = checkpoint.load_state(resume_from) if resume_from else None
    global_batch = cfg.batch_size * world  # per micro-step; x grad_accum_steps per optimizer step
    if state and state.get("global_batch", global_batch) != global_batch:
        g, procs = state["global_batch"], state.get("world_size", 1)
        keep = f"pass --batch-size {g // world}" if g % world == 0 else "that cannot be split evenly"
        raise UserError(f"the run being resumed used a global batch of {g} ({procs} process(es) x --batch-size "
                        f"{g // procs}); keep it: with {world} process(es), {keep}")

    # ---- data and model (rank 0 first: it downloads or generates, the others then read its cache)
    seed_everything(cfg.seed)
    if not main_rank:
        dist.wait_for_rank0()
    train_ds, eval_ds, class_names = load_splits(cfg)
    model, processor = build_model(cfg, class_names, device)
    if main_rank:
        dist.wait_for_rank0()
    if world > 1:  # same initial weights everywhere (above); from here, each rank its own dropout masks
        seed_everything(cfg.seed + 7919 * rank)
    dist.same_on_all((len(train_ds), len(eval_ds), class_names), "the data set")
    transformers.utils.logging.disable_progress_bar()  # downloads are done; no bar per checkpoint write
    train_tf, eval_tf, (mean, std) = transforms_for(processor)
    skip_bad = cfg.bad_images == "skip"
    train_set = ImageDataset(train_ds, cfg.image_column, cfg.label_column, train_tf, seed=cfg.seed, skip_bad=skip_bad)
    eval_set = ImageDataset(eval_ds, cfg.image_column, cfg.label_column, eval_tf, skip_bad=skip_bad)
    check_labels(train_set, len(class_names), "train")
    check_labels(eval_set, len(class_names), "eval")
    workers = cfg.num_workers if cfg.num_workers >= 0 else default_num_workers()
    sampler = EpochBatchSampler(len(train_set), cfg.seed, cfg.batch_size, rank, world)
    train_loader = make_loader(train_set, cfg.batch_size, workers, device, sampler, seed=cfg.seed)
    # each rank evaluates every world-th image; the sums are added over ranks: the whole split, once
    eval_loader = make_loader(eval_set, cfg.eval_bs, workers, device, range(rank, len(eval_set), world))
    batches_per_epoch = sampler.batches_per_epoch  # global micro-batches
    accum = cfg.grad_accum_steps
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * batches_per_epoch / accum))

    # ---- optimizer, precision, state
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, max_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # loss scaling only for fp16
    amp = autocast(precision, device)
    step, best, metrics, history = 0, None, None, []
    if state:
        load_weights(model, resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and state["scaler"]:  # empty when the run was not fp16
            scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) == world:  # each rank its own stream: exact
            checkpoint.set_rng_state(ranks[rank])
        else:  # another world size: fresh per-rank streams (matters only for dropout / drop-path)
            seed_everything(cfg.seed + 7919 * rank + 104729 * state["step"])
        step, best, metrics, history = state["step"], state["best"], state["metrics"], state.get("history", [])
        if step >= max_steps and os.path.isfile(os.path.join(out, "all_results.json")):
            say(f"{out}: the run already finished at step {step} (of {max_steps}); nothing to do")
            return
        if best and main_rank:  # a kill between a save and this file would leave it naming an older best
            checkpoint.write_json_atomic(os.path.join(out, checkpoint.BEST), best)
        say(f"resuming from {resume_from} at step {step}")
    start_step = step
    model.train()  # from_pretrained returns a model in eval mode: dropout, drop-path and BatchNorm need this
    ddp = model
    if world > 1:  # PyTorch's DDP: gradients averaged across ranks during backward
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    train_model = torch.compile(ddp) if cfg.compile else ddp

    if main_rank:
        os.makedirs(out, exist_ok=True)
        checkpoint.lock(out)
        if cfg.overwrite_output_dir and not state:
            checkpoint.clear_run(out)  # the user asked: the old run's checkpoints would outrank the new ones
        checkpoint.write_json_atomic(os.path.join(out, "train_config.json"), to_dict(cfg))
        checkpoint.write_json_atomic(os.path.join(out, "env.json"), dict(env_info(device), world_size=world))
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(out, purge_step=step if state else None)  # purge: curves don't double back on resume
        if not state:
            log_hparams(writer, cfg, precision, max_steps, world)
    else:
        writer = dist.NullWriter()
    say(f"run: {out} | {len(train_set)} train / {len(eval_set)} eval images, {len(class_names)} classes | "
        f"{cfg.model} on {device} in {precision}, {model.config._attn_implementation} attention, {workers} workers | "
        f"{max_steps} steps")
    say(f"batch: {global_batch * accum} images per optimizer step = {world} process(es) x --batch-size "
        f"{cfg.batch_size} x --grad-accum-steps {accum}; --lr applies to the mean loss over them (not scaled by processes)")

    # ---- the loop: an endless stream of micro-batches, positioned by the step count
    def micro_batches(first):
        epoch, batch = divmod(first, batches_per_epoch)
        while True:
            sampler.set_position(epoch, batch)
            yield from train_loader
            epoch, batch = epoch + 1, 0

    # SIGTERM (preemption) or Ctrl-C: finish the step, save, exit with EXIT_STOPPED; a second one exits at once
    stop = []

    def request_stop(signum, frame):
        if stop:
            os._exit(130)  # checkpoints are only ever renamed into place: nothing on disk is left half-valid
        stop.append(signal.Signals(signum).name)
        if main_rank:
            tqdm.write(f"{stop[0]}: finishing this step, then saving a checkpoint and exiting (again to exit at once)")

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    stream = micro_batches(step * accum)
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)
    t_log, wait, paused, images_seen, images_total = time.perf_counter(), 0.0, 0.0, 0, 0
    skipped_images, bad_steps, first_bad, last_log, train_loss = 0, 0, None, step, None
    t_start = time.perf_counter()
    pbar = tqdm(total=max_steps, initial=step, desc="train", dynamic_ncols=True, disable=not main_rank)
    while True:
        last_step = step >= max_steps
        stopping = dist.any_rank(stop, device) and not last_step  # every rank stops at the same step
        eval_now = step > start_step and (step % cfg.eval_steps == 0 or last_step)
        save_now = step > start_step and (step % cfg.save_steps == 0 or last_step or stopping)
        t_pause = time.perf_counter()
        if eval_now:
            metrics = evaluate(train_model, eval_loader, device, precision, mean, std, progress=main_rank,
                               num_classes=len(class_names), mistakes=8)
            for k in ("loss", "acc1", "acc5"):
                writer.add_scalar(f"eval/{k}", metrics[k], step)
            if main_rank:
                writer.add_image("eval/confusion_matrix", np.asarray(report.confusion_image(
                    metrics.pop("confusion"), class_names)), step, dataformats="HWC")
                writer.add_image("eval/mistakes", np.asarray(report.mistakes_image(
                    metrics.pop("mistakes"), class_names)), step, dataformats="HWC")
            metrics = {k: metrics[k] for k in ("loss", "acc1", "acc5", "samples", "skipped")}
            history.append(dict(step=step, train_loss=train_loss, **metrics))
            if main_rank:
                pbar.write(f"step {step}: eval loss {metrics['loss']:.4f} acc1 {metrics['acc1']:.4f} "
                           f"acc5 {metrics['acc5']:.4f}")
        if save_now:
            rng_ranks = dist.gather(checkpoint.rng_state())  # every rank's RNG (dropout), saved by rank 0
            # "best" is judged only at saves that coincide with an eval
            new_best = eval_now and (best is None or metrics["acc1"] > best["eval_accuracy"])
            if new_best:
                best = dict(step=step, eval_accuracy=metrics["acc1"], eval_loss=metrics["loss"])
            if main_rank:  # the other ranks' state follows from the step: nothing of theirs to save
                save(out, step, model, processor, dict(
                    step=step, best=best, metrics=metrics if eval_now else None, history=history, global_batch=global_batch,
                    world_size=world, data_position=dict(epoch=step * accum // batches_per_epoch,
                                                         batch=step * accum % batches_per_epoch),
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                    rng=rng_ranks[0], rng_ranks=rng_ranks), new_best, cfg.save_total_limit)
            dist.barrier()  # no rank goes on (or reads a checkpoint) before it is complete
        paused += time.perf_counter() - t_pause  # eval and save time is not training throughput
        if last_step or stopping:
            break

        lr = scheduler.get_last_lr()[0]
        # the loss is summed over samples and divided by the step's global sample count: the gradient is
        # the mean over the whole global batch, however it is split in micro-batches and ranks (DDP
        # averages over ranks, hence the world factor)
        first = step * accum
        step_samples = sum(sampler.global_size((first + j) % batches_per_epoch) for j in range(accum))
        for micro in range(accum):
            t0 = time.perf_counter()
            images, labels, skipped = next(stream)
            wait += time.perf_counter() - t0
            skipped_images += skipped
            if step == 0 and micro == 0 and main_rank:
                from torchvision.utils import make_grid
                writer.add_image("train/augmented_images", make_grid(images[:16], nrow=4), 0)
            sync = world == 1 or micro == accum - 1  # all-reduce gradients once, on the last micro-batch
            with contextlib.nullcontext() if sync else ddp.no_sync():
                loss_sum += forward_backward(train_model, images, labels, amp, scaler, mean, std, step_samples / world)
            images_seen += labels.shape[0]
        norm, finite = optimizer_step(model, optimizer, scaler, scheduler, cfg.max_grad_norm)
        step += 1
        checkpoint.fault_point("step")
        pbar.update(1)
        if finite:
            norm_sum += norm
            bad_steps = 0
        else:  # the step was skipped: weights never take a nan
            bad_steps, first_bad = bad_steps + 1, first_bad if bad_steps else step
            writer.add_scalar("train/skipped_step", 1, step)
            if bad_steps >= cfg.max_nonfinite_steps:
                last_good = checkpoint.complete_checkpoints(out)
                raise UserError(f"loss or gradients not finite for {bad_steps} consecutive steps ({first_bad} to {step}); "
                                f"stopped. Last good checkpoint: {last_good[-1][1] if last_good else 'none'}; "
                                "try a lower --lr or --precision fp32")

        if step % cfg.logging_steps == 0 or step == max_steps:
            n, last_log = step - last_log, step
            # summed over ranks; .item() syncs with the device: only here
            totals = dist.all_sum(torch.stack([loss_sum / world, norm_sum / world,
                                               torch.tensor(float(images_seen), device=device)]))
            train_loss, grad_norm, images_seen = (totals[0] / n).item(), (totals[1] / n).item(), int(totals[2].item())
            train_loss = round(train_loss, 6)
            dt = max(1e-9, time.perf_counter() - t_log - paused)
            writer.add_scalar("train/loss", train_loss, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/grad_norm", grad_norm, step)
            writer.add_scalar("train/img_per_s", images_seen / dt, step)
            writer.add_scalar("train/data_wait", min(1.0, wait / dt), step)
            if scaler.is_enabled():
                writer.add_scalar("amp/scale", scaler.get_scale(), step)
            if skipped_images:
                writer.add_scalar("data/skipped_images", skipped_images, step)
            pbar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_seen / dt:.1f}")
            images_total += images_seen
            loss_sum.zero_()
            norm_sum.zero_()
            t_log, wait, paused, images_seen = time.perf_counter(), 0.0, 0.0, 0
    pbar.close()
    runtime = time.perf_counter() - t_start
    if skipped_images:
        print(f"warning: {skipped_images} damaged image(s) could not be decoded and were skipped "
              f"{f'on rank {rank} ' if world > 1 else ''}(--bad-images error to stop instead)")
    if stopping:
        writer.close()
        saved = f"saved {os.path.join(out, f'checkpoint-{step}')}" if step > start_step else "no step taken, nothing to save"
        say(f"stopped by {stop[0] if stop else 'another rank'} at step {step}: {saved}; "
            f"continue with --resume auto --output-dir {out}")
        dist.close()
        sys.exit(EXIT_STOPPED)

    # ---- export and report
    final, export_step = metrics, step
    if cfg.export == "best" and best and best["step"] != step:
        load_weights(model, os.path.join(out, f"checkpoint-{best['step']}"))
        final, export_step = evaluate(train_model, eval_loader, device, precision, mean, std), best["step"]
    for k in ("loss", "acc1", "acc5"):  # the metrics of the exported model, beside the hparams (HPARAMS view)
        writer.add_scalar(f"final/{k}", final[k], step)
    results = dict(eval_loss=final["loss"], eval_accuracy=final["acc1"], eval_top5=final["acc5"],
                   global_step=step, exported_step=export_step, train_runtime=round(runtime, 3),
                   train_samples_per_second=round(images_total / runtime, 3))
    if main_rank:
        env = env_info(device)
        card = report.model_card(cfg, results, history, dict(train=len(train_set), eval=len(eval_set)), class_names,
                                 precision, world, {k: env[k] for k in ("torch", "transformers", "datasets")})
        model_dir = checkpoint.export(out, model, processor, card)
        checkpoint.write_json_atomic(os.path.join(out, "all_results.json"), results)
        writer.close()
        print(f"\ndone: {out}")
        print(f"  eval_loss {results['eval_loss']:.4f}  eval_accuracy {results['eval_accuracy']:.4f}  "
              f"eval_top5 {results['eval_top5']:.4f}  ({step} steps, {runtime:.0f} s)")
        print(f"  model: {model_dir}")
        print(f"  tensorboard --logdir {out}")
    dist.barrier()
    dist.close()
    return results


def save(out, step, model, processor, state, new_best, keep):
    """Write checkpoint-<step>, update the best-checkpoint record, rotate; one clear line when the disk refuses."""
    try:
        checkpoint.save(out, step, model, processor, state)
        if new_best:
            checkpoint.write_json_atomic(os.path.join(out, checkpoint.BEST), state["best"])
        checkpoint.rotate(out, keep)
    except OSError as e:
        raise UserError(f"cannot write checkpoint-{step} in {out}: {e.strerror or e}; "
                        "the complete checkpoints already there are intact") from None


def forward_backward(model, images, labels, amp, scaler, mean, std, divisor):
    """One micro-batch: uint8 images to the device, forward under autocast, backward of the summed loss
    over `divisor` (scaled for fp16). Returns that loss. An empty micro-batch still runs a backward (of
    zero), so that DDP's all-reduce finds every rank."""
    device = next(model.parameters()).device
    weight = 1.0
    if labels.numel() == 0:  # an empty share of a short global batch: a zero-weighted stand-in image
        images, labels, weight = torch.zeros((1, *images.shape[1:]), dtype=images.dtype), torch.zeros(1).long(), 0.0
    images = normalize(images.to(device, non_blocking=True), mean, std)
    labels = labels.to(device, non_blocking=True)
    with amp:
        logits = model(pixel_values=images).logits
    loss = F.cross_entropy(logits.float(), labels, reduction="sum") * weight / divisor
    scaler.scale(loss).backward()
    return loss.detach()


def optimizer_step(model, optimizer, scaler, scheduler, max_grad_norm):
    """Unscale, clip, step, update, zero. Returns (grad norm, whether the step was taken).

    A step whose gradients are not finite is skipped in every precision, as the GradScaler does
    for fp16, so the weights never take a nan.
    """
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    finite = bool(torch.isfinite(norm))  # one host-device sync a step (the fp16 GradScaler makes one too)
    if finite:
        scaler.step(optimizer)
    scaler.update()  # fp16: lowers the scale after an overflow
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, finite


def log_hparams(writer, cfg, precision, max_steps, world=1):
    """The hparams summary, written through the main writer (add_hparams would start a sub-run)."""
    from torch.utils.tensorboard.summary import hparams
    values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in to_dict(cfg).items()}
    values.update(resolved_precision=precision, total_steps=max_steps, world_size=world,
                  global_batch=cfg.batch_size * world * cfg.grad_accum_steps)
    metrics = {f"{group}/{k}": 0.0 for group in ("final", "eval") for k in ("acc1", "loss", "acc5")}
    for summary in hparams(values, metrics):
        writer.file_writer.add_summary(summary)


def cli():
    """Console entry point (`vitfood-train`, `vitfood-bench`), the same as `python -m`."""
    run_main(main)


if __name__ == "__main__":
    cli()
