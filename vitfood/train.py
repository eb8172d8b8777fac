"""Fine-tune an image classifier with a plain PyTorch loop.

    python -m vitfood.train --preset demo                    # offline demo: synthetic data, vit-tiny
    python -m vitfood.train                                  # the Food-101 recipe of the HF guide
    python -m vitfood.train --dataset ./my_images --model google/vit-base-patch16-224-in21k
    python -m vitfood.train --resume auto --output-dir runs/my-run
    tensorboard --logdir runs

main() reads in three parts: setup (start.py: run directory, data, model, optimizer, the restore from a
checkpoint), the loop (fetch, step, log, eval, save), finish (the final eval, calibration, export and report).
"""

import vitfood
import vitfood.stack

if __name__ == "__main__":
    vitfood.quiet_ctrl_c()  # before the heavy imports below
vitfood.stack.require(__name__)  # a broken install (a torchvision built for another torch) is one line, no traceback

import contextlib
import dataclasses
import math
import os
import shlex
import time

from vitfood import adapt, calibrate, checkpoint, dist, faults, fsdp, logs, metrics, report, rundir, sources, synthetic
from vitfood.common import UserError, env_info, first_line, run_main, seconds_since_start, start_cuda
from vitfood.data import check_damaged, eval_skip_warning
from vitfood.logs import Window
from vitfood.model import load_weights
from vitfood.phases import Phases
from vitfood.start import build_step, resumable, setup
from vitfood.steps import eval_pass

EXIT_STOPPED = 75  # stopped by SIGTERM/SIGHUP/SIGINT after saving a checkpoint (sysexits' EX_TEMPFAIL: run again)


def main(argv=None, on_eval=None):
    """A run from the command line `argv`; its all_results (None: it had finished already). `on_eval(step, score)`
    (vitfood.tune's pruner): called after each eval; a reason it returns (before the last step) stops the run there
    as a stop signal does (saved, exit 75)."""
    phases = Phases()
    phases.add("imports", 0.0, seconds_since_start())  # the interpreter's start and the imports above
    with phases.span("arguments"):
        cfg, out, resume = rundir.parse_run(argv)
        rank, world, device = dist.setup(cfg.device, cfg.dist_timeout, group=cfg.fsdp)
        cfg = dataclasses.replace(cfg, output_dir=dist.from_rank0(out))  # a default name holds a timestamp: rank 0's
    cuda_ready = start_cuda(device)
    checkpoints = rundir.Checkpoints(cfg.output_dir, cfg.save_total_limit, main=rank == 0, phases=phases,
                                      every=cfg.save_steps)
    r = None
    try:
        r = setup(cfg, resume, rank, world, device, checkpoints, phases, cuda_ready)
        if r is None:
            return None  # the run had already finished
        r.on_eval = on_eval
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
        faults.at("step")
        log.stepped()
        window.stepped(loss, norm, finite, r.optimizer_step.terms)
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
            epoch = r.step * accum / r.data.sampler.batches_per_epoch  # passes over the train split, fractional
            log.train(r.step, train_loss, lrs, figures["grad_norm"], figures["img_s"], figures["data_wait"], epoch,
                      r.scaler.get_scale() if r.scaler.is_enabled() else None, len(bad_train),
                      ledger.nonfinite.check(r.checkpoints.latest), figures["terms"] if r.teacher else None)
        t_pause = time.perf_counter()
        evaluated = r.progress.due(r.step, last_step)  # also when stopping: history and best stay whole
        if evaluated:  # eval
            t_eval = time.perf_counter()
            with r.phases.span("eval", step=r.step) as info:  # the last one keeps its logits, for calibration
                scores = evaluate(r, mistakes=8, keep=last_step and calibrates(cfg))
                info["images"] = scores["samples"] * (2 if r.ema else 1)  # with an EMA, a second pass
            log.eval(r.step, scores, r.class_names, seconds=time.perf_counter() - t_eval)
            r.progress.evaluated(scores, train_loss)
            if r.on_eval and not stopped:  # told every eval's score; a reason to stop counts before the last step
                why = r.on_eval(r.step, metrics.score(scores))
                stopped = None if last_step else why
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
    r.log.pbar.close()
    # a signal during the last eval or the last checkpoint's write: that checkpoint is complete; stop there
    stopped = stopped or (dist.any_rank([r.stopper.signal], r.device)[0] and (r.stopper.signal or "another rank"))
    if stopped:
        stop(r, stopped)
    ledger = r.ledger.state_dict()  # every rank: it adds up over ranks
    warn_skipped(r, ledger)
    final, export_step = final_eval(r)
    cal, unknown, final = calibration(r, final, export_step)
    early = r.progress.stopped_early()
    results = report.results(final, r.step, export_step, ledger, r.startup, r.precision, ema=r.ema is not None,
                             best_metric=r.progress.judging().name, stopped_early=early, calibration=cal,
                             unknown=unknown, broken_links=len(sources.broken_links(r.cfg.dataset)),
                             teacher=r.cfg.teacher)
    staged = stage_model(r, results, cal, unknown, export_step)
    with r.phases.span("final wait"):
        r.checkpoints.wait()  # the last checkpoint is complete before its weights are linked or the process ends
    if dist.any_rank([r.stopper.signal], r.device)[0]:  # a signal while it was written: stop, as during the eval
        if staged:
            staged.discard()
        stop(r, r.stopper.signal or "another rank")
    rows = metrics.table(final)  # what the eval measured: single-label or multi-label
    if r.main:
        hand_over(r, staged, results, rows, ledger, early, export_step)
    wind_down(r, "early stop" if early else "success", f"{model_words(export_step, results)}: eval "
              f"{metrics.scored(rows).heading} {metrics.score(final):.4f}, loss {final['loss']:.4f}" +
              (f"; stopped early: {early}" if early else ""), logs.run_summary(results, r.phases, r.device))
    dist.barrier()
    dist.close()
    r.stopper.close()  # nothing left to write: signals act as usual again
    return results


