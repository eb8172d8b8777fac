"""How far a score can be trusted: one temperature fitted on held-out data (Guo et al. 2017), the expected
calibration error, the reliability diagram, the temperature folded into the classifier's last layer, and the
threshold below which a single-label model answers "unknown" (the risk-coverage curve).

Folding: scores are softmax(z / T) (sigmoid for multi-label). The last layer computes z = W h + b, so W / T and
b / T give z / T: the saved model, transformers.pipeline and an ONNX export then score calibrated with no code of
ours, and no answer changes: the argmax of z / T is the argmax of z, and a multi-label class is predicted where
z >= logit(t), which the model keeps as its own threshold on the calibrated scores, sigmoid(logit(t) / T) (0.5
stays 0.5; THRESHOLD, read by predict, evaluate and export). Multi-label runs fit one temperature for every class too: it keeps
the classes' ranking of an image, folds the same way, and needs only the positives that each class has, not
enough per class on small eval splits for a Platt scaling of each.

Judged out of fold: a temperature fitted and judged on the same images can overfit them (on 500 images one
lowered the NLL and doubled the ECE). So the eval images are split into FOLDS parts; each part is scored with the
temperature fitted on the others (cross-fitting), and the temperature fitted on all of them is kept only when these
out-of-fold scores have a lower NLL and an ECE no higher than the raw scores. Otherwise the raw scores are kept,
and the run says why.
"""

import math

import torch
from PIL import Image, ImageDraw, ImageFont

from vitfood.common import UserError

BINS = 15
FEWEST = 2  # eval images a temperature is fitted on, at the least
FOLDS = 5  # the parts of the eval split a temperature is judged on, each with the temperature fitted on the others
BOUNDS = (0.05, 20.0)  # the temperature's search interval: a fit at an end found no minimum inside it
KEY = "vitfood_calibration"  # in a model's config.json: what was fitted, on what, and the errors before and after
UNKNOWN = "vitfood_unknown_threshold"  # in a model's config.json: predict answers "unknown" below this top score
THRESHOLD = "vitfood_threshold"  # in a multi-label model's config.json: a class is predicted from this sigmoid score


def probabilities(logits, multi_label, temperature=1.0):
    z = logits.double() / temperature
    return torch.sigmoid(z) if multi_label else torch.softmax(z, -1)


def nll(logits, labels, multi_label, temperature=1.0):
    """Mean negative log-likelihood of the labels (per (image, class) pair for multi-label)."""
    z = logits.double() / temperature
    if multi_label:
        return torch.nn.functional.binary_cross_entropy_with_logits(z, labels.double()).item()
    return torch.nn.functional.cross_entropy(z, labels).item()


def fit_temperature(logits, labels, multi_label):
    """The T > 0 minimising the NLL of softmax(logits / T). The NLL is convex in 1/T, so a golden-section search
    over log T finds its one minimum; bounded to [0.05, 20] (no model needs more, and a degenerate split, all
    right or all wrong, would push T to an end)."""
    def loss(log_t):
        return nll(logits, labels, multi_label, math.exp(log_t))
    lo, hi = map(math.log, BOUNDS)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):  # the interval shrinks to 0.618^60 of 6 (1e-12): exact for every purpose
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def confidence(probs, labels, multi_label):
    """(score, whether it was right) for each answer: the top class's probability and whether it is the label; for
    multi-label every (image, class) pair, its probability and whether the class is on the image."""
    if multi_label:
        return probs.flatten(), labels.flatten().bool()
    score, pred = probs.max(-1)
    return score, pred == labels


