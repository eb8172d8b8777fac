"""Folders sealed with each file's SHA-256, so that a file changed after it was written is named instead of
used: a checkpoint's COMPLETE.json (each file's size and SHA-256, written last: the folder is complete), and in
what vitfood hands over (model/, adapter/, export/) SHA256SUMS, as `sha256sum -c SHA256SUMS` reads it. Every
vitfood tool checks a sealed folder before it loads it (`check_intact`)."""

import hashlib
import json
import os
import re
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from vitfood.common import UserError, first_line

MARKER = "COMPLETE.json"  # a checkpoint's: {step, files: {name: {size, sha256}}}
SUMS = "SHA256SUMS"  # a handed-over folder's: "<sha256>  <name>" per file
RUN_CONFIG = "train_config.json"  # a run's options, in its folder (beside model/)

_UMASK = os.umask(0o022)  # read (there is no other way) and put back at import, before any thread runs
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def finish_files(folder, digest=True, timing=None, known=None, only=None):
    """{name: (size, sha256)} of a folder's files, each fsynced and given the permissions the umask allows
    (safetensors writes its files private, 0600; an exported model is meant to be shared). The files are done
    side by side (fsync and hashlib let go of the GIL): a ViT-B checkpoint's two large files, 0.7 and 0.3 GB,
    take the time of the larger one. `digest` False: sizes alone (the SHA-256 reads every byte back).
    `timing`: a dict that gets the seconds of fsync and hashing, summed over the files. `known`: {name: sha256}
    of files whose digest is known already (hard links to a sealed checkpoint's files: not read again). `only`:
    these files (and folders' files) of `folder` alone."""
    names = sorted(os.path.relpath(os.path.join(top, n), folder) for top, _, files in os.walk(folder) for n in files)
    names = [n for n in names if only is None or n.split(os.sep)[0] in only]
    known = known or {}
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        done = list(pool.map(lambda name: _finish_file(os.path.join(folder, name), digest and name not in known,
                                                       known.get(name)), names))
    if timing is not None:  # added to what it holds (a folder finished in parts)
        for key, value in (("fsync_s", sum(d[2] for d in done)), ("sha256_s", sum(d[3] for d in done)),
                           ("mb", sum(d[0] for d in done) / 2 ** 20)):
            timing[key] = round(timing.get(key, 0) + value, 3 if key != "mb" else 1)
    return {name: dict(size=size, sha256=sha) for name, (size, sha, _, _) in zip(names, done)}


def _finish_file(path, digest, sha=None):
    """(size, sha256 (`sha` where given) or None, seconds of fsync, seconds of hashing) of one file, synced."""
    os.chmod(path, _FILE_MODE)
    t0 = time.perf_counter()
    with open(path, "rb") as fh:  # fsync needs no write access (a umask may have taken it away)
        os.fsync(fh.fileno())
    t1 = time.perf_counter()
    sha = sha256(path) if digest else sha
    return os.path.getsize(path), sha, t1 - t0, time.perf_counter() - t1


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def listed(path):
    """{name: (size, sha256 or None)} from a checkpoint's marker (sizes alone in older checkpoints)."""
    with open(os.path.join(path, MARKER)) as fh:
        files = json.load(fh)["files"]
    return {n: (f["size"], f["sha256"]) if isinstance(f, dict) else (f, None) for n, f in files.items()}


def seal_folder(folder, known=None):
    """Sync every file of `folder` and write its SHA256SUMS (`known`: {name: sha256} not read again); a list
    there already is replaced."""
    if os.path.exists(os.path.join(folder, SUMS)):
        os.remove(os.path.join(folder, SUMS))
    files = finish_files(folder, known={n: d for n, d in (known or {}).items() if d})
    with open(os.path.join(folder, SUMS), "w") as fh:
        fh.write("".join(f"{f['sha256']}  {name}\n" for name, f in files.items()))
        fh.flush()
        os.fsync(fh.fileno())


def _sealed(folder):
    """{name: sha256} of what `folder` was sealed with: its SHA256SUMS, or a checkpoint's marker (the files a
    model is loaded from: not the training state, a .pt file); None for a folder vitfood did not seal."""
    if os.path.isfile(os.path.join(folder, SUMS)):
        with open(os.path.join(folder, SUMS)) as fh:
            rows = [line.rstrip("\n").split("  ", 1) for line in fh if line.strip()]
        if not all(len(row) == 2 and re.fullmatch(r"[0-9a-f]{64}", row[0]) for row in rows):
            raise ValueError(f"{SUMS} is not a list of SHA-256 sums")
        return {name: sha for sha, name in rows}
    if os.path.isfile(os.path.join(folder, MARKER)):
        return {n: sha for n, (_, sha) in listed(folder).items() if sha and not n.endswith(".pt")}
    return None


def changed_files(folder, sums):
    """The names of `sums` ({name: sha256}) whose file in `folder` no longer has that SHA-256, in name order;
    the files are hashed side by side (hashlib lets go of the GIL)."""
    names = sorted(sums)
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        digests = list(pool.map(lambda n: sha256(os.path.join(folder, n)), names))
    return [n for n, d in zip(names, digests) if d != sums[n]]


EDITABLE = (".json", ".md", ".txt")  # a user may edit these by hand (labels, a threshold, the model card)


def damaged_file(folder, edited=None):
    """None when every file `folder` was sealed with is there, byte for byte (or it was not sealed); else what
    is wrong, in a few words. A changed text file (EDITABLE) is not damage: its name goes to the list `edited`.
    Reads each file once, side by side."""
    try:
        sums = _sealed(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"its list of checksums cannot be read ({first_line(e, 80)})"
    if not sums:
        return None
    missing = next((n for n in sorted(sums) if not os.path.isfile(os.path.join(folder, n))), None)
    if missing:
        return f"{missing} is missing"
    changed = changed_files(folder, sums)
    if edited is not None:
        edited += [n for n in changed if n.endswith(EDITABLE)]
    damaged = [n for n in changed if not n.endswith(EDITABLE)]
    return f"{damaged[0]} does not match its SHA-256 (changed after it was written)" if damaged else None


def check_intact(folder):
    """One line, naming the file and what to do, when a sealed folder (model/, adapter/, export/, a checkpoint)
    is not as it was written; a note for a settings file edited since (config.json: labels, thresholds)."""
    edited = []
    problem = damaged_file(folder, edited)
    settings = [n for n in edited if n.endswith(".json")]  # what the model is read with (README.md: its card)
    if settings:
        print(f"note: {', '.join(settings)} in {folder} changed after it was written (edited?): read as it is now",
              file=sys.stderr)
    if not problem:
        return
    folder = os.path.normpath(os.path.abspath(os.path.expanduser(folder)))
    run, name = os.path.split(folder)
    if not os.path.isfile(os.path.join(run, RUN_CONFIG)):
        mend = "restore it from a copy, or export it again from its run"
    elif name in ("model", "adapter"):  # a finished run resumed exports them again, from its newest checkpoint
        mend = ("export it again from the run's newest checkpoint: python -m vitfood.train --resume auto "
                f"--output-dir {shlex.quote(run)}")
    elif name == "export":
        mend = f"export it again: python -m vitfood.export {shlex.quote(run)}"
    else:
        mend = "use another checkpoint of the run"
    raise UserError(f"{folder} is damaged: {problem}; {mend}")
