"""The loaders: per-index samples of a data set, the sharded, resumable order of the training batches, the eval
batches kept decoded between evals, and the loaders of a run (`build_data`).

The loaders yield uint8 image batches (4x fewer bytes than float32 to copy between processes and to the device);
`images.normalize` turns them into the model's float input on the device. Training augmentation draws from an
RNG keyed on (seed, epoch, sample index), so a sample's crop does not depend on which worker made it or on where
a run was resumed.
"""

import ctypes
import functools
import math
import os
import random
import signal
import threading
import time
from typing import NamedTuple

import torch

from vitfood.common import UserError
from vitfood.images import DECODE_ERRORS, open_image
from vitfood.sources import balanced_weights, is_multi_label
from vitfood.stream import Stream, StreamBatches, StreamImages, StreamSampler

class BadImageError(UserError):
    """An image that cannot be decoded, with --bad-images error."""


class ImageDataset(torch.utils.data.Dataset):
    """Per-index access to a `datasets.Dataset`: (uint8 image, label). Keys are (epoch, index) or index.
    A label is a class id, or for multi-label data (a list of classes per image) a multi-hot uint8 row of
    `num_classes`.

    An image that fails to decode gives (None, index) (skipped and reported by `collate`), or raises
    BadImageError naming it when `skip_bad` is off.
    """

    def __init__(self, ds, image_column, label_column, transform, seed=0, skip_bad=True, relabel=None, num_classes=None):
        import datasets
        self.ds = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.multi_hot = num_classes if is_multi_label(ds, label_column) else None  # classes of a multi-hot row
        if self.multi_hot is None:
            self.labels = [int(v) for v in ds[label_column]]
        else:
            self.labels = [tuple(int(c) for c in v) for v in ds[label_column]]
        if relabel:  # the data set's class i is the model's class relabel[i]
            new = lambda v: relabel[v] if 0 <= v < len(relabel) else v
            self.labels = [new(v) if self.multi_hot is None else tuple(map(new, v)) for v in self.labels]
        self.transform, self.seed, self.skip_bad = transform, seed, skip_bad

    def __len__(self):
        return len(self.labels)

    def where(self, i):
        """Image i's file, for a message."""
        return self.ds[i][self.image_column].get("path") or f"image {i} (embedded bytes)"

    def __getitem__(self, key):
        epoch, i, *draw = key if isinstance(key, tuple) else (0, key)
        # string seeds hash with sha512: stable everywhere; `draw`: the position of a balanced sampler's draw
        rng = random.Random(f"{self.seed}-{epoch}-{i}" + "".join(f"-{d}" for d in draw))
        cell = self.ds[i][self.image_column]
        try:
            image = self.transform(open_image(cell), rng)
        except DECODE_ERRORS as e:
            if self.skip_bad:
                return None, i
            where = cell.get("path") or "embedded bytes"
            raise BadImageError(f"image {i} ({where}) cannot be decoded: {type(e).__name__}: {e}"
                                " (--bad-images skip skips and counts such images)") from None
        if self.multi_hot is None:
            return image, self.labels[i]
        hot = torch.zeros(self.multi_hot, dtype=torch.uint8)
        hot[list(self.labels[i])] = 1
        return image, hot


def collate(samples, size=None, classes=None):
    """Stack (image, label) pairs; damaged images, (None, index), are dropped: (images, labels, their indices).

    An empty list (a rank's share of an epoch's last, short global batch), or a batch in which every image
    is damaged, gives an empty batch of `size`: a training step goes on without it, an eval pass past it.
    Multi-hot labels (multi-label data, `classes` of them) stack into rows.
    """
    good = [s for s in samples if s[0] is not None]
    bad = [i for image, i in samples if image is None]
    if not good:
        labels = torch.empty(0, dtype=torch.int64) if classes is None else torch.empty((0, classes), dtype=torch.uint8)
        return torch.empty((0, 3, *size), dtype=torch.uint8), labels, bad
    images = torch.stack([img for img, _ in good])
    if classes is not None:
        return images, torch.stack([label for _, label in good]), bad
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    return images, labels, bad


