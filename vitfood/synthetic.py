"""A generated, Food-101-shaped image classification data set, for offline demos and tests.

RGB JPEGs of varied sizes (long side up to `max_px`), an `image` column and a ClassLabel
`label` column with dish-like names, a `train` and a `validation` split, saved with
`datasets.save_to_disk`, so it is read by exactly the code that reads a real data set.

Each class is a pair of complementary colours (a hue in 5 steps over 180 degrees, and which
of the two is the light one), drawn as a random stripe or check pattern with jitter and pixel
noise. The two colours cover half the image each, so every class averages to the same grey:
the average colour says nothing, while every crop and flip keeps the cue. Past 10 classes,
the pattern's orientation set is part of the class too.

With `dishes` > 1 it is multi-label: each image a plate of 1 to `dishes` dishes of different classes, in the
cells of a 4 x 4 grid, labelled with the list of them.
"""

import io
import itertools
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from vitfood.common import UserError, cache_dir

VERSION = 2  # bump when the images change, so old caches are not reused

DISHES = ["apple_pie", "bibimbap", "caesar_salad", "dumplings", "falafel", "french_fries", "gyoza",
          "hummus", "lasagna", "miso_soup", "nachos", "paella", "pad_thai", "pho", "pizza", "ramen",
          "risotto", "samosa", "sashimi", "tacos", "tiramisu", "waffles"]

# Flip-symmetric orientation atoms, in degrees; a pattern is a combination of atoms.
ATOMS = [(0,), (90,), (30, 150), (45, 135), (60, 120)]
COMBOS = [c for r in range(1, len(ATOMS) + 1) for c in itertools.combinations(range(len(ATOMS)), r)]
COLOURS = 10  # 5 hues x which colour of the pair is light
MAX_CLASSES = COLOURS * len(COMBOS)


def class_names(num_classes):
    names = [DISHES[i % len(DISHES)] + ("" if i < len(DISHES) else f"_{i // len(DISHES) + 1}")
             for i in range(num_classes)]
    return names


def _hue_direction(deg):
    """Unit-ish RGB direction of a hue, with zero mean (so +/- it stays around grey)."""
    rgb = np.array([np.cos(np.deg2rad(deg - offset)) for offset in (0, 120, 240)], np.float32)
    return rgb - rgb.mean()


