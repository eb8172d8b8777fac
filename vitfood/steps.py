"""The compute of a run, shared by train, bench and evaluate: a micro-batch's forward and backward, the
optimizer step, and the eval pass."""

import copy
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vitfood import dist
from vitfood.common import Console, UserError
from vitfood.data import normalize
from vitfood.model import for_inference


def forward_backward(model, images, labels, amp, scaler, mean, std, divisor, label_smoothing=0.0):
    """One micro-batch: uint8 images to the device, forward under autocast, backward of the summed loss
    over `divisor` (scaled for fp16). Returns that loss. An empty micro-batch still runs a backward (of
    zero), so that DDP's all-reduce finds every rank."""
    device = next(model.parameters()).device
    weight = 1.0
    if labels.numel() == 0:  # an empty share of a short global batch: a zero-weighted stand-in image
        images, labels, weight = torch.zeros((1, *images.shape[1:]), dtype=images.dtype), torch.zeros(1).long(), 0.0
    images = normalize(images.to(device, non_blocking=True), mean, std)
    labels = labels.to(device, non_blocking=True)
    with amp:
        logits = model(pixel_values=images).logits
    loss = F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing) * weight / divisor
    scaler.scale(loss).backward()
    return loss.detach()


def optimizer_step(model, optimizer, scaler, scheduler, max_grad_norm):
    """Unscale, clip, step, update, zero, with no host-device sync. Returns (grad norm, finite), both
    tensors on the device, to be read only at logging steps.

    A step whose gradients are not finite is skipped in every precision, on the device: the fused AdamW
    kernel takes `found_inf` and then leaves weights, moments and step count as they were (the fp16
    GradScaler skips the same way, and lowers its scale). The learning-rate schedule moves on.
    """
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    finite = torch.isfinite(norm)
    optimizer.found_inf = (~finite).float()  # read by fused AdamW only: make_optimizer builds it fused
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    scaler.update()  # fp16: a lower scale after an overflow (its inf checks are the unscale's, on the device)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, finite


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


@torch.inference_mode()
def eval_pass(model, loader, device, precision, mean, std, progress=True, num_classes=None, mistakes=0):
    """Metrics summed over every sample of `loader` (no sample dropped or repeated), and over ranks.

    With `num_classes`, also the [true, predicted] count matrix; with `mistakes`, that many of the most
    confident misclassified images (uint8, as the model saw them) with their labels.
    """
    was_training = model.training
    model.eval()
    net, amp = for_inference(model, precision, device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    confusion = torch.zeros((num_classes or 1, num_classes or 1), dtype=torch.int64, device=device)
    worst, damaged = [], []
    n = 0
    for raw, labels, bad in tqdm(loader, desc="eval", leave=False, disable=not progress or not sys.stderr.isatty(),
                                 dynamic_ncols=True, file=Console(sys.stderr)):  # off a terminal: no cursor moves
        damaged += bad  # each image is met once in a pass: files, not encounters
        if labels.numel() == 0:  # every image of the batch was damaged
            continue
        images = normalize(raw.to(device, non_blocking=True), mean, std)
        labels = labels.to(device, non_blocking=True)
        with amp:
            logits = net(pixel_values=images).logits
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=-1).sum()
        if num_classes:
            confusion.index_put_((labels, top[:, 0]), torch.ones_like(labels), accumulate=True)
        if mistakes:  # keep the most confident wrong answers seen so far (a sync per batch, only here)
            conf = logits.softmax(-1).max(-1).values.cpu()
            for i in (~hits[:, 0]).nonzero().flatten().tolist():
                worst.append(dict(confidence=conf[i].item(), true=labels[i].item(), pred=top[i, 0].item(),
                                  image=raw[i].clone()))
            worst = sorted(worst, key=lambda m: -m["confidence"])[:mistakes]
        n += labels.numel()
    model.train(was_training)
    # under torchrun each rank saw its own part of the split: add the sums over ranks (one sync, at the end)
    counts = torch.tensor([n, len(damaged)], dtype=torch.float64, device=device)
    sums = dist.all_sum(torch.cat([loss_sum.view(1), correct1.double().view(1), correct5.double().view(1), counts]))
    loss_sum, correct1, correct5, n, skipped = sums.tolist()
    d = max(n, 1)
    result = dict(loss=loss_sum / d, acc1=correct1 / d, acc5=correct5 / d, samples=int(n), skipped=int(skipped),
                  damaged=sorted(i for part in dist.gather(damaged) for i in part) if skipped else [])
    if num_classes:
        result["confusion"] = dist.all_sum(confusion).tolist()
    gathered = [m for part in dist.gather(worst) for m in part] if mistakes else []
    result["mistakes"] = sorted(gathered, key=lambda m: -m["confidence"])[:mistakes]
    return result