def _worker_init(worker_id, parent=None):
    # Ctrl-C goes to the terminal's whole process group: workers leave it (and ignore SIGINT) so the
    # main process can finish its step and save. SIGTERM keeps its default: the loader's shutdown uses it.
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the main process handles a hangup, as it does Ctrl-C
    # A worker dies with its process (kill -9, OOM killer) instead of living on for seconds: Linux's
    # parent-death signal. The parent may have died already, before the signal was armed.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if parent is not None and os.getppid() != parent:
        os._exit(0)


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's share of each global batch, as lists of (epoch, index) keys, from any position on.

    Global batch k of an epoch is positions [k*G, (k+1)*G) of a permutation seeded by (seed, epoch),
    G = `global_batch` (--batch-size x processes): the same global batches for any number of processes.
    Rank r takes the r-th of `world` contiguous parts: G / world each, near-equal in an epoch's last,
    short batch, where a part may even be empty. Every sample is seen once per epoch, none is padded
    or dropped; with per-sample `weights` (--sampler balanced), an epoch is n draws with replacement.
    """

    def __init__(self, n, seed, global_batch, rank=0, world=1, shuffle=True, weights=None):
        self.n, self.seed, self.shuffle, self.weights = n, seed, shuffle, weights
        self.rank, self.world, self.global_batch = rank, world, global_batch
        self.batches_per_epoch = math.ceil(n / self.global_batch)
        self.epoch, self.batch = 0, 0

    def set_position(self, epoch, batch):
        self.epoch, self.batch = epoch, batch

    def global_size(self, batch):
        """Samples in global batch `batch` of an epoch, over all ranks."""
        return min(self.global_batch, self.n - batch * self.global_batch)

    def samples_in(self, first, count):
        """Samples in `count` global batches from global batch `first` on (counted across epochs)."""
        return sum(self.global_size((first + j) % self.batches_per_epoch) for j in range(count))

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:  # --sampler balanced: n draws with replacement, each by its weight
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        for k in range(self.batch, self.batches_per_epoch):
            m = self.global_size(k)
            start = k * self.global_batch + self.rank * (m // self.world) + min(self.rank, m % self.world)
            size = m // self.world + (self.rank < m % self.world)
            if self.weights is None:
                yield [(self.epoch, i) for i in order[start:start + size].tolist()]
            else:  # an image drawn twice in an epoch is augmented twice: its key holds the draw's position
                yield [(self.epoch, i, start + j) for j, i in enumerate(order[start:start + size].tolist())]

    def __len__(self):
        return self.batches_per_epoch - self.batch


class BatchStream:
    """This rank's training micro-batches, epoch after epoch, without end. Its state is the position of the
    next global micro-batch and the global batch that defines it, which a resumed run must keep."""

    def __init__(self, loader, sampler):
        self.loader, self.sampler = loader, sampler
        self.position, self._batches = 0, None  # global micro-batches taken, over all epochs

    def start(self):
        """Start the loader's workers on the next batches (they decode while the model is being built)."""
        if self._batches is None:
            epoch, batch = divmod(self.position, self.sampler.batches_per_epoch)
            self.sampler.set_position(epoch, batch)
            self._batches = self._epochs(epoch, iter(self.loader))  # iter(): the workers start, and prefetch

    def __next__(self):
        self.start()
        batch = next(self._batches)
        self.position += 1
        return batch

    def close(self):
        if self._batches is not None:
            self._batches.close()  # the generator lets go of the loader's iterator
            self._batches = None

    def _epochs(self, epoch, batches):
        while True:
            yield from batches
            epoch += 1
            self.sampler.set_position(epoch, 0)
            batches = iter(self.loader)

    def state_dict(self):
        epoch, batch = divmod(self.position, self.sampler.batches_per_epoch)
        return dict(epoch=epoch, batch=batch, global_batch=self.sampler.global_batch, world_size=self.sampler.world)

    def load_state_dict(self, state):
        g, procs, world = state["global_batch"], state["world_size"], self.sampler.world
        if g is not None and g != self.sampler.global_batch:  # the data order depends on it (None: before torchrun)
            keep = f"pass --batch-size {g // world}" if g % world == 0 else "that cannot be split evenly"
            raise UserError(f"the run being resumed used a global batch of {g} ({procs} process(es) x --batch-size "
                            f"{g // procs}); keep it: with {world} process(es), {keep}")
        position = state["epoch"] * self.sampler.batches_per_epoch + state["batch"]
        if position != self.position:  # else a stream started at this position goes on as it is
            self.position, self._batches = position, None


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose worker deaths are raised where the main process takes a batch, as the loader's own
    "DataLoader worker" error, and nowhere else.

    PyTorch's SIGCHLD handler raises that error wherever the main thread happens to be when a worker dies: inside
    a checkpoint's write or the export (where it reads as a disk failure), a finally block, a thread's start.
    Here the handler's error is kept and raised at the next batch any Loader hands out (a loader waiting on the
    dead worker's batch finds the death itself within 5 s). And the main process reads a batch's tensors through
    a connection to the worker that made them (file descriptors passed over a socket): a worker killed mid-send
    shows there as a reset connection or an end of file, which is that worker's death too."""

    def __iter__(self):
        batches = super().__iter__()
        _defer_worker_deaths()  # the iterator has just installed PyTorch's handler (the first time)
        while True:
            if _worker_deaths:
                death = _worker_deaths[0]
                _worker_deaths.clear()
                raise death
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (EOFError, ConnectionError) as e:
                dead = _dead_workers(getattr(batches, "_workers", []))
                if not dead:  # the dataset's own error, raised in a worker or here
                    raise
                raise RuntimeError(f"DataLoader worker (pid(s) {', '.join(map(str, dead))}) exited while sending a "
                                   f"batch ({type(e).__name__})") from e
            yield batch


