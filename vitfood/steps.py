"""The compute of a run, shared by train, bench and evaluate: a micro-batch's forward and backward, the
optimizer step, and the eval pass."""

import contextlib
import copy
import functools
import math
import random
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vitfood import dist
from vitfood.fsdp import is_sharded
from vitfood.common import Console, UserError, autocast, first_line
from vitfood.images import VIEWS, averaged, normalize, views
from vitfood.metrics import MultiLabel, SingleLabel
from vitfood.model import compiled, for_inference, unwrap


def forward_backward(model, images, labels, amp, scaler, mean, std, divisor, label_smoothing=0.0, mix=None,
                     class_weight=None, teacher=None):
    """One micro-batch: uint8 images to the device, forward under autocast, backward of the summed loss
    over `divisor` (scaled for fp16). Returns (that loss, the distillation's (soft, hard) terms over `divisor`, or
    None without a `teacher`: distill.Teacher, which scores the images the student sees, mixed ones included). An
    empty micro-batch still runs a backward (of zero), so that DDP's all-reduce finds every rank. `mix`: a Mixing draw for this micro-batch, whose soft
    targets then replace the labels. `class_weight`: each class's weight in the loss (--class-weights).
    Labels as multi-hot rows (multi-label data): binary cross-entropy per class, each image's loss the mean
    over its classes (as transformers computes it for problem_type multi_label_classification)."""
    device = next(model.parameters()).device
    weight = 1.0
    if labels.shape[0] == 0:  # an empty share of a short global batch: a zero-weighted stand-in image
        images, weight = torch.zeros((1, *images.shape[1:]), dtype=images.dtype), 0.0
        labels = torch.zeros((1, *labels.shape[1:]), dtype=labels.dtype)
    images = normalize(images.to(device, non_blocking=True), mean, std)
    labels = labels.to(device, non_blocking=True)
    multi = labels.ndim == 2
    if mix is not None:
        images, targets = mix(images, labels)
    elif multi:
        targets = smoothed(labels, label_smoothing)
    with amp:
        logits = model(pixel_values=images).logits
    logits = logits.float()
    if multi:
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[1]
    elif mix is not None:
        if class_weight is not None:
            targets = targets * class_weight
        loss = -(targets * F.log_softmax(logits, dim=-1)).sum()
    else:
        loss = F.cross_entropy(logits, labels, weight=class_weight, reduction="sum", label_smoothing=label_smoothing)
    terms = None
    if teacher is not None:
        loss, terms = teacher.loss(logits, teacher(images), loss)
        terms = terms * weight / divisor
    loss = loss * weight / divisor
    scaler.scale(loss).backward()
    return loss.detach(), terms


def smoothed(labels, smoothing, num_classes=None):
    """Soft targets: class indices as one-hot rows, or multi-hot rows as they are, times 1 - smoothing, plus
    smoothing / classes (timm's label smoothing, for softmax and for binary cross-entropy alike)."""
    hot = F.one_hot(labels, num_classes).float() if labels.ndim == 1 else labels.float()
    return hot * (1 - smoothing) + smoothing / hot.shape[1] if smoothing else hot


