"""--batch-size auto: the largest micro-batch whose training step this machine holds, for the model as it trains
(its precision, image size, gradient checkpointing, what is frozen), and the split of the global batch into
micro-batches and accumulation steps that keeps the global batch the run asked for.

How much a step needs is measured, not guessed: one forward pass of two images counts what autograd keeps for
the backward pass (each saved storage once, the weights not), to which the weights, their gradients and AdamW's
two moments add. On a CPU that is weighed against the memory the system has available (an out-of-memory there
kills the process: it cannot be tried); on CUDA against the device's free memory, and the chosen size is then run
once, forward and backward, an out-of-memory error stepping down to the next size: in the probe, never in the run.
"""

import torch

from vitfood.common import UserError, autocast
from vitfood.images import normalize

SHARE = 0.7  # of the memory free at the start, what the step may take: the rest for the loader, the allocator, spikes
# the step's peak over what the forward keeps: the backward pass's own temporaries. Measured on the demo's ViT-Ti at
# 112 px on the CPU, batches 64 and 256: 1.26-1.28x in fp32, 0.62-0.64x in bf16 (autocast's casts count twice)
BACKWARD = 1.5


def free_bytes(device):
    """Memory available now: the CUDA device's free memory, or the system's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))


def state_bytes(model):
    """The weights, and for each parameter that trains its gradient and AdamW's two moments."""
    params = list(model.parameters())
    trains = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return sum(p.numel() * p.element_size() for p in params) + 3 * trains


class Untouched:
    """The model's buffers (batch norm's running statistics) and the random streams as they were: a probe's
    forward passes leave no trace in the run."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def __enter__(self):
        self.buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        self.rng = torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for k, v in self.model.named_buffers():
                v.copy_(self.buffers[k])
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state(self.rng[1], self.device)
        self.model.zero_grad(set_to_none=True)


def activation_bytes(model, images, precision, device):
    """What a training forward pass of `images` (normalized) keeps for the backward pass, in bytes."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t
    with Untouched(model, device), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            autocast(precision, device):
        model(pixel_values=images)
    return sum(kept.values())


def divisor_at_most(n, limit):
    """The largest divisor of `n` that is at most `limit` (1 at least)."""
    return max(d for d in range(1, min(n, max(1, limit)) + 1) if n % d == 0)


def example(size, batch, device):
    """A normalized batch of random pixels, from a generator of its own: the run's random streams untouched."""
    pixels = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return normalize(pixels.to(device), [0.5] * 3, [0.5] * 3)


def runs(model, size, batch, precision, device):
    """Whether a forward and backward pass at `batch` fits on the CUDA device, beside room for AdamW's moments."""
    trains = [p for p in model.parameters() if p.requires_grad]
    try:
        with Untouched(model, device):
            moments = [torch.empty_like(p) for p in trains for _ in range(2)]
            with autocast(precision, device):
                logits = model(pixel_values=example(size, batch, device)).logits
            logits.float().sum().backward()
            torch.cuda.synchronize(device)
        del moments, logits
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def choose(cfg, model, device, precision, world, size, train_images, say=print):
    """For --batch-size auto: {batch_size (the micro-batch), grad_accum_steps, global_batch}, keeping
    cfg.global_batch (or, with --global-batch auto, taking the largest micro-batch with no accumulation and
    the global batch from it)."""
    training = model.training
    model.train()  # as it trains: dropout's masks are kept too
    per_image = activation_bytes(model, example(size, 2, device), precision, device) / 2
    model.train(training)
    free, state = free_bytes(device), state_bytes(model)
    room = SHARE * free - state
    fits = int(room / (BACKWARD * per_image)) if room > 0 else 0
    if fits < 1:
        raise UserError(f"--batch-size auto: not even one image fits: the model takes {state / 2 ** 30:.2f} GB with its "
                        f"gradients and AdamW's moments, of {free / 2 ** 30:.2f} GB free on {device}")
    keep = cfg.global_batch != "auto"
    largest = max(1, min(fits, train_images // world))
    per_rank = cfg.global_batch // world if keep else largest - largest % 8 if largest >= 8 else largest
    if keep and cfg.global_batch % world:
        raise UserError(f"--global-batch {cfg.global_batch} does not split over {world} processes")
    batch = divisor_at_most(per_rank, fits)
    while device.type == "cuda" and not runs(model, size, batch, precision, device):
        if batch == 1:
            raise UserError("--batch-size auto: one image's training step does not fit in the GPU's free memory")
        batch = divisor_at_most(per_rank, batch - 1)
    accum = per_rank // batch
    say(f"batch: --batch-size auto: {fits:,} images would fit in a step ({per_image * BACKWARD / 2 ** 20:.1f} MB each "
        f"with the backward pass, {state / 2 ** 20:.0f} MB of weights, gradients and AdamW moments, "
        f"{SHARE:.0%} of {free / 2 ** 30:.1f} GB free on {device}); micro-batch {batch} x {accum} "
        f"accumulation step(s) x {world} process(es) = global batch {batch * accum * world}"
        + (" (as asked)" if keep else " (--global-batch auto: the largest, nothing accumulated)"))
    return dict(batch_size=batch, grad_accum_steps=accum, global_batch=batch * accum * world)
