"""vitfood against what people use today, on the same work, one after the other on this machine.

    python bench/compare.py                       # ~10 minutes on 2 CPU cores
    python bench/compare.py --steps 60 --every 20 --out bench/results-cpu.json

Runs, each in its own process: the guide's input pipeline and vitfood's (one process, one
thread each); the guide's recipe through transformers.Trainer (as written, and at its best
settings: bf16, DataLoader workers); vitfood.train at its defaults and at fp32; vitfood.bench's
e2e and eval modes. All on the synthetic Food-101-shaped set with vit-tiny (ViT-Ti/16, 224 px),
batch 16, a shortened recipe: --steps optimizer steps with eval and save every --every steps.
Prints the ratios; the last line is one JSON document with every figure.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = ["--dataset", "synthetic", "--train-split", "train", "--model", "vit-tiny", "--batch-size", "16"]


def run(cmd, threads=None):
    """Run a command; return the JSON object on its last stdout line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print("$ " + " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE))
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def vitfood_train(steps, every, *extra):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "vitfood.train", *DATA, "--max-steps", str(steps), "--eval-steps", str(every),
               "--save-steps", str(every), "--output-dir", os.path.join(tmp, "run"), *extra]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       cwd=os.path.dirname(HERE))
        with open(os.path.join(tmp, "run", "all_results.json")) as fh:
            results = json.load(fh)
        ea = EventAccumulator(os.path.join(tmp, "run"))
        ea.Reload()
        rates = [e.value for e in ea.Scalars("train/img_per_s")][1:]  # the first interval holds warm-up
        results["train_steady_images_per_s"] = statistics.median(rates)
        with open(os.path.join(tmp, "run", "train_config.json")) as fh:
            results["config"] = json.load(fh)
        return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--out", help="also write the JSON document here")
    a = p.parse_args()
    py = sys.executable
    recipe = ["--max-steps", str(a.steps), "--eval-steps", str(a.every), "--save-steps", str(a.every)]
    r = {}
    r["guide_pipeline"] = run([py, os.path.join(HERE, "guide_pipeline.py"), "--flip"], threads=1)
    r["vitfood_pipeline"] = run([py, "-m", "vitfood.bench", "--json", *DATA, "--modes", "data", "--worker-counts", "0",
                                 "--steps", "20", "--repeats", "3"], threads=1)
    r["trainer_recipe"] = run([py, os.path.join(HERE, "hf_trainer.py"), *recipe])
    r["trainer_best"] = run([py, os.path.join(HERE, "hf_trainer.py"), *recipe, "--bf16", "--num-workers", "1"])
    r["vitfood_default"] = vitfood_train(a.steps, a.every)
    r["vitfood_fp32"] = vitfood_train(a.steps, a.every, "--precision", "fp32")
    r["vitfood_bench"] = run([py, "-m", "vitfood.bench", "--json", *DATA, "--modes", "e2e,eval", "--steps", "5", "--repeats", "7"])

    v, vf, tr, tb = r["vitfood_default"], r["vitfood_fp32"], r["trainer_recipe"], r["trainer_best"]
    vb = r["vitfood_bench"]
    ratios = {
        "train_img_s_vitfood_default_vs_trainer_recipe": v["train_steady_images_per_s"] / tr["train_steady_images_per_s"],
        "wall_trainer_recipe_vs_vitfood_default": tr["train_wall_s"] / v["train_runtime"],
        "train_img_s_vitfood_default_vs_trainer_best": v["train_steady_images_per_s"] / tb["train_steady_images_per_s"],
        "wall_trainer_best_vs_vitfood_default": tb["train_wall_s"] / v["train_runtime"],
        "train_img_s_vitfood_fp32_vs_trainer_recipe": vf["train_steady_images_per_s"] / tr["train_steady_images_per_s"],
        "e2e_vs_compute_only": vb["e2e"]["vs_compute_only"],
        "pipeline_per_core_vitfood_vs_guide": r["vitfood_pipeline"]["data"][0]["img_s"] / r["guide_pipeline"]["images_per_s"],
        "eval_img_s_vitfood_vs_trainer": vb["eval"]["img_s"] / tr["eval_images_per_s"],
    }
    r["ratios"] = ratios
    print(f"\n{'figure':<48} {'vitfood':>10} {'baseline':>10} {'ratio':>7}")
    rows = [
        ("train img/s, defaults vs Trainer recipe (fp32)", v["train_steady_images_per_s"], tr["train_steady_images_per_s"]),
        ("recipe wall s, Trainer recipe / vitfood", v["train_runtime"], tr["train_wall_s"]),
        ("train img/s, defaults vs Trainer best (bf16)", v["train_steady_images_per_s"], tb["train_steady_images_per_s"]),
        ("recipe wall s, Trainer best / vitfood", v["train_runtime"], tb["train_wall_s"]),
        ("train img/s, vitfood fp32 vs Trainer recipe", vf["train_steady_images_per_s"], tr["train_steady_images_per_s"]),
        ("e2e img/s vs own compute-only (interleaved)", vb["e2e"]["img_s"], vb["e2e"]["compute_only_img_s"]),
        ("input pipeline img/s, 1 process 1 thread", r["vitfood_pipeline"]["data"][0]["img_s"], r["guide_pipeline"]["images_per_s"]),
        ("eval img/s vs Trainer.evaluate()", vb["eval"]["img_s"], tr["eval_images_per_s"]),
    ]
    for (name, ours, theirs), ratio in zip(rows, ratios.values()):
        print(f"{name:<48} {ours:>10.1f} {theirs:>10.1f} {ratio:>6.2f}x")
    text = json.dumps(r)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
