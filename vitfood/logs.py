"""What a training run tells people while it runs: TensorBoard events, the progress bar and console lines.

Rank 0 alone writes; on the other ranks a RunLog is silent, so TensorBoard gets one event stream.
"""

import time

import numpy as np
from tqdm import tqdm

from vitfood import report


class RunLog:
    """The run's SummaryWriter and progress bar (rank 0), behind one method per kind of record."""

    def __init__(self, out, step, max_steps, main=True, resumed=False):
        self.main = main
        self.writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(out, purge_step=step if resumed else None)  # purge: curves don't double back
        self.pbar = tqdm(total=max_steps, initial=step, desc="train", dynamic_ncols=True, disable=not main)

    def say(self, text):
        if self.main:
            self.pbar.write(text)

    def scalars(self, step, values):
        if self.main:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def image(self, tag, image, step):
        """`image`: a PIL image or an HWC uint8 array."""
        if self.main:
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def augmented(self, images):
        """The first training batch as the model saw it, once."""
        if self.main:
            from torchvision.utils import make_grid
            self.writer.add_image("train/augmented_images", make_grid(images[:16], nrow=4), 0)

    def hparams(self, values, metrics):
        """The hparams summary, written through the main writer (add_hparams would start a sub-run)."""
        if self.main:
            from torch.utils.tensorboard.summary import hparams
            for summary in hparams(values, {m: 0.0 for m in metrics}):
                self.writer.file_writer.add_summary(summary)

    def eval(self, step, metrics, class_names):
        """eval/* scalars, the confusion matrix and mistakes images, and a console line."""
        if not self.main:
            return
        self.scalars(step, {f"eval/{k}": metrics[k] for k in ("loss", "acc1", "acc5")})
        if metrics["skipped"]:
            self.scalars(step, {"data/damaged_eval_files": metrics["skipped"]})
        self.image("eval/confusion_matrix", report.confusion_image(metrics["confusion"], class_names), step)
        self.image("eval/mistakes", report.mistakes_image(metrics["mistakes"], class_names), step)
        self.say(f"step {step}: eval loss {metrics['loss']:.4f} acc1 {metrics['acc1']:.4f} acc5 {metrics['acc5']:.4f}")

    def train(self, step, loss, lr, grad_norm, img_s, data_wait, scale=None, damaged_files=0, skipped_steps=0):
        values = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/img_per_s": img_s,
                  "train/data_wait": data_wait}
        if scale is not None:
            values["amp/scale"] = scale
        if skipped_steps:  # a running count: steps skipped for non-finite loss or gradients so far
            values["train/skipped_steps"] = skipped_steps
        if damaged_files:
            values["data/damaged_train_files"] = damaged_files
        self.scalars(step, values)
        self.pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}")

    def stepped(self):
        self.pbar.update(1)

    def close(self):
        self.pbar.close()
        if self.writer:
            self.writer.close()


class Meter:
    """The run's running figures: images/s and data wait of the current logging window (eval and save time
    left out), and, over every segment of a resumed run, training time, images and damaged files."""

    def __init__(self, before=None):
        before = before or {}  # the record of the checkpoint resumed from
        self.runtime_before, self.images_before = before.get("train_runtime", 0.0), before.get("images", 0)
        self.segments = before.get("segments", 0) + 1
        self.damaged = set(before.get("damaged_files", ()))  # indices of training images that failed to decode
        self.encounters = before.get("damaged_encounters", 0)
        self.segment_start, self.segment_images = time.perf_counter(), 0
        self.reset()

    def reset(self):
        self.start, self.images, self.wait, self.paused = time.perf_counter(), 0, 0.0, 0.0

    def fetched(self, images, wait, damaged=()):
        self.images += images
        self.wait += wait
        self.damaged.update(damaged)
        self.encounters += len(damaged)

    def stepped(self, images):
        """An optimizer step over `images` images (over all ranks)."""
        self.segment_images += images

    def pause(self, seconds):
        self.paused += seconds

    def window(self, images):
        """(img/s, share of time waiting for data) of the window, which had `images` images (over all
        ranks); then a new window starts."""
        dt = max(1e-9, time.perf_counter() - self.start - self.paused)
        rates = images / dt, min(1.0, self.wait / dt)
        self.reset()
        return rates

    def record(self, damaged, encounters):
        """The whole run so far, for a checkpoint and the results; `damaged`, `encounters`: over all ranks."""
        runtime = self.runtime_before + time.perf_counter() - self.segment_start
        return dict(train_runtime=runtime, images=self.images_before + self.segment_images, segments=self.segments,
                    damaged_files=sorted(damaged), damaged_encounters=encounters)
