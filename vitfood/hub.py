"""Local path or Hugging Face Hub id, and one clear line when the Hub cannot give what was asked for."""

import os

from vitfood.common import UserError, first_line


def is_path(name):
    """A local path (as opposed to a Hub id): it exists, or it is spelled like a path."""
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def hub_error(kind, name, e):
    """The UserError for a `kind` ('dataset' or 'model') that could not be had from the Hub."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    why = "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)" if offline else \
        "it is not a local path and the Hugging Face Hub is unreachable or has no such repository"
    hint = "a local imagefolder or save_to_disk folder" if kind == "dataset" else "a local model folder"
    return UserError(f"cannot load {kind} {name!r}: {why} ({first_line(e)}); pass {hint}, or try --preset demo")
