"""The training split read as a stream (--streaming): WebDataset tar shards, local or at any fsspec URL, or a
`datasets` streaming split (a Hub data set, a local folder), read as training goes and never copied to disk.

The order is a function of the seed alone, as a map-style run's is. Pass p over the shards takes them in a
permutation seeded by (seed, p); rank r reads every world-th shard of it, through a shuffle buffer of
--shuffle-buffer samples seeded by (seed, p, r). One thread of the main process reads the bytes and the loader's
workers decode and augment, keyed on (seed, p, r, offset in the pass): the batches do not depend on --num-workers.
A stream has no length: an epoch is --train-samples images, and the passes go on without end.

Resume is exact: each rank's position is the pass and the samples taken from it by the batches the loop has
consumed (not those read ahead). A resumed run reads that pass again from its first shard through the same
buffer and drops what was taken, read but not decoded: resuming costs up to one pass of this rank's reading.
torchdata's StatefulDataLoader snapshots each worker's iterator instead, which ties the order to --num-workers.
"""

import os
import queue
import random
import tarfile
import threading
import time

import torch

from vitfood import dist
from vitfood.common import UserError, first_line
from vitfood.images import DECODE_ERRORS, open_image

TRIES = 3  # a URL that cannot be read is tried this often, waiting RETRY_SECONDS, then twice that, ...
RETRY_SECONDS = float(os.environ.get("VITFOOD_SHARD_RETRY_SECONDS", "1"))


class TarShards:
    """WebDataset tar shards: a sample is the files sharing a key (the name up to its first dot); its image is
    the file with extension `image_key`, its label the text of `label_key` (a class id, or a class name)."""

    def __init__(self, files, image_key, label_key):
        self.shards, self.image_key, self.label_key = files, image_key, label_key

    def samples(self, shard):
        """(where, image cell, label text) of each sample of shard `shard` (its index), tried TRIES times."""
        url, done = self.shards[shard], 0
        for attempt in range(TRIES):
            try:
                for n, sample in enumerate(self._read(url)):
                    if n >= done:  # a retry after a broken read goes on where the last one stopped
                        done += 1
                        yield sample
                return
            except OSError as e:  # a URL that does not answer, a connection reset mid-shard
                if attempt + 1 == TRIES:
                    raise UserError(f"cannot read shard {url} ({TRIES} tries): {first_line(e)}") from None
                time.sleep(RETRY_SECONDS * 2 ** attempt)

    def _read(self, url):
        import fsspec
        with fsspec.open(url, "rb") as fh:
            try:
                with tarfile.open(fileobj=fh, mode="r|") as tar:  # a stream: no seek, read once in order
                    key, files = None, {}
                    for member in tar:
                        if not member.isfile():
                            continue
                        base = os.path.basename(member.name)
                        stem, _, ext = base.partition(".")
                        prefix = os.path.join(os.path.dirname(member.name), stem)
                        if prefix != key and key is not None:
                            yield self._sample(url, key, files)
                            files = {}
                        key = prefix
                        if ext in (self.image_key, self.label_key):
                            files[ext] = tar.extractfile(member).read()
                    if key is not None:
                        yield self._sample(url, key, files)
            except tarfile.TarError as e:
                raise UserError(f"shard {url} is not a readable tar file: {first_line(e)}") from None

    def _sample(self, url, key, files):
        for ext, flag in ((self.image_key, "image"), (self.label_key, "label")):
            if ext not in files:
                raise UserError(f"sample {key} of shard {url} has no .{ext} file (every sample needs "
                                f"--{flag}-column {ext}; it has {', '.join(sorted(files)) or 'none of the two'})")
        return f"{key} of {url}", {"bytes": files[self.image_key], "path": None}, files[self.label_key].decode().strip()


class SplitShards:
    """A `datasets` streaming split, read by its own shards (its data files)."""

    def __init__(self, ds, image_column, label_column):
        import datasets
        self.ds = ds.select_columns([image_column, label_column]).cast_column(image_column, datasets.Image(decode=False))
        self.shards = list(range(ds.num_shards))
        self.image_column, self.label_column = image_column, label_column

    def samples(self, shard):
        part = self.ds.shard(num_shards=len(self.shards), index=shard)
        for n, row in enumerate(part):
            yield f"row {n} of part {shard}", row[self.image_column], row[self.label_column]


class Stream:
    """What load_splits gives for a streamed train split: the reader, its class names, and its declared length."""

    def __init__(self, reader, names, samples, describe):
        self.reader, self.names, self.samples, self.describe = reader, names, samples, describe

    def __len__(self):
        return self.samples

    def label(self, value, where):
        """A label as read (a class id or a class name, as text or a number) -> class id."""
        text = str(value)
        if text.lstrip("-").isdigit():
            i = int(text)
            if 0 <= i < len(self.names):
                return i
        elif text in self.names:
            return self.names.index(text)
        raise UserError(f"label {text!r} of {where} is not one of the {len(self.names)} classes (those of "
                        "classes.txt beside the shards, or of the eval split)")


