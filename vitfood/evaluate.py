"""Evaluation: loss, top-1 and top-5 accuracy over a whole split, in inference mode."""

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vitfood.data import normalize
from vitfood.model import for_inference


@torch.inference_mode()
def evaluate(model, loader, device, precision, mean, std, progress=True):
    """Metrics summed over every sample of `loader` (no sample dropped or repeated)."""
    was_training = model.training
    model.eval()
    net, amp = for_inference(model, precision, device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    n = skipped = 0
    for images, labels, bad in tqdm(loader, desc="eval", leave=False, disable=not progress, dynamic_ncols=True):
        images = normalize(images.to(device, non_blocking=True), mean, std)
        labels = labels.to(device, non_blocking=True)
        with amp:
            logits = net(pixel_values=images).logits
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=-1).sum()
        n += labels.numel()
        skipped += bad
    model.train(was_training)
    # one host-device sync, at the end
    return dict(loss=loss_sum.item() / n, acc1=correct1.item() / n, acc5=correct5.item() / n, samples=n, skipped=skipped)
