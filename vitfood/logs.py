"""What a training run tells people while it runs: TensorBoard events, the progress bar and console lines.

Rank 0 alone writes; on the other ranks a RunLog is silent, so TensorBoard gets one event stream.

Tags are grouped so that TensorBoard, which lists groups alphabetically, shows the useful ones first:
accuracy/ (the score) and loss/ (eval and train), then memory/, metrics/, optim/, predictions/ (confusion matrix,
mistakes, reliability), skipped/, speed/, train/ (epoch, augmented images); text in run/ (status, summary),
setup/ (config, env) and tables/ (per class). Only the first group opens by itself, so the link a run prints
pins the score, the losses, the learning rate and images/s above them all, with smoothing off.
"""

import json
import sys
import time
from urllib.parse import quote

import numpy as np
import torch
from tqdm import tqdm

from vitfood import calibrate, dist, metrics, report
from vitfood.common import Console



def loss_tags(multi_label):
    """(train, eval) loss tags. A multi-label run's loss is a binary cross-entropy, the mean over classes, a figure
    of another scale than a single-label cross-entropy: its own tags, so that no chart puts the two on one axis."""
    eval_ = metrics.rows_for(multi_label)[0].tag  # the eval loss's tag is metrics' (loss/eval, loss/bce_eval)
    return eval_.replace("eval", "train"), eval_


def layout(multi_label=False):
    """The custom-scalars page: the overview, a chart per figure (TensorBoard draws a chart's lines of one run in
    one colour, so train and eval loss are charts side by side, not lines that cannot be told apart); regular
    expressions anchored, and titles by kind of run, so that single- and multi-label runs get charts of their own."""
    score = metrics.scored(metrics.rows_for(multi_label))
    train, eval_ = loss_tags(multi_label)
    kind, exact = " (multi-label)" if multi_label else "", lambda *tags: [f"^{t}$" for t in tags]
    return {"vitfood": {
        f"eval {score.heading} (and the EMA's)": ["Multiline", exact(score.tag, ema_tag(score.tag))],
        f"eval loss{kind} (and the EMA's, the calibrated model's)": ["Multiline", exact(
            eval_, ema_tag(eval_), calibrated_tag(eval_))],
        f"train loss{kind}": ["Multiline", exact(train)],
        "learning rate": ["Multiline", exact("optim/lr")],
        "training images/s": ["Multiline", exact("speed/img_per_s")]}}


def link(multi_label=False, port=6006):
    """The address that opens a run's Time Series as it should be read: smoothing off (TensorBoard's default of 0.6
    drags a curve of a few evals far from its values, and a learning-rate peak below its real height), the score,
    the losses, the learning rate and images/s pinned at the top (only the first group of charts opens by itself)."""
    score = metrics.scored(metrics.rows_for(multi_label)).tag
    pins = [dict(plugin="scalars", tag=t) for t in (score, *reversed(loss_tags(multi_label)), "optim/lr",
                                                      "speed/img_per_s")]
    return f"http://localhost:{port}/?smoothing=0&pinnedCards={quote(json.dumps(pins, separators=(',', ':')))}#timeseries"


def ema_tag(tag):
    """The EMA's tag for one of its model's: sorted right after it (accuracy/top1, accuracy/top1_ema)."""
    return f"{tag}_ema"


def calibrated_tag(tag):
    """The eval loss of model/, the exported model, when a temperature is folded into it: its scores, so its loss,
    differ from the weights' at the same step (the answers do not)."""
    return f"{tag}_calibrated"


