"""What a training run tells people while it runs: TensorBoard events, the progress bar and console lines.

Rank 0 alone writes; on the other ranks a RunLog is silent, so TensorBoard gets one event stream.

Tags are grouped so that TensorBoard, which lists groups alphabetically, shows the useful ones first:
accuracy/ (eval top-1, top-5) and loss/ (train and eval), then optim/, predictions/ (confusion matrix,
mistakes, per-class table), skipped/, speed/, train/ (augmented images).
"""

import json
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from vitfood import calibrate, dist, metrics, report
from vitfood.common import Console



def layout(multi_label=False):
    """The custom-scalars page: the overview on four charts (regular expressions anchored, so that a chart of one
    kind of run draws no tag of another kind beside it)."""
    rows = metrics.rows_for(multi_label)
    score, exact = metrics.scored(rows), lambda *tags: [f"^{t}$" for t in tags]
    return {"vitfood": {
        "loss: train and eval (and the EMA's)": ["Multiline", exact("loss/train", rows[0].tag, ema_tag(rows[0].tag))],
        f"eval {score.heading} (and the EMA's)": ["Multiline", exact(score.tag, ema_tag(score.tag))],
        "learning rate": ["Multiline", exact("optim/lr")],
        "training images/s": ["Multiline", exact("speed/img_per_s")]}}


def ema_tag(tag):
    """The EMA's tag for one of its model's: sorted right after it (accuracy/top1, accuracy/top1_ema)."""
    return f"{tag}_ema"


END_STATUS = "run/end_status"  # how the run's last segment ended: 1 success, 2 early stop, 0 stopped, -1 failure


def columns():
    """HParams' metric columns ({tag: title}; a column shows the tag's last value), the same for every run, single-
    or multi-label (TensorBoard takes one run's for all): first the five it shows by default, how the run ended, the
    score (top-1, or mAP), eval and train loss, macro F1 (both kinds have it); then the others, blank where a run
    has none. The status is a column because TensorBoard keeps only the first end status a run writes (a filter,
    not a column), so the column is what tells a run resumed to success from one that failed or was stopped."""
    head = {END_STATUS: "status: 1 success, 2 early stop, 0 stopped, -1 failure", metrics.SCORE_TAG: "score: top-1, or mAP",
            "loss/eval": "eval loss", "loss/train": "train loss"}
    both = [m for m in metrics.SINGLE if any(m.tag == n.tag for n in metrics.MULTI) and m.tag not in head]
    rest = [m for m in (*metrics.SINGLE, *metrics.MULTI) if m.tag not in head and m not in both]
    return head | {m.tag: m.heading for m in both + rest}


STATUS = {"success": 1, "early stop": 2, "stopped": 0, "failure": -1}
# HParams lists first, and shows by default, the hyperparameters marked as differing, then the rest by name
KEY_HPARAMS = ("lr", "model", "precision", "seed", "total_steps")


def eval_records(writer, step, result, class_names, mistakes=8):
    """An eval's scalars, its confusion matrix (single-label) and mistakes as images, and its per-class table
    as text: the same records for a training run and for vitfood.evaluate --tensorboard."""
    for i, m in enumerate(metrics.table(result)):
        writer.add_scalar(m.tag, result[m.key], step)
        if f"ema_{m.key}" in result and i < 3:  # with --ema-decay: loss/eval_ema, accuracy/top1_ema (or map_ema), ...
            writer.add_scalar(ema_tag(m.tag), result[f"ema_{m.key}"], step)
    writer.add_scalar(metrics.SCORE_TAG, metrics.score(result), step)
    if result.get("skipped"):
        writer.add_scalar("skipped/damaged_eval_files", result["skipped"], step)
    card = lambda image: np.asarray(image)
    if "confusion" in result:
        writer.add_image("predictions/confusion_matrix", card(report.confusion_card(result["confusion"], class_names)),
                         step, dataformats="HWC")
    writer.add_image("predictions/mistakes", card(report.mistakes_card(result["mistakes"][:mistakes], class_names)), step,
                     dataformats="HWC")
    writer.add_text("predictions/per_class", report.per_class_markdown(report.per_class(result, class_names)), step)


