"""Write a data set as WebDataset tar shards: for data that should travel as a few large files (object storage, a
cluster's shared disk), and be read by vitfood.train or any WebDataset reader.

    python -m vitfood.shards --dataset ./photos --out shards/ --shard-size 1000
    python -m vitfood.train --dataset 'shards/train-{000000..000004}.tar' \\
        --eval-split 'shards/eval-{000000..000000}.tar' --image-column jpg --label-column cls

It takes vitfood.train's data flags and writes the two splits a run with them would use (with --eval-split unset,
the same seeded hold-out): OUT/train-NNNNNN.tar and OUT/eval-NNNNNN.tar, --shard-size images each, in the
splits' order, and OUT/classes.txt (the class names, one per line: class id i is line i). Each sample is
<key>.<ext>, the image file's bytes as they were (no re-encoding; when the files mix formats, all are written as
lossless PNG), and <key>.cls, its class id. The command that trains on them is printed at the end. A shard is
written under a temporary name and renamed when complete. Single-label data.
"""

import vitfood
import vitfood.stack

if __name__ == "__main__":
    vitfood.quiet_ctrl_c()
vitfood.stack.require(__name__)  # a broken install (a torchvision built for another torch) is one line, no traceback

import argparse
import io
import os
import sys
import tarfile

from PIL import Image
from tqdm import tqdm

from vitfood.common import Console, UserError, run_main
from vitfood.config import OneLineParser, build_parser, resolve
from vitfood.images import DECODE_ERRORS
from vitfood.sources import is_multi_label, load_splits

FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "GIF": "gif"}


def main(argv=None):
    p = OneLineParser(prog="python -m vitfood.shards", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--out", help="the folder the shards go to (created; shards already there are replaced)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    a, rest = p.parse_known_args(argv)
    if a.help:
        p.print_help()
        print("\nThe data flags are vitfood.train's: --dataset, --train-split, --eval-split, --test-size, --seed, ...")
        raise SystemExit(0)
    if not a.out or a.shard_size < 1:
        raise UserError("--out is required and --shard-size must be positive")
    cfg = resolve(vars(build_parser().parse_args(rest)))
    if cfg.streaming:
        raise UserError("vitfood.shards writes a data set it can index: it does not take --streaming")
    train, evals, names = load_splits(cfg)
    if is_multi_label(train, cfg.label_column):
        raise UserError("vitfood.shards writes single-label data (one class id per image); this data set is "
                        "multi-label")
    os.makedirs(a.out, exist_ok=True)
    import datasets
    cells = {split: ds.cast_column(cfg.image_column, datasets.Image(decode=False)) for split, ds in
             (("train", train), ("eval", evals))}
    ext = common_format(cells, cfg.image_column)
    counts = {split: write_split(ds, cfg.image_column, cfg.label_column, a.out, split, a.shard_size, ext)
              for split, ds in cells.items()}
    with open(os.path.join(a.out, "classes.txt"), "w") as fh:
        fh.write("".join(f"{name}\n" for name in names))
    last = {split: f"{(n + a.shard_size - 1) // a.shard_size - 1:06d}" for split, n in counts.items()}
    print(f"{counts['train']} train and {counts['eval']} eval images in {a.out}/ ({a.shard_size} per shard, "
          f"{ext}), {len(names)} classes in classes.txt. Train on them with:")
    print(f"  python -m vitfood.train --dataset '{a.out}/train-{{000000..{last['train']}}}.tar' "
          f"--eval-split '{a.out}/eval-{{000000..{last['eval']}}}.tar' --image-column {ext} --label-column cls")
    return counts


def common_format(cells, column):
    """The extension every image is stored under: its files' format when they share one, else png."""
    seen = set()
    for ds in cells.values():
        for i in range(len(ds)):
            seen.add(image_format(ds[i][column]))
            if len(seen) > 1:
                return "png"
    return seen.pop() if seen else "png"


def image_format(cell):
    try:
        with Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]) as img:
            return FORMATS.get(img.format, "png")
    except DECODE_ERRORS:
        return "png"


def image_bytes(cell, ext):
    """The file's own bytes when it is already in `ext`'s format, else the decoded image as PNG."""
    if cell.get("bytes") is not None:
        data = cell["bytes"]
    else:
        with open(cell["path"], "rb") as fh:
            data = fh.read()
    if image_format(cell) == ext:
        return data
    try:
        with Image.open(io.BytesIO(data)) as img:
            out = io.BytesIO()
            img.save(out, "PNG")
            return out.getvalue()
    except DECODE_ERRORS as e:
        raise UserError(f"cannot decode {cell.get('path') or 'an embedded image'}: {e}") from None


def write_split(ds, image_column, label_column, out, split, size, ext):
    """The split as tar shards of `size` samples; returns how many were written."""
    shard, n = None, 0
    try:
        for i in tqdm(range(len(ds)), desc=f"{split} shards", leave=False, file=Console(sys.stderr),
                      disable=not sys.stderr.isatty()):
            if i % size == 0:
                shard = finish(shard)
                path = os.path.join(out, f"{split}-{i // size:06d}.tar")
                shard = (tarfile.open(path + ".partial", "w", format=tarfile.USTAR_FORMAT), path)
            row = ds[i]
            for suffix, data in ((ext, image_bytes(row[image_column], ext)), ("cls", str(int(row[label_column])).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{suffix}")
                info.size, info.mtime = len(data), 0  # no time in a shard: the same data, the same bytes
                shard[0].addfile(info, io.BytesIO(data))
            n += 1
        finish(shard)
    except OSError as e:
        raise UserError(f"cannot write shards in {out}: {e.strerror or e}") from None
    return n


def finish(shard):
    """A shard's last bytes written and synced, then renamed into place."""
    if shard is not None:
        shard[0].close()
        with open(shard[1] + ".partial", "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(shard[1] + ".partial", shard[1])
    return None


def cli():
    run_main(main)


if __name__ == "__main__":
    cli()
