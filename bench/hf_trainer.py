"""Baseline: the Hugging Face image-classification guide's recipe, run through `transformers.Trainer`.

Same data and model as vitfood (its seeded 80/20 split of the train split, its offline ViT), with
the guide's input pipeline (torchvision Compose via `with_transform`, `DefaultDataCollator`) and
its TrainingArguments. Adapted only where the current API requires it: `eval_strategy`,
`processing_class`, `max_steps`, fp16 only on CUDA (fp16 on a CPU would run fp32 anyway), and
`use_cpu=True` with --bf16 on a CPU (transformers refuses bf16 on a CPU without it).
As in the guide, the eval split goes through the same random-crop transform as the train split.

    HF_HUB_OFFLINE=1 /work/venv/bin/python bench/hf_trainer.py --max-steps 60 --eval-steps 20 --save-steps 20
    HF_HUB_OFFLINE=1 /work/venv/bin/python bench/hf_trainer.py --bf16          # the "best settings" variant

The last line of stdout is one JSON object with the figures.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torchvision.transforms import Compose, Normalize, RandomResizedCrop, ToTensor

import accelerate
import datasets
import transformers
from transformers import DefaultDataCollator, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vitfood.config import Config  # noqa: E402
from vitfood.model import build_model  # noqa: E402
from vitfood.sources import load_splits  # noqa: E402


class StepTimer(TrainerCallback):
    """Time between consecutive optimizer-step ends; an interval that held an eval, save or epoch end is marked."""

    def __init__(self):
        self.last, self.busy, self.steps = None, False, []  # steps: (global_step, seconds, clean)

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        if self.last is not None:
            self.steps.append((state.global_step, now - self.last, not self.busy))
        self.last, self.busy = now, False

    def on_evaluate(self, args, state, control, **kw):
        self.busy = True

    def on_save(self, args, state, control, **kw):
        self.busy = True

    def on_epoch_end(self, args, state, control, **kw):
        self.busy = True


def compute_metrics(eval_pred):
    return {"accuracy": float((np.argmax(eval_pred.predictions, axis=1) == eval_pred.label_ids).mean())}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--synthetic-size", type=int, default=2500)
    p.add_argument("--synthetic-classes", type=int, default=10)
    p.add_argument("--synthetic-max-px", type=int, default=512)
    p.add_argument("--model", default="vit-tiny")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=0, help="dataloader_num_workers (0: the Trainer's default)")
    p.add_argument("--bf16", action="store_true", help="bf16=True (the 'best settings' variant)")
    p.add_argument("--optim", default=None, help="TrainingArguments optim (unset: the Trainer's default)")
    p.add_argument("--output-dir", default=None, help="unset: a temporary folder, deleted at the end")
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--warmup-steps-skipped", type=int, default=10, help="first steps left out of the steady-state rate")
    return p.parse_args()


def main():
    args = parse_args()

    # data and model: vitfood's own pieces, so the work is the same
    cfg = Config(dataset=args.dataset, train_split="train", synthetic_size=args.synthetic_size, seed=42,
                 synthetic_classes=args.synthetic_classes, synthetic_max_px=args.synthetic_max_px,
                 max_eval_samples=args.max_eval_samples, model=args.model, image_size=args.image_size, attn="sdpa")
    train_ds, eval_ds, names = load_splits(cfg)
    transformers.set_seed(42)
    model, image_processor = build_model(cfg, names)

    # the guide's input pipeline
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    _transforms = Compose([RandomResizedCrop(image_processor.size["height"]), ToTensor(), normalize])

    def transforms(examples):
        examples["pixel_values"] = [_transforms(img.convert("RGB")) for img in examples["image"]]
        del examples["image"]
        return examples

    train_ds, eval_ds = train_ds.with_transform(transforms), eval_ds.with_transform(transforms)

    # which precision really runs: the dtype coming out of the model's first Linear during training
    seen = {}
    first_linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))

    def record_dtype(module, inputs, output):  # a forward hook must return None, or it replaces the output
        seen.setdefault("dtype", str(output.dtype).replace("torch.", ""))

    hook = first_linear.register_forward_hook(record_dtype)

    cuda = torch.cuda.is_available()
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="hf-trainer-bench-")
    extra = {"optim": args.optim} if args.optim else {}
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        eval_strategy="steps",
        num_train_epochs=4,
        max_steps=args.max_steps,
        fp16=cuda and not args.bf16,
        bf16=args.bf16,
        use_cpu=args.bf16 and not cuda,
        save_steps=args.save_steps,
        eval_steps=args.eval_steps,
        logging_steps=args.logging_steps,
        learning_rate=2e-4,
        save_total_limit=2,
        remove_unused_columns=False,
        dataloader_num_workers=args.num_workers,
        seed=42,
        **extra,
    )
    timer = StepTimer()
    trainer = Trainer(model=model, args=training_args, data_collator=DefaultDataCollator(),
                      train_dataset=train_ds, eval_dataset=eval_ds, processing_class=image_processor,
                      compute_metrics=compute_metrics, callbacks=[timer])

    try:
        t0 = time.perf_counter()
        trainer.train()
        train_wall = time.perf_counter() - t0
        hook.remove()

        t0 = time.perf_counter()
        metrics = trainer.evaluate()
        eval_wall = time.perf_counter() - t0
    finally:
        if args.output_dir is None:
            shutil.rmtree(output_dir, ignore_errors=True)

    clean = [s for step, s, ok in timer.steps if ok and step > args.warmup_steps_skipped]
    step_s = statistics.median(clean) if clean else None  # None: too few steps; raise --max-steps
    result = {
        "bench": "hf_trainer",
        "dataset": args.dataset, "train_images": len(train_ds), "eval_images": len(eval_ds),
        "model": args.model, "image_size": image_processor.size["height"],
        "max_steps": args.max_steps, "batch_size": args.batch_size,
        "eval_steps": args.eval_steps, "save_steps": args.save_steps, "logging_steps": args.logging_steps,
        "num_workers": args.num_workers, "optim": str(getattr(training_args.optim, "value", training_args.optim)),
        "precision_requested": "bf16" if args.bf16 else ("fp16" if cuda else "fp32 (guide asks fp16; CPU has none)"),
        "precision": seen.get("dtype"),
        "mixed_precision": trainer.accelerator.mixed_precision,
        "device": str(training_args.device),
        "train_wall_s": round(train_wall, 3),
        "train_steady_images_per_s": round(args.batch_size / step_s, 3) if step_s else None,
        "train_steady_step_s": round(step_s, 4) if step_s else None,
        "steady_steps_counted": len(clean),
        "eval_wall_s": round(eval_wall, 3),
        "eval_images_per_s": round(len(eval_ds) / eval_wall, 3),
        "eval_accuracy": round(metrics["eval_accuracy"], 4),
        "eval_loss": round(metrics["eval_loss"], 4),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "datasets": datasets.__version__, "accelerate": accelerate.__version__},
    }
    say(result, args, timer, train_wall, len(clean))
    print(json.dumps(result))


def say(result, args, timer, train_wall, counted):
    """The run in a few lines, for people; the JSON line follows."""
    print(f"\nHF Trainer (guide recipe): {args.model} on {args.dataset}, {result['train_images']} train / {result['eval_images']} eval images")
    print(f"  precision ran: {result['precision']} (mixed_precision={result['mixed_precision']}), "
          f"optim {result['optim']}, {result['threads']} threads, device {result['device']}")
    print(f"  trainer.train(): {train_wall:.1f} s for {args.max_steps} steps (with evals every {args.eval_steps}, saves every {args.save_steps})")
    print(f"  steady training: {result['train_steady_images_per_s']} images/s "
          f"(median of {counted} steps without eval/save, first {args.warmup_steps_skipped} skipped)")
    print(f"  evaluate(): {result['eval_images_per_s']:.1f} images/s, accuracy {result['eval_accuracy']:.4f}")
    print("  step times (s, * = held an eval/save):", " ".join(f"{t:.2f}" + ("" if ok else "*") for _, t, ok in timer.steps))


if __name__ == "__main__":
    main()