def warn_skipped(r, ledger):
    """A warning for the training and eval images that could not be decoded."""
    bad_train, bad_eval = len(ledger["damaged_files"]), (r.progress.metrics or {}).get("skipped", 0)
    if bad_train:
        r.log.say(f"warning: {bad_train} damaged training file(s) ({ledger['damaged_encounters']} encounters) could "
                  "not be decoded and were skipped (--bad-images error to stop instead)")
    if bad_eval:
        r.log.say(eval_skip_warning(bad_eval, len(r.data.eval_set)))


def final_eval(r):
    """(the eval of the weights model/ gets, their step): the last step's, or --export best's checkpoint's, in
    r.model; with --export-ema the EMA's weights and figures. Refused, nothing exported, when they are not finite."""
    cfg = r.cfg
    if cfg.export == "best" or cfg.export_ema:  # maybe other weights than the last write's: no overlap with
        r.checkpoints.wait()  # it (nor its rotation beside the reading of an older checkpoint)
    final, export_step = r.progress.current(), r.checkpoints.to_export(r.step, r.progress, cfg.export, r.log.say)
    if export_step != r.step:
        load_weights(r.model, os.path.join(cfg.output_dir, f"checkpoint-{export_step}"))
        final = None
    if final is None or not metrics.complete(final):  # the best's weights, or a run resumed at its last step
        # from a save between evals (or written by a vitfood without some of today's metrics)
        with r.phases.span("final eval"):
            final = evaluate(r, keep=calibrates(cfg))
        if r.kept:
            r.kept["step"] = export_step  # the logits of the weights just loaded
    if cfg.export_ema:  # the EMA's weights and eval stand for the model
        r.model.load_state_dict(r.ema.model.state_dict())
        final = dict(final, **{m.key: final[f"ema_{m.key}"] for m in metrics.table(final)})
    if not math.isfinite(final["loss"]):
        raise UserError(f"the final eval loss is {final['loss']}: the weights at step {export_step} are not finite "
                        f"(a damaged checkpoint?); nothing exported. The checkpoints in {cfg.output_dir} are untouched")
    return final, export_step


def calibration(r, final, export_step):
    """(the calibration, the unknown threshold's row, the final figures with the calibrated loss when it is kept),
    fitted on the eval split's logits of the weights model/ gets; (None, None, final) with --calibrate none."""
    cfg, log = r.cfg, r.log
    if not calibrates(cfg):
        return None, None, final
    cal, unknown = None, None
    with r.phases.span("calibration"):
        seen = r.kept  # the final eval's logits: the exported weights' (final_eval loaded or evaluated them)
        if seen is None or seen["step"] != export_step:  # a run resumed after its last eval, before its end
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
        final = dict(final, loss=cal["nll_after"], loss_uncalibrated=final["loss"])
        log.calibrated_loss(export_step, final["loss"])
    return cal, unknown, final