def reliability(score, right, bins=BINS):
    """Per equal-width bin of the score ((0, 1/bins], ..., the first one holding 0 too): [(count, mean score,
    share right)], and the expected calibration error, sum over bins of count / n * |share right - mean score|."""
    score, right = score.double().cpu(), right.double().cpu()
    index = (torch.ceil(score * bins).long() - 1).clamp(0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        mean, acc = (score[mask].mean().item(), right[mask].mean().item()) if n else (0.0, 0.0)
        rows.append((n, mean, acc))
        ece += n / len(score) * abs(acc - mean)
    return rows, ece


def cross_fitted(logits, labels, multi_label, folds=FOLDS):
    """The logits divided, image by image, by the temperature fitted on the other folds (image i is in fold
    i % folds): scores of a temperature judged on images it was not fitted on."""
    fold = torch.arange(len(labels)) % folds
    out = logits.double().clone()
    for f in range(folds):
        held = fold == f
        out[held] /= fit_temperature(logits[~held], labels[~held], multi_label)
    return out


def calibrate(logits, labels, multi_label):
    """The temperature fitted on these logits; the NLL and ECE of the raw scores (before), of the scores with this
    temperature (after: what model/ gives on this split) and out of fold (cross-fitted); whether the temperature is
    kept, and why not; the diagram's bins (raw, and out of fold)."""
    if len(labels) < FEWEST:
        raise UserError(f"calibration needs at least {FEWEST} images")
    t = fit_temperature(logits, labels, multi_label)
    folds = min(FOLDS, len(labels))
    out = dict(method="temperature", temperature=t, samples=len(labels), bins=BINS, folds=folds)
    for when, z, temp in (("before", logits, 1.0), ("after", logits, t),
                          ("out_of_fold", cross_fitted(logits, labels, multi_label, folds), 1.0)):
        rows, ece = reliability(*confidence(probabilities(z, multi_label, temp), labels, multi_label))
        out.update({f"nll_{when}": nll(z, labels, multi_label, temp), f"ece_{when}": ece, f"bins_{when}": rows})
    if not BOUNDS[0] * 1.001 < t < BOUNDS[1] / 1.001:
        out["not_kept"] = f"the fitted temperature reached its search bound ({t:.3g}): no minimum of the NLL inside it"
    elif out["nll_out_of_fold"] >= out["nll_before"]:
        out["not_kept"] = (f"out of fold it raised the NLL ({out['nll_before']:.4f} -> {out['nll_out_of_fold']:.4f})")
    elif out["ece_out_of_fold"] > out["ece_before"]:
        out["not_kept"] = (f"out of fold it raised the ECE ({out['ece_before']:.4f} -> {out['ece_out_of_fold']:.4f})")
    out["kept"] = "not_kept" not in out
    return out


def kept(cal):
    """The temperature model/ gets: the fitted one when it helped out of fold, else 1 (the raw scores)."""
    return cal["temperature"] if cal and cal["kept"] else 1.0


def last_layer(model):
    """The linear layer that computes the logits: the last nn.Linear with one output per class."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == model.config.num_labels]
    if not layers:
        raise UserError(f"{type(model).__name__} has no linear layer with one output per class to fold a temperature "
                        "into; use --calibrate none")
    return layers[-1]


@torch.no_grad()
def fold(model, temperature):
    """Divide the last layer by the temperature, in place: the model then scores softmax(z / T)."""
    layer = last_layer(model)
    layer.weight.div_(temperature)
    if layer.bias is not None:
        layer.bias.div_(temperature)


def risk_coverage(score, right):
    """Thresholding the top score at each distinct value: [(threshold, share kept, accuracy of the kept)], the
    most confident first (the last row keeps every answer)."""
    order = torch.argsort(score.double().cpu(), descending=True, stable=True)
    s, r = score.double().cpu()[order], right.double().cpu()[order]
    kept = torch.arange(1, len(s) + 1, dtype=torch.float64)
    acc = torch.cumsum(r, 0) / kept
    last = torch.ones(len(s), dtype=torch.bool)  # a cut only where the score changes: ties go together
    last[:-1] = s[1:] != s[:-1]
    return [(s[i].item(), kept[i].item() / len(s), acc[i].item()) for i in torch.nonzero(last).flatten().tolist()]


def threshold_for(curve, accuracy=None, coverage=None):
    """The row of risk_coverage(...) for a target: the most answers kept whose accuracy reaches `accuracy`, or the
    fewest kept that reach the share `coverage`. None when no threshold reaches the accuracy."""
    if accuracy is not None:
        ok = [row for row in curve if row[2] >= accuracy]
        return max(ok, key=lambda row: row[1]) if ok else None
    return next(row for row in curve if row[1] >= coverage - 1e-12)


def summary(cal):
    """One line: T, the ECE and NLL before and out of fold, and which scores were kept."""
    figures = (f"temperature {cal['temperature']:.3f}: ECE {cal['ece_before']:.4f} -> {cal['ece_out_of_fold']:.4f}, "
               f"NLL {cal['nll_before']:.4f} -> {cal['nll_out_of_fold']:.4f} out of fold ({cal['samples']} eval "
               f"images, {cal['folds']} folds)")
    return f"{figures}: kept" if cal["kept"] else f"{figures}: raw scores kept, {cal['not_kept']}"


def diagram(cal, size=400):
    """The reliability diagram: per bin, the share right against the mean score, raw (grey) and calibrated out of
    fold (blue), with the diagonal a calibrated model follows."""
    fnt = ImageFont.load_default(size=13)  # the legend in black beside a swatch of each bar's colour, the axes alike: read at card size
    left, top, side = 40, 66, size - 100
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    x0, y0 = left, top + side  # the plot's bottom-left corner

    def at(x, y):
        return x0 + x * side, y0 - y * side
    d.rectangle([*at(0, 1), *at(1, 0)], outline="black")
    d.line([at(0, 0), at(1, 1)], fill=(150, 150, 150))
    width = side / cal["bins"]
    for half, (when, colour) in enumerate((("before", (170, 170, 170)), ("out_of_fold", (40, 90, 200)))):
        for b, (n, _, acc) in enumerate(cal[f"bins_{when}"]):  # each bin: raw on its left half, calibrated right
            if n:
                x = x0 + b * width + half * width / 2
                d.rectangle([x + 1, at(0, acc)[1], x + width / 2 - 1, y0], fill=colour)
    for v in (0, 0.5, 1):
        d.text((at(v, 0)[0], y0 + 4), f"{v:g}", fill="black", anchor="mt", font=fnt)
        d.text((x0 - 6, at(0, v)[1]), f"{v:g}", fill="black", anchor="rm", font=fnt)
    d.text((x0 + side / 2, y0 + 20), "score (15 bins)", fill="black", anchor="mt", font=fnt)
    d.text((x0, top - 4), "share right", fill="black", anchor="ld", font=fnt)
    for row, (colour, words) in enumerate((((170, 170, 170), f"raw scores, ECE {cal['ece_before']:.3f}"), (
            (40, 90, 200), f"divided by T = {cal['temperature']:.2f} (out of fold), ECE {cal['ece_out_of_fold']:.3f}"
                           f"{'' if cal['kept'] else ' (not kept)'}"))):
        d.rectangle([6, 6 + 18 * row, 18, 18 + 18 * row], fill=colour)
        d.text((24, 5 + 18 * row), words, fill="black", font=fnt)
    return img


def stored(config):
    """The unknown threshold a model's config holds (None: answer every image)."""
    return getattr(config, UNKNOWN, None)


def label_threshold(config, default=0.5):
    """A multi-label model's own threshold: the sigmoid score from which a class is predicted, as its run chose it
    and moved by the temperature folded in (`default` for a model that holds none)."""
    return getattr(config, THRESHOLD, None) or default


def moved(threshold, temperature):
    """The threshold on sigmoid(z / T) that predicts the classes sigmoid(z) >= `threshold` predicts."""
    return 1 / (1 + math.exp(-math.log(threshold / (1 - threshold)) / temperature))


def record(config, cal=None, threshold=None, label_threshold=None):
    """What was fitted, into the config save_pretrained writes (the bins stay out: they are in the diagram);
    `threshold`: the unknown threshold; `label_threshold`: a multi-label model's threshold on its raw scores, kept
    as the one on the scores it gives (the temperature folded in)."""
    if cal is not None:
        setattr(config, KEY, {k: v for k, v in cal.items() if not k.startswith("bins_")})
    if threshold is not None:
        setattr(config, UNKNOWN, threshold)
    if label_threshold is not None:
        setattr(config, THRESHOLD, moved(label_threshold, kept(cal)))


def check(multi_label, accuracy=None, coverage=None):
    """The one line for a target on a multi-label model, before anything is trained or read."""
    if (accuracy or coverage) and multi_label:
        raise UserError("--target-accuracy and --target-coverage are for single-label models: a multi-label model "
                        "already answers no class where no score reaches --threshold")


def fitted(logits, labels, multi_label, method="temperature", accuracy=None, coverage=None):
    """What the end of a run (and vitfood.evaluate --calibrate) stores with a model: the calibration (None with
    method "none"; its temperature is folded in only when kept), and for a single-label target the unknown
    threshold's row, (threshold, coverage, accuracy), of the scores the model will give (None when no threshold
    reaches the accuracy: every image is then answered)."""
    check(multi_label, accuracy, coverage)
    cal = calibrate(logits, labels, multi_label) if method != "none" else None
    row = None
    if accuracy or coverage:
        scores = confidence(probabilities(logits, False, kept(cal)), labels, False)
        row = threshold_for(risk_coverage(*scores), accuracy, coverage)
    return cal, row
