"""What an eval measures, and the names each figure goes by.

Single-label: loss, top-1, top-5, and from the confusion matrix balanced accuracy and macro F1. Multi-label:
loss (binary cross-entropy, the mean over classes, as transformers computes it), macro mAP, micro and macro F1
at a threshold and the exact-match ratio. Counts are kept on the device as sums, so they add over ranks; the
multi-label scores are gathered once, at the end, for the average precision.
"""

import math
from collections import namedtuple

import torch
import torch.nn.functional as F

from vitfood import dist
from vitfood.common import UserError

Metric = namedtuple("Metric", "key result tag console heading")
Metric.__doc__ = """A figure of an eval, by every name it goes by: its key in an eval's result (and a run's history),
in all_results.json, its TensorBoard tag, its name on the console, its heading in tables and text."""

# The only list of what an eval reports. The first row is the loss; the second the score, by which the best
# checkpoint is judged. TensorBoard sorts groups, then tags, by name: the score and the loss are in the groups it
# shows first (accuracy/, loss/), the other figures in metrics/; an EMA's tag is its model's with "_ema" after it.
SINGLE = (Metric("loss", "eval_loss", "loss/eval", "loss", "loss"),
          Metric("acc1", "eval_accuracy", "accuracy/top1", "acc1", "top-1"),
          Metric("acc5", "eval_top5", "metrics/top5", "acc5", "top-5"),
          Metric("balanced_acc", "eval_balanced_accuracy", "metrics/balanced_accuracy", "balanced", "balanced accuracy"),
          Metric("f1_macro", "eval_f1_macro", "metrics/f1_macro", "f1", "macro F1"))
MULTI = (Metric("loss", "eval_loss", "loss/bce_eval", "loss", "loss"),  # its own tag: another scale
         Metric("map", "eval_map", "accuracy/map", "mAP", "mAP"),
         Metric("f1_micro", "eval_f1_micro", "metrics/f1_micro", "f1 micro", "micro F1"),
         Metric("f1_macro", "eval_f1_macro", "metrics/f1_macro", "f1 macro", "macro F1"),
         Metric("exact_match", "eval_exact_match", "metrics/exact_match", "exact match", "exact match"))


def table(metrics):
    """The rows above for an eval's metrics (or a run's history entry, or its all_results.json)."""
    return MULTI if "map" in metrics or "eval_map" in metrics else SINGLE


def rows_for(multi_label):
    return MULTI if multi_label else SINGLE


def scored(rows):
    """The row of the score: top-1 accuracy, or for multi-label the macro mAP."""
    return rows[1]


def score(metrics):
    """The eval's score: top-1 accuracy, or for multi-label the macro mAP."""
    return metrics[scored(table(metrics)).key]


def name(row):
    """A figure's name for --best-metric: its all_results.json key without "eval_" (accuracy, loss, map, ...)."""
    return row.result.removeprefix("eval_")


class Judge:
    """Which of two evals is better, for the best checkpoint and early stopping: by one figure (--best-metric;
    auto: the score) in its direction (the loss lower, every other figure higher)."""

    def __init__(self, figure, multi_label):
        rows = rows_for(multi_label)
        names = {name(m): m for m in rows}
        if figure != "auto" and figure not in names:
            raise UserError(f"--best-metric {figure}: not a figure of a {'multi' if multi_label else 'single'}-label "
                            f"run's eval; use auto or one of {', '.join(names)}")
        self.row = scored(rows) if figure == "auto" else names[figure]
        self.lower = self.row.key == "loss"

    @property
    def name(self):
        return name(self.row)

    def value(self, result):
        """The figure in an eval's result, or a history entry."""
        return result[self.row.key]

    def better(self, new, old, min_delta=0.0):
        """Whether `new` improves on `old` by more than `min_delta`."""
        return new < old - min_delta if self.lower else new > old + min_delta


def complete(metrics):
    """Whether an eval's result holds every figure of its table (one written by an older vitfood may not)."""
    return all(m.key in metrics for m in table(metrics))


def summary(metrics, prefix="", rows=None):
    """'loss 0.4321 acc1 0.9000 ...': an eval's figures (the first `rows`) for a console line (`prefix`: 'ema_'
    for the EMA's)."""
    return " ".join(f"{m.console} {metrics[prefix + m.key]:.4f}" for m in table(metrics)[:rows]
                    if prefix + m.key in metrics)


class Worst:
    """The `keep` most confident wrong answers so far, kept on the device (no read per batch): for each, its
    confidence, what was true, what was predicted and the image (uint8, as the model saw it)."""

    def __init__(self, keep):
        self.keep, self.kept = keep, None

    def add(self, confidence, wrong, *rows):
        """`confidence` of each image's answer, `wrong` where the answer was wrong; `rows`: the truth, the
        prediction and what else a mistake's description needs, each image's along the first dimension, the image
        last."""
        candidates = (torch.where(wrong, confidence.float(), -1.0), *rows)  # a right answer never qualifies
        if self.kept is not None:
            candidates = tuple(torch.cat([old, new]) for old, new in zip(self.kept, candidates))
        order = candidates[0].topk(min(self.keep, len(candidates[0]))).indices
        self.kept = tuple(c[order] for c in candidates)

    def result(self, describe):
        """[dict(confidence, true, pred, image)], the most confident first (one read from the device);
        `describe(true, pred)` turns a row's truth and prediction into what the dict holds."""
        if self.kept is None:
            return []
        confidence, *rows, images = (t.cpu() for t in self.kept)
        return [dict(confidence=c.item(), **describe(*row), image=image)
                for c, *row, image in zip(confidence, *rows, images) if c >= 0]


