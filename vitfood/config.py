"""One typed config for a run. Command-line flags are generated from its fields.

Precedence, lowest first: field defaults, --preset, --config FILE, explicit flags.
When a run is resumed, the run directory's train_config.json takes the place of the
defaults, preset and config file, so `--resume auto --output-dir DIR` alone continues it.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field

from vitfood.common import DTYPES, UserError, first_line
from vitfood.seal import RUN_CONFIG  # noqa: F401 (a run's options, in its folder; imported from here)


_NONE = object()


def _opt(group, default, help, choices=None, decides=None, legacy=_NONE, run_only=False, auto=False, check=None):
    """A Config field, in `group` (its section of --help and docs/options.md). `decides`: what the option decides,
    when it decides the run: "weights" or "data" (the data order), both fixed once a run has started, or
    "schedule" (its length and batch, which a resumed run may change). `legacy`: the value that runs written
    before the option existed behaved as. `run_only`: it means something to a training run only (vitfood.bench
    has no such flag). `auto`: the value "auto" is accepted too (a number the run works out). `check`: its
    rule (_rule), applied to any value but unset and auto."""
    meta = {"group": group, "help": help, "choices": choices, "decides": decides, "run_only": run_only, "auto": auto,
            "check": check}
    if legacy is not _NONE:
        meta["legacy"] = legacy
    return field(default=default, metadata=meta)


GROUPS = ("data", "model", "schedule and optimizer", "augmentation and regularisation",
          "evaluation, checkpoints, logging", "machine")
_data, _model, _schedule, _augment, _eval, _machine = (functools.partial(_opt, g) for g in GROUPS)


def _rule(ok, says):
    """A field's check: `ok(value)`, or the error `--<flag> <says>, got <value>`."""
    return lambda value: None if ok(value) else says


def _finite(ok):
    return lambda v: math.isfinite(v) and ok(v)


POSITIVE = _rule(lambda v: v >= 1, "must be a positive integer")
NOT_NEGATIVE = _rule(_finite(lambda v: v >= 0), "must not be negative")
SHARE = _rule(lambda v: 0 <= v <= 1, "must be between 0 and 1")


