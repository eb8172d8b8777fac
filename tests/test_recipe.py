"""The fine-tuning levers of timm's recipes: label smoothing, an EMA of the weights."""

import json

import pytest
import torch

from conftest import killed_and_resumed, same, train, weights
from vitfood import checkpoint
from vitfood.common import UserError
from vitfood.steps import EMA, Mixing

LEVERS = ["--label-smoothing", "0.1", "--mixup", "0.8", "--cutmix", "1.0", "--ema-decay", "0.9", "--export-ema",
          "--auto-augment", "randaugment", "--random-erasing", "0.25", "--layer-decay", "0.75"]


def test_the_ema_is_a_warmed_up_moving_average_updated_in_place():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.99)
    start = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()  # update 1: decay min(0.99, 1 - 2^(-2/3)) = 0.370
    d = 1 - 2 ** (-2 / 3)
    for mine, was, theirs in zip(ema.model.parameters(), start, model.parameters()):
        assert torch.allclose(mine, d * was + (1 - d) * theirs)
        assert not mine.requires_grad
    for _ in range(10_000):
        ema.update()
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()  # warmed up: the average moves 1 - 0.99 of the way to the weights
    for mine, was, theirs in zip(ema.model.parameters(), before, model.parameters()):
        assert torch.allclose((mine - was) / (theirs - was), torch.full_like(mine, 0.01), rtol=1e-3)
    again = EMA(torch.nn.Linear(3, 2), 0.99)
    again.load_state_dict(ema.state_dict())
    assert again.updates == ema.updates and same(again.model.state_dict(), ema.model.state_dict())


@pytest.mark.parametrize("augment", ["randaugment", "trivialaugment"])
def test_augmentations_are_keyed_on_the_sample_and_leave_the_global_generator_alone(augment):
    import random

    import numpy as np
    from PIL import Image
    from vitfood.images import TrainTransform
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    plain = TrainTransform(height=32, width=32)
    strong = TrainTransform(height=32, width=32, auto_augment=augment, erasing=1.0)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a, b = (strong(img, random.Random("42-0-7")) for _ in range(2))
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32) and torch.equal(a, b)  # the same sample, the same crop
    assert not torch.equal(a, plain(img, random.Random("42-0-7")))  # and it did augment
    assert not torch.equal(a, strong(img, random.Random("42-0-8")))
    assert torch.equal(before, torch.get_rng_state())  # dropout's stream is untouched (0 workers run it here)


def test_mixing_is_keyed_soft_and_whole():
    mixing = Mixing(0.8, 1.0, 1.0, 0.5, 0.1, 4, seed=42)
    images, labels = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    seen, cuts, mixups = set(), 0, 0
    for step in range(40):
        a, ta = mixing.at(step, 0)(images, labels)
        b, tb = mixing.at(step, 0)(images, labels)
        assert torch.equal(a, b) and torch.equal(ta, tb)  # keyed: the same draw again after a resume
        assert torch.allclose(ta.sum(-1), torch.ones(5)) and ta.min() >= 0.1 / 4 - 1e-6
        lam = ta[0, 0].item()  # image 0 (class 0) mixed with image 4 (class 0) reversed: stays class 0
        seen.add(round(lam, 3))
        cut = torch.isclose(a, images) | torch.isclose(a, images.flip(0))
        if torch.equal(a, images):
            continue  # not mixed at this step
        if cut.all():  # CutMix: each pixel from one image or the other, and the targets say how much of each
            cuts += 1
            share = (torch.isclose(a[1], images[1]) & ~torch.isclose(a[1], images[3])).float().mean().item()
            assert ta[1, 1].item() == pytest.approx(0.9 * share + 0.1 / 4, abs=0.05)
        else:  # mixup: image 1 blends with image 3, and so do their targets
            mixups += 1
            lam = ta[1, 1].item() / 0.9 - 0.1 / 4 / 0.9
            assert torch.allclose(a[1], lam * images[1] + (1 - lam) * images[3], atol=1e-3)
    assert cuts and mixups  # both were drawn (--mixup-switch-prob 0.5)
    assert len(seen) == 1  # image 0 and its partner share a class: smoothing alone
    one, t1 = mixing.at(0, 1)(images[:1], labels[:1])  # a one-image micro-batch mixes with itself
    assert torch.allclose(one, images[:1]) and torch.allclose(t1.sum(), torch.tensor(1.0))


