"""The GPU comparison as one command: the disk, then vitfood against transformers.Trainer on the recipe, then
vitfood.bench's step, eval and save figures. Each phase runs in its own process under its own time limit, and
the JSON document is rewritten after every phase, so a call cut short keeps what it measured; a phase that fails
or runs out of time is recorded as such and the others still run.

    python bench/gpu.py --out /tmp/gpu.json                      # on a GPU: about 6 minutes on one H200
    python bench/gpu.py --tiny --out /tmp/gpu.json               # the same phases at toy sizes: a check on a CPU
    python bench/gpu.py --phases vitfood_eager --out /tmp/gpu.json   # one more phase into the same document

The recipe: the generated set (5,000 JPEGs up to 512 px, 80/20 split), ViT-B/16 from its config (random
init: no Hub), batch 16, 1,000 steps, eval and save every 100, fp16. The Trainer gets the same data, model,
steps, cadence and DataLoader worker count. Wall times are from process start to exit; each vitfood run's own
phases.json (where its time went) is kept in the document. A table of the headline figures is printed last.
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
PHASES = ("disk", "generate", "vitfood", "trainer", "bench", "bench_graph", "vitfood_eager", "vitfood_compile")
DEFAULT = ("disk", "generate", "vitfood", "trainer", "bench", "vitfood_eager")


def save(path, results):
    if path:
        with open(path, "w") as fh:
            fh.write(json.dumps(results) + "\n")


def run(name, cmd, limit, results, out_path, json_last_line=True):
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
    entry = dict(wall_s=round(wall, 2), rc=rc, stdout_tail=out[-1500:])
    if rc == 0 and json_last_line:
        try:
            entry["result"] = json.loads(out.strip().splitlines()[-1])
            entry.pop("stdout_tail")
        except (ValueError, IndexError):
            entry["note"] = "no JSON on the last line"
    if rc != 0:
        entry["stderr_tail"] = err[-1500:]
    results[name] = entry
    save(out_path, results)
    print(f"   {name}: rc {rc}, {wall:.1f} s" + (f"\n{err[-800:]}" if rc != 0 else ""), flush=True)
    return entry


def disk(folder, mb):
    """Write `mb` MB to a file in `folder` (to the page cache), fsync it, read it back: seconds of each."""
    path = os.path.join(folder, "disk-probe.bin")
    block = os.urandom(1 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(mb):
            fh.write(block)
        t1 = time.perf_counter()
        os.fsync(fh.fileno())
    t2 = time.perf_counter()
    with open(path, "rb") as fh:
        while fh.read(1 << 22):
            pass
    t3 = time.perf_counter()
    os.remove(path)
    return dict(folder=folder, mb=mb, write_s=round(t1 - t0, 3), fsync_s=round(t2 - t1, 3), read_s=round(t3 - t2, 3),
                write_and_fsync_mb_s=round(mb / (t2 - t0), 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes, to check the script on a CPU")
    p.add_argument("--out", help="the JSON document: read if it exists (phases are added to it), rewritten after each phase")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers, for vitfood and the Trainer alike")
    p.add_argument("--phases", default=",".join(DEFAULT), help=f"comma list of {','.join(PHASES)}")
    a = p.parse_args()
    phases = a.phases.split(",")
    py = sys.executable
    if a.tiny:
        size, model, steps, every, classes, max_px = 240, "vit-micro", 20, 10, 4, 128
        bench_sizes, limits, disk_mb = "4,16", dict(default=300), 64
    else:
        size, model, steps, every, classes, max_px = 5000, "vit-base", 1000, 100, 10, 512
        bench_sizes, disk_mb = "16,256", 1024
        limits = dict(generate=150, vitfood=150, vitfood_eager=200, vitfood_compile=200, trainer=200, bench=150,
                      bench_graph=90)
    limit = lambda name: limits.get(name, limits.get("default", 200))
    data = ["--dataset", "synthetic", "--train-split", "train", "--synthetic-size", str(size),
            "--synthetic-classes", str(classes), "--synthetic-max-px", str(max_px)]
    recipe = [*data, "--model", model, "--batch-size", "16", "--max-steps", str(steps), "--eval-steps", str(every),
              "--save-steps", str(every), "--num-workers", str(a.workers)]
    try:
        with open(a.out) as fh:
            r = json.load(fh)
    except (TypeError, OSError, ValueError):
        r = {}
    tmp = tempfile.mkdtemp(prefix="vitfood-gpu-")

    for phase in phases:
        if phase == "disk":  # where the runs write their checkpoints
            r["disk"] = disk(tmp, disk_mb)
            save(a.out, r)
            print(f"\n== disk: {r['disk']}", flush=True)
        elif phase == "generate":  # the data set, generated once into the cache (not part of any timing below)
            run("generate", [py, "-c", f"from vitfood import synthetic; synthetic.ensure({size}, {classes}, {max_px})"],
                limit(phase), r, a.out, False)
        elif phase.startswith("vitfood"):
            extra = {"vitfood": [], "vitfood_eager": ["--no-cuda-graph"], "vitfood_compile": ["--compile"]}[phase]
            out = os.path.join(tmp, phase)
            run(phase, [py, "-m", "vitfood.train", *recipe, *extra, "--output-dir", out], limit(phase), r, a.out, False)
            for name in ("all_results.json", "phases.json"):
                path = os.path.join(out, name)
                if os.path.isfile(path):
                    with open(path) as fh:
                        r[phase][name.split(".")[0]] = json.load(fh)
            save(a.out, r)
        elif phase == "trainer":
            run("trainer", [py, os.path.join(HERE, "hf_trainer.py"), "--synthetic-size", str(size), "--model", model,
                            "--synthetic-classes", str(classes), "--synthetic-max-px", str(max_px),
                            "--max-steps", str(steps), "--eval-steps", str(every), "--save-steps", str(every),
                            "--num-workers", str(a.workers), "--output-dir", os.path.join(tmp, "t")], limit(phase), r,
                a.out)
        elif phase in ("bench", "bench_graph"):  # bench_graph: the graphed step's rows alone, a shorter phase
            full = phase == "bench"
            run(phase, [py, "-m", "vitfood.bench", "--json", *data, "--model", model, "--batch-size", "16",
                        "--modes", "model,eval,save" if full else "model", "--batch-sizes", bench_sizes,
                        "--compile-modes", "eager" if a.tiny else "eager,graph" if full else "graph",
                        "--precisions", "fp32" if a.tiny else "fp16,bf16",
                        "--attns", "sdpa", "--steps", "10", "--repeats", "3", "--num-workers", str(a.workers)],
                limit(phase), r, a.out)
        else:
            raise SystemExit(f"unknown phase {phase!r}; use {', '.join(PHASES)}")

    r["figures"] = figures(r)
    print("\nfigure                                        value")
    for k, v in r["figures"].items():
        if isinstance(v, (int, float)):
            print(f"{k:<45} {v:10.3f}")
    save(a.out, r)


def figures(r):
    """The headline figures, from whatever phases ran."""
    f, get = {}, lambda *keys: _dig(r, keys)
    for name in ("vitfood", "vitfood_eager", "vitfood_compile"):
        if get(name, "rc") == 0:
            f[f"{name}_wall_s"] = get(name, "wall_s")
            if get("trainer", "rc") == 0:
                f[f"{name}_speedup_vs_trainer"] = get("trainer", "wall_s") / get(name, "wall_s")
            seg = (get(name, "phases", "segments") or [None])[-1]
            if seg:
                f.update({f"{name}_{k.replace(' ', '_')}_s": v for k, v in seg["totals"].items() if k != "first batch"})
                first = [p for p in seg["phases"] if p["name"] == "first batch"]
                f[f"{name}_first_batch_s"] = first[0]["start"] if first else None
                evals = [p for p in seg["phases"] if p["name"] == "eval"]
                if len(evals) > 1:  # after the first: the decoded images are kept
                    f[f"{name}_eval_img_s_kept"] = sum(p["images"] for p in evals[1:]) / sum(
                        p["end"] - p["start"] for p in evals[1:])
    if get("trainer", "rc") == 0:
        f["trainer_wall_s"] = get("trainer", "wall_s")
    for row in (get("bench", "result", "model") or []) + (get("bench_graph", "result", "model") or []):
        if "img_s" in row:
            key = f"{row['precision']}_b{row['batch_size']}_{row['step']}"
            f[f"img_s_{key}"], f[f"mfu_{key}"] = row["img_s"], row.get("mfu")
    for k in ("eval", "save"):
        for name, v in (get("bench", "result", k) or {}).items():
            if isinstance(v, (int, float)):
                f[f"{k}_{name}"] = v
    if get("disk"):
        f["disk_write_and_fsync_mb_s"] = get("disk", "write_and_fsync_mb_s")
    return f


def _dig(obj, keys):
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    return obj


if __name__ == "__main__":
    main()