_worker_deaths = []  # errors of PyTorch's SIGCHLD handler, for the next batch


def _defer_worker_deaths():
    """Wrap PyTorch's SIGCHLD handler (once, from the main thread) so that its error is kept, not raised."""
    handler = signal.getsignal(signal.SIGCHLD)
    if not callable(handler) or getattr(handler, "deferred", False) or threading.current_thread() is not threading.main_thread():
        return

    def deferred(signum, frame):
        try:
            handler(signum, frame)
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):
                raise
            _worker_deaths.append(e)
    deferred.deferred = True
    signal.signal(signal.SIGCHLD, deferred)


def _dead_workers(workers, wait=2.0):
    """The pids of `workers` that have ended, waiting up to `wait` seconds for one to: a killed process closes its
    sockets before it can be reaped, so its reader may see the connection drop a moment before it is dead."""
    deadline = time.monotonic() + wait
    while not (dead := [w.pid for w in workers if not w.is_alive()]) and workers and time.monotonic() < deadline:
        time.sleep(0.02)
    return dead


def make_loader(dataset, batch_size, num_workers, device, sampler=None, seed=0):
    """Batches of `batch_size` in order or over `sampler`; an EpochBatchSampler makes the batches itself."""
    if isinstance(sampler, (EpochBatchSampler, StreamSampler)):
        batching = dict(batch_sampler=sampler)
    else:
        batching = dict(batch_size=batch_size, sampler=sampler, drop_last=False)
    size = getattr(getattr(dataset, "transform", None), "size", None)
    return Loader(
        dataset, **batching, num_workers=num_workers,
        collate_fn=functools.partial(collate, size=size, classes=getattr(dataset, "multi_hot", None)),
        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # own generator: the global RNG is never touched
        worker_init_fn=functools.partial(_worker_init, parent=os.getpid()),
        prefetch_factor=4 if num_workers > 0 else None)


class KeptBatches:
    """The eval loader, whose decoded batches are kept after its first whole pass (the eval transform has no
    randomness), so that every later eval decodes nothing: in GPU memory when they fit in `gpu_bytes`, else
    in pinned host memory. A pass cut short keeps nothing."""

    def __init__(self, loader, device, gpu_bytes=0):
        self.loader, self.batches = loader, None
        self.device = device if device.type == "cuda" and gpu_bytes > 0 else None
        self.batch_size = loader.batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.batches is not None:
            yield from self.batches
            return
        kept = []
        for images, labels, bad in self.loader:
            if self.device is not None:
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            elif not images.is_pinned():  # from a worker, in shared memory (a file descriptor each): copy it out
                images, labels = images.clone(), labels.clone()
            kept.append((images, labels, bad))
            yield kept[-1]
        self.batches = kept


def stop_workers(*loaders):
    """Stop these DataLoaders' worker processes now, while the interpreter is whole. Left to the interpreter's
    exit, persistent workers with pinned memory (CUDA) hold it up 5 s each (pytorch/pytorch#81794): 40 s at the
    end of a run with 8 workers, measured on an H200."""
    for loader in loaders:
        loader = getattr(loader, "loader", loader)  # KeptBatches' own loader
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            loader._iterator = None


class Data(NamedTuple):
    """What a run reads: the image sets, the training sampler and the loaders (train parts None for eval only)."""
    train_set: ImageDataset | StreamImages | None
    eval_set: ImageDataset
    sampler: EpochBatchSampler | StreamSampler | None
    train_loader: torch.utils.data.DataLoader | None
    eval_loader: torch.utils.data.DataLoader
    batches: BatchStream | StreamBatches | None  # the training micro-batches, resumable

    def close(self):
        """Stop every loader's workers (the end of a run)."""
        if self.batches is not None:
            self.batches.close()
        stop_workers(*(loader for loader in (self.train_loader, self.eval_loader) if loader is not None))


