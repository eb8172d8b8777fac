"""Data: loading a data set from the Hub or disk, the image transforms, and the DataLoaders.

The loaders yield uint8 image batches (4x fewer bytes than float32 to copy between
processes and to the device); `normalize` turns them into the model's float input on the
device. Training augmentation draws from an RNG keyed on (seed, epoch, sample index), so a
sample's crop does not depend on which worker made it or on where a run was resumed.
"""

import ctypes
import functools
import io
import math
import os
import random
import re
import signal
import warnings
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from vitfood import synthetic
from vitfood.common import UserError, first_line
from vitfood.hub import hub_error, is_path

Image.MAX_IMAGE_PIXELS = 178_956_970  # Pillow's own limit, stated so it cannot be lost
warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse images past ~89 MP instead of warning


# ---------------------------------------------------------------------------- loading

_SLICE = re.compile(r"^(?P<name>[\w.-]+)(\[(?P<start>-?\d*)(?P<pct1>%?):(?P<stop>-?\d*)(?P<pct2>%?)\])?$")


def _take_split(splits, spec):
    """`splits[spec]` for a local DatasetDict, with the Hub's 'train[:5000]' slice syntax."""
    m = _SLICE.match(spec)
    if not m:
        raise UserError(f"cannot read split {spec!r}; use a name like 'train' or a slice like 'train[:5000]'")
    if m["name"] not in splits:
        raise UserError(f"split {m['name']!r} not found; the data set has: {', '.join(splits)}")
    ds = splits[m["name"]]
    if m.group(2):
        n = len(ds)
        bound = lambda v, pct: None if v in ("", "-") else (int(v) * n // 100 if pct else int(v))
        ds = ds.select(range(n)[slice(bound(m["start"], m["pct1"]), bound(m["stop"], m["pct2"]))])
    return ds


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # what imagefolder reads, mostly


def _load_local(path):
    import datasets
    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        loaded = datasets.load_from_disk(path)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    if not any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for _, _, files in os.walk(path) for f in files):
        raise UserError(f"the data set folder {path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                        "files, in one subfolder per class) and is not a save_to_disk folder")
    splits = datasets.load_dataset("imagefolder", data_dir=path)
    if any(f in ("metadata.csv", "metadata.jsonl") for _, _, files in os.walk(path) for f in files):
        _check_listed_files(path, splits)
    return splits


def _check_listed_files(path, splits):
    """An image that a metadata file names but that is not there is one line (datasets lists it all the same)."""
    import datasets
    for name, split in splits.items():
        if "image" not in split.column_names:
            continue
        for row in split.cast_column("image", datasets.Image(decode=False))["image"]:
            if row and row.get("path") and not os.path.isfile(row["path"]):
                raise UserError(f"{os.path.relpath(row['path'], path)} is named in a metadata file of {path} "
                                f"(split {name!r}) but does not exist; add it, or remove its line")


def is_multi_label(ds, column):
    """Whether `ds`'s label column holds a list of classes per image (after load_splits: List(ClassLabel))."""
    return _is_list(ds.features[column])


def _is_list(feature):
    import datasets
    kinds = tuple(k for k in (getattr(datasets, n, None) for n in ("List", "LargeList", "Sequence")) if isinstance(k, type))
    return isinstance(feature, (*kinds, list))  # List in datasets 4+, Sequence before; a plain [feature] too