def text(writer, tag, markdown, step):
    """A text record under `tag` itself (SummaryWriter.add_text files it under "<tag>/text_summary")."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
    value = TensorProto(dtype="DT_STRING", string_val=[markdown.encode()],
                        tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=value)]), step)


# The Text tab sorts by tag: how the run went (run/status, run/summary) first, then what it was (setup/config,
# setup/env), then the per-class tables of its evals
PER_CLASS = "tables/per_class"


def eval_records(writer, step, result, class_names, mistakes=8, calibrated=False, seconds=None):
    """An eval's scalars, its confusion matrix (single-label) and mistakes as images, and its per-class table
    as text: the same records for a training run and for vitfood.evaluate --tensorboard. `calibrated`: the model
    holds a folded temperature (model/ of a calibrated run), its loss goes by calibrated_tag; `seconds`: the eval's
    time, for its runtime and images/s."""
    for i, m in enumerate(metrics.table(result)):
        tag = calibrated_tag(m.tag) if calibrated and i == 0 else m.tag
        writer.add_scalar(tag, result[m.key], step)
        if f"ema_{m.key}" in result and i < 3:  # with --ema-decay: loss/eval_ema, accuracy/top1_ema (or map_ema), ...
            writer.add_scalar(ema_tag(m.tag), result[f"ema_{m.key}"], step)
    if "agreement" in result:  # --teacher: the share of answers the student shares with it, and its own score
        score = metrics.scored(metrics.table(result))
        writer.add_scalar("distill/agreement", result["agreement"], step)
        writer.add_scalar(f"distill/teacher_{score.tag.split('/')[1]}", result["teacher"][score.key], step)
    if seconds:
        writer.add_scalar("speed/eval_runtime_s", seconds, step)
        writer.add_scalar("speed/eval_img_per_s", result["samples"] / seconds, step)
    if result.get("skipped"):
        writer.add_scalar("skipped/damaged_eval_files", result["skipped"], step)
    card = lambda image: np.asarray(image)
    if "confusion" in result:
        writer.add_image("predictions/confusion_matrix", card(report.confusion_card(result["confusion"], class_names)),
                         step, dataformats="HWC")
    writer.add_image("predictions/mistakes", card(report.mistakes_card(result["mistakes"][:mistakes], class_names)), step,
                     dataformats="HWC")
    text(writer, PER_CLASS, report.per_class_markdown(report.per_class(result, class_names)), step)


# Options that name where a run is and how it was started, not how it trains: left out of HParams, where they would
# differ in every run and so take the columns TensorBoard shows first
NOT_HPARAMS = ("output_dir", "resume")


def hparams_summaries(values=None, status=None):
    """The HParams plugin's records, as TensorBoard summaries: a session start (typed values: numbers, booleans,
    strings; integers as text, which TensorBoard would show as "32.000"), or with `status` the session's end.

    No experiment record: TensorBoard would take one run's as every run's. Without one it reads every run's values
    and lists first, and shows, the options that differ between the runs it opens; its metric columns are the
    runs' scalars by name, accuracy/ and loss/ first."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    def summary(tag, **data):
        meta = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(version=0, **data))
        return Summary(value=[Summary.Value(tag=tag, metadata=meta)])

    if status:
        return [summary(metadata.SESSION_END_INFO_TAG, session_end_info=plugin_data_pb2.SessionEndInfo(
            status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time()))]
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, v in sorted(values.items()):
        if name in NOT_HPARAMS:
            continue
        if isinstance(v, bool):
            start.hparams[name].bool_value = v
        elif isinstance(v, float):
            start.hparams[name].number_value = v
        else:
            start.hparams[name].string_value = "" if v is None else str(v)
    return [summary(metadata.SESSION_START_INFO_TAG, session_start_info=start)]


