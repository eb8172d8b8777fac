"""The GPU comparison of issue #13, as one command: vitfood against transformers.Trainer on the recipe, then
vitfood.bench's levers. Each phase runs in its own process under its own time limit; a phase that fails or
runs out of time is recorded as such and the others still run.

    python bench/gpu.py --out /tmp/gpu.json           # on a GPU: about 8 minutes on one H100
    python bench/gpu.py --tiny --out /tmp/gpu.json    # the same phases at toy sizes: a check on a CPU

The recipe: the generated set (5,000 JPEGs up to 512 px, 80/20 split), ViT-B/16 from its config (random
init: no Hub), batch 16, 1,000 steps, eval and save every 100, fp16. The Trainer gets the same data,
model, steps, cadence and DataLoader worker count as vitfood. Wall times are from process start to exit.
Prints a table of ratios; the last line is one JSON document with every figure.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


OUT = None  # --out: rewritten after every phase, so that a run cut short keeps what it measured


def save(results):
    if OUT:
        with open(OUT, "w") as fh:
            fh.write(json.dumps(results) + "\n")


def phase(name, cmd, limit, results, json_last_line=True):
    """Run one phase; record its wall time, exit status and (when it prints one) its JSON result."""
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
        wall, rc, out, err = time.perf_counter() - t0, p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        wall, rc, out, err = time.perf_counter() - t0, "timeout", e.stdout or "", e.stderr or ""
        out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
    entry = dict(wall_s=round(wall, 2), rc=rc)
    if rc == 0 and json_last_line:
        try:
            entry["result"] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            entry["note"] = "no JSON on the last line"
    if rc != 0:
        entry["stderr_tail"] = err[-1500:]
    results[name] = entry
    save(results)
    print(f"   {name}: rc {rc}, {wall:.1f} s" + (f"\n{err[-800:]}" if rc != 0 else ""), flush=True)
    return entry


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes, to check the script on a CPU")
    p.add_argument("--out", help="also write the JSON document here")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers, for vitfood and the Trainer alike")
    a = p.parse_args()
    global OUT
    OUT = a.out
    py = sys.executable
    if a.tiny:
        size, model, steps, every, extra = 240, "vit-micro", 20, 10, ["--synthetic-classes", "4", "--synthetic-max-px", "128"]
        bench_sizes, limit = "4,16", 300
    else:
        size, model, steps, every, extra = 5000, "vit-base", 1000, 100, []
        bench_sizes, limit = "16,256", 240
    data = ["--dataset", "synthetic", "--train-split", "train", "--synthetic-size", str(size), *extra]
    recipe = [*data, "--model", model, "--batch-size", "16", "--max-steps", str(steps), "--eval-steps", str(every),
              "--save-steps", str(every), "--num-workers", str(a.workers)]
    r = {}
    tmp = tempfile.mkdtemp(prefix="vitfood-gpu-")
    # the data set, generated once into the cache (not part of any timing below)
    classes, max_px = (4, 128) if a.tiny else (10, 512)
    phase("generate", [py, "-c", f"from vitfood import synthetic; synthetic.ensure({size}, {classes}, {max_px})"],
          limit, r, False)
    for name, run, extra_args in (("vitfood", "a", []), ("vitfood_compile", "b", ["--compile"])):
        phase(name, [py, "-m", "vitfood.train", *recipe, *extra_args, "--output-dir", os.path.join(tmp, run)], limit, r,
              False)
        path = os.path.join(tmp, run, "all_results.json")
        if os.path.isfile(path):
            with open(path) as fh:
                r[name]["result"] = json.load(fh)
        save(r)
    phase("trainer", [py, os.path.join(HERE, "hf_trainer.py"), "--synthetic-size", str(size), "--model", model,
                      "--synthetic-classes", str(classes), "--synthetic-max-px", str(max_px),
                      "--max-steps", str(steps), "--eval-steps", str(every), "--save-steps", str(every),
                      "--num-workers", str(a.workers), "--output-dir", os.path.join(tmp, "t")], limit, r)
    phase("bench", [py, "-m", "vitfood.bench", *data, "--model", model, "--batch-size", "16",
                    "--modes", "model,e2e,eval,save", "--batch-sizes", bench_sizes, "--compile-modes", "off,on",
                    "--precisions", "fp32" if a.tiny else "fp16",
                    "--attns", "sdpa", "--steps", "10", "--repeats", "3", "--num-workers", str(a.workers)],
          limit, r)
    # issue #20: the recipe levers' cost in the step (label smoothing, mixup/cutmix, layer decay, EMA), side by side
    phase("levers", [py, "-m", "vitfood.bench", *data, "--model", model, "--batch-size", "16", "--modes", "levers",
                     "--steps", "20", "--repeats", "5"], limit, r)

    figures = {}
    get = lambda *keys: _dig(r, keys)
    trainer_wall, ours = get("trainer", "wall_s"), [get(n, "wall_s") for n in ("vitfood", "vitfood_compile")
                                                     if get(n, "rc") == 0]
    if get("trainer", "rc") == 0 and ours:
        figures["recipe_speedup_vs_trainer"] = trainer_wall / min(ours)
    rows = get("bench", "result", "model") or []
    for row in rows:
        key = f"{row['precision']}_b{row['batch_size']}_{'compiled' if row['compile'] else 'eager'}"
        figures[f"img_s_{key}"], figures[f"mfu_{key}"] = row.get("img_s"), row.get("mfu")
    for k in ("e2e", "eval", "save"):
        if get("bench", "result", k):
            figures[k] = get("bench", "result", k)
    if get("levers", "result", "levers"):
        figures["levers"] = get("levers", "result", "levers")
    figures["startup_s"] = get("vitfood", "result", "startup_seconds")
    r["figures"] = figures
    print("\nfigure                                   value")
    for k, v in figures.items():
        if isinstance(v, (int, float)):
            print(f"{k:<40} {v:10.3f}")
    save(r)
    print(json.dumps(r))


def _dig(obj, keys):
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    return obj


if __name__ == "__main__":
    main()
