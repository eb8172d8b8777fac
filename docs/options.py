"""Writes docs/options.md from vitfood.config.Config, the one place options are defined, so the page cannot drift:

    python docs/options.py            # rewrite docs/options.md
    python docs/options.py --check    # exit 1 when docs/options.md is not what the Config says (tests run this)
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vitfood.config import GROUPS, PRESETS, Config, flag  # noqa: E402

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "options.md")


def render():
    """The page: what a user does with options, then every option by group, with its default and meaning."""
    lines = [
        "# Options",
        "",
        "Every option of `python -m vitfood.train` (and, for those that mean something outside a run, of",
        "`python -m vitfood.bench`). Give them as flags (`--batch-size 32`), in a JSON or YAML file (`--config",
        "FILE`, keys as below with `_` or `-`), or through a preset (`--preset demo`); flags win over the file,",
        "which wins over the preset. A run records every option, resolved, in its `train_config.json`; `--resume",
        "auto` reads them back, and refuses a flag that would change what decides the weights or the data order",
        "(marked *fixed on resume* below). This page is generated from `vitfood.config.Config` by",
        "`python docs/options.py`.",
        "",
    ]
    for group in GROUPS:  # each field declares its group
        lines += [f"## {group.capitalize()}", "", "| option | default | meaning |", "| --- | --- | --- |"]
        lines += [row(f) for f in dataclasses.fields(Config) if f.metadata["group"] == group]
        lines.append("")
    lines += ["## Presets", ""]
    for name, values in PRESETS.items():
        lines.append(f"- `--preset {name}`: " + ", ".join(f"`--{flag(k)} {v}`" for k, v in values.items()))
    return "\n".join(lines) + "\n"


def row(f):
    """An option's row: its flag, default and meaning (its choices, and whether it is fixed on resume)."""
    default = "unset" if f.default is None else ("on" if f.default else "off") if isinstance(f.default, bool) \
        else f"`{f.default}`"
    name = f"`--{flag(f.name)}`" + (f" / `--no-{flag(f.name)}`" if isinstance(f.default, bool) else "")
    meaning = f.metadata["help"].replace("|", "\\|")
    if f.metadata.get("choices"):
        meaning += " (" + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + ")"
    if f.metadata["decides"] in ("weights", "data"):
        meaning += "; *fixed on resume*"
    return f"| {name} | {default} | {meaning} |"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        with open(PAGE) as fh:
            sys.exit(0 if fh.read() == text else "docs/options.md is out of date: run python docs/options.py")
    with open(PAGE, "w") as fh:
        fh.write(text)