def _class_ids(train, evals, cfg, log=print):
    """Labels as a data set writes them, made class ids: (train, evals, class names), the label column then a
    ClassLabel (or integers) or, multi-label, a List(ClassLabel). Single-label: a ClassLabel, integers or
    class names. Multi-label: per image a list of ClassLabel, of integers or of class names, or names in one
    string separated by --label-separator (a metadata.csv); --multi-label makes a single label a list of one.
    Names become the training split's classes, sorted."""
    import datasets
    col, sep = cfg.label_column, cfg.label_separator
    feature = train.features[col]
    listed = _is_list(feature)
    inner = (feature[0] if isinstance(feature, list) else feature.feature) if listed else feature
    text = isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")
    whole = isinstance(inner, datasets.Value) and inner.dtype.startswith(("int", "uint"))
    if not (text or whole or isinstance(inner, datasets.ClassLabel)):
        raise UserError(f"label column {col!r} must hold integers, class names or a ClassLabel (or a list of them "
                        f"per image, for multi-label data), found {feature}")
    joined = text and not listed and (cfg.multi_label or any(sep in v for v in train[col] if isinstance(v, str)))
    if joined and not cfg.multi_label:
        log(f"the label column {col!r} names several classes in one cell, separated by {sep!r}: training "
            "multi-label (--label-separator sets another character)")
    multi = listed or joined or cfg.multi_label
    if not (text or multi):  # single-label ids, as the data set has them
        if isinstance(inner, datasets.ClassLabel):
            return train, evals, list(inner.names)
        return train, evals, [str(i) for i in range(max(train[col], default=-1) + 1)]

    def rows(ds, split):
        values = ds[col]
        if joined:
            values = [None if v is None else [p.strip() for p in v.split(sep) if p.strip()] for v in values]
        elif multi and not listed:
            values = [None if v is None else [v] for v in values]
        for i, v in enumerate(values):
            if v is None or (multi and not v) or (text and any(not isinstance(n, str) or not n.strip() for n in (v if multi else [v]))):
                raise UserError(f"image {i} of split {split!r} names no class in the label column {col!r} "
                                f"({v!r}); every image needs at least one")
        return values

    train_rows = rows(train, cfg.train_split)
    eval_rows = rows(evals, cfg.eval_split) if evals is not None else None
    flat = lambda values: (n for v in values for n in (v if multi else [v]))
    if isinstance(inner, datasets.ClassLabel):
        names = list(inner.names)
    elif whole:
        names = [str(i) for i in range(max(flat(train_rows), default=-1) + 1)]
    else:
        names = sorted(set(flat(train_rows)))
        extra = sorted(set(flat(eval_rows or [])) - set(names), key=str)
        if extra:
            raise UserError(f"class {extra[0]!r} appears only in the eval split ({len(extra)} such class(es)); "
                            f"the training split {cfg.train_split!r} has no image of it")
    ids = {n: i for i, n in enumerate(names)} if text else None
    labels = datasets.ClassLabel(names=names)
    new = datasets.Sequence(labels) if multi else labels  # a List in datasets 4+

    def convert(ds, values):
        if listed and not text:  # a list of ids already
            return ds
        if text:
            values = [[ids[n] for n in v] if multi else ids[v] for v in values]
        return ds.remove_columns(col).add_column(col, values, feature=new)
    return convert(train, train_rows), evals if evals is None else convert(evals, eval_rows), names


def _mixed_forms(error):
    """A metadata.jsonl column whose rows differ in form (pyarrow stops at the first that differs), in words."""
    m = re.search(r"Column\(/?([^)]*)\) changed from (\w+) to (\w+) in row (\d+)", str(error))
    if not m:
        return None
    forms = {m[2], m[3]}
    what = "a list of classes and a single class" if "array" in forms else f"{m[2]} and {m[3]} values"
    return (f"column {m[1]!r} of its metadata.jsonl mixes {what} (row {m[4]}); write every image's label in "
            "one form (a list of classes per image, for multi-label data)")


def hub_dataset(name):
    """`name` when it is a Hub data set id, else None (a local folder or the synthetic set)."""
    return None if name == "synthetic" or is_path(name) else name


def _refuse_single_class_folder(path, splits):
    """An imagefolder with fewer than two class folders has no label column at all: say why, in its terms."""
    if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
        return  # a save_to_disk folder: its columns are what they are
    roots = [os.path.join(path, s) for s in splits if os.path.isdir(os.path.join(path, s))] or [path]
    classes = sorted({d for root in roots for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))})
    if len(classes) < 2:
        holds = f"1 class folder ({classes[0]!r})" if classes else "no class folders (images must sit in one subfolder per class)"
        raise UserError(f"a classifier needs at least 2 classes, and the image folder {path} holds {holds}")