class Step:
    """One optimizer step as vitfood.train and vitfood.bench both run it: the forward and backward of each
    micro-batch (under DDP the gradients all-reduced on the last one only), then the optimizer step; with `graph`
    (a GraphedStep, on CUDA) the whole step replayed as one CUDA graph. `model` is the plain model (the
    optimizer's), `ddp` its DDP wrapper under torchrun, `train_model` what the forward calls (DDP and/or
    torch.compile around the model)."""

    def __init__(self, model, optimizer, scheduler, scaler, amp, mean, std, max_grad_norm, label_smoothing=0.0,
                 class_weight=None, mixing=None, ddp=None, train_model=None, world=1, graph=None, teacher=None):
        self.model, self.optimizer, self.scheduler, self.scaler, self.amp = model, optimizer, scheduler, scaler, amp
        self.teacher, self.terms = teacher, None  # terms: the last step's distillation terms (soft, hard), or None
        self.mean, self.std, self.max_grad_norm, self.label_smoothing = mean, std, max_grad_norm, label_smoothing
        self.class_weight, self.mixing, self.world, self.graph = class_weight, mixing, world, graph
        self.ddp, self.train_model = ddp or model, train_model or ddp or model
        self.sharded = is_sharded(self.ddp)  # --fsdp

    def __call__(self, batches, step, samples):
        """Optimizer step `step` on `batches`, [(images, labels)] (one per micro-batch), whose loss is divided by
        `samples`, the step's global sample count: (loss, grad norm, finite), device tensors, no sync; with a
        teacher, the step's distillation terms in `terms`."""
        if self.graph is not None:  # one micro-batch per step, one process: GraphedStep's conditions
            (images, labels), = batches
            out = self.graph(images, labels, samples)
            self.terms = self.graph.terms
            return out
        loss = torch.zeros((), device=next(self.model.parameters()).device)
        self.terms = None
        for micro, (images, labels) in enumerate(batches):
            sync = self.world == 1 or micro == len(batches) - 1  # all-reduce gradients once, on the last micro-batch
            if self.sharded:  # FSDP keeps unsharded gradients until the last one, then reduce-scatters
                self.ddp.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or self.sharded else self.ddp.no_sync():  # both average: / world
                part, terms = forward_backward(self.train_model, images, labels, self.amp, self.scaler, self.mean,
                                               self.std, samples / self.world, self.label_smoothing,
                                               self.mixing and self.mixing.at(step, micro), self.class_weight,
                                               self.teacher)
                loss += part
                self.terms = terms if self.terms is None else self.terms + terms
        return (loss, *optimizer_step(self.model, self.optimizer, self.scaler, self.scheduler, self.max_grad_norm))


def build_step(cfg, model, optimizer, scheduler, scaler, amp, precision, mean, std, device, world=1, class_weight=None,
               mixing=None, graph_batch=None, divisor=None, say=print, teacher=None):
    """(what the forward calls, the optimizer Step): the one way vitfood.train and the bench assemble a step.
    DDP around the model on several processes (not with --fsdp: the sharded model reduces its own gradients),
    compiled with --compile; with `graph_batch` (images, labels), the whole step one CUDA graph of those shapes,
    each step's loss divided by `divisor` (the global batch)."""
    ddp = model
    if world > 1 and not cfg.fsdp:  # PyTorch's DDP: gradients averaged across ranks during backward
        ddp = dist.data_parallel(model, device)
    train_model = compiled(ddp, device, world, graph_batch is not None) if cfg.compile else ddp
    graph = None
    if graph_batch is not None:
        graph = GraphedStep(train_model, optimizer, scaler, scheduler, precision, mean, std, cfg.max_grad_norm,
                            cfg.label_smoothing, class_weight, *graph_batch, divisor, say, teacher)
    return train_model, Step(model, optimizer, scheduler, scaler, amp, mean, std, cfg.max_grad_norm,
                             cfg.label_smoothing, class_weight, mixing, ddp, train_model, world, graph, teacher)


