"""Small shared pieces: the user-facing error, device, precision and worker choice, seeding, environment."""

import contextlib
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import torch


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


def first_line(e, limit=200):
    """An exception's message as a short quote: its first line, cut at a sentence or word end past `limit`."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "") or type(e).__name__
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = cut.rfind(". ")
    if end > limit // 3:
        return cut[:end + 1]
    return cut[:cut.rfind(" ")].rstrip(",;:") + " ..." if " " in cut else cut + " ..."


class Console:
    """A console stream whose writes cannot fail a run: a terminal that hung up (SIGHUP: the window closed,
    the ssh session dropped) answers every write with EIO, before the stop handler can redirect it."""

    mid_line = False  # a progress bar left the cursor mid-line (an error line then starts on a new one)

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        if text:
            Console.mid_line = not text.endswith("\n")
        try:
            return self.stream.write(text)
        except OSError:
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError:
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _close_progress_bars():
    """End any open tqdm bar, so an error starts on a line of its own (also when a bar's close was cut short:
    a dead loader worker's error can be raised inside it)."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
    if Console.mid_line:
        Console(sys.stderr).write("\n")


def _quiet_unraisable(args, default=sys.unraisablehook):
    # PyTorch's SIGCHLD handler raises "DataLoader worker ... is killed" wherever Python happens to be;
    # inside a finalizer or callback that exception cannot propagate and would print a traceback. The
    # loader raises it again at its next batch, where run_main turns it into one line.
    if not (isinstance(args.exc_value, RuntimeError) and "DataLoader worker" in str(args.exc_value)):
        default(args)


def _quiet_event_writer(args, _default=threading.excepthook):
    """TensorBoard's event-writer thread re-raises a failed write (a full disk) as the thread ends, which Python
    prints as a traceback; the writer keeps the error and raises it in the main thread at its next write, where
    run_main makes it one line. So the thread's own report is dropped."""
    if issubclass(args.exc_type, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
        return
    _default(args)


def run_main(main):
    """Run an entry point; a UserError becomes one line on stderr and exit status 2. An error of no known kind is
    first checked against the install (vitfood.stack): a torchvision built for another torch fails far from its
    cause, and is then one line that says so; any other error keeps its traceback."""
    try:
        _one_line_errors(main)
    except Exception:
        from vitfood import stack
        line = stack.problem()
        if line is None:
            raise
        _close_progress_bars()
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)


def _one_line_errors(main):
    sys.unraisablehook = _quiet_unraisable
    threading.excepthook = _quiet_event_writer
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt again (below)
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before a run's own handler is in place, or in evaluate and predict
        _close_progress_bars()
        print(f"error: {_rank_prefix()}interrupted (Ctrl-C)", file=sys.stderr)
        # not sys.exit: CPython then re-kills itself with SIGINT (status -2) when the interrupt passed through
        # some of its C-level calls, caught or not. The run's own cleanup (`finally`) has already run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except UserError as e:
        _close_progress_bars()
        # raised in a DataLoader worker, the message carries the worker's traceback: keep its last line
        line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        line = re.sub(r"^[\w.]*Error: ", "", line)
        print(f"error: {_rank_prefix()}{line}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # an output directory that is unwritable or full, outside a checkpoint save
        _close_progress_bars()
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {_rank_prefix()}{e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        lost = isinstance(e, torch.distributed.DistError) or any(
            w in str(e) for w in ("Connection closed", "Connection reset", "gloo", "NCCL", "timed out", "Timed out"))
        if torch.distributed.is_initialized() and lost:
            # a collective failed: another rank died (its own message is above) or timed out
            _close_progress_bars()
            print(f"error: {_rank_prefix()}lost contact with the other processes of the job "
                  f"({first_line(e, 160)})", file=sys.stderr, flush=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's SIGTERM now ends this process at once
            time.sleep(3)  # let the failed rank exit first, so that torchrun names it as the root cause
            os._exit(1)
        if "DataLoader worker" not in str(e):
            raise
        _close_progress_bars()
        print(f"error: {first_line(e, 400)} (killed for memory? try fewer --num-workers "
              "or a smaller --batch-size; resume with --resume auto)", file=sys.stderr, flush=True)
        # leave now: interpreter teardown with a dead worker prints multiprocessing tracebacks, or hangs
        os._exit(2)


def _rank_prefix():
    """'[rank N] ' under torchrun with several processes, so a failing rank names itself."""
    return f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return device


def cpu_has_bf16_units():
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision, device):
    """The one place precision is decided: 'auto' becomes fp16 on CUDA, and on a CPU bf16 where it has bf16 matrix
    units, else fp32. VITFOOD_CPU_PRECISION=fp32|bf16 sets what 'auto' picks on a CPU: the other kind of CPU's
    numbers on this one (a test suite run both ways, a figure compared with another machine's)."""
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        forced = os.environ.get("VITFOOD_CPU_PRECISION")
        if forced:
            if forced not in ("fp32", "bf16"):
                raise UserError(f"VITFOOD_CPU_PRECISION={forced}: use fp32 or bf16")
            return forced
        return "bf16" if cpu_has_bf16_units() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 is not supported on the CPU; use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU does not support bfloat16; use fp16 or fp32")
    return precision


def model_precision(model, device):
    """The precision a loaded model's own weights give, as transformers.pipeline and an ONNX export run it: what
    predict and evaluate use unless --precision asks for another (fp16 weights run in fp32 on a CPU)."""
    weight = next(model.parameters(), None) if hasattr(model, "parameters") else None  # an ONNX file has none
    dtype = weight.dtype if weight is not None else torch.float32
    name = {v: k for k, v in DTYPES.items()}.get(dtype, "fp32")
    return "fp32" if name == "fp16" and device.type == "cpu" else name


def autocast(precision, device, cache=True):
    """Context manager for the forward pass: autocast for fp16/bf16, nothing for fp32. `cache` False: each
    weight is cast at each use (the same numbers; what a CUDA graph capture needs)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision], cache_enabled=cache)


def mixed_precision(precision, device, sharded=False):
    """(autocast context, GradScaler) for a resolved precision: loss scaling only for fp16. `sharded` (--fsdp):
    the scaler that agrees over the ranks whether a step overflowed (each rank checks only its shards)."""
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return autocast(precision, device), ShardedGradScaler(device.type, enabled=precision == "fp16")
    return autocast(precision, device), torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def start_cuda(device):
    """Create the CUDA context in a thread, while the main thread goes on loading the data: a second or more
    that the driver spends outside Python. Returns the thread (join it before forking), or None off CUDA."""
    if device.type != "cuda":
        return None

    def create():
        try:
            torch.empty(1, device=device)
        except Exception:  # the main thread meets the same error at its first CUDA call, and reports it
            pass
    thread = threading.Thread(target=create, name="vitfood-cuda-init", daemon=True)
    thread.start()
    return thread


def seed_everything(seed):
    seed %= 2 ** 32  # numpy's limit; derived seeds (per rank, per step) may pass it
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed, rank, step=0):
    """The seed of rank `rank`'s own random streams (dropout, drop-path) from the run's seed; `step`: streams
    started afresh at that step of a resumed run (a run resumed with another number of processes)."""
    return seed + 7919 * rank + 104729 * step


def num_workers(requested=-1):
    """DataLoader workers: as requested, or for -1 half the CPUs (the compute threads keep the rest), 1 to 8."""
    return requested if requested >= 0 else max(1, min(8, (os.cpu_count() or 2) // 2))


_IMPORTED = time.time()


def cache_dir():
    """Where vitfood keeps what it can make again (generated data sets, compiled kernels): $VITFOOD_CACHE, or
    ~/.cache/vitfood."""
    return os.environ.get("VITFOOD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vitfood")


_OWN_INDUCTOR_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # read before torch sets it to its /tmp default


def keep_compiled_kernels():
    """torch.compile's caches (inductor's, AOTAutograd's, Triton's kernels) under cache_dir() instead of /tmp,
    unless TORCHINDUCTOR_CACHE_DIR names a place: a later run of the same model and shapes loads its kernels
    there instead of compiling them again (vit-micro's step on a 2-core CPU: 25-34 s cold, 2 s warm)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _OWN_INDUCTOR_DIR or os.path.join(cache_dir(), "torchinductor")


def seconds_since_start():
    """Wall seconds since this process started (Linux: from /proc; elsewhere: since vitfood was imported)."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, in clock ticks
        with open("/proc/uptime") as fh:
            return float(fh.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED


def safe_name(text):
    """A filesystem-safe single path component: 'google/vit-base' -> 'google_vit-base'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return name or "run"


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def env_info(device):
    import datasets
    import transformers
    info = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                datasets=datasets.__version__, platform=platform.platform(), device=str(device),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                cpu_bf16_units=cpu_has_bf16_units(), git_commit=git_commit())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
