"""torchrun support: one process per device, PyTorch's DistributedDataParallel, rank 0 writes.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process.
"""

import datetime
import os
import signal
import time

import torch
import torch.distributed as dist

from vitfood.common import UserError, pick_device


def setup(device_name, timeout_s, group=False):
    """(rank, world size, device). Joins the process group when launched by torchrun; with `group` (--fsdp, whose
    shards live on a device mesh) a single process outside torchrun makes a group of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not group:
        return 0, 1, pick_device(device_name)
    if "RANK" not in os.environ:  # a group of one, in this process's memory
        device = pick_device(device_name)
        if device.type == "cuda":  # NCCL and FSDP's device mesh take the current device, by index
            device = torch.device("cuda", device.index or 0)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, device_id=device if device.type == "cuda" else None)
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name.startswith("cuda:"):
        raise UserError(f"--device {device_name}: under torchrun each process takes the GPU of its local rank; "
                        "pass --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose GPUs")
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda":
        device_name = f"cuda:{local_rank}"  # one process per GPU
    device = pick_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # a timeout, so that a rank that died or hangs ends the job instead of blocking the others forever
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return rank, world, device


def data_parallel(model, device):
    """PyTorch's DistributedDataParallel around `model`, on this rank's device."""
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def active():
    return dist.is_available() and dist.is_initialized()


def rank():
    """This process's rank (0 outside torchrun)."""
    return dist.get_rank() if active() else 0


def barrier():
    if active():
        dist.barrier()


_patient = []


def wait_for_rank0():
    """A barrier with no practical time limit, for the ranks that wait while rank 0 downloads the data
    and model (Food-101 is 5 GB: longer than --dist-timeout). A rank 0 that fails ends the job anyway."""
    if not active():
        return
    if not _patient:
        _patient.append(dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7)))
    dist.barrier(group=_patient[0])


def from_rank0(obj):
    """Rank 0's value of `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(tensor):
    """Sum over ranks, in place; returns the tensor."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def all_max(tensor):
    """Maximum over ranks, in place; returns the tensor."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def any_rank(flags, device):
    """[flag is true on any rank, for each of `flags`], the same on every rank: all ranks act at the same
    step. With several processes, one small all-reduce and its host-device sync."""
    if not active():
        return [bool(f) for f in flags]
    return [bool(v) for v in all_sum(torch.tensor([int(bool(f)) for f in flags], device=device)).tolist()]


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled: for small things)."""
    if not active():
        return [obj]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, obj)
    return values


def same_on_all(value, what):
    """Refuse to go on when ranks disagree on `value` (launched with different flags or data)."""
    values = gather(value)
    if any(v != values[0] for v in values):
        raise UserError(f"ranks disagree on {what}: {values}; launch every process with the same flags and data")


def close():
    if active():
        dist.destroy_process_group()


class Stopper:
    """SIGTERM (preemption), SIGHUP (the terminal closed, an ssh session dropped) or Ctrl-C asks the run to
    stop: it finishes its step, saves and exits with EXIT_STOPPED. A second signal exits at once. The loop
    passes `signal` through `any_rank`, so all ranks stop at the same step."""

    def __init__(self, device, say=print):
        self.device, self.say, self.signal = device, say, None
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal:
            # SIGTERM again within half a second is one event delivered twice, not a second request: Linux
            # sends a parent-death signal (vitfood.audit's fold runs) as each thread of the dying parent exits.
            # (A second Ctrl-C, however quick, still exits at once.)
            if signum == signal.SIGTERM == getattr(signal, self.signal) and time.monotonic() - self.at < 0.5:
                return
            os._exit(130)  # checkpoints are only ever renamed into place: nothing on disk is left half-valid
        self.signal, self.at = signal.Signals(signum).name, time.monotonic()
        if signum == signal.SIGHUP:  # the terminal is gone: writing to it would fail; the run goes on silent
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                if os.isatty(fd):
                    os.dup2(devnull, fd)
            os.close(devnull)
        self.say(f"{self.signal}: finishing this step, then saving a checkpoint and exiting (again to exit at once)")

    def close(self):
        """Nothing is left to write: Ctrl-C and SIGTERM act as usual again; a SIGHUP still only silences the
        dead terminal."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
