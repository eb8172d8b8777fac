"""A generated, Food-101-shaped image classification data set, for offline demos and tests.

RGB JPEGs of varied sizes (long side up to `max_px`), an `image` column and a ClassLabel
`label` column with dish-like names, a `train` and a `validation` split, saved with
`datasets.save_to_disk`, so it is read by exactly the code that reads a real data set.

Each class is a set of stripe orientations (a flip-symmetric set, so horizontal flips keep
the class) drawn in two random colours with pixel noise: the cue survives random crops, and
the average colour says nothing about the class.
"""

import io
import itertools
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from vitfood.common import UserError

VERSION = 1  # bump when the images change, so old caches are not reused

DISHES = ["apple_pie", "bibimbap", "caesar_salad", "dumplings", "falafel", "french_fries", "gyoza",
          "hummus", "lasagna", "miso_soup", "nachos", "paella", "pad_thai", "pho", "pizza", "ramen",
          "risotto", "samosa", "sashimi", "tacos", "tiramisu", "waffles"]

# Flip-symmetric orientation atoms, in degrees; a class is a combination of atoms.
ATOMS = [(0,), (90,), (30, 150), (45, 135), (60, 120)]
COMBOS = [c for r in range(1, len(ATOMS) + 1) for c in itertools.combinations(range(len(ATOMS)), r)]
STYLES = ["solid", "thin", "dotted", "soft"]  # renderings, used once the orientation sets run out
MAX_CLASSES = len(COMBOS) * len(STYLES)


def class_names(num_classes):
    names = [DISHES[i % len(DISHES)] + ("" if i < len(DISHES) else f"_{i // len(DISHES) + 1}")
             for i in range(num_classes)]
    return names


def make_image(label, rng, max_px):
    """One RGB uint8 image of class `label`, drawn with the numpy Generator `rng`."""
    combo = COMBOS[label % len(COMBOS)]
    style = STYLES[label // len(COMBOS)]
    w, h = (int(v) for v in rng.integers(max_px // 2, max_px + 1, size=2))
    period = min(w, h) / rng.uniform(4, 9)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros((h, w), np.float32)
    for atom in combo:
        for deg in ATOMS[atom]:
            t = np.deg2rad(deg)
            u = x * np.float32(np.cos(t)) + y * np.float32(np.sin(t))
            field += np.cos(u * np.float32(2 * np.pi / period) + np.float32(rng.uniform(0, 2 * np.pi)))
    field /= sum(len(ATOMS[a]) for a in combo)
    if style == "solid":
        mask = (field > 0).astype(np.float32)
    elif style == "thin":
        mask = (field > 0.6).astype(np.float32)
    elif style == "dotted":
        mask = ((field > 0) & (np.cos(x * np.float32(2 * np.pi / period * 3.1)) > 0)).astype(np.float32)
    else:
        mask = 0.5 + 0.5 * field
    fg, bg = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    img = mask[..., None] * fg + (1 - mask[..., None]) * bg
    img += 20 * rng.standard_normal(size=(h, w, 1), dtype=np.float32)  # luminance noise
    img += 8 * rng.standard_normal(size=(h, w, 3), dtype=np.float32)   # chroma noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(seed, index, label, max_px):
    rng = np.random.default_rng([seed, index])
    buf = io.BytesIO()
    Image.fromarray(make_image(label, rng, max_px)).save(buf, format="JPEG", quality=90)
    return {"bytes": buf.getvalue(), "path": None}


def _split(seed, offset, n, num_classes, max_px):
    labels = [int(v) for v in np.random.default_rng([seed, offset, 7]).integers(0, num_classes, size=n)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # numpy and libjpeg release the GIL
        images = list(pool.map(_jpeg, [seed] * n, range(offset, offset + n), labels, [max_px] * n))
    return images, labels


def cache_dir():
    return os.environ.get("VITFOOD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vitfood")


def ensure(size, num_classes=10, max_px=512, seed=0, log=print):
    """Path of the save_to_disk folder for these parameters, generating it on first use."""
    import datasets

    if num_classes > MAX_CLASSES:
        raise UserError(f"--synthetic-classes must be at most {MAX_CLASSES}, got {num_classes}")
    if max_px < 16:
        raise UserError(f"--synthetic-max-px must be at least 16, got {max_px}")
    root = cache_dir()
    path = os.path.join(root, f"synthetic-v{VERSION}-n{size}-c{num_classes}-px{max_px}-s{seed}")
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return path
    os.makedirs(root, exist_ok=True)
    n_val = max(num_classes, size // 10)
    log(f"generating the synthetic data set ({size} train + {n_val} validation images) in {path}")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names(num_classes))})
    splits = {}
    for name, offset, n in [("train", 0, size), ("validation", size, n_val)]:
        images, labels = _split(seed, offset, n, num_classes, max_px)
        splits[name] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    tmp = tempfile.mkdtemp(prefix=".tmp-synthetic-", dir=root)
    try:
        datasets.DatasetDict(splits).save_to_disk(tmp)
        try:
            os.replace(tmp, path)  # atomic: a concurrent or killed run never sees half a data set
        except OSError:
            if not os.path.isfile(os.path.join(path, "dataset_dict.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
