"""vitfood's start-up against the imports any PyTorch + transformers tool pays, on this machine, in one call:

    python bench/startup.py [--repeats 5] [--out runs/startup.json]

Times, each the median of --repeats runs taken in alternation (the same machine noise for all three):
  imports      python -c "import torch, transformers"
  help         python -m vitfood.train --help
  first batch  the demo's process start to its first batch (phases.json of
               python -m vitfood.train --preset demo --max-steps 1; its data generated once before)
and the ratio of the last two to the first.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def seconds(cmd, env):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def first_batch(out, env):
    """The demo's process start to its first batch, from its own phases.json."""
    subprocess.run([sys.executable, "-m", "vitfood.train", "--preset", "demo", "--max-steps", "1", "--calibrate", "none",
                    "--output-dir", out, "--overwrite-output-dir"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "phases.json")) as fh:
        phases = json.load(fh)["segments"][-1]["phases"]
    return next(p["start"] for p in phases if p["name"] == "first batch")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join("runs", f"startup-{time.strftime('%Y%m%d-%H%M%S')}.json"))
    a = p.parse_args()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    rows = dict(imports=[], help=[], first_batch=[])
    with tempfile.TemporaryDirectory(prefix=".startup-", dir=os.path.dirname(a.out) or ".") as tmp:
        first_batch(os.path.join(tmp, "demo"), env)  # generates the demo's data set once, into the cache
        for _ in range(a.repeats):
            rows["imports"].append(seconds([sys.executable, "-c", "import torch, transformers"], env))
            rows["help"].append(seconds([sys.executable, "-m", "vitfood.train", "--help"], env))
            rows["first_batch"].append(first_batch(os.path.join(tmp, "demo"), env))
    median = {k: statistics.median(v) for k, v in rows.items()}
    import platform
    import torch
    import transformers
    report = dict(median_s=median, runs_s=rows, help_ratio=median["help"] / median["imports"],
                  first_batch_ratio=median["first_batch"] / median["imports"], repeats=a.repeats,
                  machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                               python=platform.python_version(), torch=torch.__version__,
                               transformers=transformers.__version__))
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"import torch, transformers: {median['imports']:.2f} s | vitfood.train --help: {median['help']:.2f} s "
          f"({report['help_ratio']:.2f}x) | demo to its first batch: {median['first_batch']:.2f} s "
          f"({report['first_batch_ratio']:.2f}x) | medians of {a.repeats}; {a.out}")


if __name__ == "__main__":
    main()
