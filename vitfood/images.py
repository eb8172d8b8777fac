"""One image: decoded (EXIF orientation, 16-bit and palette modes, JPEG draft decoding), cropped and resized as
uint8 CHW, and normalized on the device. What a training or eval sample is made of, and what `vitfood.predict`
needs of the data, without the loaders.

Pillow's decompression-bomb limit is set here for the whole process: an image of more than about 89 megapixels
is refused with an error (Pillow only warns between 89 and 179).
"""

import functools
import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from vitfood.common import UserError

# Pillow warns past MAX_IMAGE_PIXELS and refuses only past twice that; vitfood refuses past it, itself (open_image),
# so that no warnings filter (a test runner's, a user's) can let a 100 MP image be decoded in full.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default (1024 x 1024 x 1024 // 4 // 3), stated
warnings.simplefilter("error", Image.DecompressionBombWarning)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # what imagefolder reads, mostly

# What a damaged, truncated, non-image or oversized file raises while it is opened or decoded.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
                 Image.DecompressionBombWarning)


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
    img = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") is not None else Image.open(value["path"])
    if img.width * img.height > MAX_PIXELS:  # read from the header: nothing is decoded yet
        raise Image.DecompressionBombError(f"{img.width} x {img.height} = {img.width * img.height / 1e6:.0f} MP, past "
                                           f"the limit of {MAX_PIXELS / 1e6:.1f} MP for decompression bombs")
    return img


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


VIEWS = {"none": 1, "flip": 2, "flip+crops": 7}  # test-time augmentation: how many views of each image are averaged
TTA = tuple(VIEWS)


def views(images, tta):
    """The views test-time augmentation averages over, of a normalized NCHW batch: the batch itself; with "flip"
    its mirror image too; with "flip+crops" also its four corner crops and its centre crop, each of 7/8 of the
    side and resized back (bilinear), as the ten-crop tradition does with fewer views."""
    out = [images]
    if tta in ("flip", "flip+crops"):
        out.append(images.flip(-1))
    if tta == "flip+crops":
        h, w = images.shape[-2:]
        ch, cw = round(h * 7 / 8), round(w * 7 / 8)
        for top, left in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)):
            crop = images[..., top:top + ch, left:left + cw]
            out.append(torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
    return out


def averaged(logits, multi_label):
    """Logits whose softmax (multi-label: sigmoid) is the mean of the views' probabilities: what the metrics
    and the scores of test-time augmentation read."""
    if len(logits) == 1:
        return logits[0]
    if multi_label:
        p = torch.stack([x.float().sigmoid() for x in logits]).mean(0).clamp(1e-7, 1 - 1e-7)
        return p.log() - (-p).log1p()
    return torch.stack([x.float().softmax(-1) for x in logits]).mean(0).clamp_min(1e-12).log()
