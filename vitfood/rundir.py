"""A run directory: its name, the claim and the lock on it, and the policy of its checkpoints (`Checkpoints`:
background writes, rotation, the best, which checkpoint a run resumes from and which one it exports);
`parse_run`, the command line read over the run's own saved config."""

import contextlib
import dataclasses
import datetime
import errno
import json
import os
import shutil
import threading
import time

import torch

from vitfood import adapt, checkpoint, dist, faults
from vitfood.common import UserError, safe_name
from vitfood.config import FIXED_ON_RESUME, RUN_CONFIG, build_parser, read_config_file, resolve, saved_run
from vitfood.hub import is_path


def parse_run(argv):
    """(config, output_dir, --resume value) from the command line."""
    explicit = vars(build_parser().parse_args(argv))
    resume = explicit.get("resume")
    out = explicit.get("output_dir")
    if resume == "auto" and out is None:  # the user's last run of this model and data set, never a silent fresh start
        out = newest_run(resolve(explicit))
    if resume not in (None, "auto") and os.path.isfile(os.path.join(resume, RUN_CONFIG)):
        resume, out = "auto", out or resume  # a run folder (what `done:` prints): its newest checkpoint
    if resume not in (None, "auto"):
        checkpoint.check_resumable(resume)  # fails fast, with one line, when it is not an intact checkpoint
        out = out or os.path.dirname(os.path.abspath(resume))
    run_dir = os.path.dirname(os.path.abspath(resume)) if resume not in (None, "auto") else out
    saved = os.path.join(run_dir, RUN_CONFIG) if run_dir else None
    base = None
    if resume and saved and os.path.isfile(saved):  # resuming: the run's own config, flags on top
        base = saved_run(saved)
    cfg = resolve(explicit, base)
    if base:  # what decides the data order and the weights cannot change under a resumed run
        changed = [k for k in FIXED_ON_RESUME if k in base and getattr(cfg, k) != base[k]]
        if changed:
            raise UserError(f"--{changed[0].replace('_', '-')} differs from the run being resumed "
                            f"({base[changed[0]]!r}); drop the flag, or start a new run in another --output-dir")
    if out is None:  # a new run: rank 0 claims its folder now (another run may start in the same second)
        out = os.path.join("runs", run_name(cfg))
        out = claim(out) if os.environ.get("RANK", "0") == "0" else out
    cfg = dataclasses.replace(cfg, output_dir=out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output-dir {out} exists and is not a folder")
    return cfg, out, resume


def run_name(cfg):
    """<MMDD-HHMMSS>-<model>-<data set>: the part that tells runs apart first, as TensorBoard cuts long
    names; a path contributes its last folder, and each part is capped, so the name stays short."""
    part = lambda name: safe_name(os.path.basename(os.path.normpath(name)) if is_path(name) else name)[:40]
    data = part(cfg.dataset) + ("-multilabel" if cfg.dataset == "synthetic" and cfg.synthetic_dishes > 1 else "")
    return f"{datetime.datetime.now():%m%d-%H%M%S}-{part(cfg.model)}-{data}"


def differences(saved, cfg):
    """The options fixed on resume (the data and the weights) on which a saved run's config and `cfg` differ.
    multi_label is left out: a run records it as detected from its data."""
    plain = lambda v: json.loads(json.dumps(v))
    return [k for k in FIXED_ON_RESUME if k != "multi_label" and k in saved and saved[k] != plain(getattr(cfg, k))]


def newest_run(cfg, root="runs"):
    """The newest run directory under `root` made with cfg's model and data set, or None (saying so)."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else ():
        path = os.path.join(root, name, RUN_CONFIG)
        if not os.path.isfile(path):
            continue  # not a run directory
        try:
            saved = read_config_file(path)
        except UserError as e:
            print(f"--resume auto without --output-dir: skipping {os.path.join(root, name)}: {e}")
            continue
        if saved.get("model") == cfg.model and saved.get("dataset") == cfg.dataset:
            found.append((os.path.getmtime(path), os.path.join(root, name), differences(saved, cfg)))
    what = f"{cfg.model} on {cfg.dataset}"
    if not [f for f in found if not f[2]]:
        near = f" with these options (the newest, {max(found)[1]}, differs in --{max(found)[2][0].replace('_', '-')})" \
            if found else ""
        print(f"--resume auto without --output-dir: no earlier run of {what}{near} under {root}/; starting a new one")
        return None
    found = [f for f in found if not f[2]]
    out = max(found)[1]
    print(f"--resume auto without --output-dir: continuing {out}, the newest run of {what} under {root}/ "
          "(pass --output-dir to choose another)")
    return out


_claimed = set()  # run folders this process created with claim()


def claim(path):
    """Create the folder of a new run: `path`, or `path-2`, `path-3`, ... when other runs took those first
    (started in the same second). Returns the folder created."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for n in range(1, 10_000):
        candidate = path if n == 1 else f"{path}-{n}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        _claimed.add(os.path.realpath(candidate))
        return candidate
    raise UserError(f"cannot create a new run folder next to {path}: 9,999 exist")


_locks = {}


def lock(output_dir):
    """Hold an exclusive lock on a run directory for this process's life; refuse a second run there.

    A POSIX record lock (fcntl), not flock: forked children such as DataLoader workers do not inherit it,
    so a restart right after a kill -9 of the main process is not refused by workers still exiting, and
    the kernel drops it the moment the process dies."""
    key = os.path.realpath(output_dir)
    if key in _locks:  # this process holds it already (closing a second handle would drop the lock)
        return
    path = os.path.join(output_dir, "run.lock")
    while True:
        fh = open(path, "a+")
        if not _locked(fh):
            fh.close()
            raise UserError(f"another vitfood process is running in {output_dir}; wait for it or use another --output-dir")
        with contextlib.suppress(OSError):  # the file locked is still the one at `path`: not one a run that
            if os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:  # ended (unlock) removed meanwhile
                break
        fh.close()
    _locks[key] = fh


def _locked(fh):
    """Whether this process now holds the exclusive run lock on the open file `fh` (False: another process does)."""
    import fcntl
    try:
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        return False


def wait_unlocked(output_dir, say, timeout=600):
    """Until no process holds `output_dir`'s run lock (a run still finishing there: an audit's fold run orphaned by
    a kill -9 of the audit saves and exits on its parent-death SIGTERM), saying so once; one line after `timeout`."""
    path, deadline, said = os.path.join(output_dir, "run.lock"), time.monotonic() + timeout, False
    while os.path.exists(path):
        with open(path, "a+") as fh:  # closed at once: the lock, if taken, is released with it
            if _locked(fh):
                return
        if not said:
            say(f"waiting for the vitfood process still running in {output_dir} to finish")
            said = True
        if time.monotonic() > deadline:
            raise UserError(f"another vitfood process has held {output_dir} for {timeout} s; stop it, then run again")
        time.sleep(0.5)


def unlock(output_dir):
    """The run is over: its lock file removed (while still held, so no other process can lock the old file), then
    released."""
    fh = _locks.pop(os.path.realpath(output_dir), None)
    if fh is not None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(output_dir, "run.lock"))
        fh.close()