class SingleLabel:
    """Loss, top-1/top-5 hits and the [true, predicted] count matrix of single-label batches; with
    `mistakes`, that many of the most confident misclassified images."""

    def __init__(self, num_classes, device, mistakes=0):
        self.k, self.keep = num_classes, mistakes
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.hits = torch.zeros(2, dtype=torch.int64, device=device)  # top-1, top-5
        self.confusion = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
        self.worst = Worst(mistakes)

    def add(self, logits, labels, raw):
        self.loss += F.cross_entropy(logits, labels, reduction="sum")
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == labels[:, None]
        self.hits += torch.stack([hits[:, 0].sum(), hits.any(dim=-1).sum()])
        self.confusion.index_put_((labels, top[:, 0]), torch.ones_like(labels), accumulate=True)
        if self.keep:
            self.worst.add(logits.softmax(-1).max(-1).values, ~hits[:, 0], labels, top[:, 0], raw)

    def mistakes(self):
        return self.worst.result(lambda true, pred: dict(true=true.item(), pred=pred.item()))

    def result(self, n):
        """The metrics over every rank's batches, `n` images in all."""
        loss, top1, top5 = dist.all_sum(torch.cat([self.loss.view(1), self.hits.double()])).tolist()
        confusion = dist.all_sum(self.confusion).tolist()
        d = max(n, 1)
        return dict(loss=loss / d, acc1=top1 / d, acc5=top5 / d, confusion=confusion, **class_balanced(confusion))


def class_balanced(confusion):
    """Balanced accuracy (the mean recall over the classes the split holds) and macro F1 (over the classes
    that are held or predicted), from a [true, predicted] count matrix: what top-1 hides on imbalanced data."""
    m = torch.tensor(confusion, dtype=torch.float64)
    tp, actual, predicted = m.diag(), m.sum(1), m.sum(0)
    held, seen = actual > 0, (actual + predicted) > 0
    recall = tp[held] / actual[held]
    f1 = 2 * tp[seen] / (actual[seen] + predicted[seen])
    return dict(balanced_acc=recall.mean().item() if held.any() else 0.0,
                f1_macro=f1.mean().item() if seen.any() else 0.0)


class MultiLabel:
    """Loss, per-class true/false positives and false negatives at `threshold`, exact matches and every
    image's logits (for the average precision) of multi-label batches (labels: multi-hot rows); with
    `mistakes`, that many images whose predicted set is wrong, the most confident wrong decision first."""

    def __init__(self, num_classes, device, threshold=0.5, mistakes=0):
        self.k, self.threshold, self.keep = num_classes, threshold, mistakes
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.exact = torch.zeros((), dtype=torch.int64, device=device)
        self.counts = torch.zeros((3, num_classes), dtype=torch.int64, device=device)  # tp, fp, fn
        self.scores, self.targets, self.worst = [], [], Worst(mistakes)

    def add(self, logits, labels, raw):
        truth = labels.bool()
        self.loss += F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum") / self.k
        probs = logits.sigmoid()
        pred = probs >= self.threshold
        self.counts += torch.stack([(pred & truth).sum(0), (pred & ~truth).sum(0), (~pred & truth).sum(0)])
        right = (pred == truth).all(1)
        self.exact += right.sum()
        self.scores.append(logits)  # AP ranks by them: sigmoids tie at 1.0 in float32 past a logit of about 17
        self.targets.append(truth)
        if self.keep:  # confidence of a wrong decision: p for a class predicted wrongly, 1 - p for one missed
            conf, surest = torch.where(pred == truth, 0.0, torch.where(pred, probs, 1 - probs)).max(1)
            self.worst.add(conf, ~right, truth, pred, surest, raw)

    def mistakes(self):
        return self.worst.result(lambda true, pred, surest: dict(
            true=true.nonzero().flatten().tolist(), pred=pred.nonzero().flatten().tolist(), surest=surest.item()))

    def result(self, n):
        loss, exact = dist.all_sum(torch.stack([self.loss, self.exact.double()])).tolist()
        tp, fp, fn = dist.all_sum(self.counts).double().cpu()
        empty = torch.zeros((0, self.k))
        parts = dist.gather((torch.cat(self.scores).cpu() if self.scores else empty,
                             torch.cat(self.targets).cpu() if self.targets else empty.bool()))
        ap = average_precision(torch.cat([s for s, _ in parts]), torch.cat([t for _, t in parts]))
        held = [a for a in ap if not math.isnan(a)]
        seen = (tp + fp + fn) > 0
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        d = max(n, 1)
        return dict(loss=loss / d, map=sum(held) / len(held) if held else 0.0,
                    f1_micro=(2 * tp.sum() / max(1.0, (2 * tp + fp + fn).sum().item())).item(),
                    f1_macro=f1[seen].mean().item() if seen.any() else 0.0, exact_match=exact / d,
                    per_class=dict(ap=ap, tp=tp.long().tolist(), fp=fp.long().tolist(), fn=fn.long().tolist()))


def average_precision(scores, targets):
    """Each class's average precision, as scikit-learn's average_precision_score computes it: the precision at
    each distinct score, weighted by the recall it adds. NaN for a class with no positive image (macro mAP
    is the mean over the classes the split holds)."""
    aps = []
    for s, y in zip(scores.double().T, targets.double().T):
        if not y.any():
            aps.append(float("nan"))
            continue
        order = torch.argsort(s, descending=True, stable=True)
        s, y = s[order], y[order]
        last = torch.cat([(s[1:] != s[:-1]).nonzero().flatten(), torch.tensor([len(s) - 1])])  # ends of ties
        tp = y.cumsum(0)[last]
        precision, recall = tp / (last + 1), tp / tp[-1]
        aps.append((torch.diff(recall, prepend=torch.zeros(1)) * precision).sum().item())
    return aps
