"""Evaluation: loss, top-1 and top-5 accuracy over a whole split, in inference mode."""

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vitfood import dist
from vitfood.data import normalize
from vitfood.model import for_inference


@torch.inference_mode()
def evaluate(model, loader, device, precision, mean, std, progress=True):
    """Metrics summed over every sample of `loader` (no sample dropped or repeated), and over ranks."""
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
    # under torchrun each rank saw its own part of the split: add the sums over ranks (one sync, at the end)
    counts = torch.tensor([n, skipped], dtype=torch.float64, device=device)
    sums = dist.all_sum(torch.cat([loss_sum.view(1), correct1.double().view(1), correct5.double().view(1), counts]))
    loss_sum, correct1, correct5, n, skipped = sums.tolist()
    d = max(n, 1)
    return dict(loss=loss_sum / d, acc1=correct1 / d, acc5=correct5 / d, samples=int(n), skipped=int(skipped))