@dataclass
class Config:
    dataset: str = _data("food101", "Hub dataset id, imagefolder folder, save_to_disk folder, WebDataset tar shards ('DIR/train-{000000..000009}.tar', a comma list, or fsspec URLs), or 'synthetic'", decides="data")
    train_split: str = _data("train[:5000]", "split to train on; slices like 'train[:5000]' work", decides="data")
    eval_split: str | None = _data(None, "existing split to evaluate on (e.g. 'validation'; with shards as --dataset, the eval shards' pattern); unset: carve --test-size out of the train split", decides="data")
    test_size: float = _data(0.2, "share of the train split held out for eval when --eval-split is unset (seeded)", decides="data", check=_rule(lambda v: 0 < v < 1, "must be between 0 and 1"))
    fold: str | None = _data(None, "k/K: train on the train split less its k-th of K seeded folds, and evaluate on that fold (vitfood.audit's out-of-fold runs; --eval-split is then not used)", decides="data", legacy=None)
    max_train_samples: int | None = _data(None, "keep only the first N training images", decides="data", check=POSITIVE)
    max_eval_samples: int | None = _data(None, "keep only the first N eval images", decides="data", check=POSITIVE)
    streaming: bool = _data(False, "read the train split as a stream, never copied to disk: tar shards or a Hub data set (each process its own shards, a seeded shard order and --shuffle-buffer; resume is exact); needs --eval-split and --train-samples", decides="data", legacy=False)
    train_samples: int | None = _data(None, "with --streaming: images in an epoch, as a stream has no length (unset: the count the Hub data set declares)", decides="schedule", legacy=None, check=POSITIVE)
    shuffle_buffer: int = _data(1000, "with --streaming: samples held in the shuffle buffer that each process reads its shards through (1: the shards' own order)", decides="data", legacy=1000, check=POSITIVE)
    image_column: str = _data("image", "name of the image column", decides="data")
    label_column: str = _data("label", "name of the label column", decides="data")
    multi_label: bool = _data(False, "train multi-label (binary cross-entropy, sigmoid scores) even where every image has one label; detected from the data otherwise (a list of classes per image)", decides="weights", legacy=False)
    label_separator: str = _data(";", "in a text label column (a metadata.csv), the character between an image's classes, which makes the data multi-label", decides="data", legacy=";", check=_rule(lambda v: len(v) == 1 and not v.isalnum(), "must be one character, not a letter or digit"))
    threshold: float = _data(0.5, "multi-label: a class is predicted where its sigmoid score is at least this (F1 and exact match; mAP needs none)", check=_rule(lambda v: 0 < v < 1, "must be between 0 and 1"))
    synthetic_size: int = _data(2500, "images generated for --dataset synthetic (all in its 'train' split)", decides="data", check=POSITIVE)
    synthetic_classes: int = _data(10, "classes of --dataset synthetic", decides="data", check=_rule(lambda v: v >= 2, "must be at least 2"))
    synthetic_dishes: int = _data(1, "dishes per image of --dataset synthetic: 1, one class per image; N > 1, plates of 1 to N dishes, labelled with each (multi-label)", decides="data", legacy=1)
    synthetic_max_px: int = _data(512, "longest side, in pixels, of the largest synthetic image", decides="data", check=POSITIVE)
    fast_decode: bool = _data(True, "decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when its crop is downscaled by that much anyway; faster, same accuracy (bench/README.md)", decides="data", legacy=False)
    bad_images: str = _data("skip", "an image that cannot be decoded: skip it (counted, with a warning) or stop with an error", ["skip", "error"])
    max_bad_share: float = _data(0.1, "with --bad-images skip: stop, naming files, once more than this share of a split's images could not be decoded", check=SHARE)
    model: str = _model("google/vit-base-patch16-224-in21k", "Hub id, local model folder, or a named config: vit-tiny, vit-small, vit-base, vit-large, vit-huge (ViT-L/16, ViT-H/14), vit-micro", decides="weights")
    image_size: int | None = _model(None, "input resolution in px (unset: the model's own); a pretrained model's position tables are resized to it once, at load", decides="weights", check=POSITIVE)
    freeze_backbone: bool = _model(False, "train only the classification head (a linear probe); the backbone stays as loaded", decides="weights", legacy=False)
    freeze_epochs: float = _model(0.0, "train the head alone for this many epochs first (the backbone frozen; its own lr, warm-up and decay), then the whole model on the configured schedule, as fastai's fine_tune (0: off)", decides="weights", legacy=0.0, check=_rule(_finite(lambda v: v >= 0), "must be a finite number of epochs, 0 or more"))
    freeze_steps: int | None = _model(None, "the same as --freeze-epochs in optimizer steps; overrides it", decides="weights", legacy=None, check=POSITIVE)
    freeze_lr: float | None = _model(None, "peak learning rate of the head while the backbone is frozen (unset: 5x --lr: a head alone takes a higher rate, bench/README.md)", decides="weights", legacy=None, check=_rule(_finite(lambda v: v > 0), "must be positive"))
    lora_rank: int = _model(0, "train LoRA adapters of this rank (through peft) and the head; the rest stays as loaded (0: off)", decides="weights", legacy=0)
    lora_alpha: float = _model(16.0, "LoRA: scale alpha (the update is scaled by alpha / rank)", decides="weights", legacy=16.0)
    lora_dropout: float = _model(0.1, "LoRA: dropout on the adapters' input", decides="weights", legacy=0.1)
    lora_targets: str | None = _model(None, "LoRA: comma list of module names to adapt (unset: the attention's q_proj,v_proj)", decides="weights", legacy=None)
    teacher: str | None = _model(None, "distil from this trained model (a run's model/ or folder, a checkpoint, a Hub id; the same classes as the data): frozen, in the run's precision, on each training batch the student sees; see --distill", decides="weights", legacy=None)
    distill: str = _model("soft", "with --teacher: soft, the KL divergence to the teacher's distribution tempered by --distill-temperature (times T^2; multi-label: binary cross-entropy to its tempered sigmoid scores); hard, cross-entropy to the teacher's top class (DeiT)", ["soft", "hard"], decides="weights", legacy="soft")
    distill_alpha: float = _model(0.5, "with --teacher: the teacher's share of the loss, (1 - A) x the usual loss + A x the distillation term", decides="weights", legacy=0.5, check=SHARE)
    distill_temperature: float = _model(2.0, "with --teacher and --distill soft: the temperature T both distributions are divided by", decides="weights", legacy=2.0, check=_rule(_finite(lambda v: v > 0), "must be positive"))
    gradient_checkpointing: bool = _model(False, "recompute activations in the backward pass instead of keeping them (less memory, about a third more compute)", decides="weights", legacy=False)
    trust_remote_code: bool = _model(False, "let a Hub model run its own code (off: nothing from a repository is executed)")
    attn: str = _model("auto", "attention implementation; auto: sdpa on CUDA, eager on the CPU (faster there, measured in bench/README.md)", ["auto", "sdpa", "eager"])
    compile: bool = _model(False, "torch.compile the model (first steps are slow; compile time is reported)")
    fsdp: bool = _model(False, "shard the weights, gradients and AdamW state over the processes (PyTorch FSDP2, each transformer block a unit of its own; under torchrun, or one process): checkpoints written by every process with torch.distributed.checkpoint, resumable on another number of processes; model/ an ordinary transformers folder", decides="weights", legacy=False, run_only=True)
    cuda_graph: bool = _model(True, "on CUDA, capture the whole training step (forward, backward, clipping, AdamW) as one CUDA graph and replay it at every step; needs one process, --grad-accum-steps 1 and no --mixup/--cutmix (else the step runs eagerly)")
    max_steps: int | None = _schedule(None, "optimizer steps to train; overrides --epochs", decides="schedule", run_only=True, check=POSITIVE)
    epochs: float = _schedule(4.0, "epochs to train, converted to optimizer steps", decides="schedule", run_only=True, check=_rule(_finite(lambda v: v > 0), "must be positive"))
    batch_size: int = _schedule(16, "images per micro-batch (per process); auto: the largest whose training step fits in memory (measured at the start), with accumulation steps that keep the global batch (--global-batch, else this option's value before auto x --grad-accum-steps x processes)", decides="schedule", auto=True, check=POSITIVE)
    global_batch: int | None = _schedule(None, "images per optimizer step over every process; with --batch-size auto what its split keeps; auto (with --batch-size auto): the largest micro-batch, nothing accumulated", decides="schedule", legacy=None, auto=True, check=POSITIVE)
    eval_batch_size: int | None = _schedule(None, "images per eval batch (unset: 2x --batch-size on the CPU, 8x on CUDA)", check=POSITIVE)
    eval_cache_gb: float = _schedule(2.0, "keep the decoded eval images between evals when they take at most this many GB (in GPU memory on CUDA when that is at most a twentieth of it, else in host memory), so that only the first eval decodes; 0: decode at every eval", check=_rule(_finite(lambda v: v >= 0), "must be a finite number of GB, 0 or more"))
    grad_accum_steps: int = _schedule(1, "micro-batches per optimizer step", decides="weights", check=POSITIVE)
    lr: float = _schedule(2e-4, "peak learning rate of AdamW", decides="weights", check=_rule(_finite(lambda v: v > 0), "must be positive"))
    weight_decay: float = _schedule(0.0, "AdamW weight decay (never applied to biases and norm weights)", decides="weights", check=NOT_NEGATIVE)
    warmup_steps: int = _schedule(0, "linear warm-up steps, then linear decay to 0", decides="schedule", check=NOT_NEGATIVE)
    max_grad_norm: float = _schedule(1.0, "clip the gradient norm to this (0: no clipping)", check=NOT_NEGATIVE)
    label_smoothing: float = _augment(0.0, "training targets: 1 - F on the label, F spread over every class (eval stays plain cross-entropy)", decides="weights", legacy=0.0, check=_rule(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    layer_decay: float = _augment(1.0, "layer-wise lr decay for the ViT family: the head at --lr, each block below times F, the embeddings lowest (1: off)", decides="weights", legacy=1.0, check=_rule(lambda v: 0 < v <= 1, "must be in (0, 1] (1: off)"))
    drop_path: float = _augment(0.0, "stochastic depth rate, for models whose config has drop_path_rate (BEiT, DINOv2, Swin, ConvNeXt; not HF's ViT)", decides="weights", legacy=0.0, check=_rule(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    auto_augment: str = _augment("none", "torchvision's automatic augmentation of training crops, in the loader workers", ["none", "randaugment", "trivialaugment"], decides="weights", legacy="none")
    randaugment_ops: int = _augment(2, "RandAugment: operations per image", decides="weights", legacy=2, check=POSITIVE)
    randaugment_magnitude: int = _augment(9, "RandAugment: magnitude, 0-30", decides="weights", legacy=9, check=_rule(lambda v: 0 <= v <= 30, "must be between 0 and 30"))
    random_erasing: float = _augment(0.0, "probability of erasing a random rectangle of a training crop (torchvision's RandomErasing)", decides="weights", legacy=0.0, check=SHARE)
    mixup: float = _augment(0.0, "mixup's Beta(A, A) on training batches (0: off); mixed on the device with soft targets", decides="weights", legacy=0.0, check=_rule(_finite(lambda v: v >= 0), "must be a finite alpha >= 0 (0: off)"))
    cutmix: float = _augment(0.0, "CutMix's Beta(A, A) (0: off); with --mixup too, one of the two per batch", decides="weights", legacy=0.0, check=_rule(_finite(lambda v: v >= 0), "must be a finite alpha >= 0 (0: off)"))
    mixup_prob: float = _augment(1.0, "share of batches mixed when --mixup or --cutmix is on", decides="weights", legacy=1.0, check=SHARE)
    mixup_switch_prob: float = _augment(0.5, "with both --mixup and --cutmix: share of mixed batches that use CutMix", decides="weights", legacy=0.5, check=SHARE)
    class_weights: str = _augment("none", "weight the loss of each class: balanced, n / (classes x n_class) from the training split's counts", ["none", "balanced"], decides="weights", legacy="none")
    sampler: str = _augment("uniform", "training order: uniform (each image once an epoch) or balanced (each epoch drawn with replacement, classes equally likely; keyed on seed and epoch)", ["uniform", "balanced"], decides="data", legacy="uniform")
    ema_decay: float = _augment(0.0, "keep an exponential moving average of the weights with this decay (0: none; its decay warms up as in timm: min(D, 1 - (1 + updates)^(-2/3))); evaluated beside the weights at each eval", decides="weights", legacy=0.0, check=_rule(lambda v: 0 <= v < 1, "must be in [0, 1) (0: no EMA)"))
    export_ema: bool = _augment(False, "export the EMA weights to model/ instead of the trained ones (needs --ema-decay)", run_only=True)
    max_nonfinite_steps: int = _schedule(25, "stop after this many consecutive steps with non-finite loss or gradients (each is skipped)", run_only=True, check=POSITIVE)
    precision: str = _schedule("auto", "auto: fp16 on CUDA, bf16 on CPUs with bf16 matrix units, else fp32 (VITFOOD_CPU_PRECISION=fp32 or bf16 sets what auto picks on a CPU)", ["auto", *DTYPES])
    eval_steps: int = _eval(100, "evaluate every N optimizer steps (and at the end)", run_only=True, check=POSITIVE)
    save_steps: int = _eval(100, "save a checkpoint every N optimizer steps (and at the end)", run_only=True, check=POSITIVE)
    logging_steps: int = _eval(10, "log training scalars every N optimizer steps", run_only=True, check=POSITIVE)
    save_total_limit: int = _eval(2, "keep the newest N complete checkpoints (the best is kept in addition)", run_only=True, check=POSITIVE)
    best_metric: str = _eval("auto", "the eval figure that picks the best checkpoint (and stops early): auto (top-1 accuracy; multi-label: macro mAP), or the name of any figure in all_results.json without 'eval_'; the loss lower, the others higher", ["auto", "loss", "accuracy", "top5", "balanced_accuracy", "f1_macro", "map", "f1_micro", "exact_match"], decides="weights", legacy="auto")
    early_stopping_patience: int = _eval(0, "stop when this many evals in a row have not improved --best-metric on its best by more than --early-stopping-min-delta (0: never); the stop is part of the run's state, so a resumed run stops at the same step", decides="schedule", legacy=0, check=_rule(lambda v: v >= 0, "must not be negative (0: off)"))
    early_stopping_min_delta: float = _eval(0.0, "the improvement of --best-metric that counts as one for --early-stopping-patience", decides="schedule", legacy=0.0, check=NOT_NEGATIVE)
    export: str = _eval("last", "which weights go to <output-dir>/model at the end", ["last", "best"], run_only=True)
    calibrate: str = _eval("temperature", "at the end, fit one temperature on the eval split (minimising its NLL) and fold it into model/'s last layer, so every tool that loads it gives calibrated scores; none: keep the raw scores", ["temperature", "none"], run_only=True, legacy="none")
    target_accuracy: float | None = _eval(None, "single-label: store in model/ the score threshold whose answers reach this accuracy on the eval split (the most answers that do); vitfood.predict answers 'unknown' below it", run_only=True, legacy=None, check=_rule(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    target_coverage: float | None = _eval(None, "single-label: the same, for the threshold that keeps this share of the eval split's answers", run_only=True, legacy=None, check=_rule(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    output_dir: str | None = _eval(None, "run directory (unset: runs/<timestamp>-<model>-<dataset>)", run_only=True)
    overwrite_output_dir: bool = _eval(False, "allow a fresh run in a directory that already holds checkpoints", run_only=True)
    resume: str | None = _eval(None, "'auto' (newest complete checkpoint of --output-dir, or start fresh) or a checkpoint path", run_only=True)
    device: str = _machine("auto", "auto, cpu, cuda, cuda:N")
    num_workers: int = _machine(-1, "DataLoader worker processes per training process (-1: from the CPU count)", check=_rule(lambda v: v >= -1, "must be -1 (auto) or at least 0"))
    dist_timeout: int = _machine(600, "under torchrun: seconds a rank waits for the others before the job fails", run_only=True, check=POSITIVE)
    seed: int = _machine(42, "seed for the split, initialisation, shuffling and augmentation", decides="data", check=_rule(lambda v: 0 <= v < 2 ** 32, "must be between 0 and 2**32 - 1"))
    preset: str | None = _machine(None, "start from a named preset: demo (offline, minutes on a CPU), demo-multilabel (the same, multi-label), finetune (the recipe levers of the published ViT fine-tunes)", ["demo", "demo-multilabel", "finetune"])

    def eval_batch(self, device):
        # on the CPU inference ran fastest at batch 32, 2x the recipe's (64 fell back by a third); on CUDA a larger
        # batch keeps the GPU busy, and inference needs far less memory per image than training (bench/README.md)
        return self.eval_batch_size or (8 if device.type == "cuda" else 2) * self.batch_size

    def validate(self):
        """Each field by its own rule and choices, then the rules between fields; returns self."""
        for f in dataclasses.fields(self):
            check_option(f.name, getattr(self, f.name))
        from vitfood import adapt, fsdp
        for rule in (_batch_auto, _synthetic_dishes, _targets, _export_ema, _export_best, _streaming, adapt.check,
                     fsdp.check):
            rule(self)
        return self


def check_option(name, value):
    """One line when `value` breaks Config field `name`'s choices or rule (an unset value, or auto where the
    field takes it, passes): the rule vitfood.evaluate applies to its flags of the same names too."""
    meta = Config.__dataclass_fields__[name].metadata
    if value is None or value == "auto" and meta["auto"]:
        return
    if meta["choices"] and value not in meta["choices"]:
        raise UserError(f"--{flag(name)} must be one of {', '.join(meta['choices'])}, got {value!r}")
    if meta["check"] and (says := meta["check"](value)):
        if isinstance(value, float) and not math.isfinite(value) and "finite" not in says:
            says = "must be a finite number"  # nan or inf: not "must be positive"
        raise UserError(f"--{flag(name)} {says}, got {repr(value) if isinstance(value, str) else value}")


# The rules between fields, each one named.
def _batch_auto(cfg):
    if cfg.global_batch == "auto" and cfg.batch_size != "auto":
        raise UserError("--global-batch auto needs --batch-size auto (the largest micro-batch that fits)")


def _synthetic_dishes(cfg):
    if not 1 <= cfg.synthetic_dishes <= min(4, cfg.synthetic_classes):
        raise UserError(f"--synthetic-dishes must be between 1 and 4, and at most --synthetic-classes "
                        f"({cfg.synthetic_classes}), got {cfg.synthetic_dishes}")


def _targets(cfg):
    check_targets(cfg.target_accuracy, cfg.target_coverage)


def check_targets(accuracy, coverage):
    """--target-accuracy and --target-coverage: each by its field's rule, and not both (vitfood.evaluate's too)."""
    check_option("target_accuracy", accuracy)
    check_option("target_coverage", coverage)
    if accuracy is not None and coverage is not None:
        raise UserError("--target-accuracy and --target-coverage exclude each other: give one")


def _export_ema(cfg):
    if cfg.export_ema and not cfg.ema_decay:
        raise UserError("--export-ema needs --ema-decay (the EMA it would export)")
    if cfg.export_ema and cfg.export == "best":
        raise UserError("--export-ema exports the EMA of the last step; it does not combine with --export best")


def _export_best(cfg):
    if cfg.export == "best" and cfg.save_steps % cfg.eval_steps:
        raise UserError(f"--export best needs evals at the saves: --save-steps ({cfg.save_steps}) must be a "
                        f"multiple of --eval-steps ({cfg.eval_steps})")


def _streaming(cfg):
    if not cfg.streaming:
        return
    for bad, what in ((cfg.fold, "--fold"), (cfg.max_train_samples, "--max-train-samples (use --train-samples)"),
                      (cfg.sampler == "balanced", "--sampler balanced"),
                      (cfg.class_weights == "balanced", "--class-weights balanced")):
        if bad:
            raise UserError(f"{what} needs the whole train split at hand; it does not combine with --streaming")


PRESETS = {
    # The levers of the published ViT-B fine-tunes (MAE's FINETUNE.md, timm's augreg, DeiT), not tuned to any data
    # set here; schedule, lr and model stay the guide's (drop path too: HF's ViT has none).
    "finetune": dict(label_smoothing=0.1, mixup=0.8, cutmix=1.0, auto_augment="randaugment", randaugment_ops=2,
                     randaugment_magnitude=9, random_erasing=0.25, layer_decay=0.65, weight_decay=0.05),
    # Offline demo: the generated Food-101-shaped set and ViT-Ti/16 at 112 px; a few minutes on 2 CPU cores.
    "demo": dict(dataset="synthetic", train_split="train", model="vit-tiny", image_size=112,
                 max_steps=300, batch_size=32, lr=1e-3, weight_decay=0.05, warmup_steps=30,
                 eval_steps=100, save_steps=100, logging_steps=10),
}
# The offline demo, multi-label: plates of 1 to 3 dishes (smaller files: generated in a quarter of the time), 450
# steps at lr 6e-4 (1e-3 and 2e-3 learned slower): macro mAP 0.93-0.95 over 3 seeds (bench/README.md).
PRESETS["demo-multilabel"] = dict(PRESETS["demo"], synthetic_dishes=3, synthetic_max_px=256, max_steps=450, lr=6e-4,
                                  eval_steps=150, save_steps=150)


def flag(name):
    return name.replace("_", "-")


def _base_type(tp):
    """int | None -> int; the type a flag's string is parsed with."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp


def _parse_none(tp):
    def parse(text):
        if text.lower() in ("none", "null", ""):
            return None
        return tp(text)
    parse.__name__ = tp.__name__  # argparse names the type in its error messages
    return parse


def _int_or_auto(text):
    return "auto" if text == "auto" else int(text)


_int_or_auto.__name__ = "int"  # argparse names the type in its error messages


# transformers.TrainingArguments' names for vitfood's flags: what a Trainer user types first
TRAINER_NAMES = {"--learning-rate": "--lr", "--learning_rate": "--lr", "--num-train-epochs": "--epochs",
                 "--num_train_epochs": "--epochs", "--per-device-train-batch-size": "--batch-size",
                 "--per_device_train_batch_size": "--batch-size", "--per-device-eval-batch-size": "--eval-batch-size",
                 "--per_device_eval_batch_size": "--eval-batch-size", "--gradient-accumulation-steps": "--grad-accum-steps",
                 "--gradient_accumulation_steps": "--grad-accum-steps", "--fp16": "--precision fp16",
                 "--bf16": "--precision bf16", "--dataloader-num-workers": "--num-workers",
                 "--dataloader_num_workers": "--num-workers", "--resume-from-checkpoint": "--resume",
                 "--resume_from_checkpoint": "--resume"}


class OneLineParser(argparse.ArgumentParser):
    """Every entry point's parser: no abbreviations (argparse would read --epoch 2 as --epochs 2 without a word;
    a misspelling gets "did you mean" instead), and an error is one line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):  # one line, no usage block; same exit path as every other input error
        if message.startswith("unrecognized arguments: "):
            import difflib
            flags = [a.split("=")[0] for a in message.split(": ", 1)[1].split() if a.startswith("--")]
            known = [o for o in self._option_string_actions if o.startswith("--")]
            for f in flags:
                near = TRAINER_NAMES.get(f) or next(iter(difflib.get_close_matches(f.replace("_", "-"), known, 1)), None)
                if near:
                    message += f"; did you mean {near}?"
                    break
        raise UserError(f"{message} (see --help)")


def build_parser(run=True):
    """The flags of every Config field (`run` False: those that mean something to a run only are accepted but
    not listed)."""
    p = OneLineParser(prog="python -m vitfood.train", description=__doc__,
                                argument_default=argparse.SUPPRESS,  # only flags actually given appear
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON or YAML file of option values (flags override it)")
    hints = typing.get_type_hints(Config)
    sections = {title: p.add_argument_group(title) for title in GROUPS}
    for f in dataclasses.fields(Config):
        tp = _base_type(hints[f.name])
        kw = dict(help=f"{f.metadata['help']} (default: {f.default})")
        if f.metadata["run_only"] and not run:
            kw["help"] = argparse.SUPPRESS  # accepted, so one set of flags serves train and bench, but not listed
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif f.metadata.get("auto"):
            kw["type"] = _int_or_auto
        else:
            kw["type"] = _parse_none(tp) if f.default is None else tp
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
        sections[f.metadata["group"]].add_argument("--" + flag(f.name), dest=f.name, **kw)
    return p


def _coerce(name, value, hints, path):
    """Check a value from a config file against the field's type."""
    tp = _base_type(hints[name])
    if value is None and hints[name] is not tp:
        return None
    if value == "auto" and Config.__dataclass_fields__[name].metadata.get("auto"):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"config file {path}: '{name}' must be {tp.__name__}, got {value!r}")
    return value


# Derived once from the fields' metadata:
# what cannot change under a resumed run (besides the global batch, which its data position checks)
FIXED_ON_RESUME = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["decides"] in ("weights", "data"))
# what a run's own train_config.json must hold: one without it was edited by hand and is refused, rather than
# filled in with defaults (a deleted max_steps would turn 30 steps into 252)
RUN_KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["decides"] and "legacy" not in f.metadata)
# options added after the first release, as runs written before them behaved
LEGACY = {f.name: f.metadata["legacy"] for f in dataclasses.fields(Config) if "legacy" in f.metadata}


def _decode(path, data):
    """The text of a config file: UTF-8, or UTF-16/UTF-8 with a byte-order mark (as some editors and
    PowerShell write)."""
    for bom, codec in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            break
    else:
        codec = "utf-8"
    try:
        return data.decode(codec)
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not text in UTF-8 (or UTF-16 with a byte-order mark): "
                        f"byte {e.start} is {data[e.start:e.start + 1]!r}") from None


def read_config_file(path, run=False):
    """Option values from a JSON or YAML file; `run`: it is a run's own train_config.json."""
    if os.path.isdir(path):
        raise UserError(f"config file {path} is a folder: give a JSON or YAML file")
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            text = _decode(path, fh.read())
    except OSError as e:
        raise UserError(f"config file {path} cannot be read: {e.strerror or e}") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:
        raise UserError(f"config file {path} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: {first_line(e)}")
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    hints = typing.get_type_hints(Config)
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise UserError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    if run:
        missing = [k for k in RUN_KEYS if k not in values]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}, which decide the run (edited by hand?); "
                            "put them back, or start a new run")
        values = {**LEGACY, **values}
    return {k: _coerce(k, v, hints, path) for k, v in values.items()}


def resolve(explicit, base=None):
    """Config from explicit flags (a dict) over base values (a dict, e.g. a saved run's). An explicit
    --epochs clears a max_steps that came from the preset, a config file or the saved run."""
    values = {}
    if base is None:
        preset = explicit.get("preset")
        if preset is not None:
            values.update(PRESETS[preset])
        if explicit.get("config"):
            values.update(read_config_file(explicit["config"]))
            preset = values.get("preset", preset)
            if preset is not None and preset not in PRESETS:
                raise UserError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
            if "preset" in values and "preset" not in explicit:  # a preset named in the file applies under the file
                values = {**PRESETS[preset], **values}
    else:
        values.update(base)
    if "epochs" in explicit and "max_steps" not in explicit:
        values["max_steps"] = None  # max_steps would override the --epochs the user asked for
    preset = PRESETS.get(values.get("preset") or "", {})
    if base is None and "model" in explicit and "image_size" in preset and values.get("image_size") == preset["image_size"] \
            and "image_size" not in explicit:
        values["image_size"] = None  # a preset's image size belongs to the preset's model
    flags = {k: v for k, v in explicit.items() if k != "config"}
    if base is not None and flags.get("batch_size") == "auto":  # a resumed run keeps the split it chose
        flags.pop("batch_size")
        flags.pop("global_batch", None)
    if flags.get("batch_size", values.get("batch_size")) == "auto" and flags.get("global_batch",
                                                                                 values.get("global_batch")) is None:
        # the global batch the run would have had: auto changes how it is split, not its size
        prior = values.get("batch_size", Config.batch_size)
        prior = Config.batch_size if prior == "auto" else prior
        accum = flags.get("grad_accum_steps", values.get("grad_accum_steps", Config.grad_accum_steps))
        values["global_batch"] = prior * accum * int(os.environ.get("WORLD_SIZE", "1"))
    values.update(flags)
    return Config(**values).validate()


def to_dict(cfg):
    return dataclasses.asdict(cfg)




def saved_run(path):
    """A run's own options from its train_config.json at `path`, less where it runs and whether it resumes (the
    command line says those)."""
    return {k: v for k, v in read_config_file(path, run=True).items() if k not in ("resume", "output_dir")}


def run_config_path(model_path):
    """The train_config.json of the run a model/ or checkpoint-<step>/ folder, or a file of its export/ folder,
    belongs to, or None."""
    folder = os.path.abspath(os.path.expanduser(model_path))
    if os.path.isfile(folder):  # export/model.onnx
        folder = os.path.dirname(folder)
    path = os.path.join(os.path.dirname(folder), RUN_CONFIG)
    return path if os.path.isfile(path) else None