def stage_model(r, results, cal, unknown, export_step):
    """model/ (and a LoRA run's adapter/) written under a temporary name (rank 0; an --fsdp run's every rank
    sends its shards first): the weights merged, the temperature folded in, the model card. Sealed by hand_over."""
    cfg, out = r.cfg, r.cfg.output_dir
    whole = fsdp.gathered(r.model, r.main) if cfg.fsdp else None  # every rank sends its shards to rank 0
    if not r.main:
        return None
    env = env_info(r.device)
    card = report.model_card(cfg, results, r.progress.history, dict(train=len(r.data.train_set), eval=len(r.data.eval_set)),
                             r.class_names, r.precision, r.world, r.global_batch * cfg.grad_accum_steps,
                             {k: env[k] for k in ("torch", "transformers", "datasets")})
    with r.phases.span("export"):
        if adapt.is_lora(r.model):  # the adapter as it trained, then the model with it merged in
            checkpoint.write_model(out, r.model, r.processor, name=adapt.ADAPTER)
        merged = whole or adapt.merged(r.model)
        if calibrate.kept(cal) != 1:  # model/ scores calibrated wherever it is loaded; checkpoints keep the raw
            calibrate.fold(merged, calibrate.kept(cal))
        calibrate.record(merged.config, cal, unknown and unknown[0], cfg.threshold if r.multi_label else None)
        # the checkpoint of the exported step holds these very weights, unless they are merged, the EMA's or
        # calibrated
        same = not (adapt.is_lora(r.model) or cfg.export_ema or calibrate.kept(cal) != 1 or whole)
        return checkpoint.ModelFolder(out, merged, r.processor, card,
                                 weights_of=os.path.join(out, f"checkpoint-{export_step}") if same else None,
                                 own_config=cal is not None or unknown is not None)


def model_words(export_step, results):
    """What the final figures are of, in the same words on the console, in TensorBoard and in all_results.json."""
    return f"model/ (step {export_step}{', calibrated' if 'eval_loss_uncalibrated' in results else ''})"


def hand_over(r, staged, results, rows, ledger, early, export_step):
    """model/ sealed and renamed into place, all_results.json, and what the console says at the end."""
    out = r.cfg.output_dir
    with r.phases.span("export"):
        model_dir = staged.seal()
        checkpoint.write_json_atomic(os.path.join(out, "all_results.json"), results)
    print(f"\ndone: {out}")
    segments = f" in {ledger['segments']} segments" if ledger["segments"] > 1 else ""
    before = (f" (eval_loss {results['eval_loss_uncalibrated']:.4f} before calibration)"
              if "eval_loss_uncalibrated" in results else "")
    print(f"  {model_words(export_step, results)}: " + "  ".join(f"{m.result} {results[m.result]:.4f}" for m in rows[:3])
          + before + f"  ({r.step} steps, {ledger['train_runtime']:.0f} s{segments})")
    if early:
        print(f"  stopped early at step {r.step} of {r.max_steps}: {early}")
    print(f"  model: {model_dir}")
    if r.cfg.dataset == "synthetic":  # a few images to try the model on, where the next command finds them
        samples = synthetic.write_samples(out, r.data.eval_set, r.class_names)
        print(f"  try it: python -m vitfood.predict --model {shlex.quote(out)} {shlex.quote(samples)}")
    print(f"  tensorboard --logdir {shlex.quote(out)}, then open {logs.link(r.multi_label)}")
    print(f"  {r.phases.summary()}")
    r.phases.write(out, "success")


def wind_down(r, status, note, summary=None):
    """The run's end in the log (TensorBoard's HParams status, the console), then the log and the loader closed."""
    r.log.end(status, r.step, note, summary)
    r.log.close()
    r.data.close()


def stop(r, by):
    """After a stop signal: the last checkpoint complete, say how to continue, exit 75."""
    out = r.cfg.output_dir
    r.checkpoints.wait()
    wind_down(r, "stopped", f"by {by}; resume with --resume auto")
    r.log.say(f"stopped by {by} at step {r.step}: saved {os.path.join(out, f'checkpoint-{r.step}')}; "
              f"continue with --resume auto --output-dir {shlex.quote(out)}")
    if r.main:
        r.phases.write(out, "stopped")
    dist.close()
    raise SystemExit(EXIT_STOPPED)


def evaluate(r, keep=False, **details):
    """The eval of the weights, and with --ema-decay of the EMA weights too (keys ema_loss, ema_acc1, ...);
    `details`: how many mistakes to keep, for the weights. `keep`: the logits and labels of the weights model/
    gets (the EMA's with --export-ema) are kept in r.kept, with the step, for the calibration at the end."""
    def run(model, logits=False, **more):
        result = eval_pass(model, r.data.eval_loader, r.device, r.precision, r.mean, r.std, progress=r.main,
                           num_classes=len(r.class_names), multi_label=r.multi_label, threshold=r.cfg.threshold,
                           keep=logits, **more)
        if logits:
            r.kept = dict(step=r.step, logits=result.pop("logits"), labels=result.pop("labels"))
        return result
    result = run(r.train_model, keep and not r.cfg.export_ema, teacher=r.teacher, **details)
    if r.ema:
        ema = run(r.ema.model, keep and r.cfg.export_ema)
        result.update({f"ema_{m.key}": ema[m.key] for m in metrics.table(ema)})
    return result


def calibrates(cfg):
    """Whether the end of the run fits something on the eval split's logits: a temperature, an unknown threshold."""
    return cfg.calibrate != "none" or bool(cfg.target_accuracy or cfg.target_coverage)


def cli():
    """Console entry point `vitfood-train`, the same as `python -m vitfood.train`."""
    run_main(main)


if __name__ == "__main__":
    cli()