def mixing_for(cfg, num_classes, rank=0):
    """--mixup/--cutmix's Mixing for this rank, or None."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    return Mixing(cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.label_smoothing, num_classes,
                  cfg.seed, rank)


def optimizer_step(model, optimizer, scaler, scheduler, max_grad_norm):
    """Unscale, clip, step, update, zero, with no host-device sync; then the schedule's next learning rate.
    Returns (grad norm, finite), both tensors on the device, to be read only at logging steps."""
    norm, finite = update(model, optimizer, scaler, max_grad_norm)
    scheduler.step()
    return norm, finite


def update(model, optimizer, scaler, max_grad_norm, lrs=None):
    """The optimizer step's device work: unscale, clip, AdamW, the loss scale's update, gradients released.
    Returns (grad norm, finite). `lrs`: device tensors that stand in for the parameter groups' learning rates
    (a CUDA graph replays with them, filled before each replay); None: the groups' own numbers.

    A step whose gradients are not finite is skipped in every precision, on the device: the fused AdamW
    kernel takes `found_inf` and then leaves weights, moments and step count as they were (the fp16
    GradScaler skips the same way, and lowers its scale). The learning-rate schedule moves on.
    """
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    if hasattr(norm, "full_tensor"):  # --fsdp: the norm over every rank's shards, the same on each
        norm = norm.full_tensor()
    finite = torch.isfinite(norm)
    optimizer.found_inf = (~finite).float()  # read by fused AdamW only: make_optimizer builds it fused
    numbers = [group["lr"] for group in optimizer.param_groups]
    try:
        for group, lr in zip(optimizer.param_groups, lrs or ()):
            group["lr"] = lr
        optimizer.step()
    finally:
        del optimizer.found_inf
        for group, lr in zip(optimizer.param_groups, numbers):
            group["lr"] = lr
    scaler.update()  # fp16: a lower scale after an overflow (its inf checks are the unscale's, on the device)
    optimizer.zero_grad(set_to_none=True)
    return norm, finite


def example_batch(batch_size, size, classes=None):
    """(images, labels) of the shapes and types the loaders give: uint8 images of `size` (h, w), class ids, or
    with `classes` multi-hot uint8 rows. Empty: for the shapes alone."""
    labels = torch.empty((batch_size, classes), dtype=torch.uint8) if classes else torch.empty(batch_size, dtype=torch.int64)
    return torch.empty((batch_size, 3, *size), dtype=torch.uint8), labels


class GraphedStep:
    """The whole training step on one micro-batch (normalize, forward, loss, backward, unscale, clip, AdamW,
    the loss scale's update) as one CUDA graph, replayed at every step: one launch instead of hundreds of
    kernels, each of which costs the host more than the GPU at a small batch.

    The first `WARMUP` steps run eagerly on the capture stream (they create the optimizer's state and the
    libraries' handles), then the step is captured once. Replays run the same kernels on the same numbers as
    those steps did. The learning rates are device tensors, filled before each step, so the schedule moves on
    without a new capture; every step of a graphed run takes them (float32, where the eager path passes
    AdamW a double), so that its steps are alike whichever way they run. A batch of another shape (an epoch's
    short last batch, one that lost damaged images) runs eagerly. If the capture fails, every step stays eager
    and the run says why, once."""

    WARMUP = 3

    def __init__(self, model, optimizer, scaler, scheduler, precision, mean, std, max_grad_norm, label_smoothing,
                 class_weight, images, labels, divisor, say=print, teacher=None):
        self.model, self.optimizer, self.scaler, self.scheduler = model, optimizer, scaler, scheduler
        self.teacher, self.terms = teacher, None  # the teacher's forward is captured inside the step
        self.mean, self.std, self.max_grad_norm, self.label_smoothing = mean, std, max_grad_norm, label_smoothing
        self.class_weight, self.divisor, self.say = class_weight, divisor, say
        self.device = next(model.parameters()).device
        self.amp = autocast(precision, self.device, cache=False)  # autocast's weight cache cannot live in a graph
        self.images = torch.zeros(images.shape, dtype=images.dtype, device=self.device)  # the graph's input
        self.labels = torch.zeros(labels.shape, dtype=labels.dtype, device=self.device)
        self.lrs = [torch.zeros((), dtype=torch.float32, device=self.device) for _ in optimizer.param_groups]
        self.stream = torch.cuda.Stream(self.device)
        self.graph, self.out, self.eager_steps, self.failed = None, None, 0, False

    def _step(self, images, labels, divisor):
        loss, terms = forward_backward(self.model, images, labels, self.amp, self.scaler, self.mean, self.std, divisor,
                                       self.label_smoothing, None, self.class_weight, self.teacher)
        return (loss, *update(self.model, self.optimizer, self.scaler, self.max_grad_norm, self.lrs), terms)

    def __call__(self, images, labels, samples):
        """One optimizer step on this micro-batch, whose loss is divided by `samples`: (loss, grad norm, finite),
        device tensors."""
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        if self.failed or labels.shape != self.labels.shape or samples != self.divisor:
            out = self._step(images, labels, samples)  # eagerly, on the current stream
        else:
            self.images.copy_(images, non_blocking=True)
            self.labels.copy_(labels, non_blocking=True)
            if self.graph is not None:
                self.graph.replay()
                out = self.out
            else:
                self.stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.stream):
                    out = self._step(self.images, self.labels, self.divisor)
                torch.cuda.current_stream().wait_stream(self.stream)
                self.eager_steps += 1
                if self.eager_steps == self.WARMUP:
                    self._capture()
        self.scheduler.step()
        *out, self.terms = out
        return tuple(out)

    def _capture(self):
        groups = self.optimizer.param_groups
        graph = torch.cuda.CUDAGraph()
        try:
            for group in groups:  # the optimizer's own check that its step may be captured
                group["capturable"] = True
            # thread_local: the loader's pin-memory thread keeps working meanwhile, and the autograd engine's
            # threads launch the backward onto the capture stream
            with unmasked_attention(self.model), \
                    torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                out = self._step(self.images, self.labels, self.divisor)
        except Exception as e:
            self.failed = True
            if self.scaler.is_enabled():  # a step cut short between unscale_ and update: the scaler starts afresh
                self.scaler._per_optimizer_states.clear()
            self.optimizer.zero_grad(set_to_none=True)
            self.say(f"note: the training step could not be captured as a CUDA graph ({first_line(e, 160)}); it "
                     "runs eagerly")
            return
        finally:
            for group in groups:
                group["capturable"] = False
        self.graph, self.out = graph, out


UNMASKED_SDPA = "vitfood_sdpa_unmasked"


@contextlib.contextmanager
def unmasked_attention(model):
    """SDPA attention given no mask, for the time of a CUDA graph capture. Some transformers versions (5.17
    among them) build an explicit all-ones mask for every layer when they see a stream capture, as they cannot
    look into a padding mask then; a mask keeps SDPA off its flash kernel (half the speed at batch 256, measured
    on an H200). Outside a capture they drop that mask themselves, and an image has no padding: the same SDPA
    function, registered under a name of its own with no mask function, gets None, as in an eager step."""
    config = unwrap(model).config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    AttentionInterface.register(UNMASKED_SDPA, sdpa_attention_forward)
    config._attn_implementation = UNMASKED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


class Mixing:
    """Mixup and CutMix as in timm's recipes: each micro-batch is mixed with itself reversed, on the device,
    and the loss takes soft targets (label smoothing folded in). The draws come from a host generator keyed
    on (seed, step, micro-batch, rank): no device sync, and a resumed run mixes as an uninterrupted one.
    Under torchrun each rank mixes its own share, so the result depends on the number of processes."""

    def __init__(self, mixup, cutmix, prob, switch_prob, smoothing, num_classes, seed, rank=0):
        self.mixup, self.cutmix, self.prob, self.switch_prob = mixup, cutmix, prob, switch_prob
        self.smoothing, self.num_classes, self.seed, self.rank = smoothing, num_classes, seed, rank

    def at(self, step, micro):
        """The mix of micro-batch `micro` of optimizer step `step`: a function (images, labels) -> (images, targets)."""
        return functools.partial(self._mix, random.Random(f"{self.seed}-mix-{step}-{micro}-{self.rank}"))

    def _mix(self, rng, images, labels):
        targets = smoothed(labels, self.smoothing, self.num_classes)  # multi-hot rows (multi-label) mix as they are
        if rng.random() >= self.prob:
            return images, targets
        cut = self.cutmix > 0 and (self.mixup == 0 or rng.random() < self.switch_prob)
        lam = rng.betavariate(self.cutmix, self.cutmix) if cut else rng.betavariate(self.mixup, self.mixup)
        other = images.flip(0)
        if cut:  # a box of area (1 - lam) of the image, centred anywhere, clipped; lam is then what is left
            h, w = images.shape[-2:]
            bh, bw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
            cy, cx = rng.randrange(h), rng.randrange(w)
            y0, y1, x0, x1 = max(cy - bh // 2, 0), min(cy + bh // 2, h), max(cx - bw // 2, 0), min(cx + bw // 2, w)
            images = images.clone()
            images[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            images = images * lam + other * (1 - lam)
        return images, targets * lam + targets.flip(0) * (1 - lam)


class EMA:
    """An exponential moving average of a model's weights, on the device, updated after every optimizer step
    as one foreach lerp (buffers copied). The decay warms up as timm's ModelEmaV3 does: at update t it is
    min(decay, 1 - (1 + t)^(-2/3)), so the average does not start from the random head. Resumable."""

    def __init__(self, model, decay):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = [(mine, theirs) for mine, theirs in zip(self.model.parameters(), model.parameters())]
        self._buffers = list(zip(self.model.buffers(), model.buffers()))

    @torch.no_grad()
    def update(self):
        self.updates += 1
        decay = min(self.decay, 1 - (1 + self.updates) ** (-2 / 3))
        mine, theirs = zip(*self._pairs)
        torch._foreach_lerp_(list(mine), list(theirs), 1 - decay)
        for mine, theirs in self._buffers:
            mine.copy_(theirs)

    def state_dict(self):
        return dict(updates=self.updates, weights=self.model.state_dict())

    def load_state_dict(self, state):
        self.updates = state["updates"]
        self.model.load_state_dict(state["weights"])


class NonFiniteStreak:
    """Skipped (non-finite) steps, counted on the device: `limit` in a row stop the run with one line.
    `check()` reads the counts (a sync), so the loop calls it at logging steps only."""

    def __init__(self, limit, device):
        self.limit = limit
        zero = lambda: torch.zeros((), dtype=torch.int64, device=device)
        self.streak, self.longest, self.end, self.skipped = zero(), zero(), zero(), zero()

    def update(self, finite, step):
        bad = (~finite).long()
        self.streak.add_(1).mul_(bad)  # consecutive skipped steps up to this one
        self.skipped.add_(bad)
        longer = self.streak > self.longest
        self.end.copy_(torch.where(longer, step, self.end))
        self.longest.copy_(torch.maximum(self.streak, self.longest))

    def total(self):
        """Steps skipped so far, over every segment of the run (a sync: for saves and the end)."""
        return int(self.skipped.item())

    def check(self, last_good):
        """Skipped steps so far; raises when `limit` came in a row since the last check. `last_good()` names
        the newest complete checkpoint, for the message."""
        longest, end, skipped = torch.stack([self.longest, self.end, self.skipped]).tolist()
        self.longest.zero_()
        if longest >= self.limit:
            raise UserError(f"loss or gradients not finite for {longest} consecutive steps ({end - longest + 1} to "
                            f"{end}); stopped. Last good checkpoint: {last_good() or 'none'}; try a lower --lr or "
                            "--precision fp32")
        return skipped


class Idle:
    """The forwards a rank of a sharded (--fsdp) model makes with no images of its own, so that every rank makes as
    many (each gathers weights from all): one batch's views for an empty batch (all its images damaged), and at the
    end as many batches as the rank with the most has over this one's. The counts are agreed before the pass."""

    def __init__(self, net, loader, device, amp, views_per_batch):
        self.net, self.device, self.amp, self.per_batch = net, device, amp, views_per_batch
        self.left = int(dist.all_max(torch.tensor(float(len(loader)), device=device)))
        size = getattr(unwrap(net).config, "image_size", 224)
        self.shape = (1, 3, *(size if isinstance(size, (tuple, list)) else (size, size)))

    def counted(self, raw):
        self.left -= 1
        self.shape = (1, *raw.shape[1:])

    def batch(self):
        with self.amp:
            for _ in range(self.per_batch):
                self.net(pixel_values=torch.zeros(self.shape, device=self.device))
        self.left -= 1

    def finish(self):
        while self.left > 0:
            self.batch()


@torch.inference_mode()
def eval_pass(model, loader, device, precision, mean, std, progress=True, num_classes=None, mistakes=0,
              multi_label=False, threshold=0.5, tta="none", keep=False, teacher=None):
    """Metrics summed over every sample of `loader` (no sample dropped or repeated), and over ranks: those of
    metrics.SingleLabel (with its confusion matrix), or with `multi_label` of metrics.MultiLabel at
    `threshold`. `mistakes`: that many of the most confident wrong answers (images uint8, as the model saw
    them) with their labels. `num_classes`: the model's, unless given. `tta` (images.TTA): also the metrics of
    the probabilities averaged over the views of each image, under "tta". `keep`: also every image's logits (float32,
    on the CPU) and labels, from every rank, under "logits" and "labels" (for calibration). `teacher` (distill.Teacher):
    also its figures on the split, under "teacher", and the share of answers the model shares with it, "agreement".
    """
    was_training = model.training
    model.eval()
    net, amp = for_inference(model, precision, device)
    k = num_classes or unwrap(model).config.num_labels
    meter = MultiLabel(k, device, threshold, mistakes) if multi_label else SingleLabel(k, device, mistakes)
    augmented = (MultiLabel(k, device, threshold) if multi_label else SingleLabel(k, device)) if tta != "none" else None
    taught = (MultiLabel(k, device, threshold) if multi_label else SingleLabel(k, device)) if teacher else None
    damaged, n, kept, agree = [], 0, [], torch.zeros((), device=device)
    idle = Idle(net, loader, device, amp, VIEWS[tta]) if is_sharded(net) else None  # --fsdp: forwards in step
    for raw, labels, bad in tqdm(loader, desc="eval", leave=False, disable=not progress or not sys.stderr.isatty(),
                                 dynamic_ncols=True, file=Console(sys.stderr)):  # off a terminal: no cursor moves
        damaged += bad  # each image is met once in a pass: files, not encounters
        if labels.shape[0] == 0:  # every image of the batch was damaged
            if idle:
                idle.batch()
            continue
        raw, labels = raw.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        every = views(normalize(raw, mean, std), tta)
        with amp:
            logits = [net(pixel_values=x).logits.float() for x in every]
        if idle:
            idle.counted(raw)
        meter.add(logits[0], labels, raw)
        if teacher:
            scores = teacher(every[0])
            taught.add(scores, labels, raw)
            agree += teacher.agreement(logits[0], scores)
        if keep:
            kept.append((logits[0].cpu(), labels.cpu()))
        if augmented:
            augmented.add(averaged(logits, multi_label), labels, raw)
        n += labels.shape[0]
    if idle:
        idle.finish()
    model.train(was_training)
    # under torchrun each rank saw its own part of the split: add the counts over ranks (one sync, at the end)
    n, skipped = (int(v) for v in dist.all_sum(torch.tensor([n, len(damaged)], dtype=torch.float64, device=device)).tolist())
    result = dict(meter.result(n), samples=n, skipped=skipped,
                  damaged=sorted(i for part in dist.gather(damaged) for i in part) if skipped else [])
    if teacher:
        figures = taught.result(n)  # its loss and score (the rest stays out of the run's history)
        result.update(teacher={k: figures[k] for k in ("loss", "acc1", "map") if k in figures},
                      agreement=dist.all_sum(agree).item() / max(n, 1))
    gathered = [m for part in dist.gather(meter.mistakes()) for m in part] if mistakes else []
    result["mistakes"] = sorted(gathered, key=lambda m: -m["confidence"])[:mistakes]
    if augmented:
        result["tta"] = dict(augmented.result(n), mode=tta, views=VIEWS[tta])
    if keep:
        parts = [part for rank in dist.gather(kept) for part in rank]
        result["logits"] = torch.cat([z for z, _ in parts]) if parts else torch.zeros(0, k)
        result["labels"] = torch.cat([y for _, y in parts]) if parts else torch.zeros(0, dtype=torch.long)
    return result