def test_levers_are_recorded_evaluated_and_exported(tmp_path):
    out = tmp_path / "run"
    results = train("--max-steps", 6, "--eval-steps", 3, "--save-steps", 3, *LEVERS, "--calibrate", "none",
                    "--output-dir", out)
    assert {"eval_ema_accuracy", "eval_ema_loss"} <= results.keys()
    assert results["eval_loss"] == results["eval_ema_loss"]  # --export-ema: the exported model is the EMA
    state = torch.load(out / "checkpoint-6" / checkpoint.STATE, weights_only=True)
    from transformers import AutoModelForImageClassification
    exported = AutoModelForImageClassification.from_pretrained(out / "model").state_dict()
    assert state["ema"]["updates"] == 6 and same(exported, state["ema"]["weights"])
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["label_smoothing"] == 0.1 and saved["ema_decay"] == 0.9 and saved["export_ema"] is True
    card = (out / "model" / "README.md").read_text()
    assert "label smoothing 0.1; mixup 0.8, cutmix 1 (probability 1, cutmix share 0.5); EMA of the weights, decay " \
           "0.9; exported: the EMA weights; layer decay 0.75; drop path 0" in card
    assert "horizontal flip, RandAugment (2 ops, magnitude 9), random erasing (p 0.25); eval" in card
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(out)).Reload().Tags()["scalars"]
    assert {"accuracy/top1_ema", "loss/eval_ema", "accuracy/top1", "optim/lr", "optim/lr_lowest"} <= set(tags)
    lr, lowest = (EventAccumulator(str(out)).Reload().Scalars(t)[0].value for t in ("optim/lr", "optim/lr_lowest"))
    assert lowest == pytest.approx(lr * 0.75 ** 3)  # vit-micro: embeddings, 2 blocks, then the head


@pytest.mark.slow
def test_a_run_with_the_levers_resumes_bit_exact_after_kill_9(tmp_path, cache_dir):
    ref, out = killed_and_resumed(tmp_path, *LEVERS)  # killed as checkpoint-5 is renamed into place
    assert same(weights(out), weights(ref))
    for name in ("ema", "optimizer"):
        a = torch.load(ref / "checkpoint-12" / checkpoint.STATE, weights_only=True)[name]
        b = torch.load(out / "checkpoint-12" / checkpoint.STATE, weights_only=True)[name]
        assert json.dumps(a, default=lambda t: t.tolist()) == json.dumps(b, default=lambda t: t.tolist()), name


def test_layer_decay_scales_each_block_and_keeps_norms_and_biases_undecayed():
    from vitfood.config import Config
    from vitfood.model import build_model, make_optimizer
    model, _ = build_model(Config(model="vit-micro"), ["a", "b"])
    optimizer = make_optimizer(model, Config(model="vit-micro", lr=1.0, weight_decay=0.05, layer_decay=0.5))
    names = {p: n for n, p in model.named_parameters()}
    lr_of = {names[p]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert lr_of["classifier.weight"] == (1.0, 0.05) and lr_of["classifier.bias"] == (1.0, 0.0)
    assert lr_of["vit.layernorm.weight"] == (1.0, 0.0)
    assert lr_of["vit.layers.1.mlp.fc1.weight"] == (0.5, 0.05) and lr_of["vit.layers.0.mlp.fc1.weight"] == (0.25, 0.05)
    assert lr_of["vit.embeddings.cls_token"][0] == lr_of["vit.embeddings.patch_embeddings.projection.weight"][0] == 0.125
    assert len(lr_of) == len(names)


def test_drop_path_reaches_a_family_that_has_it_and_is_refused_where_there_is_none(tmp_path):
    import transformers as t
    from vitfood.config import Config
    from vitfood.model import build_model
    config = t.BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8, num_labels=3)
    t.BeitForImageClassification(config).save_pretrained(tmp_path / "beit")
    t.BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(tmp_path / "beit")
    model, _ = build_model(Config(model=str(tmp_path / "beit"), drop_path=0.1), ["a", "b"])
    assert model.config.drop_path_rate == 0.1
    with pytest.raises(UserError, match="--drop-path: vit-micro is a ViTConfig, which has no stochastic depth"):
        build_model(Config(model="vit-micro", drop_path=0.1), ["a", "b"])
    swin = t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
    with pytest.raises(UserError, match="--layer-decay applies to the ViT family .* SwinForImageClassification"):
        from vitfood.model import layer_ids
        layer_ids(t.SwinForImageClassification(swin))


@pytest.mark.parametrize("args, message", [
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["--ema-decay", "-0.1"], "--ema-decay must be in [0, 1)"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["--export-ema"], "--export-ema needs --ema-decay"),
    (["--mixup", "-1"], "--mixup must be a finite alpha >= 0"),
    (["--cutmix", "nan"], "--cutmix must be a finite alpha >= 0"),
    (["--mixup-prob", "1.5"], "--mixup-prob must be between 0 and 1"),
    (["--auto-augment", "autoaugment"], "argument --auto-augment: invalid choice"),
    (["--randaugment-magnitude", "31"], "--randaugment-magnitude must be between 0 and 30, got 31"),
    (["--randaugment-ops", "0"], "--randaugment-ops must be a positive integer, got 0"),
    (["--random-erasing", "2"], "--random-erasing must be between 0 and 1"),
    (["--layer-decay", "0"], "--layer-decay must be in (0, 1]"),
    (["--drop-path", "1"], "--drop-path must be in [0, 1)"),
])
def test_bad_lever_values_are_one_line(args, message):
    """Each refused before any work, in one line."""
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        train(*args)


def test_the_finetune_preset_turns_the_levers_on_and_flags_still_win():
    from vitfood.config import build_parser, resolve
    cfg = resolve(vars(build_parser().parse_args(["--preset", "finetune", "--mixup", "0.2"])))
    assert (cfg.label_smoothing, cfg.cutmix, cfg.layer_decay, cfg.auto_augment) == (0.1, 1.0, 0.65, "randaugment")
    assert cfg.mixup == 0.2 and cfg.model == "google/vit-base-patch16-224-in21k" and cfg.drop_path == 0