def clear_run(output_dir):
    """--overwrite-output-dir: remove a previous run's checkpoints, exported model, results and events."""
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if checkpoint.NAME.match(name) or name in (checkpoint.MODEL, adapt.ADAPTER):
            trash = os.path.join(output_dir, f".trash-{name}-{os.getpid()}")
            os.replace(path, trash)
            shutil.rmtree(trash)
        elif name in (checkpoint.BEST, "all_results.json") or name.startswith("events.out.tfevents."):
            os.remove(path)


def rotate(output_dir, keep, best_step=None):
    """Keep the newest `keep` complete checkpoints and checkpoint-<best_step>; delete the rest."""
    ckpts = checkpoint.complete_checkpoints(output_dir)
    for step, path in ckpts[:-keep] if keep else ckpts:
        if step == best_step:
            continue
        trash = os.path.join(output_dir, f".trash-checkpoint-{step}-{os.getpid()}")
        os.replace(path, trash)  # renamed first: a kill mid-delete never leaves a partial checkpoint-N
        faults.at("rotating")
        shutil.rmtree(trash)


def snapshot(obj, buffers, key=()):
    """A copy of `obj` (nested dicts, lists, tuples, tensors) that later training cannot change: tensors are
    copied into host buffers kept in `buffers` and reused from save to save (pinned when they come from a
    GPU, where the copies are only enqueued: wait on an event before reading them)."""
    if isinstance(obj, torch.Tensor):
        buf = buffers.get(key)
        if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
            buf = buffers[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
        return buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
    if isinstance(obj, dict):
        return {k: snapshot(v, buffers, key + (k,)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v, buffers, key + (i,)) for i, v in enumerate(obj))
    return obj


class Checkpoints:
    """The checkpoint policy of a run directory, in one place: the lock, saves written in the background,
    the record of the best checkpoint (which `state.Progress` judges), and rotation to the newest `keep` plus
    the best. Only the writing rank (`main`) touches the disk.

    A save pauses the loop only to copy the weights and the training state to host memory; a thread then
    writes, fsyncs, seals and renames the checkpoint and rotates. Up to `IN_FLIGHT` writes go on at once, each
    from host copies of its own (a second set is made only when a save comes while a write is still going:
    on a fast GPU, saving every 100 steps outpaces one writer); they appear, record the best and rotate in
    step order. The next save waits when that many are going; `wait()` and the end of the run wait for all.
    A failed write stops the run at the next `check()`."""

    IN_FLIGHT = 2

    def __init__(self, out, keep, main=True, phases=None, every=None):
        self.out, self.keep, self.main, self.phases = out, keep, main, phases  # phases: a phases.Phases, or None
        self.every = every  # --save-steps
        self._created = os.path.realpath(out) in _claimed  # a new run's folder, claimed in parse_run
        self._free = []  # sets of host copies no write uses, reused from save to save (about 3x the weights with AdamW)
        self._writers = []  # (thread, its host copies), oldest first
        self._failure = None  # (step, exception) of a failed write
        self._pace = dict(saved_at=[], written=None, said=False)  # save times, the last write's (MB, s), said once

    def open(self):
        """Create and lock the directory for this process's life (a second run there is refused), and
        clear what a killed run left half-done."""
        if self.main:
            self._created = self._created or not os.path.exists(self.out)
            os.makedirs(self.out, exist_ok=True)
            lock(self.out)
            checkpoint.cleanup(self.out)

    def resume_point(self, resume, overwrite=False):
        """The checkpoint to resume from (`resume`: None, "auto" or a path), or None. Rank 0 creates, locks and
        tidies the directory first: damaged checkpoints are moved aside, never deleted; --resume auto takes the
        newest intact one. A new run refuses a directory that holds a run, unless `overwrite`."""
        self.open()
        if self.main:
            check_newest = resume == "auto"  # read to the byte; older ones are read when they are resumed from
            for _, path in reversed(checkpoint.checkpoint_folders(self.out)):
                if checkpoint.is_complete(path) and not check_newest:
                    continue
                problem = checkpoint.damage(path)
                if not problem:
                    check_newest = False
                    continue
                moved = checkpoint.set_aside(path)
                then = "not used" if resume != "auto" else "resuming from the checkpoint before it" \
                    if checkpoint.complete_checkpoints(self.out) else "no complete checkpoint is left before it"
                print(f"warning: {path} is damaged ({problem}); moved it aside to {moved}; {then}")
        dist.barrier()  # no rank lists checkpoints before the cleanup
        found = checkpoint.complete_checkpoints(self.out)
        if resume == "auto":
            if found:
                return found[-1][1]
            if self.main:
                print(f"--resume auto: no complete checkpoint in {self.out}, starting fresh")
            return None
        if resume:
            return resume
        finished = os.path.isfile(os.path.join(self.out, "all_results.json"))
        if (found or finished) and not overwrite:
            what = "a finished run" if finished else f"{len(found)} checkpoint(s)"
            raise UserError(f"{self.out} already holds {what}; pass --resume auto to continue it, "
                            "or --overwrite-output-dir to start over there")
        return None

    def due(self, step, last_step):
        """Whether a save is due after optimizer step `step` (every --save-steps, and at the last)."""
        return last_step or step % self.every == 0

    def to_export(self, step, progress, export, say=print):
        """The step whose weights go to model/: the last (`step`), or with `export` "best" the best checkpoint's;
        when that folder is gone or damaged, the best evaluated checkpoint left, or else the last step (with a
        warning)."""
        best = progress.best
        if export != "best" or not best or best["step"] == step:
            return step
        judge = progress.judging()
        sign = 1 if judge.lower else -1
        scores = {h["step"]: sign * judge.value(h) for h in progress.history}
        left = dict(checkpoint.complete_checkpoints(self.out))
        for candidate in sorted(scores, key=lambda s: (s != best["step"], scores[s])):  # the best first
            if candidate == step or (candidate in left and not checkpoint.damage(left[candidate])):
                break
        else:
            candidate = step
        if candidate != best["step"]:
            instead = f"checkpoint-{candidate}, the best of those left" if candidate != step else \
                f"the last weights (step {candidate})"
            say(f"warning: --export best: checkpoint-{best['step']}, the best, is missing or damaged; exporting "
                f"{instead}")
        return candidate

    def discard_if_unused(self):
        """The end of a run: remove the directory when this run created it and failed before writing anything into
        it, and release the run's lock (its file removed)."""
        self.wait(raise_failure=False)
        with contextlib.suppress(OSError):
            if self._created and set(os.listdir(self.out)) <= {"run.lock"}:
                shutil.rmtree(self.out, ignore_errors=True)
        unlock(self.out)

    def latest(self):
        """Path of the newest complete checkpoint, or None."""
        found = checkpoint.complete_checkpoints(self.out)
        return found[-1][1] if found else None

    def restore_best(self, best):
        """On resume: the record of the best as of the checkpoint, rewritten (a kill between a save and the
        record's update would leave it naming an older best)."""
        if best and self.main:
            checkpoint.write_json_atomic(os.path.join(self.out, checkpoint.BEST), best)

    def save(self, step, model, processor, state, best=None, new_best=False):
        """Start writing checkpoint-<step> holding the model's weights and `state` as they are now; keep the
        best, `best` (dict(step, ...)), and record it when it is `new_best`."""
        self._reap()
        self._pace["saved_at"] = [*self._pace["saved_at"][-1:], time.perf_counter()]
        if len(self._writers) >= self.IN_FLIGHT:  # as many writes as may be going: the loop waits for the oldest
            t0 = time.perf_counter()
            with self.phases.span("save wait", step=step) if self.phases else contextlib.nullcontext():
                self._writers[0][0].join()
            self._reap()
            self._slow_disk(time.perf_counter() - t0)
        self.check()
        if not self.main:
            return
        faults.at("snapshot")
        buffers = self._free.pop() if self._free else {}
        weights = snapshot(model.state_dict(), buffers, ("model",))
        state = snapshot(state, buffers, ("state",))
        copied = None
        if next(model.parameters()).is_cuda:  # the copies are enqueued on the stream: the writer waits for them
            copied = torch.cuda.Event()
            copied.record()
        earlier = self._writers[-1][0] if self._writers else None
        writer = threading.Thread(target=self._write, name=f"vitfood-save-{step}", daemon=False,
                                  args=(step, model, processor, weights, state, dict(best or {}), new_best, copied,
                                        earlier))
        self._writers.append((writer, buffers))
        writer.start()

    def _slow_disk(self, waited):
        """Once a run, when the loop waited for the writer: the figures that say why (what the writer does against
        what the save cadence needs), instead of a loop that slows down without a word."""
        pace = self._pace
        if pace["said"] or not self.main or waited < 0.2 or not pace["written"] or len(pace["saved_at"]) < 2:
            return
        pace["said"] = True
        (mb, seconds), every = pace["written"], pace["saved_at"][1] - pace["saved_at"][0]
        print(f"note: the loop waited {waited:.1f} s for the checkpoint writer: it writes {mb:.0f} MB in {seconds:.1f} s "
              f"({mb / seconds:.0f} MB/s), and a save every {every:.1f} s needs {mb / every:.0f} MB/s; save less often "
              "(--save-steps) or write to a faster disk", flush=True)

    def save_sharded(self, step, model, optimizer, processor, state, best=None, new_best=False):
        """checkpoint-<step> of an --fsdp run, written now by every rank (checkpoint.save with the optimizer); rank 0
        then records the best and rotates. No write goes on in the background: the shards are on the devices."""
        self.wait()
        failure = None
        with self.phases.span("write", step=step) if self.phases else contextlib.nullcontext({}) as timing:
            try:
                checkpoint.save(self.out, step, model, processor, state, timing=timing, optimizer=optimizer,
                                main=self.main)
                if self.main:
                    if new_best:
                        checkpoint.write_json_atomic(os.path.join(self.out, checkpoint.BEST), dict(best or {}))
                    rotate(self.out, self.keep, (best or {}).get("step"))
            except Exception as e:  # the shards' failure reaches every rank (fsdp.save); rank 0's own part, rank 0
                failure = checkpoint.write_error(e, self.out)
        if dist.any_rank([failure is not None], next(model.parameters()).device)[0]:  # every rank stops here
            raise UserError(f"cannot write checkpoint-{step} in {self.out}: "
                            f"{failure or 'rank 0 failed (its error is above)'}; the complete checkpoints already "
                            "there are intact")

    def _reap(self):
        """Writes that are done give their host copies back."""
        while self._writers and not self._writers[0][0].is_alive():
            self._writers[0][0].join()
            self._free.append(self._writers.pop(0)[1])

    def _write(self, step, model, processor, weights, state, best, new_best, copied, earlier):
        with self.phases.span("write", step=step) if self.phases else contextlib.nullcontext({}) as timing:
            self._write_now(step, model, processor, weights, state, best, new_best, copied, earlier, timing)

    def _write_now(self, step, model, processor, weights, state, best, new_best, copied, earlier, timing):
        what = f"checkpoint-{step}"
        try:
            if copied:
                copied.synchronize()  # the copies to host memory are done
            # the earlier checkpoint is complete, its best recorded and its rotation done before this one appears
            t0 = time.perf_counter()
            checkpoint.save(self.out, step, model, processor, state, weights, timing, before_marker=earlier and earlier.join)
            self._pace["written"] = (timing.get("mb", 0.0), max(time.perf_counter() - t0 - timing.get("waited_s", 0), 1e-3))
            what = f"{checkpoint.BEST} (checkpoint-{step} itself is complete)"
            if new_best:
                checkpoint.write_json_atomic(os.path.join(self.out, checkpoint.BEST), best)
            what = f"the rotation after checkpoint-{step} (which is complete)"
            t0 = time.perf_counter()
            rotate(self.out, self.keep, best.get("step"))
            timing["rotate_s"] = round(time.perf_counter() - t0, 3)
        except BaseException as e:  # a full disk raises OSError, or RuntimeError from torch.save, or SafetensorError
            self._failure = (what, e)

    def writing(self):
        return any(writer.is_alive() for writer, _ in self._writers)

    @property
    def failed(self):
        """True once a background write has failed (check() raises its error)."""
        return self._failure is not None

    def wait(self, raise_failure=True):
        """Block until every write in flight is complete; then raise a failure, if any."""
        for writer, _ in self._writers:
            writer.join()
        self._reap()
        if raise_failure:
            self.check()

    def check(self):
        """Raise, as one clear line, the failure of a background write (the loop calls this every step)."""
        if self._failure:
            (what, e), self._failure = self._failure, None
            raise UserError(f"cannot write {what} in {self.out}: {checkpoint.write_error(e, self.out)}; "
                            "the complete checkpoints already there are intact") from None


def model_step(path):
    """The training step of a checkpoint-<step>/ folder, of a run's model/, or of an ONNX file of its export/
    (0 when unknown)."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):  # export/model.onnx: its parity.json says
        path = os.path.join(os.path.dirname(os.path.abspath(path)), "parity.json")
        try:
            with open(path) as fh:
                return int(json.load(fh)["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0
    state, results = os.path.join(path, checkpoint.STATE), os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                       "all_results.json")
    try:
        if os.path.isfile(state):
            return int(checkpoint.load_state(path)["progress"]["step"])
        if os.path.basename(os.path.normpath(path)) == checkpoint.MODEL and os.path.isfile(results):
            with open(results) as fh:
                return int(json.load(fh)["exported_step"])
    except (OSError, ValueError, KeyError, RuntimeError, UserError):
        pass
    return 0
