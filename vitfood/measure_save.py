"""What a checkpoint save costs (vitfood.bench --modes save): the loop's pause and the slower steps beside the
background write, and the writer's speed against the disk's own: one plain write and fsync of as many bytes, in
the same folder, timed in alternation with synchronous saves (the same page cache, the same disk)."""

import os
import statistics
import tempfile
import time

from vitfood import rundir
from vitfood.measure import fixed_batch, stepping, sync, timed, training
from vitfood.phases import Phases

PAIRS = 5  # saves and plain writes timed in alternation


def bench_save(cfg, names, device, precision, steps):
    """How long one checkpoint save (the model with its AdamW state) holds up the loop. The save call copies
    the state to host memory (the pause); the write then runs in the background while steps go on, each a
    little slower (the slowdown). Synchronous saves of the same checkpoint are timed against plain writes of as
    many bytes (writer_share: the writer's speed as a share of the disk's)."""
    model, processor, optimizer_step = training(cfg, names, device, precision)
    batch = cfg.batch_size if device.type == "cuda" else min(cfg.batch_size, 2)  # on a CPU: a short step
    step = stepping(optimizer_step, fixed_batch(model, names, batch, device))
    step_s, _ = timed(step, device, steps, 1, warmup=2)  # the warm-up also makes the optimizer state
    parts = optimizer_step
    state = lambda: dict(step=1, optimizer=parts.optimizer.state_dict(), scheduler=parts.scheduler.state_dict(),
                         scaler=parts.scaler.state_dict())
    os.makedirs("runs", exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bench-save-", dir="runs") as out:  # on disk, as a run writes
        phases = Phases()
        saver = rundir.Checkpoints(out, keep=2, phases=phases)
        saver.open()
        saver.save(1, model, processor, state())  # the first save of a run also allocates the host buffers
        saver.wait()
        sync(device)
        t0 = time.perf_counter()
        saver.save(2, model, processor, state())
        pause = time.perf_counter() - t0
        n, t1 = 0, time.perf_counter()
        while saver.writing():
            step()
            n += 1
        sync(device)
        overlapped = time.perf_counter() - t1
        saver.wait()
        writes, plains = [], []
        for k in range(PAIRS):  # a synchronous save, then a plain write of its size: the writer against the disk
            t2 = time.perf_counter()
            saver.save(3 + k, model, processor, state())
            saver.wait()
            sync_write = time.perf_counter() - t2
            # the writer's own time: its "write" phase (files, fsync, SHA-256, marker, rename), less the rotation,
            # which deletes an older checkpoint (the host copy before it is the loop's pause, timed above)
            record = [r for r in phases.records if r["name"] == "write"][-1]
            writes.append(record["end"] - record["start"] - record.get("rotate_s", 0))
            nbytes = sum(f.stat().st_size for f in os.scandir(os.path.join(out, f"checkpoint-{3 + k}")))
            plains.append(plain_write(out, nbytes))
        mb = nbytes / 2 ** 20
    slowdown = max(0.0, overlapped - n * step_s)  # what the steps lost to the write beside them
    write, plain = statistics.median(writes), statistics.median(plains)
    return dict(pause_s=pause, slowdown_s=slowdown, stall_s=pause + slowdown, sync_write_s=sync_write,
                steps_during_write=n, step_ms=1000 * step_s, batch_size=batch, checkpoint_mb=mb,
                write_mb_s=mb / write, disk_mb_s=mb / plain, writer_share=plain / write,
                write_s_each=writes, plain_s_each=plains)


def plain_write(folder, nbytes, block=1 << 24):
    """Seconds to write `nbytes` (random, in 16 MB blocks) to a new file in `folder` and fsync it: the disk's speed
    for one file, as the writer's is measured (its files also go through the page cache, then fsync)."""
    data = os.urandom(block)
    path = os.path.join(folder, "plain.bin")
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for start in range(0, nbytes, block):
            fh.write(data[:min(block, nbytes - start)])
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    os.remove(path)
    return seconds
