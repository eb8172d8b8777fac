"""Checkpoints: atomic, marked complete, rotated; plain state a resume restores exactly.

<output-dir>/checkpoint-<step>/ holds a Hugging Face model folder (config.json,
model.safetensors, preprocessor_config.json), training_state.pt (every resumable part of the
run under its name, see `state_of`; loadable with weights_only=True) and, written last,
COMPLETE.json listing every file, its size and SHA-256. It is built under a temporary name and
renamed into place, so a folder named checkpoint-<step> is either complete or absent.

An --fsdp run's checkpoint holds config.json instead of model.safetensors, and its weights and optimizer
state in sharded/ (one file per rank, written by every rank at once; see fsdp.py), listed in COMPLETE.json
like the rest.

The exported model/ (and a LoRA run's adapter/) is sealed too, with SHA256SUMS (seal.py).
"""

import contextlib
import errno
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from vitfood.common import UserError, first_line
from vitfood import faults, seal
from vitfood.seal import MARKER, finish_files, seal_folder

STATE = "training_state.pt"
BEST = "best_checkpoint.json"
NAME = re.compile(r"^checkpoint-(\d+)$")  # a checkpoint folder's name
MODEL = "model"  # <output-dir>/model: the exported model


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


FORMAT = 2  # the layout of training_state.pt: one entry per resumable part (1: the flat dict before it)


def state_of(parts):
    """What training_state.pt holds: each resumable part's state_dict() under its name. Every rank calls
    this: some parts gather over ranks."""
    return dict(format=FORMAT, **{name: part.state_dict() for name, part in parts.items()})


def restore(path, state, model, parts, optimizer=None):
    """Put a run back as it was at checkpoint `path`, whose training state is `state` (from load_state): the
    model's weights, then each part of `parts` in order. `optimizer`: an --fsdp run's, restored with the
    weights from the checkpoint's shards (on any number of ranks)."""
    from vitfood.model import load_sharded_weights, load_weights
    if optimizer is not None:
        load_sharded_weights(model, path, optimizer)
    else:
        load_weights(model, path)
    for name, part in parts.items():
        if state.get(name):  # an empty one (the scaler of a run that was not fp16) leaves the part as it is
            part.load_state_dict(state[name])


def upgrade(state):
    """A training state as vitfood wrote it before FORMAT 2 (one flat dict), in today's layout."""
    if "format" in state:
        return state
    for group in state["optimizer"]["param_groups"]:  # an older vitfood built foreach AdamW on the CPU: the
        group.update(fused=True, foreach=None)  # step skips non-finite updates in the fused kernel only
    position = state["data_position"]
    ledger = dict(train_runtime=0.0, images=0, segments=0, damaged_files=[], damaged_encounters=0, nonfinite_steps=0)
    ledger.update(state.get("elapsed") or {})
    return dict(format=FORMAT, optimizer=state["optimizer"], scheduler=state["scheduler"], scaler=state["scaler"],
                progress=dict(step=state["step"], metrics=state["metrics"], history=state.get("history", []),
                              best=state.get("best")),
                ledger=ledger, rng=dict(ranks=state.get("rng_ranks") or [state["rng"]]),
                data=dict(epoch=position["epoch"], batch=position["batch"], world_size=state.get("world_size", 1),
                          global_batch=state.get("global_batch")))


def save(output_dir, step, model, processor, training_state, weights=None, timing=None, before_marker=None,
         optimizer=None, main=True):
    """Write checkpoint-<step> atomically and return its path. `weights`: the model's state dict to write
    (a snapshot), instead of the model's current one. `timing`: a dict that gets the seconds spent writing
    the files, and sealing them (fsync, SHA-256, marker). `before_marker`: called once the files are written
    and synced, before the marker makes the checkpoint complete (an earlier write's end, awaited).

    `optimizer`: an --fsdp run's. Every rank calls this, on storage they share: each writes its shards of the
    weights and of the optimizer state into the same temporary folder at once (fsdp.save; a failure on one
    raises on all), then rank 0 (`main`) the rest, and seals and renames the folder as for any checkpoint."""
    from vitfood import dist, fsdp
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}-{'sharded' if optimizer else os.getpid()}")  # one for all ranks
    timing = {} if timing is None else timing
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if optimizer is not None:
        dist.barrier()  # no rank writes into the folder before rank 0 has cleared it
    try:
        t0 = time.perf_counter()
        if optimizer is None:
            model.save_pretrained(tmp, state_dict=weights)
        else:
            fsdp.save(tmp, model, optimizer)
        faults.at("weights_written")
        if main:
            if optimizer is not None:
                model.config.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            with ThreadPoolExecutor(1) as beside:  # the weights synced and hashed while the state is serialized
                written = os.listdir(tmp)
                part = {}
                weights_done = beside.submit(finish_files, tmp, only=written, timing=part)
                save_state(training_state, os.path.join(tmp, STATE))
                t1 = time.perf_counter()
                rest = finish_files(tmp, timing=timing, only=[n for n in os.listdir(tmp) if n not in written])
                files = {**weights_done.result(), **rest}
            timing.update({k: round(timing.get(k, 0) + v, 3) for k, v in part.items()})
            timing.update(files_s=round(t1 - t0, 3), seal_s=round(time.perf_counter() - t1, 3))
            if before_marker:
                t2 = time.perf_counter()
                before_marker()
                timing["waited_s"] = round(time.perf_counter() - t2, 3)  # for the earlier write: not this one's
            _mark(tmp, step, files)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial folder behind, even on a full disk
        raise
    if main:
        _swap_in(tmp, final)
        faults.at("renamed")
    return final