def make_image(label, rng, max_px, num_classes=COLOURS, size=None, where=None):
    """One RGB uint8 image of class `label`, drawn with the numpy Generator `rng`. `size`: (w, h), else drawn;
    `where`: a boolean (h, w) mask: then only those pixels, as float32 rows of RGB, without pixel noise."""
    colour, pattern = label % COLOURS, label // COLOURS
    if num_classes <= COLOURS:  # the pattern is free: any orientation set
        pattern = int(rng.integers(0, len(COMBOS)))
    w, h = size or (int(v) for v in rng.integers(max_px // 2, max_px + 1, size=2))
    period = min(w, h) / rng.uniform(12, 24)  # a few stripes in every 16 px patch after cropping
    y, x = (np.mgrid[0:h, 0:w] if where is None else np.nonzero(where))
    y, x = y.astype(np.float32), x.astype(np.float32)
    field = np.zeros(y.shape, np.float32)
    for atom in COMBOS[pattern]:
        for deg in ATOMS[atom]:
            t = np.deg2rad(deg)
            u = x * np.float32(np.cos(t)) + y * np.float32(np.sin(t))
            field += np.cos(u * np.float32(2 * np.pi / period) + np.float32(rng.uniform(0, 2 * np.pi)))
    mask = (field > 0).astype(np.float32)[..., None]
    hue = (colour % 5) * 36 + rng.uniform(-8, 8)
    light = 1.0 if colour < 5 else -1.0
    delta = rng.uniform(50, 90) * _hue_direction(hue) + light * rng.uniform(25, 50)
    grey = 127.5 + rng.uniform(-15, 15)
    img = grey + (2 * mask - 1) * delta  # colour A where mask, its complement elsewhere
    return noise(img, rng) if where is None else img


def noise(img, rng):
    """A float (h, w, 3) image with luminance and chroma noise, as uint8."""
    h, w = img.shape[:2]
    img += 20 * rng.standard_normal(size=(h, w, 1), dtype=np.float32)  # luminance noise
    img += 8 * rng.standard_normal(size=(h, w, 3), dtype=np.float32)   # chroma noise
    return np.clip(img, 0, 255).astype(np.uint8)


def make_plate(labels, rng, max_px, num_classes=COLOURS):
    """A plate of several dishes, laid out as a bento box: a 4 x 4 grid of cells, each dish in as many cells
    as the others (within one), scattered at random, so that most random crops of training still show every
    dish (a crop missing one would be a wrong label)."""
    w, h = (int(v) for v in rng.integers(max_px // 2, max_px + 1, size=2))
    cells = rng.permutation(np.resize(np.arange(len(labels)), 16)).reshape(4, 4)  # each cell's dish
    rows, cols = np.linspace(0, 4, h, endpoint=False).astype(int), np.linspace(0, 4, w, endpoint=False).astype(int)
    owner = cells[rows[:, None], cols[None, :]]  # each pixel's dish
    img = np.empty((h, w, 3), np.float32)
    for i, label in enumerate(labels):
        img[owner == i] = make_image(label, rng, max_px, num_classes, size=(w, h), where=owner == i)
    return noise(img, rng)


def _jpeg(seed, index, label, max_px, num_classes=COLOURS):
    rng = np.random.default_rng([seed, index])
    buf = io.BytesIO()
    image = make_plate(label, rng, max_px, num_classes) if isinstance(label, list) else make_image(label, rng, max_px, num_classes)
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return {"bytes": buf.getvalue(), "path": None}


def _split(seed, offset, n, num_classes, max_px, dishes=1):
    rng = np.random.default_rng([seed, offset, 7])
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    if dishes > 1:  # 1 to `dishes` different classes per image, sorted
        labels = [sorted(int(c) for c in rng.choice(num_classes, size=int(rng.integers(1, dishes + 1)), replace=False))
                  for _ in range(n)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # numpy and libjpeg release the GIL
        images = list(pool.map(_jpeg, [seed] * n, range(offset, offset + n), labels, [max_px] * n, [num_classes] * n))
    return images, labels


def ensure(size, num_classes=10, max_px=512, seed=0, log=print, dishes=1):
    """Path of the save_to_disk folder for these parameters, generating it on first use. `dishes` > 1: plates
    of 1 to `dishes` dishes, each image labelled with a list of classes (multi-label)."""
    import datasets

    if num_classes > MAX_CLASSES:
        raise UserError(f"--synthetic-classes must be at most {MAX_CLASSES}, got {num_classes}")
    if max_px < 16:
        raise UserError(f"--synthetic-max-px must be at least 16, got {max_px}")
    root = cache_dir()
    plates = f"-d{dishes}" if dishes > 1 else ""
    path = os.path.join(root, f"synthetic-v{VERSION}-n{size}-c{num_classes}{plates}-px{max_px}-s{seed}")
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return path
    os.makedirs(root, exist_ok=True)
    n_val = max(num_classes, size // 10)
    log(f"generating the synthetic data set in {path}: {size} images in its 'train' split, {n_val} in 'validation'")
    label = datasets.ClassLabel(names=class_names(num_classes))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Sequence(label) if dishes > 1 else label})
    splits = {}
    for name, offset, n in [("train", 0, size), ("validation", size, n_val)]:
        images, labels = _split(seed, offset, n, num_classes, max_px, dishes)
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


SAMPLES = "samples"  # in a run folder: a few of the eval split's images, for a first `vitfood.predict`


def write_samples(run_dir, eval_set, class_names, n=4):
    """The first `n` eval images of a run on generated data, as JPEG files named for their class in
    RUN_DIR/samples/: the data set itself lives in an Arrow folder of the cache, so a newcomer has no photo of
    these dishes to give vitfood.predict. Returns the folder."""
    folder = os.path.join(run_dir, SAMPLES)
    os.makedirs(folder, exist_ok=True)
    for i in range(min(n, len(eval_set))):
        cell, label = eval_set.ds[i][eval_set.image_column], eval_set.labels[i]
        name = "+".join(class_names[c] for c in label) if isinstance(label, tuple) else class_names[label]
        with open(os.path.join(folder, f"{name}-{i}.jpg"), "wb") as fh:
            fh.write(cell["bytes"] if cell.get("bytes") else open(cell["path"], "rb").read())
    return folder
