"""What a run carries across a stop, besides its weights, optimizer, scheduler and scaler: where it is
(`Progress`), what it has cost and met (`Ledger`) and its random streams (`RNGStreams`). Each has
`state_dict()` / `load_state_dict()` (the Stateful protocol of torch.distributed.checkpoint);
`start.resumable` names every such part of a run, and `checkpoint` saves and restores them together.
The data position is `data.BatchStream`'s.
"""

import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from vitfood import dist, metrics
from vitfood.common import rank_seed, seed_everything


@dataclass
class Progress:
    """Where the run is: optimizer steps taken, the latest eval, every eval so far, and the best checkpoint
    (judged at saves that coincide with an eval, by `judge`: --best-metric, by default top-1 accuracy or for
    multi-label macro mAP). Early stopping is read from the evals' history, so a resumed run stops where one never
    stopped would."""
    step: int = 0
    metrics: dict | None = None  # the latest eval
    history: list = field(default_factory=list)  # every eval: step, train_loss, metrics
    best: dict | None = None  # dict(step, the judged figure under its all_results.json key, eval_loss)
    every: int = 100  # --eval-steps (not part of the state, nor are the three below)
    judge: "metrics.Judge | None" = None  # None: the score (top-1, or mAP)
    patience: int = 0  # --early-stopping-patience (0: off)
    min_delta: float = 0.0  # --early-stopping-min-delta

    def due(self, step, last_step):
        """Whether an eval is due after optimizer step `step` (every --eval-steps, and at the last)."""
        return last_step or step % self.every == 0

    def evaluated(self, result, train_loss):
        keep = {m.key for rows in (metrics.SINGLE, metrics.MULTI) for m in rows}
        keep |= {"samples", "skipped", "teacher", "agreement"} | {f"ema_{k}" for k in keep}  # teacher: --teacher's
        self.metrics = {k: v for k, v in result.items() if k in keep}
        self.history.append(dict(step=self.step, train_loss=train_loss, **self.metrics))

    def judging(self):
        """The Judge of evals: --best-metric's, or by default the score."""
        return self.judge or metrics.Judge("auto", metrics.table(self.metrics or self.history[-1]) is metrics.MULTI)

    def consider_best(self):
        """At a save right after an eval: True when this step's eval is the best so far (it becomes the best)."""
        judge = self.judging()
        key, value = judge.row.result, judge.value(self.metrics)
        if self.best is not None and not judge.better(value, self.best[key]):
            return False
        self.best = {"step": self.step, key: value, "eval_loss": self.metrics["loss"]}
        return True

    def stopped_early(self):
        """Why the run stops before --max-steps: --early-stopping-patience evals in a row have not improved on
        the best by more than --early-stopping-min-delta (as Keras and Lightning count it); else None."""
        if not self.patience or not self.history:
            return None
        judge, best, since = self.judging(), None, 0
        for h in self.history:
            if best is None or judge.better(judge.value(h), judge.value(best), self.min_delta):
                best, since = h, 0
            else:
                since += 1
        if since < self.patience:
            return None
        return (f"{judge.name} has not improved by more than {self.min_delta:g} for {since} evals (best "
                f"{judge.value(best):.4f} at step {best['step']})")

    def current(self):
        """The eval of this step's weights, or None (the last eval was of an earlier step)."""
        return self.metrics if self.history and self.history[-1]["step"] == self.step else None

    def state_dict(self):
        # the metrics only when they describe this step's weights: a run resumed at its last step from a save
        # between evals evaluates again before it reports
        return dict(step=self.step, metrics=self.current(), history=list(self.history), best=self.best)

    def load_state_dict(self, state):
        self.step, self.metrics = state["step"], state["metrics"]
        self.history, self.best = list(state["history"]), state["best"]


class Ledger:
    """The run's account over every segment of a resumed run: training time, images, damaged training files
    (and how often they were met) and skipped non-finite steps (counted on the device by `nonfinite`).
    Each rank keeps its own part; `state_dict()` adds them up, so every rank must call it."""

    def __init__(self, nonfinite):
        self.nonfinite = nonfinite  # steps.NonFiniteStreak
        self.runtime_before, self.images_before, self.encounters_before, self.segments = 0.0, 0, 0, 1
        self.damaged, self.encounters = set(), 0  # indices of training images that failed to decode (this rank)
        self.begin()

    def begin(self):
        """This segment's clock starts (with the loop: set-up and restore are not training time)."""
        self.segment_start, self.segment_images = time.perf_counter(), 0

    def fetched(self, damaged):
        self.damaged.update(damaged)
        self.encounters += len(damaged)

    def stepped(self, images):
        """An optimizer step over `images` images (over all ranks)."""
        self.segment_images += images

    def damaged_files(self):
        """(distinct damaged training files, times they were met), over all ranks."""
        parts = dist.gather((self.damaged, self.encounters))
        return set().union(*(d for d, _ in parts)), self.encounters_before + sum(e for _, e in parts)

    def state_dict(self):
        damaged, encounters = self.damaged_files()
        return dict(train_runtime=self.runtime_before + time.perf_counter() - self.segment_start,
                    images=self.images_before + self.segment_images, segments=self.segments,
                    damaged_files=sorted(damaged), damaged_encounters=encounters,
                    nonfinite_steps=self.nonfinite.total())

    def load_state_dict(self, state):
        self.runtime_before, self.images_before = state["train_runtime"], state["images"]
        self.segments = state["segments"] + 1
        self.damaged = set(state["damaged_files"])  # a set: the same on every rank adds up to itself
        self.encounters_before = state["damaged_encounters"]  # a count: added once, not once per rank
        self.nonfinite.skipped.fill_(state["nonfinite_steps"])


def rng_state():
    # lists and tensors only: torch.load(weights_only=True) refuses numpy arrays
    np_state = np.random.get_state()
    state = dict(python=[random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                 numpy=dict(name=np_state[0], keys=torch.from_numpy(np_state[1].astype(np.int64)),
                            pos=int(np_state[2]), has_gauss=int(np_state[3]), gauss=float(np_state[4])),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStreams:
    """Every rank's Python, NumPy, torch and CUDA random streams (dropout, drop-path). Augmentation does not
    draw from them: it is keyed on (seed, epoch, sample). `state_dict()` gathers, so every rank calls it."""

    def __init__(self, rank, world, seed, progress):
        self.rank, self.world, self.seed, self.progress = rank, world, seed, progress

    def state_dict(self):
        return dict(ranks=dist.gather(rng_state()))

    def load_state_dict(self, state):
        if len(state["ranks"]) == self.world:  # each rank its own stream: exact
            set_rng_state(state["ranks"][self.rank])
        else:  # another world size: fresh per-rank streams, new at each resumed step
            seed_everything(rank_seed(self.seed, self.rank, self.progress.step))