def hparams_summaries(values, metrics, status=None):
    """The HParams plugin's records, as TensorBoard summaries: a session start (typed values: numbers,
    booleans, strings; integers as text, which TensorBoard would show as "32.000") with the experiment
    (key hyperparameters first, `metrics` as its one set of metric columns); or, with `status` ("success",
    "failure", "stopped"), the session's end."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    def summary(tag, **data):
        meta = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(version=0, **data))
        return Summary(value=[Summary.Value(tag=tag, metadata=meta)])

    if status:
        code = {"success": api_pb2.STATUS_SUCCESS, "early stop": api_pb2.STATUS_SUCCESS,
                "failure": api_pb2.STATUS_FAILURE}.get(status, api_pb2.STATUS_UNKNOWN)
        return [summary(metadata.SESSION_END_INFO_TAG, session_end_info=plugin_data_pb2.SessionEndInfo(
            status=code, end_time_secs=time.time()))]
    start, infos = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time()), []
    for name in sorted(values, key=lambda k: (k not in KEY_HPARAMS, k)):
        v = values[name]
        if isinstance(v, bool):
            start.hparams[name].bool_value, kind = v, api_pb2.DATA_TYPE_BOOL
        elif isinstance(v, float):
            start.hparams[name].number_value, kind = v, api_pb2.DATA_TYPE_FLOAT64
        else:
            start.hparams[name].string_value, kind = "" if v is None else str(v), api_pb2.DATA_TYPE_STRING
        infos.append(api_pb2.HParamInfo(name=name, type=kind, differs=name in KEY_HPARAMS))
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m), display_name=title) for m, title in metrics.items()])
    return [summary(metadata.EXPERIMENT_TAG, experiment=experiment),
            summary(metadata.SESSION_START_INFO_TAG, session_start_info=start)]


class RunLog:
    """The run's SummaryWriter and progress bar (rank 0), behind one method per kind of record."""

    def __init__(self, out, step, max_steps, main=True, every=10):
        self.main, self.writer, self.windows, self.every = main, None, 0, every  # every: --logging-steps
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

    def start(self, hparams, records, multi_label=False):
        """A fresh run: its hyperparameters (HParams), the overview layout (Custom Scalars), and `records`,
        {name: dict} such as the config and environment, as JSON text at step 0."""
        if self.main:
            for summary in hparams_summaries(hparams, columns()):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_custom_scalars(layout(multi_label))
            for name, record in records.items():
                self.writer.add_text(f"run/{name}", "```json\n" + json.dumps(record, indent=2) + "\n```", 0)

    def note(self, tag, text, step):
        """A line of text in TensorBoard at `step` (and on the console)."""
        if self.main and self.writer:
            self.writer.add_text(tag, text, step)
        self.say(text)

    def end(self, status, step, note):
        """How the run ended ("success", "early stop", "stopped", "failure"): as text, and in HParams' status column.
        TensorBoard keeps a run's first end status only, so a stop, after which the run goes on, writes none
        there (it shows "unknown"); a failure shows as one even when the run is resumed later."""
        if self.main and self.writer:
            if status != "stopped":
                for summary in hparams_summaries({}, (), status):
                    self.writer.file_writer.add_summary(summary)
            self.writer.add_text("run/status", f"**{status}** at step {step}: {note}", step)
            # at step 0, whatever the step: one point, the last segment's (TensorBoard keeps the last written at a
            # step), not a line ramping from one segment's end to the next
            self.writer.add_scalar(END_STATUS, STATUS[status], 0)

    def calibration(self, step, cal, unknown, target_accuracy=None):
        """The fitted temperature (the reliability diagram in TensorBoard) and unknown threshold, on the console."""
        if cal:
            if self.main and self.writer:
                self.writer.add_image("predictions/reliability", np.asarray(calibrate.diagram(cal)), step,
                                      dataformats="HWC")
            self.say(f"calibrated: {calibrate.summary(cal)}")
        if unknown:
            self.note("predictions/unknown", f"unknown below a top score of {unknown[0]:.4f}: {unknown[1]:.1%} of the "
                      f"eval split answered, {unknown[2]:.1%} of them right", step)
        elif target_accuracy:
            self.say(f"warning: no threshold reaches accuracy {target_accuracy:g} on the eval split: every image is "
                     "answered (no unknown threshold stored)")

    def eval(self, step, result, class_names):
        """The eval's TensorBoard records, and a console line."""
        if self.main:
            eval_records(self.writer, step, result, class_names)
            ema = f" | EMA {metrics.summary(result, 'ema_', rows=2)}" if "ema_loss" in result else ""
            self.say(f"step {step}: eval {metrics.summary(result)}" + ema)

    def train(self, step, loss, lrs, grad_norm, img_s, data_wait, scale=None, damaged_files=0, skipped_steps=0):
        """A logging step's scalars; `lrs`: the learning rate of each parameter group (the head's is logged
        as optim/lr, and with --layer-decay the lowest as optim/lr_lowest)."""
        lr = max(lrs)
        values = {"loss/train": loss, "optim/lr": lr}
        if grad_norm is not None:  # None: every step of the window was skipped (non-finite)
            values["optim/grad_norm"] = grad_norm
        if min(lrs) < lr:
            values["optim/lr_lowest"] = min(lrs)
        self.windows += 1
        if self.windows > 1:  # the first window of a segment holds its start-up (loader, first kernels)
            values.update({"speed/img_per_s": img_s, "speed/data_wait_percent": 100 * data_wait})
        if scale is not None:
            values["optim/amp_scale"] = scale
        if skipped_steps:  # a running count: steps skipped for non-finite loss or gradients so far
            values["skipped/nonfinite_steps"] = skipped_steps
        if damaged_files:
            values["skipped/damaged_train_files"] = damaged_files
        self.scalars(step, values)
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
        self.sums = torch.zeros(3, device=device)  # loss, grad norm of the steps taken, steps taken
        self.reset()

    def reset(self):
        self.start, self.images, self.wait, self.paused = time.perf_counter(), 0, 0.0, 0.0

    def fetched(self, images, wait):
        self.images += images
        self.wait += wait

    def pause(self, seconds):
        self.paused += seconds

    def stepped(self, loss, norm, finite):
        # a skipped step (non-finite) left the weights as they were: the norm is the mean over the steps taken
        self.sums += torch.stack([loss, torch.where(finite, norm, 0.0), finite.float()])

    def close(self, step, damaged):
        """The window ending at optimizer step `step`: dict(loss, grad_norm (None when every step was skipped),
        img_s, data_wait, any_damaged (this rank's `damaged` count, summed over ranks)). A host-device sync."""
        counts = torch.tensor([self.images, damaged], dtype=torch.float32, device=self.device)
        totals = dist.all_sum(torch.cat([self.sums / self.world, counts]))
        taken = totals[2].item()
        seconds = max(1e-9, time.perf_counter() - self.start - self.paused)
        figures = dict(loss=round((totals[0] / (step - self.first)).item(), 6),
                       grad_norm=(totals[1] / taken).item() if taken else None, img_s=int(totals[3].item()) / seconds,
                       data_wait=min(1.0, self.wait / seconds), any_damaged=bool(totals[4].item()))
        self.sums.zero_()
        self.first = step
        self.reset()
        return figures
