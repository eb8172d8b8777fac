"""Checkpoints: atomic, marked complete, rotated; plain state a resume restores exactly.

<output-dir>/checkpoint-<step>/ holds a Hugging Face model folder (config.json,
model.safetensors, preprocessor_config.json), training_state.pt (optimizer, scheduler,
scaler, step, RNG states, data position; loadable with weights_only=True) and, written
last, COMPLETE.json listing every file and its size. It is built under a temporary name and
renamed into place, so a folder named checkpoint-<step> is either complete or absent.
"""

import errno
import json
import os
import random
import re
import shutil
import signal

import numpy as np
import torch

from vitfood.common import UserError, first_line, seed_everything

MARKER = "COMPLETE.json"
STATE = "training_state.pt"
BEST = "best_checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


_reached = {}


def fault_point(name):
    """Test hook for the few-millisecond windows of a save, and for a failing rank. VITFOOD_FAULT=<name>[:<n>]
    SIGKILLs this process the n-th time (default 1st) it reaches <name>; VITFOOD_FAULT=enospc:<name>[:<n>]
    fails there as a full disk, error:<name>[:<n>] with an error. VITFOOD_FAULT_RANK=<r>: only on rank r."""
    spec = os.environ.get("VITFOOD_FAULT", "")
    if not spec or os.environ.get("VITFOOD_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    parts = spec.split(":")
    kind = parts[0] if parts[0] in ("enospc", "error") else "kill"
    parts = parts[1:] if kind != "kill" else parts
    if parts[0] != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(parts[1] if len(parts) > 1 else 1):
        if kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if kind == "error":
            raise UserError(f"fault injected at {name} (VITFOOD_FAULT)")
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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


def restore(path, state, model, optimizer, scheduler, scaler, rank=0, world=1, seed=0):
    """Put a run back as it was at checkpoint `path` (whose training state is `state`): the weights,
    optimizer, scheduler, scaler and this rank's random streams."""
    from vitfood.model import load_weights
    load_weights(model, path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and state["scaler"]:  # empty when the run was not fp16
        scaler.load_state_dict(state["scaler"])
    ranks = state.get("rng_ranks") or [state["rng"]]
    if len(ranks) == world:  # each rank its own stream: exact
        set_rng_state(ranks[rank])
    else:  # another world size: fresh per-rank streams (matters only for dropout / drop-path)
        seed_everything(seed + 7919 * rank + 104729 * state["step"])


def save(output_dir, step, model, processor, training_state):
    """Write checkpoint-<step> atomically and return its path."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        fault_point("weights_written")
        torch.save(training_state, os.path.join(tmp, STATE))
        _seal(tmp, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial folder behind, even on a full disk
        raise
    _swap_in(tmp, final)
    fault_point("renamed")
    return final


def _seal(tmp, step):
    """fsync every file, then write the marker that makes the folder a complete checkpoint."""
    files = {}
    for name in sorted(os.listdir(tmp)):
        with open(os.path.join(tmp, name), "rb+") as fh:
            os.fsync(fh.fileno())
        files[name] = os.path.getsize(os.path.join(tmp, name))
    fault_point("marker")
    write_json_atomic(os.path.join(tmp, MARKER), dict(step=step, files=files))
    _fsync_dir(tmp)


def _swap_in(tmp, final):
    """Rename folder tmp to final; an existing final is moved aside first (os.replace refuses a non-empty target)."""
    parent, name = os.path.split(final)
    if os.path.exists(final):
        old = os.path.join(parent, f".old-{name}-{os.getpid()}")
        os.replace(final, old)
        fault_point("swapping")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(parent)


def export(output_dir, model, processor, card=None):
    """save_pretrained into <output-dir>/model, with the model card `card` as README.md, atomically;
    returns its path."""
    final = os.path.join(output_dir, "model")
    tmp = os.path.join(output_dir, f".tmp-model-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if card:
        with open(os.path.join(tmp, "README.md"), "w") as fh:
            fh.write(card)
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb+") as fh:
            os.fsync(fh.fileno())
    _swap_in(tmp, final)
    return final


def is_complete(path):
    """True when the folder's marker exists and every file it lists is there with its size."""
    try:
        with open(os.path.join(path, MARKER)) as fh:
            files = json.load(fh)["files"]
        return all(os.path.getsize(os.path.join(path, n)) == size for n, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(output_dir):
    """[(step, path)] of the complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def cleanup(output_dir):
    """Remove what a killed run left half-done; put back a checkpoint moved aside for a re-save."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        m = re.match(r"^\.old-(checkpoint-\d+|model)-\d+$", name)
        if m and not os.path.exists(os.path.join(output_dir, m.group(1))) and (m.group(1) == "model" or is_complete(path)):
            os.replace(path, os.path.join(output_dir, m.group(1)))
        elif name.startswith((".tmp-checkpoint-", ".trash-", ".old-", ".tmp-model-")):
            shutil.rmtree(path, ignore_errors=True)
        elif ".json.tmp-" in name:
            os.remove(path)


_locks = {}


def lock(output_dir):
    """Hold an exclusive lock on a run directory for this process's life; refuse a second run there.

    A POSIX record lock (fcntl), not flock: forked children such as DataLoader workers do not inherit it,
    so a restart right after a kill -9 of the main process is not refused by workers still exiting, and
    the kernel drops it the moment the process dies."""
    import fcntl
    key = os.path.realpath(output_dir)
    if key in _locks:  # this process holds it already (closing a second handle would drop the lock)
        return
    fh = open(os.path.join(output_dir, "run.lock"), "a+")
    try:
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        fh.close()
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise UserError(f"another vitfood process is running in {output_dir}; wait for it or use another --output-dir")
    _locks[key] = fh


def clear_run(output_dir):
    """--overwrite-output-dir: remove a previous run's checkpoints, exported model, results and events."""
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if _NAME.match(name) or name == "model":
            trash = os.path.join(output_dir, f".trash-{name}-{os.getpid()}")
            os.replace(path, trash)
            shutil.rmtree(trash)
        elif name in (BEST, "all_results.json") or name.startswith("events.out.tfevents."):
            os.remove(path)


def rotate(output_dir, keep, best_step=None):
    """Keep the newest `keep` complete checkpoints and checkpoint-<best_step>; delete the rest."""
    ckpts = complete_checkpoints(output_dir)
    for step, path in ckpts[:-keep] if keep else ckpts:
        if step == best_step:
            continue
        trash = os.path.join(output_dir, f".trash-checkpoint-{step}-{os.getpid()}")
        os.replace(path, trash)  # renamed first: a kill mid-delete never leaves a partial checkpoint-N
        fault_point("rotating")
        shutil.rmtree(trash)


class Checkpoints:
    """The checkpoint policy of a run directory, in one place: the lock, atomic saves, the best
    checkpoint (judged at saves that coincide with an eval, by top-1 accuracy) and its record, and
    rotation to the newest `keep` plus the best. Only the writing rank (`main`) touches the disk."""

    def __init__(self, out, keep, main=True):
        self.out, self.keep, self.main = out, keep, main
        self.best = None  # dict(step, eval_accuracy, eval_loss)
        self._created = False

    def open(self):
        """Create and lock the directory for this process's life (a second run there is refused), and
        clear what a killed run left half-done."""
        if self.main:
            self._created = not os.path.exists(self.out)
            os.makedirs(self.out, exist_ok=True)
            lock(self.out)
            cleanup(self.out)

    def discard_if_unused(self):
        """Remove the directory when this run created it and failed before writing anything into it."""
        if self._created and set(os.listdir(self.out)) <= {"run.lock"}:
            shutil.rmtree(self.out, ignore_errors=True)

    def latest(self):
        """Path of the newest complete checkpoint, or None."""
        found = complete_checkpoints(self.out)
        return found[-1][1] if found else None

    def restore_best(self, best):
        """On resume: the best as of the checkpoint, its record rewritten (a kill between a save and the
        record's update would leave it naming an older best)."""
        self.best = best
        if best and self.main:
            write_json_atomic(os.path.join(self.out, BEST), best)

    def save(self, step, model, processor, state, metrics=None):
        """Write checkpoint-<step> holding `state` and the best record, then rotate. `metrics`: the eval at
        this step, if there was one. A disk that refuses becomes one clear line."""
        new_best = metrics is not None and (self.best is None or metrics["acc1"] > self.best["eval_accuracy"])
        if new_best:
            self.best = dict(step=step, eval_accuracy=metrics["acc1"], eval_loss=metrics["loss"])
        if not self.main:
            return
        try:
            save(self.out, step, model, processor, dict(state, best=self.best))
            if new_best:
                write_json_atomic(os.path.join(self.out, BEST), self.best)
            rotate(self.out, self.keep, self.best and self.best["step"])
        except OSError as e:
            raise UserError(f"cannot write checkpoint-{step} in {self.out}: {e.strerror or e}; "
                            "the complete checkpoints already there are intact") from None


def load_state(path):
    """The training state of a complete checkpoint; a clear error for anything else."""
    if not os.path.isdir(path):
        raise UserError(f"--resume {path}: no such checkpoint folder")
    if not is_complete(path):
        raise UserError(f"--resume {path}: not a complete vitfood checkpoint (no valid {MARKER}, or a file is missing or truncated)")
    try:
        return torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--resume {path}: cannot read {STATE} ({first_line(e, 160)})")