def save_state(state, path):
    """torch.save without the zip's CRC-32 where torch can (2.6 and later): it took two thirds of the time of
    AdamW's state (1.4-2.0 s against 0.66 s for 660 MB on a 2-core Xeon). The SHA-256 in COMPLETE.json covers
    every byte instead, and torch.load reads the file alike."""
    try:
        from torch.utils.serialization import config
        unchecked = config.patch({"save.compute_crc32": False})
    except (ImportError, AttributeError):
        unchecked = contextlib.nullcontext()
    with unchecked:
        torch.save(state, path)


def _seal(tmp, step):
    """fsync every file, then write the marker that makes the folder a complete checkpoint."""
    _mark(tmp, step, finish_files(tmp))


def _mark(tmp, step, files):
    """The marker that makes the folder a complete checkpoint: each file's size (checked whenever checkpoints
    are listed) and SHA-256 (checked when one is resumed from)."""
    faults.at("marker")
    for top, folders, _ in os.walk(tmp):  # an --fsdp checkpoint's sharded/: its entries synced too
        for folder in folders:
            _fsync_dir(os.path.join(top, folder))
    write_json_atomic(os.path.join(tmp, MARKER), dict(step=step, files=files))
    _fsync_dir(tmp)


def _swap_in(tmp, final):
    """Rename folder tmp to final; an existing final is moved aside first (os.replace refuses a non-empty target)."""
    parent, name = os.path.split(final)
    if os.path.exists(final):
        old = os.path.join(parent, f".old-{name}-{os.getpid()}")
        os.replace(final, old)
        faults.at("swapping")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(parent)


