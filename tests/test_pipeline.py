"""The input path (uint8, one resize with a crop box, keyed RNG) against torchvision and plain PIL."""

import io
import math
import random

import numpy as np
import torch
from PIL import Image

from vitfood.data import TrainTransform, random_resized_crop_box, to_uint8_tensor
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


def test_fast_path_matches_plain_pil_at_the_same_crop():
    tf = TrainTransform(height=224, width=224)
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
