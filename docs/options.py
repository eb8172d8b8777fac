"""Writes docs/options.md from vitfood.config.Config, the one place options are defined, so the page cannot drift:

    python docs/options.py            # rewrite docs/options.md
    python docs/options.py --check    # exit 1 when docs/options.md is not what the Config says (tests run this)
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vitfood.config import PRESETS, Config, flag  # noqa: E402

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "options.md")
GROUPS = (("data", "dataset"), ("model", "model"), ("schedule", "max_steps"), ("evaluation, checkpoints, logging", "eval_steps"),
          ("machine", "device"))  # each group starts at the field named


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
    starts = {field: title for title, field in GROUPS}
    for f in dataclasses.fields(Config):
        if f.name in starts:
            lines += ["" if lines[-1] else None, f"## {starts[f.name].capitalize()}", "", "| option | default | meaning |",
                      "| --- | --- | --- |"]
            lines = [line for line in lines if line is not None]
        default = "unset" if f.default is None else ("on" if f.default else "off") if isinstance(f.default, bool) \
            else f"`{f.default}`"
        name = f"`--{flag(f.name)}`" + (f" / `--no-{flag(f.name)}`" if isinstance(f.default, bool) else "")
        meaning = f.metadata["help"].replace("|", "\\|")
        if f.metadata.get("choices"):
            meaning += " (" + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + ")"
        if f.metadata["decides"] in ("weights", "data"):
            meaning += "; *fixed on resume*"
        lines.append(f"| {name} | {default} | {meaning} |")
    lines += ["", "## Presets", ""]
    for name, values in PRESETS.items():
        lines.append(f"- `--preset {name}`: " + ", ".join(f"`--{flag(k)} {v}`" for k, v in values.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        with open(PAGE) as fh:
            sys.exit(0 if fh.read() == text else "docs/options.md is out of date: run python docs/options.py")
    with open(PAGE, "w") as fh:
        fh.write(text)