def build_data(cfg, train_ds, eval_ds, transforms, num_classes, device, workers, global_batch=None, rank=0, world=1,
               eval_batch=None, relabel=None, keep_eval=False):
    """The data sets and loaders of a run, as train, bench and evaluate all read them.

    Training (when `train_ds` is given) gets rank `rank`'s share of each global batch of `global_batch`
    images; eval takes every `world`-th image from `rank` on, so the sums over ranks cover the split once.
    `keep_eval`: the decoded eval images are kept between passes (KeptBatches) when this rank's share takes at
    most --eval-cache-gb; on CUDA in GPU memory when that is at most 5% of the GPU's.
    """
    train_tf, eval_tf = transforms
    skip_bad = cfg.bad_images == "skip"
    train_set = sampler = train_loader = batches = None
    if isinstance(train_ds, Stream):
        train_set = StreamImages(train_ds, train_tf, cfg.seed, rank, skip_bad)
        sampler = StreamSampler(train_ds, cfg.seed, global_batch, rank, world, cfg.shuffle_buffer)
        train_loader = make_loader(train_set, cfg.batch_size, workers, device, sampler, seed=cfg.seed)
        batches = StreamBatches(train_loader, sampler)
    elif train_ds is not None:
        train_set = ImageDataset(train_ds, cfg.image_column, cfg.label_column, train_tf, seed=cfg.seed, skip_bad=skip_bad,
                                 num_classes=num_classes)
        check_labels(train_set, num_classes, "train")
        if train_set.multi_hot and "balanced" in (cfg.sampler, cfg.class_weights):
            raise UserError("--sampler balanced and --class-weights balanced are for single-label data; this data set "
                            "is multi-label (a list of classes per image)")
        weights = balanced_weights(train_set.labels, num_classes)[train_set.labels] if cfg.sampler == "balanced" else None
        sampler = EpochBatchSampler(len(train_set), cfg.seed, global_batch, rank, world, weights=weights)
        train_loader = make_loader(train_set, cfg.batch_size, workers, device, sampler, seed=cfg.seed)
        batches = BatchStream(train_loader, sampler)
    eval_set = ImageDataset(eval_ds, cfg.image_column, cfg.label_column, eval_tf, skip_bad=skip_bad, relabel=relabel,
                            num_classes=num_classes)
    check_labels(eval_set, num_classes, "eval")
    eval_loader = make_loader(eval_set, eval_batch or cfg.eval_batch(device), workers, device, range(rank, len(eval_set), world))
    size = len(range(rank, len(eval_set), world)) * 3 * math.prod(eval_tf.size)  # uint8 pixels
    if keep_eval and size <= cfg.eval_cache_gb * 2 ** 30:
        room = torch.cuda.get_device_properties(device).total_memory // 20 if device.type == "cuda" else 0
        eval_loader = KeptBatches(eval_loader, device, room if size <= room else 0)
    return Data(train_set, eval_set, sampler, train_loader, eval_loader, batches)


def check_damaged(dataset, damaged, which, limit):
    """Stop, naming files, when more than `limit` of `dataset`'s images are among `damaged` (indices)."""
    if damaged and len(damaged) > limit * len(dataset):
        names = ", ".join(dataset.where(i) for i in sorted(damaged)[:3]) + (", ..." if len(damaged) > 3 else "")
        raise UserError(f"{len(damaged)} of the {len(dataset)} {which} images cannot be decoded, more than "
                        f"--max-bad-share {limit:g} of them: {names}; fix or remove them, or raise --max-bad-share")


def eval_skip_warning(skipped, total):
    return (f"warning: {skipped} of the {total} eval images could not be decoded and were skipped: "
            f"the eval covers {total - skipped} (--bad-images error to stop instead)")


def check_labels(dataset, num_classes, which):
    if num_classes < 2:
        raise UserError(f"the data set has {num_classes} class(es); a classifier needs at least 2")
    ids = dataset.labels if dataset.multi_hot is None else [c for v in dataset.labels for c in v]
    bad = [v for v in ids if not 0 <= v < num_classes]
    if bad:
        raise UserError(f"the {which} split has label {bad[0]} outside the {num_classes} classes (0..{num_classes - 1})")

