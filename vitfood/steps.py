"""The compute of a run, shared by train, bench and evaluate: a micro-batch's forward and backward, the
optimizer step, and the eval pass."""

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vitfood import dist
from vitfood.common import UserError
from vitfood.data import normalize
from vitfood.model import for_inference


def forward_backward(model, images, labels, amp, scaler, mean, std, divisor):
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
    loss = F.cross_entropy(logits.float(), labels, reduction="sum") * weight / divisor
    scaler.scale(loss).backward()
    return loss.detach()


def optimizer_step(model, optimizer, scaler, scheduler, max_grad_norm):
    """Unscale, clip, step, update, zero. Returns (grad norm, whether the step was taken).

    A step whose gradients are not finite is skipped in every precision, as the GradScaler does
    for fp16, so the weights never take a nan.
    """
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    finite = bool(torch.isfinite(norm))  # one host-device sync a step (the fp16 GradScaler makes one too)
    if finite:
        scaler.step(optimizer)
    scaler.update()  # fp16: lowers the scale after an overflow
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, finite


class NonFiniteStreak:
    """Counts consecutive skipped (non-finite) steps; `limit` in a row stop the run with one line."""

    def __init__(self, limit):
        self.limit, self.count, self.first = limit, 0, None

    def update(self, finite, step, last_good):
        """`last_good()` names the newest complete checkpoint, for the message."""
        if finite:
            self.count = 0
            return
        self.count, self.first = self.count + 1, self.first if self.count else step
        if self.count >= self.limit:
            raise UserError(f"loss or gradients not finite for {self.count} consecutive steps ({self.first} to {step}); "
                            f"stopped. Last good checkpoint: {last_good() or 'none'}; try a lower --lr or --precision fp32")


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
    worst = []
    n = skipped = 0
    for raw, labels, bad in tqdm(loader, desc="eval", leave=False, disable=not progress, dynamic_ncols=True):
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
        skipped += len(bad)  # each image is met once in a pass: files, not encounters
    model.train(was_training)
    # under torchrun each rank saw its own part of the split: add the sums over ranks (one sync, at the end)
    counts = torch.tensor([n, skipped], dtype=torch.float64, device=device)
    sums = dist.all_sum(torch.cat([loss_sum.view(1), correct1.double().view(1), correct5.double().view(1), counts]))
    loss_sum, correct1, correct5, n, skipped = sums.tolist()
    d = max(n, 1)
    result = dict(loss=loss_sum / d, acc1=correct1 / d, acc5=correct5 / d, samples=int(n), skipped=int(skipped))
    if num_classes:
        result["confusion"] = dist.all_sum(confusion).tolist()
    gathered = [m for part in dist.gather(worst) for m in part] if mistakes else []
    result["mistakes"] = sorted(gathered, key=lambda m: -m["confidence"])[:mistakes]
    return result