def peak_memory_gb(device):
    """{tag: GB}: the process's peak resident memory, and on a GPU the most the allocator held."""
    import resource
    figures = {"memory/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB
    if device.type == "cuda":
        figures["memory/cuda_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return figures


def run_summary(results, phases, device):
    """The end of a run in a markdown table (TensorBoard's run/summary): what the Trainer's train_runtime,
    train_samples_per_second and train_steps_per_second say, over every segment, with this segment's evals and
    memory."""
    runtime, steps = results["train_runtime"], results["global_step"]
    rows = [("steps", f"{steps}" + (f" in {results['segments']} segments" if results["segments"] > 1 else "")),
            ("training time (s, pauses between segments left out)", f"{runtime:.1f}"),
            ("training images/s", f"{results['train_samples_per_second']:.1f}"),
            ("training steps/s", f"{steps / runtime:.3f}" if runtime else "-"),
            ("seconds to the first batch", f"{results['startup_seconds']:.1f}")]
    if phases.count("eval"):
        rows.append(("eval time (s), this segment", f"{phases.total('eval'):.1f} in {phases.count('eval')} evals"))
    words = {"memory/peak_rss_gb": "peak resident memory (GB)", "memory/cuda_peak_gb": "peak CUDA memory (GB)"}
    rows += [(words[tag], f"{gb:.2f}") for tag, gb in peak_memory_gb(device).items()]
    return "| | |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


class RunLog:
    """The run's SummaryWriter and progress bar (rank 0), behind one method per kind of record."""

    def __init__(self, out, step, max_steps, main=True, every=10, multi_label=False, device=torch.device("cpu")):
        self.main, self.writer, self.windows, self.every = main, None, 0, every  # every: --logging-steps
        self.multi_label, self.device = multi_label, device
        if main:
            from torch.utils.tensorboard import SummaryWriter
            # purge what a killed run logged after its checkpoint (curves don't double back), or all of it when
            # it was killed before its first one; the checkpoint's own step was logged before it was saved
            self.writer = SummaryWriter(out, purge_step=step + 1 if step else 0)
        # a bar on a terminal; off one (a log file, a job scheduler) no bar and no cursor moves: a line at
        # each logging step instead
        self.lines = main and not sys.stderr.isatty()
        self.max_steps = max_steps
        self.pbar = tqdm(total=max_steps, initial=step, desc="train", dynamic_ncols=True, disable=not main or self.lines,
                         file=Console(sys.stderr))

    def due(self, step, last_step):
        """Whether the training figures are logged after optimizer step `step` (every --logging-steps, the last)."""
        return last_step or step % self.every == 0

    def say(self, text):
        if self.main:
            self.pbar.write(text, file=Console(sys.stdout))

    def scalars(self, step, values):
        if self.main:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def augmented(self, images):
        """The first training batch as the model saw it, once."""
        if self.main and len(images):
            from torchvision.utils import make_grid
            self.writer.add_image("train/augmented_images", make_grid(images[:16], nrow=4), 0)

    def start(self, hparams, records):
        """A fresh run: its hyperparameters (HParams), the overview layout (Custom Scalars), and `records`,
        {name: dict} such as the config and environment, as JSON text at step 0 (setup/config, setup/env)."""
        if self.main:
            for summary in hparams_summaries(hparams):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_custom_scalars(layout(self.multi_label))
            for name, record in records.items():
                text(self.writer, f"setup/{name}", "```json\n" + json.dumps(record, indent=2) + "\n```", 0)

    def note(self, tag, line, step):
        """A line of text in TensorBoard at `step` (and on the console)."""
        if self.main and self.writer:
            text(self.writer, tag, line, step)
        self.say(line)

    def end(self, status, step, note, summary=None):
        """How the run's segment ended ("success", "early stop", "stopped", "failure"), as text (run/status, first
        in the Text tab), with `summary` (markdown: its time, throughput, memory) under run/summary. HParams'
        status is set once the run has ended for good: TensorBoard keeps the first a run writes, and a stopped or
        failed run is resumed to its end with the same folder."""
        if self.main and self.writer:
            if status in ("success", "early stop"):
                for record in hparams_summaries(status=status):
                    self.writer.file_writer.add_summary(record)
            text(self.writer, "run/status", f"**{status}** at step {step}: {note}", step)
            if summary:
                text(self.writer, "run/summary", summary, step)

    def calibration(self, step, cal, unknown, target_accuracy=None):
        """The fitted temperature (the reliability diagram in TensorBoard) and unknown threshold, on the console."""
        if cal:
            if self.main and self.writer:
                self.writer.add_image("predictions/reliability", np.asarray(calibrate.diagram(cal)), step,
                                      dataformats="HWC")
            self.say(f"calibrated: {calibrate.summary(cal)}")
        if unknown:
            self.note("run/unknown", f"unknown below a top score of {unknown[0]:.4f}: {unknown[1]:.1%} of the "
                      f"eval split answered, {unknown[2]:.1%} of them right", step)
        elif target_accuracy:
            self.say(f"warning: no threshold reaches accuracy {target_accuracy:g} on the eval split: every image is "
                     "answered (no unknown threshold stored)")

    def calibrated_loss(self, step, loss):
        """The eval loss of model/, calibrated (its temperature folded in), beside the weights' loss at `step`."""
        if self.main and self.writer:
            self.writer.add_scalar(calibrated_tag(loss_tags(self.multi_label)[1]), loss, step)

    def eval(self, step, result, class_names, seconds=None):
        """The eval's TensorBoard records, and a console line."""
        if self.main:
            eval_records(self.writer, step, result, class_names, seconds=seconds)
            ema = f" | EMA {metrics.summary(result, 'ema_', rows=2)}" if "ema_loss" in result else ""
            agree = f" | agrees with the teacher on {result['agreement']:.1%}" if "agreement" in result else ""
            self.say(f"step {step}: eval {metrics.summary(result)}" + ema + agree)

    def train(self, step, loss, lrs, grad_norm, img_s, data_wait, epoch, scale=None, damaged_files=0, skipped_steps=0,
              distill=None):
        """A logging step's scalars; `lrs`: the learning rate of each parameter group (the head's is logged
        as optim/lr, and with --layer-decay the lowest as optim/lr_lowest); `epoch`: passes over the train split
        so far, fractional (the Trainer's train/epoch); `distill`: --teacher's (soft, hard) terms, the loss being
        (1 - alpha) x hard + alpha x soft."""
        lr = max(lrs)
        values = {loss_tags(self.multi_label)[0]: loss, "optim/lr": lr, "train/epoch": epoch}
        if grad_norm is not None:  # None: every step of the window was skipped (non-finite)
            values["optim/grad_norm"] = grad_norm
        if min(lrs) < lr:
            values["optim/lr_lowest"] = min(lrs)
        self.windows += 1
        if self.windows > 1:  # the first window of a segment holds its start-up (loader, first kernels)
            values.update({"speed/img_per_s": img_s, "speed/data_wait_percent": 100 * data_wait})
        if scale is not None:
            values["optim/amp_scale"] = scale
        if distill:
            values.update({"distill/soft_loss": distill[0], "distill/hard_loss": distill[1]})
        if skipped_steps:  # a running count: steps skipped for non-finite loss or gradients so far
            values["skipped/nonfinite_steps"] = skipped_steps
        if damaged_files:
            values["skipped/damaged_train_files"] = damaged_files
        self.scalars(step, values | peak_memory_gb(self.device))
        self.pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}")
        if self.lines:
            self.say(f"step {step}/{self.max_steps}: loss {loss:.4f} lr {lr:.2e} {img_s:.1f} img/s")

    def stepped(self):
        self.pbar.update(1)

    def flush(self):
        """Events so far to disk: at each save, so a run killed later resumes with whole curves."""
        if self.writer:
            self.writer.flush()

    def close(self):
        self.pbar.close()
        if self.writer:
            self.writer.close()
            self.writer = None


class Window:
    """A logging window's training figures: the loss, gradient norm and steps taken summed on the device (no
    sync per step), images and data wait counted on the host, eval and save pauses left out. `close()` reduces
    them over ranks, reads them once and starts the next window. (What the whole run has cost, over every
    segment, is `state.Ledger`'s.)"""

    def __init__(self, device, world, step):
        self.device, self.world, self.first = device, world, step
        self.sums = torch.zeros(5, device=device)  # loss, grad norm of the steps taken, steps taken; --teacher's terms
        self.reset()

    def reset(self):
        self.start, self.images, self.wait, self.paused = time.perf_counter(), 0, 0.0, 0.0

    def fetched(self, images, wait):
        self.images += images
        self.wait += wait

    def pause(self, seconds):
        self.paused += seconds

    def stepped(self, loss, norm, finite, terms=None):
        # a skipped step (non-finite) left the weights as they were: the norm is the mean over the steps taken
        self.sums[:3] += torch.stack([loss, torch.where(finite, norm, 0.0), finite.float()])
        if terms is not None:  # --teacher: the distillation's soft and hard terms
            self.sums[3:] += terms

    def close(self, step, damaged):
        """The window ending at optimizer step `step`: dict(loss, grad_norm (None when every step was skipped),
        img_s, data_wait, any_damaged (this rank's `damaged` count, summed over ranks)). A host-device sync."""
        counts = torch.tensor([self.images, damaged], dtype=torch.float32, device=self.device)
        totals = dist.all_sum(torch.cat([self.sums / self.world, counts]))
        taken = totals[2].item()
        seconds = max(1e-9, time.perf_counter() - self.start - self.paused)
        steps = step - self.first
        figures = dict(loss=round((totals[0] / steps).item(), 6),
                       grad_norm=(totals[1] / taken).item() if taken else None, img_s=int(totals[5].item()) / seconds,
                       data_wait=min(1.0, self.wait / seconds), any_damaged=bool(totals[6].item()),
                       terms=(totals[3:5] / steps).tolist())
        self.sums.zero_()
        self.first = step
        self.reset()
        return figures
