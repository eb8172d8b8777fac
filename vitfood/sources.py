"""Where the images come from: a Hub data set, an imagefolder (its labels from folders or a metadata file), a
save_to_disk folder or the generated set; its splits, and its labels as class ids (single- or multi-label)."""

import dataclasses
import os
import re

import torch

from vitfood import synthetic
from vitfood.stream import SplitShards, Stream, TarShards
from vitfood.common import UserError, first_line
from vitfood.hub import hub_error, is_path
from vitfood.images import IMAGE_EXTENSIONS

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


# The image files of each folder read so far that are links leading nowhere: the imagefolder loader never lists
# them, so no split holds them; all_results.json counts them beside the damaged files (broken_links).
_BROKEN_LINKS = {}


def broken_links(name):
    """The image files of data set folder `name`, as it was last read in this process, that lead nowhere."""
    return _BROKEN_LINKS.get(os.path.abspath(os.path.expanduser(str(name))), [])


def _load_local(path, log=print, strict=False):
    import datasets
    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        loaded = datasets.load_from_disk(path)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    if not any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for _, _, files in os.walk(path) for f in files):
        raise UserError(f"the data set folder {path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                        "files, in one subfolder per class) and is not a save_to_disk folder")
    broken = sorted(os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path) for f in files
                    if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not os.path.exists(os.path.join(root, f)))
    _BROKEN_LINKS[os.path.abspath(path)] = broken
    if broken:  # listed by the walk, skipped by the imagefolder loader: said here, or they would vanish unseen
        what = (f"{len(broken)} image file(s) in {path} are symbolic links that lead nowhere (dangling, or a loop)"
                f": {', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}")
        if strict:  # --bad-images error: as a file that cannot be decoded
            raise UserError(f"{what} (--bad-images error; skip them with --bad-images skip)")
        log(f"warning: {what}; they are not read")
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


def _cause(error):
    """The error under `datasets`' "An error occurred while generating the dataset": the one that names the file
    and the rule."""
    while type(error).__name__ == "DatasetGenerationError" and (error.__cause__ or error.__context__):
        error = error.__cause__ or error.__context__
    return error


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
    """`name` when it is a Hub data set id, else None (a local folder, tar shards or the synthetic set)."""
    return None if name == "synthetic" or is_path(name) or is_shards(name) else name


def _refuse_single_class_folder(path, splits):
    """An imagefolder with fewer than two class folders has no label column at all: say why, in its terms."""
    if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
        return  # a save_to_disk folder: its columns are what they are
    roots = [os.path.join(path, s) for s in splits if os.path.isdir(os.path.join(path, s))] or [path]
    classes = sorted({d for root in roots for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))})
    if len(classes) < 2:
        holds = f"1 class folder ({classes[0]!r})" if classes else "no class folders (images must sit in one subfolder per class)"
        raise UserError(f"a classifier needs at least 2 classes, and the image folder {path} holds {holds}")


def _refuse_eval_only_classes(train, evals, cfg):
    """A class folder that only the eval split has: one line, as for a metadata file's class (balanced accuracy
    would count a class the model never saw at recall 0)."""
    import datasets
    feature = train.features.get(cfg.label_column)
    if evals is None or not isinstance(feature, datasets.ClassLabel):
        return
    extra = sorted(set(evals[cfg.label_column]) - set(train[cfg.label_column]))
    if extra:
        raise UserError(f"class {feature.int2str(extra[0])!r} appears only in the eval split ({len(extra)} such "
                        f"class(es)); the training split {cfg.train_split!r} has no image of it")


def is_shards(spec):
    """WebDataset tar shards: a .tar file, a brace pattern of them ('train-{000000..000009}.tar') or a comma list."""
    return bool(spec) and all(part.strip().endswith(".tar") for part in spec.split(",") if "{" not in part) and ".tar" in spec