def passes(stream, seed, rank, world, buffer, start=(0, 0)):
    """(pass, offset, where, image cell, class id) of this rank's samples, pass after pass, from `start`
    (pass, samples already taken from it): those are read again and dropped."""
    p, skip = start
    n = len(stream.reader.shards)
    while True:
        order = list(range(n))
        random.Random(f"shards-{seed}-{p}").shuffle(order)
        mine = order[rank::world]
        rng, kept, offset = random.Random(f"buffer-{seed}-{p}-{rank}"), [], 0

        def emit():
            j = rng.randrange(len(kept))
            kept[j], kept[-1] = kept[-1], kept[j]
            return kept.pop()

        def sample_lists():
            for shard in mine:
                for where, cell, label in stream.reader.samples(shard):
                    kept.append((where, cell, label))
                    if len(kept) >= buffer:
                        yield emit()
            rng.shuffle(kept)
            while kept:
                yield kept.pop()

        for where, cell, label in sample_lists():
            if offset >= skip:
                yield p, offset, where, cell, stream.label(label, where)
            offset += 1
        if offset == 0:
            raise UserError(f"rank {rank}'s shards hold no samples ({stream.describe})")
        p, skip = p + 1, 0


class Reader:
    """`passes` read ahead by a thread (its errors raised where the samples are taken), so that reading a shard
    overlaps the training step."""

    def __init__(self, samples, ahead):
        self.queue, self.stop = queue.Queue(maxsize=ahead), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(samples,), daemon=True, name="vitfood-stream")
        self.thread.start()

    def _run(self, samples):
        try:
            for sample in samples:
                while not self.stop.is_set():
                    try:
                        self.queue.put(sample, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except Exception as e:  # noqa: BLE001 - handed to the main thread, which reports it
            self.queue.put(e)

    def take(self):
        item = self.queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self):
        self.stop.set()


class StreamSampler:
    """The loader's batch sampler: this rank's micro-batches of `batch_size` samples, read from the stream and
    handed to the workers as keys that carry the image bytes. Each batch's position after it is queued in
    `marks`, in the order the loader gives the batches back."""

    def __init__(self, stream, seed, global_batch, rank, world, buffer):
        if len(stream.reader.shards) < world:
            raise UserError(f"{stream.describe} has {len(stream.reader.shards)} shard(s) for {world} processes: "
                            f"each process reads its own, so write at least {world} (vitfood.shards --shard-size)")
        self.stream, self.seed, self.rank, self.world, self.buffer = stream, seed, rank, world, buffer
        self.global_batch, self.batch_size = global_batch, global_batch // world
        self.batches_per_epoch = max(1, len(stream) // global_batch)
        self.start, self.marks, self.reader = (0, 0), [], None

    def samples_in(self, first, count):
        return count * self.global_batch  # a stream has no short last batch

    def __iter__(self):
        self.close()
        # read ahead: 4 batches (the loader's workers hold their own prefetched batches besides)
        self.reader = Reader(passes(self.stream, self.seed, self.rank, self.world, self.buffer, self.start),
                             ahead=4 * self.batch_size)
        while True:
            batch = [self.reader.take() for _ in range(self.batch_size)]
            self.marks.append((batch[-1][0], batch[-1][1] + 1))
            yield batch

    def close(self):
        if self.reader is not None:
            self.reader.close()


class StreamImages(torch.utils.data.Dataset):
    """A streamed sample, as the loader's workers decode it: key (pass, offset, where, image cell, class id);
    augmentation keyed on (seed, pass, rank, offset)."""

    multi_hot = None

    def __init__(self, stream, transform, seed, rank, skip_bad):
        self.stream, self.transform, self.seed, self.rank, self.skip_bad = stream, transform, seed, rank, skip_bad

    def __len__(self):
        return len(self.stream)

    def where(self, i):
        return i  # a damaged sample's index is where it is already

    def __getitem__(self, key):
        p, offset, where, cell, label = key
        rng = random.Random(f"{self.seed}-s{p}-{self.rank}-{offset}")
        try:
            return self.transform(open_image(cell), rng), label
        except DECODE_ERRORS as e:
            if self.skip_bad:
                return None, where
            raise UserError(f"{where} cannot be decoded: {type(e).__name__}: {e} (--bad-images skip skips "
                                "and counts such images)") from None


class StreamBatches:
    """BatchStream's part for a stream: this rank's micro-batches without end; its state is every rank's
    position in its stream, as of the batches taken."""

    def __init__(self, loader, sampler):
        self.loader, self.sampler = loader, sampler
        self.position, self.taken, self._batches = 0, sampler.start, None

    def start(self):
        if self._batches is None:
            self.sampler.start, self.sampler.marks = self.taken, []
            self._batches = iter(self.loader)

    def __next__(self):
        self.start()
        batch = next(self._batches)
        self.taken = self.sampler.marks.pop(0)
        self.position += 1
        return batch

    def close(self):
        self.sampler.close()
        self._batches = None

    def state_dict(self):
        return dict(stream=dist.gather(self.taken), position=self.position, global_batch=self.sampler.global_batch,
                    world_size=self.sampler.world)

    def load_state_dict(self, state):
        if "stream" not in state:
            raise UserError("the run being resumed did not read a stream; resume it without --streaming")
        if len(state["stream"]) != self.sampler.world or state["global_batch"] != self.sampler.global_batch:
            raise UserError(f"a streamed run resumes with the processes and batch it ran with: "
                            f"{state['world_size']} process(es), global batch {state['global_batch']}")
        position, taken = state["position"], tuple(state["stream"][self.sampler.rank])
        if (position, taken) != (self.position, self.taken):  # else a stream started here goes on as it is
            self.close()
            self.position, self.taken = position, taken
