"""The input path (uint8, one resize with a crop box, keyed RNG) against torchvision and plain PIL."""

import io
import math
import random

import numpy as np
import torch
from PIL import Image

from vitfood.images import TrainTransform, random_resized_crop_box, to_uint8_tensor
from vitfood.synthetic import make_image


def test_crop_distribution_matches_torchvision():
    from torchvision.transforms import RandomResizedCrop
    torch.manual_seed(0)
    img = Image.new("RGB", (500, 375))
    rng = random.Random(0)
    ours, theirs = [], []
    for _ in range(20000):
        x0, y0, x1, y1 = random_resized_crop_box(500, 375, rng)
        ours.append(((x1 - x0) * (y1 - y0) / (500 * 375), math.log((x1 - x0) / (y1 - y0))))
        top, left, h, w = RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        theirs.append((w * h / (500 * 375), math.log(w / h)))
    ours, theirs = np.array(ours), np.array(theirs)
    for column in range(2):  # area share and log aspect ratio: the same quantiles
        q = np.linspace(0.05, 0.95, 19)
        assert np.abs(np.quantile(ours[:, column], q) - np.quantile(theirs[:, column], q)).max() < 0.02


def _jpeg(seed, size=512):
    a = make_image(seed % 10, np.random.default_rng(seed), size)
    buf = io.BytesIO()
    Image.fromarray(a).resize((size, size)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_full_scale_path_matches_plain_pil_at_the_same_crop():
    tf = TrainTransform(height=224, width=224, fast=False)
    for seed in range(40):
        data = _jpeg(seed)
        # the crop and flip our transform will draw, replayed from the same seed
        rng = random.Random(seed)
        box = random_resized_crop_box(512, 512, rng)
        flip = rng.random() < 0.5
        fast = tf(Image.open(io.BytesIO(data)), random.Random(seed)).float()
        plain = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.BILINEAR, box=box)
        if flip:
            plain = plain.transpose(Image.FLIP_LEFT_RIGHT)
        diff = (fast - to_uint8_tensor(plain).float()).abs().mean().item()
        assert diff <= 2.0, (seed, box, diff)  # mean absolute difference in 0-255 units: at most 2/255


def test_reduced_scale_decoding_is_used_when_the_crop_allows_and_stays_close():
    """A crop downscaled 2x or more decodes at 1/2 (or less) scale; the result stays near the full decode."""
    data = _jpeg(3, size=512)
    full, fast = TrainTransform(height=112, width=112, fast=False), TrainTransform(height=112, width=112)
    scaled, diffs = 0, []
    for seed in range(60):
        box = random_resized_crop_box(512, 512, random.Random(seed))
        a = full(Image.open(io.BytesIO(data)), random.Random(seed)).float()
        b = fast(Image.open(io.BytesIO(data)), random.Random(seed)).float()
        assert a.shape == b.shape == (3, 112, 112)
        if min(box[2] - box[0], box[3] - box[1]) >= 2 * 112:
            scaled += 1
            diffs.append((a - b).abs().mean().item())
        else:
            assert torch.equal(a, b)  # nothing to gain: the very same path
    assert scaled >= 10 and np.mean(diffs) < 8.0, (scaled, diffs)  # a different resampling, not another image