def expand(spec):
    """A brace pattern's names, in order: {000..003} counts (keeping the width), {a,b} lists; a comma list outside
    braces names several patterns."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(spec):  # split on the commas outside braces
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    if len(parts) > 1:
        return [name for part in parts for name in expand(part.strip())]
    m = re.search(r"\{([^{}]*)\}", spec)
    if not m:
        return [spec]
    inner = m.group(1)
    counted = re.fullmatch(r"(\d+)\.\.(\d+)", inner)
    if counted:
        lo, hi = counted.groups()
        choices = [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        choices = inner.split(",")
    return [name for c in choices for name in expand(spec[:m.start()] + c + spec[m.end():])]


def load_shards(spec, cfg, which):
    """A split held in WebDataset tar shards (local paths or fsspec URLs), read by `datasets`' webdataset builder
    (into its Arrow cache: a map-style data set, which every rank and a resumed run index exactly as any other)."""
    import datasets
    files = expand(spec)
    local = [f for f in files if "://" not in f]
    missing = [f for f in local if not os.path.isfile(os.path.expanduser(f))]
    if missing:
        raise UserError(f"shard {missing[0]} of the {which} split does not exist ({len(missing)} of {len(files)} "
                        f"named by {spec!r} missing)")
    try:
        ds = datasets.load_dataset("webdataset", data_files={"train": [os.path.expanduser(f) for f in files]},
                                   split="train")
    except Exception as e:  # not a tar, a truncated tar, a URL that does not answer: datasets' own types
        broken = _broken_shard(local)
        if broken:
            raise UserError(f"cannot read the {which} shards {spec!r}: {broken}; --bad-images skip does not cover a "
                            "broken shard: write it again (python -m vitfood.shards) or leave it out of the pattern") \
                from None
        raise UserError(f"cannot read the {which} shards {spec!r}: {first_line(e)}") from None
    for col in (cfg.image_column, cfg.label_column):
        if col in ds.column_names and ds.data.column(col).null_count:
            row = next(i for i, v in enumerate(ds.data.column(col).to_pylist()) if v is None)
            raise UserError(f"sample {ds[row]['__key__']} of shard {ds[row]['__url__']} has no {col!r} file "
                            f"(every sample needs --image-column {cfg.image_column} and --label-column {cfg.label_column})")
    return ds


def _broken_shard(files):
    """Where the first local shard that is not a whole tar breaks: its name, the byte and the last sample read
    whole (datasets' builder only says that "an error occurred while generating the dataset"). None if all read."""
    import tarfile
    for f in files:
        samples, last, at = set(), None, 0
        try:
            with tarfile.open(os.path.expanduser(f)) as tar:
                for member in tar:
                    if member.isfile():
                        tar.extractfile(member).read()  # a file cut short fails here, not at its header
                        key = member.name.split(".", 1)[0]
                        samples.add(key)
                        last, at = key, member.offset_data + member.size
        except (tarfile.TarError, OSError, EOFError) as e:
            after = f"after sample {last!r}, {len(samples)} samples read whole" if last else "before any sample"
            if last is None and isinstance(e, tarfile.ReadError) and at == 0 and "could not be opened" in str(e):
                return f"shard {f} is not a tar file"
            return f"shard {f} breaks at byte {at:,} ({after}; {type(e).__name__}: {first_line(e, 120)})"
    return None


def shard_names(spec, ds, column):
    """The class names of a classes.txt beside the shards, for their integer class ids (None: no such file, or
    labels that are names already). Not cast into the data set: that would write it to the cache a second time."""
    names_file = os.path.join(os.path.dirname(expand(spec)[0]), "classes.txt")
    if not os.path.isfile(names_file) or not ds.features[column].dtype.startswith("int"):
        return None
    with open(names_file) as fh:
        names = [line.strip() for line in fh if line.strip()]
    top = max(ds[column], default=-1)
    if top >= len(names):
        raise UserError(f"class id {top} in the shards, and {names_file} names {len(names)} classes")
    return names


def load_splits(cfg, log=print):
    """(train, eval) `datasets.Dataset`s and the class names, as the config asks."""
    import datasets

    name = cfg.dataset
    if name == "synthetic":
        name = synthetic.ensure(cfg.synthetic_size, cfg.synthetic_classes, cfg.synthetic_max_px, seed=0, log=log,
                                dishes=cfg.synthetic_dishes)
    if cfg.streaming:
        return _streamed(cfg, log)
    if is_shards(name):
        train = _take_split({"train": load_shards(name, cfg, "train")}, cfg.train_split)
        if cfg.eval_split and not is_shards(cfg.eval_split):
            raise UserError(f"--eval-split {cfg.eval_split!r}: with shards as --dataset, name the eval shards "
                            "(a .tar pattern), or leave it unset to hold out --test-size of the train shards")
        evals = load_shards(cfg.eval_split, cfg, "eval") if cfg.eval_split else None
    elif is_path(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise UserError(f"data set path {name} does not exist (or is not a folder)")
        try:
            splits = _load_local(path, log, cfg.bad_images == "error")
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read data set folder {name}: {_mixed_forms(e) or _mixed_forms(_cause(e)) or first_line(_cause(e), 400)}")
        train = _take_split(splits, cfg.train_split)
        evals = _take_split(splits, cfg.eval_split) if cfg.eval_split else None
        if cfg.label_column not in train.column_names and cfg.label_column == "label":
            _refuse_single_class_folder(path, splits)
        _refuse_eval_only_classes(train, evals, cfg)
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
    if is_shards(name) and cfg.label_column in train.column_names:  # integer ids: the names of classes.txt
        names = shard_names(name, train, cfg.label_column) or names
    if cfg.fold:  # vitfood.audit's out-of-fold runs: fold k of the train split held out (eval), the rest trained on
        k, folds = fold_of(cfg.fold)
        held = fold_indices(len(train), folds, cfg.seed)[k - 1]
        rest = sorted(set(range(len(train))) - set(held))
        train, evals = train.select(rest), train.select(held)
    elif evals is None:
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


def _streamed(cfg, log):
    """--streaming: (the train split as a stream.Stream, the eval split loaded whole, class names). The class
    names are those of classes.txt beside the shards, else the eval split's."""
    import datasets
    if is_shards(cfg.dataset):
        if not is_shards(cfg.eval_split or ""):
            raise UserError("--streaming with shards needs --eval-split: the eval shards' pattern (a stream "
                            "cannot hold out part of itself)")
        evals = load_shards(cfg.eval_split, cfg, "eval")
    else:
        if not cfg.eval_split:
            raise UserError("--streaming needs --eval-split, the data set's eval split (a stream cannot hold out "
                            "part of itself)")
        path = os.path.expanduser(cfg.dataset)
        try:
            evals = (_take_split(_load_local(path, log, cfg.bad_images == "error"), cfg.eval_split) if os.path.isdir(path)
                     else datasets.load_dataset(cfg.dataset, split=cfg.eval_split))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the Hub raises many types
            raise hub_error("dataset", cfg.dataset, e)
    for col in (cfg.image_column, cfg.label_column):
        if col not in evals.column_names:
            raise UserError(f"column {col!r} not found in the eval split; columns: {', '.join(evals.column_names)}")
    if is_multi_label(evals, cfg.label_column) or cfg.multi_label:
        raise UserError("--streaming reads single-label data (one class per image)")
    evals, _, names = _class_ids(evals, None, dataclasses.replace(cfg, train_split=cfg.eval_split), log)
    if is_shards(cfg.dataset):
        names = shard_names(cfg.dataset, evals, cfg.label_column) or names
    if cfg.max_eval_samples:
        evals = evals.select(range(min(cfg.max_eval_samples, len(evals))))
    if len(evals) == 0:
        raise UserError(f"the eval split is empty ({cfg.eval_split!r})")
    return open_stream(cfg, names, f"the train split {cfg.dataset!r}"), evals, names


def open_stream(cfg, names, describe):
    """The train split of `cfg` as a stream.Stream: tar shards, or a `datasets` streaming split. Its samples:
    --train-samples, else the count a Hub data set declares."""
    import datasets
    samples = cfg.train_samples
    if is_shards(cfg.dataset):
        files = [os.path.expanduser(f) for f in expand(cfg.dataset)]
        missing = [f for f in files if "://" not in f and not os.path.isfile(f)]
        if missing:
            raise UserError(f"shard {missing[0]} of the train split does not exist ({len(missing)} of {len(files)} "
                            f"named by {cfg.dataset!r} missing)")
        reader = TarShards(files, cfg.image_column, cfg.label_column)
    else:
        if not re.fullmatch(r"[\w.-]+", cfg.train_split):
            raise UserError(f"--streaming reads a whole split, and --train-split {cfg.train_split!r} is a slice (the "
                            "default 'train[:5000]' is one): name the split, e.g. --train-split train")
        path = os.path.expanduser(cfg.dataset)
        try:
            ds = datasets.load_dataset(path, split=cfg.train_split, streaming=True)
        except Exception as e:  # noqa: BLE001 - the Hub and datasets raise many types
            if not is_path(cfg.dataset):
                raise hub_error("dataset", cfg.dataset, e)
            raise UserError(f"cannot stream the train split {cfg.train_split!r} of {cfg.dataset}: {first_line(e)}") from None
        for col in (cfg.image_column, cfg.label_column):
            if ds.features is not None and col not in ds.features:
                raise UserError(f"column {col!r} not found in the streamed train split; columns: "
                                f"{', '.join(ds.features)}")
        reader = SplitShards(ds, cfg.image_column, cfg.label_column)
        if samples is None:  # the count a Hub data set's card declares for the split, if any
            split = (ds.info.splits or {}).get(cfg.train_split)
            samples = getattr(split, "num_examples", None) or None
    if samples is None:
        raise UserError("--streaming needs --train-samples N, the images in an epoch (a stream has no length)")
    return Stream(reader, names, samples, describe)  # the run records its samples as --train-samples


def fold_of(spec):
    """'k/K' -> (k, K), checked."""
    try:
        k, folds = (int(v) for v in spec.split("/"))
    except ValueError:
        raise UserError(f"--fold {spec!r}: write it k/K, as 2/5") from None
    if not 1 <= k <= folds or folds < 2:
        raise UserError(f"--fold {spec!r}: k from 1 to K, and K at least 2")
    return k, folds


def fold_indices(n, folds, seed):
    """The images 0..n-1 dealt into `folds` folds of nearly equal size, in a seeded random order; each fold's
    indices ascending."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(order[k::folds]) for k in range(folds)]


def balanced_weights(labels, num_classes):
    """Per class, n / (classes x n_class): each class weighs as much as if the split were balanced (a
    class with no training image: 0)."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes).double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = len(labels) / (int(present.sum()) * counts[present])
    return weights.float()