def load_splits(cfg, log=print):
    """(train, eval) `datasets.Dataset`s and the class names, as the config asks."""
    import datasets

    name = cfg.dataset
    if name == "synthetic":
        name = synthetic.ensure(cfg.synthetic_size, cfg.synthetic_classes, cfg.synthetic_max_px, seed=0, log=log,
                                dishes=cfg.synthetic_dishes)
    if is_path(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise UserError(f"data set path {name} does not exist (or is not a folder)")
        try:
            splits = _load_local(path)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read data set folder {name}: {_mixed_forms(e) or first_line(e)}")
        train = _take_split(splits, cfg.train_split)
        evals = _take_split(splits, cfg.eval_split) if cfg.eval_split else None
        if cfg.label_column not in train.column_names and cfg.label_column == "label":
            _refuse_single_class_folder(path, splits)
    else:
        try:
            train = datasets.load_dataset(name, split=cfg.train_split)
            evals = datasets.load_dataset(name, split=cfg.eval_split) if cfg.eval_split else None
        except Exception as e:  # the Hub raises many types: connection, not found, offline, gated
            if isinstance(e, ValueError) and "split" in str(e).lower():
                raise UserError(f"data set {name!r}: {first_line(e)}")
            raise hub_error("dataset", name, e)

    for ds, which in [(train, "train"), (evals, "eval")]:
        if ds is None:
            continue
        for col in (cfg.image_column, cfg.label_column):
            if col not in ds.column_names:
                raise UserError(f"column {col!r} not found in the {which} split; columns: {', '.join(ds.column_names)}"
                                f" (set --{'image' if col == cfg.image_column else 'label'}-column)")
    train, evals, names = _class_ids(train, evals, cfg, log)

    if evals is None:
        if len(train) < 2:
            raise UserError(f"the train split {cfg.train_split!r} has {len(train)} image(s): too few to carve an eval split")
        try:
            parts = train.train_test_split(test_size=cfg.test_size, seed=cfg.seed)
        except ValueError as e:
            raise UserError(f"cannot hold out --test-size {cfg.test_size} of {len(train)} images: {e}")
        train, evals = parts["train"], parts["test"]
    if cfg.max_train_samples:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples:
        evals = evals.select(range(min(cfg.max_eval_samples, len(evals))))
    for ds, which in [(train, "train"), (evals, "eval")]:
        if len(ds) == 0:
            raise UserError(f"the {which} split is empty (dataset {cfg.dataset!r})")
    return train, evals, names


# ---------------------------------------------------------------------------- images

def to_rgb(img):
    """Any PIL image as 8-bit RGB: 16-bit, palette, alpha, grayscale and CMYK inputs included."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit data: scale to 8 bits first, or convert() clips it to almost white
        a = np.asarray(img).astype(np.float32) / 257.0
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def open_image(value):
    """A PIL image from a `datasets.Image(decode=False)` cell ({'bytes', 'path'}), not yet decoded."""
    if value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    return Image.open(value["path"])


def to_uint8_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def crop_resize(img, box, size):
    """The `box` (x0, y0, x1, y1) of a PIL image resized to `size` (h, w), bilinear with antialias, as
    uint8 CHW. A whole-pixel box is cropped by PIL and resized by torchvision's uint8 kernel: about 2x
    PIL's resize on one core, within 0.1/255 of it (bench/README.md). Fractional boxes stay in PIL."""
    if not all(float(v).is_integer() for v in box):
        return to_uint8_tensor(to_rgb(img).resize((size[1], size[0]), Image.BILINEAR, box=box))
    from torchvision.transforms.v2.functional import resize
    x = to_uint8_tensor(to_rgb(img).crop(tuple(map(int, box))))
    return resize(x, list(size), antialias=True)


def random_resized_crop_box(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop parameters, drawn from `rng` (a random.Random): (x0, y0, x1, y1)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.randint(0, width - w)
            y0 = rng.randint(0, height - h)
            return x0, y0, x0 + w, y0 + h
    # fallback: the whole image's central crop within the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


ORIENTATION = 0x0112  # the EXIF tag: how the stored pixels must be turned to stand upright


def _orientation(img):
    try:
        return img.getexif().get(ORIENTATION, 1)  # read from the header: nothing is decoded yet
    except Exception:  # a damaged EXIF block: take the pixels as stored
        return 1


def upright_size(img):
    """(width, height) of the image as it is meant to be seen: EXIF orientations 5-8 swap the sides."""
    w, h = img.size
    return (h, w) if _orientation(img) in (5, 6, 7, 8) else (w, h)


def decode_upright(img, box, size, fast=True):
    """Decode `img` (opened, not yet decoded), turned upright by its EXIF orientation, as phone photos need
    and as `datasets` and `transformers.pipeline` do; returns it with `box` (x0, y0, x1, y1, in the upright
    full-size image's pixels) in its pixels. With `fast`, a JPEG whose crop will be downscaled to `size`
    (h, w) by 2x or more is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling: 4-64x fewer pixels
    to decode and to resize."""
    orientation = _orientation(img)
    width, height = upright_size(img)
    if fast and img.format in ("JPEG", "MPO"):  # MPO: a phone's JPEG with extra frames
        factor = min((box[2] - box[0]) / size[1], (box[3] - box[1]) / size[0])
        scale = next((s for s in (8, 4, 2) if factor >= s), 1)
        if scale > 1:  # Pillow takes the largest scale that keeps both sides at least this size
            img.draft(None, (max(1, img.size[0] // scale), max(1, img.size[1] // scale)))
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    sx, sy = img.size[0] / width, img.size[1] / height
    if (sx, sy) == (1, 1):
        return img, box
    return img, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


class TrainTransform:
    """RandomResizedCrop to (height, width) + horizontal flip, as uint8 CHW; then, when asked, torchvision's
    RandAugment or TrivialAugmentWide and RandomErasing on the uint8 crop. With `fast`, JPEGs decode at
    reduced scale when the crop allows it (decode_upright); the crop then snaps to whole pixels of the
    reduced image. All randomness comes from `rng`, keyed on (seed, epoch, sample): torchvision's draws
    run on the global generator seeded from it, which is put back as it was afterwards."""

    def __init__(self, *, height, width, fast=True, auto_augment="none", ops=2, magnitude=9, erasing=0.0):
        from torchvision.transforms import v2
        self.height, self.width, self.fast = height, width, fast
        self.size = (height, width)
        steps = {"none": [], "randaugment": [v2.RandAugment(num_ops=ops, magnitude=magnitude)],
                 "trivialaugment": [v2.TrivialAugmentWide()]}[auto_augment]
        steps += [v2.RandomErasing(p=erasing, value=0)] if erasing else []
        self.augment = v2.Compose(steps) if steps else None

    def __call__(self, img, rng):
        full = random_resized_crop_box(*upright_size(img), rng)
        flip = rng.random() < 0.5
        img, box = decode_upright(img, full, self.size, self.fast)
        if box is not full:
            box = tuple(round(v) for v in box)
        x = crop_resize(img, box, self.size)
        x = x.flip(-1) if flip else x
        if self.augment:
            with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
                torch.manual_seed(rng.getrandbits(63))
                x = self.augment(x)
        return x


class EvalTransform:
    """Resize (shortest edge, or exact height x width) then center crop, as uint8 CHW. No randomness."""

    def __init__(self, *, resize, crop, fast=True):
        self.resize, self.crop, self.fast = resize, crop, fast  # resize: int (shortest edge) or (h, w); crop: (h, w)
        self.size = tuple(crop)

    def __call__(self, img, rng=None):
        w, h = upright_size(img)
        if isinstance(self.resize, int):
            s = self.resize / min(w, h)
            size = (max(1, round(w * s)), max(1, round(h * s)))
        else:
            size = (self.resize[1], self.resize[0])
        ch, cw = self.crop
        left, top = round((size[0] - cw) / 2), round((size[1] - ch) / 2)
        box = (left / size[0] * w, top / size[1] * h, (left + cw) / size[0] * w, (top + ch) / size[1] * h)
        img, box = decode_upright(img, box, (ch, cw), self.fast)
        return crop_resize(img, box, (ch, cw))


def transforms_for(processor, fast_decode=True, cfg=None):
    """(train, eval) transforms and (mean, std) built from an image processor's own fields. `fast_decode`
    applies to training only: eval decodes in full, so that the exported image processor (what
    transformers.pipeline runs) sees the images as vitfood's eval, predict and evaluate do. `cfg`: a run's
    config, for its training augmentations."""
    size = dict(processor.size)
    crop = getattr(processor, "crop_size", None)
    crop = dict(crop) if crop else None
    do_crop = getattr(processor, "do_center_crop", False) and crop
    if "height" in size and "width" in size:
        resize = (size["height"], size["width"])
    elif "shortest_edge" in size:
        edge = size["shortest_edge"]
        crop_pct = getattr(processor, "crop_pct", None)
        if crop_pct and edge < 384:  # ConvNeXt-style: resize to edge / crop_pct, then crop to edge
            resize, crop, do_crop = int(edge / crop_pct), {"height": edge, "width": edge}, True
        else:
            resize = edge
    else:
        raise UserError(f"unsupported image processor size {size}")
    if do_crop:
        out = (crop["height"], crop["width"])
    elif isinstance(resize, int):
        out = (resize, resize)
    else:
        out = resize
    if getattr(processor, "do_normalize", True):
        mean, std = list(processor.image_mean), list(processor.image_std)
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    augment = dict(auto_augment=cfg.auto_augment, ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude,
                   erasing=cfg.random_erasing) if cfg else {}
    return (TrainTransform(height=out[0], width=out[1], fast=fast_decode, **augment),
            EvalTransform(resize=resize, crop=out, fast=False), (mean, std))


def normalize(images, mean, std):
    """uint8 NCHW batch -> float32 normalized, on the batch's device: (x/255 - mean) / std, as one
    multiply-add in place (4x faster on a CPU core than the four-pass expression)."""
    scale, shift = _affine(tuple(mean), tuple(std), images.device)
    return images.float().mul_(scale).add_(shift)


@functools.lru_cache(maxsize=16)
def _affine(mean, std, device):
    """(scale, shift) of normalize, made once per device: no host-to-device copy per batch."""
    mean, std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    return ((1 / (255 * std)).float().view(1, -1, 1, 1).to(device),
            (-mean / std).float().view(1, -1, 1, 1).to(device))


# ---------------------------------------------------------------------------- datasets and loaders

class BadImageError(UserError):
    """An image that cannot be decoded, with --bad-images error."""


# What a damaged, truncated, non-image or oversized file raises while it is opened or decoded.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
                 Image.DecompressionBombWarning)


class ImageDataset(torch.utils.data.Dataset):
    """Per-index access to a `datasets.Dataset`: (uint8 image, label). Keys are (epoch, index) or index.
    A label is a class id, or for multi-label data (a list of classes per image) a multi-hot uint8 row of
    `num_classes`.

    An image that fails to decode gives (None, index) (skipped and reported by `collate`), or raises
    BadImageError naming it when `skip_bad` is off.
    """

    def __init__(self, ds, image_column, label_column, transform, seed=0, skip_bad=True, relabel=None, num_classes=None):
        import datasets
        self.ds = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.multi_hot = num_classes if is_multi_label(ds, label_column) else None  # classes of a multi-hot row
        if self.multi_hot is None:
            self.labels = [int(v) for v in ds[label_column]]
        else:
            self.labels = [tuple(int(c) for c in v) for v in ds[label_column]]
        if relabel:  # the data set's class i is the model's class relabel[i]
            new = lambda v: relabel[v] if 0 <= v < len(relabel) else v
            self.labels = [new(v) if self.multi_hot is None else tuple(map(new, v)) for v in self.labels]
        self.transform, self.seed, self.skip_bad = transform, seed, skip_bad

    def __len__(self):
        return len(self.labels)

    def where(self, i):
        """Image i's file, for a message."""
        return self.ds[i][self.image_column].get("path") or f"image {i} (embedded bytes)"

    def __getitem__(self, key):
        epoch, i, *draw = key if isinstance(key, tuple) else (0, key)
        # string seeds hash with sha512: stable everywhere; `draw`: the position of a balanced sampler's draw
        rng = random.Random(f"{self.seed}-{epoch}-{i}" + "".join(f"-{d}" for d in draw))
        cell = self.ds[i][self.image_column]
        try:
            image = self.transform(open_image(cell), rng)
        except DECODE_ERRORS as e:
            if self.skip_bad:
                return None, i
            where = cell.get("path") or "embedded bytes"
            raise BadImageError(f"image {i} ({where}) cannot be decoded: {type(e).__name__}: {e}"
                                " (--bad-images skip skips and counts such images)") from None
        if self.multi_hot is None:
            return image, self.labels[i]
        hot = torch.zeros(self.multi_hot, dtype=torch.uint8)
        hot[list(self.labels[i])] = 1
        return image, hot


def collate(samples, size=None, classes=None):
    """Stack (image, label) pairs; damaged images, (None, index), are dropped: (images, labels, their indices).

    An empty list (a rank's share of an epoch's last, short global batch), or a batch in which every image
    is damaged, gives an empty batch of `size`: a training step goes on without it, an eval pass past it.
    Multi-hot labels (multi-label data, `classes` of them) stack into rows.
    """
    good = [s for s in samples if s[0] is not None]
    bad = [i for image, i in samples if image is None]
    if not good:
        labels = torch.empty(0, dtype=torch.int64) if classes is None else torch.empty((0, classes), dtype=torch.uint8)
        return torch.empty((0, 3, *size), dtype=torch.uint8), labels, bad
    images = torch.stack([img for img, _ in good])
    if classes is not None:
        return images, torch.stack([label for _, label in good]), bad
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    return images, labels, bad


def _worker_init(worker_id, parent=None):
    # Ctrl-C goes to the terminal's whole process group: workers leave it (and ignore SIGINT) so the
    # main process can finish its step and save. SIGTERM keeps its default: the loader's shutdown uses it.
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the main process handles a hangup, as it does Ctrl-C
    # A worker dies with its process (kill -9, OOM killer) instead of living on for seconds: Linux's
    # parent-death signal. The parent may have died already, before the signal was armed.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if parent is not None and os.getppid() != parent:
        os._exit(0)


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's share of each global batch, as lists of (epoch, index) keys, from any position on.

    Global batch k of an epoch is positions [k*G, (k+1)*G) of a permutation seeded by (seed, epoch),
    G = `global_batch` (--batch-size x processes): the same global batches for any number of processes.
    Rank r takes the r-th of `world` contiguous parts: G / world each, near-equal in an epoch's last,
    short batch, where a part may even be empty. Every sample is seen once per epoch, none is padded
    or dropped; with per-sample `weights` (--sampler balanced), an epoch is n draws with replacement.
    """

    def __init__(self, n, seed, global_batch, rank=0, world=1, shuffle=True, weights=None):
        self.n, self.seed, self.shuffle, self.weights = n, seed, shuffle, weights
        self.rank, self.world, self.global_batch = rank, world, global_batch
        self.batches_per_epoch = math.ceil(n / self.global_batch)
        self.epoch, self.batch = 0, 0

    def set_position(self, epoch, batch):
        self.epoch, self.batch = epoch, batch

    def global_size(self, batch):
        """Samples in global batch `batch` of an epoch, over all ranks."""
        return min(self.global_batch, self.n - batch * self.global_batch)

    def samples_in(self, first, count):
        """Samples in `count` global batches from global batch `first` on (counted across epochs)."""
        return sum(self.global_size((first + j) % self.batches_per_epoch) for j in range(count))

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:  # --sampler balanced: n draws with replacement, each by its weight
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        for k in range(self.batch, self.batches_per_epoch):
            m = self.global_size(k)
            start = k * self.global_batch + self.rank * (m // self.world) + min(self.rank, m % self.world)
            size = m // self.world + (self.rank < m % self.world)
            if self.weights is None:
                yield [(self.epoch, i) for i in order[start:start + size].tolist()]
            else:  # an image drawn twice in an epoch is augmented twice: its key holds the draw's position
                yield [(self.epoch, i, start + j) for j, i in enumerate(order[start:start + size].tolist())]

    def __len__(self):
        return self.batches_per_epoch - self.batch


class BatchStream:
    """This rank's training micro-batches, epoch after epoch, without end. Its state is the position of the
    next global micro-batch and the global batch that defines it, which a resumed run must keep."""

    def __init__(self, loader, sampler):
        self.loader, self.sampler = loader, sampler
        self.position, self._batches = 0, None  # global micro-batches taken, over all epochs

    def start(self):
        """Start the loader's workers on the next batches (they decode while the model is being built)."""
        if self._batches is None:
            epoch, batch = divmod(self.position, self.sampler.batches_per_epoch)
            self.sampler.set_position(epoch, batch)
            self._batches = self._epochs(epoch, iter(self.loader))  # iter(): the workers start, and prefetch

    def __next__(self):
        self.start()
        batch = next(self._batches)
        self.position += 1
        return batch

    def close(self):
        if self._batches is not None:
            self._batches.close()  # the generator lets go of the loader's iterator
            self._batches = None

    def _epochs(self, epoch, batches):
        while True:
            yield from batches
            epoch += 1
            self.sampler.set_position(epoch, 0)
            batches = iter(self.loader)

    def state_dict(self):
        epoch, batch = divmod(self.position, self.sampler.batches_per_epoch)
        return dict(epoch=epoch, batch=batch, global_batch=self.sampler.global_batch, world_size=self.sampler.world)

    def load_state_dict(self, state):
        g, procs, world = state["global_batch"], state["world_size"], self.sampler.world
        if g is not None and g != self.sampler.global_batch:  # the data order depends on it (None: before torchrun)
            keep = f"pass --batch-size {g // world}" if g % world == 0 else "that cannot be split evenly"
            raise UserError(f"the run being resumed used a global batch of {g} ({procs} process(es) x --batch-size "
                            f"{g // procs}); keep it: with {world} process(es), {keep}")
        position = state["epoch"] * self.sampler.batches_per_epoch + state["batch"]
        if position != self.position:  # else a stream started at this position goes on as it is
            self.position, self._batches = position, None


def make_loader(dataset, batch_size, num_workers, device, sampler=None, seed=0):
    """Batches of `batch_size` in order or over `sampler`; an EpochBatchSampler makes the batches itself."""
    if isinstance(sampler, EpochBatchSampler):
        batching = dict(batch_sampler=sampler)
    else:
        batching = dict(batch_size=batch_size, sampler=sampler, drop_last=False)
    size = getattr(getattr(dataset, "transform", None), "size", None)
    return torch.utils.data.DataLoader(
        dataset, **batching, num_workers=num_workers,
        collate_fn=functools.partial(collate, size=size, classes=getattr(dataset, "multi_hot", None)),
        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # own generator: the global RNG is never touched
        worker_init_fn=functools.partial(_worker_init, parent=os.getpid()),
        prefetch_factor=4 if num_workers > 0 else None)


class KeptBatches:
    """The eval loader, whose decoded batches are kept after its first whole pass (the eval transform has no
    randomness), so that every later eval decodes nothing: in GPU memory when they fit in `gpu_bytes`, else
    in pinned host memory. A pass cut short keeps nothing."""

    def __init__(self, loader, device, gpu_bytes=0):
        self.loader, self.batches = loader, None
        self.device = device if device.type == "cuda" and gpu_bytes > 0 else None
        self.batch_size = loader.batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.batches is not None:
            yield from self.batches
            return
        kept = []
        for images, labels, bad in self.loader:
            if self.device is not None:
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            elif not images.is_pinned():  # from a worker, in shared memory (a file descriptor each): copy it out
                images, labels = images.clone(), labels.clone()
            kept.append((images, labels, bad))
            yield kept[-1]
        self.batches = kept


def stop_workers(*loaders):
    """Stop these DataLoaders' worker processes now, while the interpreter is whole. Left to the interpreter's
    exit, persistent workers with pinned memory (CUDA) hold it up 5 s each (pytorch/pytorch#81794): 40 s at the
    end of a run with 8 workers, measured on an H200."""
    for loader in loaders:
        loader = getattr(loader, "loader", loader)  # KeptBatches' own loader
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            loader._iterator = None


class Data(NamedTuple):
    """What a run reads: the image sets, the training sampler and the loaders (train parts None for eval only)."""
    train_set: ImageDataset | None
    eval_set: ImageDataset
    sampler: EpochBatchSampler | None
    train_loader: torch.utils.data.DataLoader | None
    eval_loader: torch.utils.data.DataLoader
    batches: BatchStream | None  # the training micro-batches, resumable

    def close(self):
        """Stop every loader's workers (the end of a run)."""
        if self.batches is not None:
            self.batches.close()
        stop_workers(*(loader for loader in (self.train_loader, self.eval_loader) if loader is not None))


def build_data(cfg, train_ds, eval_ds, transforms, num_classes, device, workers, global_batch=None, rank=0, world=1,
               eval_batch=None, relabel=None, keep_eval=False):
    """The data sets and loaders of a run, as train, bench and evaluate all read them.

    Training (when `train_ds` is given) gets rank `rank`'s share of each global batch of `global_batch`
    images; eval takes every `world`-th image from `rank` on, so the sums over ranks cover the split once.
    `keep_eval`: the decoded eval images are kept between passes (KeptBatches) when this rank's share takes at
    most --eval-cache-gb; on CUDA in GPU memory when that is at most 5% of the GPU's.
    """
    train_tf, eval_tf = transforms
    skip_bad = cfg.bad_images == "skip"
    train_set = sampler = train_loader = batches = None
    if train_ds is not None:
        train_set = ImageDataset(train_ds, cfg.image_column, cfg.label_column, train_tf, seed=cfg.seed, skip_bad=skip_bad,
                                 num_classes=num_classes)
        check_labels(train_set, num_classes, "train")
        if train_set.multi_hot and "balanced" in (cfg.sampler, cfg.class_weights):
            raise UserError("--sampler balanced and --class-weights balanced are for single-label data; this data set "
                            "is multi-label (a list of classes per image)")
        weights = balanced_weights(train_set.labels, num_classes)[train_set.labels] if cfg.sampler == "balanced" else None
        sampler = EpochBatchSampler(len(train_set), cfg.seed, global_batch, rank, world, weights=weights)
        train_loader = make_loader(train_set, cfg.batch_size, workers, device, sampler, seed=cfg.seed)
        batches = BatchStream(train_loader, sampler)
    eval_set = ImageDataset(eval_ds, cfg.image_column, cfg.label_column, eval_tf, skip_bad=skip_bad, relabel=relabel,
                            num_classes=num_classes)
    check_labels(eval_set, num_classes, "eval")
    eval_loader = make_loader(eval_set, eval_batch or cfg.eval_batch(device), workers, device, range(rank, len(eval_set), world))
    size = len(range(rank, len(eval_set), world)) * 3 * math.prod(eval_tf.size)  # uint8 pixels
    if keep_eval and size <= cfg.eval_cache_gb * 2 ** 30:
        room = torch.cuda.get_device_properties(device).total_memory // 20 if device.type == "cuda" else 0
        eval_loader = KeptBatches(eval_loader, device, room if size <= room else 0)
    return Data(train_set, eval_set, sampler, train_loader, eval_loader, batches)


def balanced_weights(labels, num_classes):
    """Per class, n / (classes x n_class): each class weighs as much as if the split were balanced (a
    class with no training image: 0)."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes).double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = len(labels) / (int(present.sum()) * counts[present])
    return weights.float()


def check_damaged(dataset, damaged, which, limit):
    """Stop, naming files, when more than `limit` of `dataset`'s images are among `damaged` (indices)."""
    if damaged and len(damaged) > limit * len(dataset):
        names = ", ".join(dataset.where(i) for i in sorted(damaged)[:3]) + (", ..." if len(damaged) > 3 else "")
        raise UserError(f"{len(damaged)} of the {len(dataset)} {which} images cannot be decoded, more than "
                        f"--max-bad-share {limit:g} of them: {names}; fix or remove them, or raise --max-bad-share")


def eval_skip_warning(skipped, total):
    return (f"warning: {skipped} of the {total} eval images could not be decoded and were skipped: "
            f"the eval covers {total - skipped} (--bad-images error to stop instead)")


def check_labels(dataset, num_classes, which):
    if num_classes < 2:
        raise UserError(f"the data set has {num_classes} class(es); a classifier needs at least 2")
    ids = dataset.labels if dataset.multi_hot is None else [c for v in dataset.labels for c in v]
    bad = [v for v in ids if not 0 <= v < num_classes]
    if bad:
        raise UserError(f"the {which} split has label {bad[0]} outside the {num_classes} classes (0..{num_classes - 1})")