class ModelFolder:
    """<output-dir>/<name> (a model folder: weights, config, image processor, the card as README.md), built in a
    temporary folder and renamed into place by `seal()`. With `weights_of`, a checkpoint folder that holds these
    very weights, its weights files are hard-linked at `seal()` instead of written again (so it may still be
    being written until then), and its config.json copied unless `own_config` (the model's config holds more than
    the checkpoint's: a calibration not kept, an unknown threshold); elsewhere they are written now."""

    def __init__(self, output_dir, model, processor, card=None, name=MODEL, weights_of=None, own_config=False):
        self.output_dir, self.weights_of = output_dir, weights_of
        self.final = os.path.join(output_dir, name)
        self.tmp = os.path.join(output_dir, f".tmp-{name}-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        with self._guard():
            if weights_of:
                os.makedirs(self.tmp)
                if own_config:  # with what save_pretrained adds to it, though no checkpoint was saved this time
                    model.config.dtype = str(model.dtype).split(".")[1]
                    model.config.architectures = [type(model).__name__]
                    model.config.save_pretrained(self.tmp)
            else:
                model.save_pretrained(self.tmp)
            processor.save_pretrained(self.tmp)
            if card:
                with open(os.path.join(self.tmp, "README.md"), "w") as fh:
                    fh.write(card)

    @contextlib.contextmanager
    def _guard(self):
        try:
            yield
        except Exception as e:  # a full disk raises OSError, SafetensorError or RuntimeError: one line, no leftovers
            self.discard()
            raise UserError(f"cannot write the exported model in {self.output_dir}: {write_error(e, self.output_dir)}; "
                            "the checkpoints are intact") from None

    def seal(self):
        """The folder in place, every file synced; returns its path."""
        with self._guard():
            known = {}
            if self.weights_of:
                files = seal.listed(self.weights_of)
                for name in os.listdir(self.weights_of):
                    if name == "config.json" and not os.path.exists(os.path.join(self.tmp, name)):  # the same model's
                        shutil.copyfile(os.path.join(self.weights_of, name), os.path.join(self.tmp, name))
                    elif name.startswith("model") and ".safetensors" in name:  # model.safetensors, or its shards
                        link(os.path.join(self.weights_of, name), os.path.join(self.tmp, name))
                        known[name] = files.get(name, (0, None))[1]  # as written: a change since then shows
            seal_folder(self.tmp, known)
        _swap_in(self.tmp, self.final)
        return self.final

    def discard(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


def unsound_exports(output_dir, lora, say, main=True):
    """After a finished run: its model/ (and a LoRA run's adapter/) missing or damaged? Each damaged one is moved
    aside by the `main` process (never deleted), and said, so that the run's end exports it again. True when one is
    (on every rank: the others find it damaged or already moved)."""
    unsound = False
    for name in (MODEL, "adapter") if lora else (MODEL,):
        path = os.path.join(output_dir, name)
        problem = seal.damaged_file(path) if os.path.isdir(path) else f"{name}/ is missing"
        if problem and main and os.path.isdir(path):
            moved = set_aside(path)
            problem = f"{name}/ is damaged ({problem}; moved to {os.path.basename(moved)}/)"
        if problem:
            say(f"{output_dir}: the run finished, but {problem}: exporting it again from the newest checkpoint")
            unsound = True
    return unsound


def write_model(output_dir, model, processor, card=None, name=MODEL):
    """save_pretrained into <output-dir>/<name>, with the model card `card` as README.md, atomically;
    returns its path."""
    return ModelFolder(output_dir, model, processor, card, name).seal()


def link(source, target):
    """A hard link to a sealed file (both names then share its bytes, which nothing rewrites: every write here
    goes to a new file, renamed into place); a copy where the file system has no hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def is_complete(path):
    """True when the folder's marker exists, lists the training state, and every file it lists is there with
    its size."""
    try:
        files = seal.listed(path)
        return STATE in files and all(os.path.getsize(os.path.join(path, n)) == size for n, (size, _) in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def damage(path):
    """None when checkpoint `path` is intact: every file as its marker lists it, to the byte (SHA-256), and
    its training state readable; else what is wrong, in a few words. Reads the whole checkpoint."""
    if not is_complete(path):
        return f"no valid {MARKER}, or a file is missing or truncated"
    files = seal.listed(path)
    changed = seal.changed_files(path, {name: sha for name, (_, sha) in files.items() if sha})
    if changed:
        return f"{changed[0]} does not match its checksum (changed after it was written)"
    if files.get(STATE, (0, None))[1]:
        return None  # byte for byte as written: readable (load_state reads it once, for the resume)
    try:  # an older checkpoint, sizes alone: read its state to be sure
        torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=True)
    except Exception as e:
        return f"{STATE} cannot be read ({first_line(e, 80)})"
    return None


def set_aside(path):
    """Rename a damaged checkpoint out of the way (never delete what a user had); returns the new path."""
    moved = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, moved)
    return moved


def checkpoint_folders(output_dir):
    """[(step, path)] of every checkpoint-<step> folder, complete or not, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [(NAME.match(name), name) for name in os.listdir(output_dir)]
    return sorted((int(m.group(1)), os.path.join(output_dir, name)) for m, name in names if m)


def complete_checkpoints(output_dir):
    """[(step, path)] of the complete checkpoints, oldest first."""
    return [(step, path) for step, path in checkpoint_folders(output_dir) if is_complete(path)]


def cleanup(output_dir):
    """Remove what a killed run left half-done; put back a checkpoint moved aside for a re-save."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        m = re.match(r"^\.old-(checkpoint-\d+|model)-\d+$", name)
        if m and not os.path.exists(os.path.join(output_dir, m.group(1))) and (m.group(1) == MODEL or is_complete(path)):
            os.replace(path, os.path.join(output_dir, m.group(1)))
        elif name.startswith((".tmp-checkpoint-", ".trash-", ".old-", ".tmp-model-", ".tmp-adapter-")):
            shutil.rmtree(path, ignore_errors=True)
        elif ".json.tmp-" in name:
            os.remove(path)


def write_error(e, folder):
    """What a failed write says, in a few words, with the room left on the disk that holds `folder`: a full
    disk shows as OSError, as RuntimeError from torch.save or as SafetensorError, depending on the writer."""
    what = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e, 120)
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return what
    full = usage.free < 64 * 2 ** 20 or (isinstance(e, OSError) and e.errno == errno.ENOSPC)
    size = lambda n: f"{n / 2 ** 30:.1f} GB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MB"
    room = f"{size(usage.free)} free of {size(usage.total)}"
    return f"the disk holding it is full ({room}; {what})" if full else f"{what} ({room} on its disk)"


def check_resumable(path):
    """One clear line when `path` (given as --resume PATH) is not an intact checkpoint."""
    if not os.path.isdir(path):
        raise UserError(f"--resume {path}: no such checkpoint folder")
    if not is_complete(path):
        raise UserError(f"--resume {path}: not a complete vitfood checkpoint (no valid {MARKER}, or a file is "
                        "missing or truncated)")
    problem = damage(path)
    if problem:
        raise UserError(f"--resume {path}: the checkpoint is damaged: {problem}; resume from another checkpoint")


def load_state(path):
    """The training state of a complete checkpoint, in today's layout."""
    try:
        state = torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: {STATE} cannot be read ({first_line(e, 120)})") from None
    return upgrade(state)
