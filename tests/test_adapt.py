"""A frozen backbone, LoRA, gradient checkpointing, --image-size for pretrained models, and the
image-classification families of transformers, each through train, resume, export, predict, evaluate and
the pipeline. Every model is a tiny random config saved as a local folder (no download)."""

import json
import os

import pytest
import torch
import transformers as t
from PIL import Image
from safetensors.torch import load_file

from conftest import killed_and_resumed, resumed_copy, same, train
from vitfood import checkpoint
from vitfood.common import run_main

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)
# family: (model class, config, image processor)
FAMILIES = {
    "vit": (t.ViTForImageClassification, lambda: t.ViTConfig(**SMALL),
            lambda: t.ViTImageProcessor(size={"height": 32, "width": 32})),
    "deit": (t.DeiTForImageClassification, lambda: t.DeiTConfig(**SMALL),
             lambda: t.DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32})),
    "beit": (t.BeitForImageClassification, lambda: t.BeitConfig(**SMALL, use_relative_position_bias=True),
             lambda: t.BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)),
    "dinov2": (t.Dinov2ForImageClassification,
               lambda: t.Dinov2Config(**{k: v for k, v in SMALL.items() if k != "intermediate_size"}, mlp_ratio=2),
               lambda: t.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})),
    "swin": (t.SwinForImageClassification,
             lambda: t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                  window_size=4),
             lambda: t.ViTImageProcessor(size={"height": 32, "width": 32})),
    "convnext": (t.ConvNextForImageClassification,
                 lambda: t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32),
                 lambda: t.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)),
    "resnet": (t.ResNetForImageClassification, lambda: t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                                      depths=[1, 1]),
               lambda: t.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)),
}
# TINY's data and recipe, 6 steps, checkpoints every 3, every family in bf16 (the eval path that once crashed)
SHORT = ["--max-steps", "6", "--eval-steps", "3", "--save-steps", "3", "--precision", "bf16"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{family: a local model folder}, as a user's downloaded checkpoint would be."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family, (cls, config, processor) in FAMILIES.items():
        torch.manual_seed(0)
        cls(config()).save_pretrained(root / family)
        processor().save_pretrained(root / family)
        out[family] = root / family
    return out


def run(out, *args):
    return train(*SHORT, *map(str, args), "--output-dir", out)


def resumed(out, tmp_path, *args):
    """The run in `out` resumed from its first checkpoint in a copy (as if killed after it): the copy's path."""
    return resumed_copy(out, tmp_path / "resumed", *SHORT, *map(str, args))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_resumes_exports_predicts_evaluates_and_pipelines(family, folders, tmp_path):
    out = tmp_path / "run"
    results = run(out, "--model", folders[family])
    assert results["global_step"] == 6
    assert same(load_file(resumed(out, tmp_path, "--model", folders[family]) / "model" / "model.safetensors"),
                load_file(out / "model" / "model.safetensors"))
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 80, 20)).save(image)
    from vitfood.predict import main as predict
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        predict(["--model", str(out / "model"), "--json", "--precision", "fp32", str(image)])
    ours = json.loads(printed.getvalue())["predictions"][0]
    clf = t.pipeline("image-classification", model=str(out / "model"), device="cpu")
    theirs = clf(str(image))[0]
    assert ours["label"] == theirs["label"] and ours["score"] == pytest.approx(theirs["score"], abs=1e-4)
    from vitfood.evaluate import main as evaluate
    with contextlib.redirect_stdout(io.StringIO()):
        evaluated = evaluate(["--model", str(out / "model"), "--output-dir", str(tmp_path / "eval")])
    assert evaluated["eval_accuracy"] == pytest.approx(results["eval_accuracy"], abs=0.05)


@pytest.mark.parametrize("how", ["--freeze-backbone", "--lora-rank=4", "--gradient-checkpointing"])
def test_adapted_runs_resume_bit_exact(how, tmp_path):
    out = tmp_path / "run"
    run(out, "--model", "vit-micro", how)
    state = torch.load(out / "checkpoint-6" / checkpoint.STATE, weights_only=True)
    if how == "--lora-rank=4":  # the checkpoint holds what trains: the adapters and the head
        assert sorted(p.name for p in (out / "checkpoint-6").iterdir() if "safetensors" in p.name) == \
            ["adapter_model.safetensors"]
    copy = resumed(out, tmp_path, "--model", "vit-micro", how)
    assert same(load_file(copy / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors"))
    again = torch.load(copy / "checkpoint-6" / checkpoint.STATE, weights_only=True)
    assert json.dumps(state["optimizer"], default=lambda x: x.tolist()) == \
        json.dumps(again["optimizer"], default=lambda x: x.tolist())


def test_a_frozen_resnet_keeps_its_batch_norm_statistics_and_a_lora_checkpoint_is_not_a_model(folders, tmp_path):
    out = tmp_path / "run"
    run(out, "--model", folders["resnet"], "--freeze-backbone")
    before = load_file(folders["resnet"] / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if "classifier" not in k)  # buffers too
    run(tmp_path / "lora", "--model", "vit-micro", "--lora-rank", "4")
    with pytest.raises(SystemExit):
        from vitfood.predict import main as predict
        run_main(lambda: predict(["--model", str(tmp_path / "lora" / "checkpoint-6"), str(tmp_path)]))


def test_a_frozen_backbone_trains_the_head_alone_and_the_optimizer_holds_only_it(tmp_path):
    out = tmp_path / "run"
    run(out, "--model", "vit-micro", "--freeze-backbone")
    first, last = (load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (3, 6))
    changed = {k for k in first if not torch.equal(first[k], last[k])}
    assert changed == {"classifier.weight", "classifier.bias"}, changed
    state = torch.load(out / "checkpoint-6" / checkpoint.STATE, weights_only=True)["optimizer"]
    assert sum(s["exp_avg"].numel() for s in state["state"].values()) == sum(last[k].numel() for k in changed)


def test_lora_exports_a_plain_merged_model_and_its_adapter_beside_it(tmp_path):
    out = tmp_path / "run"
    run(out, "--model", "vit-micro", "--lora-rank", "4")
    exported = load_file(out / "model" / "model.safetensors")
    assert not any("lora" in k or "base_model" in k for k in exported)
    assert json.loads((out / "model" / "config.json").read_text())["architectures"] == ["ViTForImageClassification"]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k for k in adapter) and any(k.endswith("classifier.weight") for k in adapter)
    # merged: the exported q_proj is the base weight plus B @ A x alpha / rank, the base being the initial one
    base = load_file(out / "checkpoint-3" / "adapter_model.safetensors")
    assert any(not torch.equal(base[k], adapter[k]) for k in adapter if "lora_B" in k)  # the adapters trained
    card = (out / "model" / "README.md").read_text()
    assert "LoRA adapters (rank 4" in card


def test_a_finished_lora_run_with_ema_resumed_exports_a_damaged_adapter_and_model_again(tmp_path, capsys):
    """Neither folder shares a checkpoint's bytes (merged; the EMA's): resumed, the run writes both again, the same."""
    out = tmp_path / "run"
    args = ["--model", "vit-micro", "--lora-rank", "4", "--ema-decay", "0.9", "--export-ema"]
    run(out, *args)
    files = [out / "adapter" / "adapter_model.safetensors", out / "model" / "model.safetensors"]
    before = [f.read_bytes() for f in files]
    for f in files:
        f.write_bytes(f.read_bytes()[:-1] + b"x")
    run(out, *args, "--resume", "auto")
    said = capsys.readouterr().out
    assert "adapter/ is damaged" in said and "model/ is damaged" in said
    assert [f.read_bytes() for f in files] == before
    assert sorted(p.name.split("-")[0] for p in out.iterdir() if ".damaged-" in p.name) == ["adapter.damaged", "model.damaged"]


def test_gradient_checkpointing_gives_the_same_loss(tmp_path):
    plain = run(tmp_path / "a", "--model", "vit-micro", "--precision", "fp32")
    ckpt = run(tmp_path / "b", "--model", "vit-micro", "--precision", "fp32", "--gradient-checkpointing")
    assert ckpt["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("family", ["vit", "beit", "dinov2", "convnext"])
def test_image_size_resizes_a_pretrained_model_once_at_load(family, folders, tmp_path):
    out = tmp_path / "run"
    run(out, "--model", folders[family], "--image-size", "48")
    config = json.loads((out / "model" / "config.json").read_text())
    processor = json.loads((out / "model" / "preprocessor_config.json").read_text())
    shown = processor["crop_size"] if processor.get("do_center_crop") else processor["size"]
    assert config["image_size"] == 48 and 48 in shown.values()  # resized and cropped alike: its crop ratio stays
    clf = t.pipeline("image-classification", model=str(out / "model"), device="cpu")
    assert clf(Image.new("RGB", (60, 50)))[0]["label"]  # runs at 48 px
    if family == "vit":  # the position embeddings: [CLS] + a 6 x 6 grid (was 4 x 4)
        assert load_file(out / "model" / "model.safetensors")["vit.embeddings.position_embeddings"].shape[1] == 37


@pytest.mark.parametrize("args, message", [
    (["--freeze-backbone", "--lora-rank", "4"], "exclude each other"),
    (["--lora-rank", "-1"], "--lora-rank must be at least 1"),
    (["--lora-rank", "4", "--lora-targets", "query"], "query name no Linear, Conv2d or Embedding layer of ViTFor"),
    (["--gradient-checkpointing", "--freeze-backbone"], "nothing to recompute"),
    (["--image-size", "30"], "multiple of the patch size 8"),
    (["--lora-rank", "4", "--lora-targets", "classifier"], "classifier name no Linear, Conv2d or Embedding layer"),
    (["--lora-rank", "4", "--lora-targets", "layernorm_before"], "layernorm_before name no Linear"),
    (["--class-weights", "balanced", "--sampler", "balanced"], "corrects the imbalance twice"),
])
def test_bad_combinations_are_one_line_before_any_work(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VITFOOD_CACHE", str(tmp_path / "cache"))  # where the data set would be generated
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train(*args, "--output-dir", tmp_path / "run"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # no data read, no run folder


@pytest.mark.parametrize("family, args, message", [
    ("resnet", ["--gradient-checkpointing"], "ResNetForImageClassification has no gradient checkpointing"),
    ("convnext", ["--lora-rank", "4"], "the default targets q_proj, v_proj name no Linear, Conv2d or Embedding layer of ConvNext"),
    ("swin", ["--layer-decay", "0.7"], "SwinForImageClassification is not one"),
    ("vit", ["--drop-path", "0.1"], "ViTConfig has no stochastic depth"),
])
def test_what_a_family_lacks_is_one_line(family, args, message, folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train(*args, "--model", folders[family], "--output-dir", tmp_path / "run"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in lines[-1] and not any("Traceback" in l for l in lines), lines


@pytest.mark.parametrize("family, how", [("swin", "--lora-rank=4"), ("resnet", "--freeze-backbone"),
                                         ("beit", "--gradient-checkpointing")])
def test_adaptations_on_other_families_in_fp32_resume_bit_exact(family, how, folders, tmp_path):
    args = ["--model", folders[family], "--precision", "fp32", how]
    out = tmp_path / "run"
    run(out, *args)
    copy = resumed(out, tmp_path, *args)
    assert same(load_file(copy / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors"))


@pytest.mark.parametrize("family, precision", [("convnext", "fp32"), ("resnet", "bf16"), ("swin", "bf16")])
def test_multi_label_on_other_families_resumes_bit_exact(family, precision, folders, tmp_path):
    args = ["--model", folders[family], "--precision", precision, "--synthetic-dishes", "3", "--mixup", "0.8"]
    out = tmp_path / "run"
    results = run(out, *args)
    assert {"eval_map", "eval_exact_match"} <= results.keys() and "eval_accuracy" not in results
    assert json.loads((out / "model" / "config.json").read_text())["problem_type"] == "multi_label_classification"
    copy = resumed(out, tmp_path, *args)
    assert same(load_file(copy / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors"))


def _killed_and_resumed_is_the_same(tmp_path, *args):
    """A run killed -9 as checkpoint-5 is renamed in, then --resume auto, ends with the weights of one never
    killed."""
    ref, killed = killed_and_resumed(tmp_path, *args)
    assert same(load_file(killed / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("how", [["--freeze-backbone"], ["--lora-rank", "4"], ["--gradient-checkpointing"],
                                 ["--sampler", "balanced"], ["--class-weights", "balanced"],
                                 ["--synthetic-dishes", "3", "--mixup", "0.8"]])
def test_new_options_resume_bit_exact_after_kill_9(how, tmp_path, cache_dir):
    _killed_and_resumed_is_the_same(tmp_path, *how)


@pytest.mark.slow
@pytest.mark.parametrize("family, precision", [("resnet", "bf16"), ("swin", "fp32")])
def test_multi_label_on_other_families_resumes_bit_exact_after_kill_9(family, precision, folders, tmp_path):
    _killed_and_resumed_is_the_same(tmp_path, "--model", folders[family], "--precision", precision,
                                    "--synthetic-dishes", "3")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_to_onnx_and_passes_the_gate(family, folders, tmp_path):
    from vitfood import export
    out = tmp_path / "run"
    run(out, "--model", folders[family])
    parity = export.main([str(out), "--int8", "--max-int8-drop", "1"])  # a 6-step random model: int8 may drift
    assert parity["models"]["onnx"]["passed"] and parity["models"]["onnx"]["max_prob_diff"] <= 1e-3
    assert (out / "export" / "model-int8.onnx").is_file() and parity["images"] > 0


@pytest.mark.slow
def test_a_lora_checkpoint_exports_merged_as_the_run_s_model_does(folders, tmp_path, capsys):
    """A LoRA checkpoint holds the adapters and the head: export loads them into the base and merges them, and
    the file equals the one from model/ (where training merged them) at the same step."""
    import numpy as np
    import onnxruntime as ort
    from conftest import error
    from vitfood import export
    out = tmp_path / "lora"
    run(out, "--model", folders["vit"], "--lora-rank", "4", "--calibrate", "none")  # model/ as trained
    export.main([str(out), "--checkpoint", "last"])
    os.rename(out / "export", out / "from-checkpoint")
    export.main([str(out)])
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    a, b = (ort.InferenceSession(str(out / d / "model.onnx")).run(None, {"pixel_values": x})[0]
            for d in ("from-checkpoint", "export"))
    assert np.abs(a - b).max() < 1e-5
    run(tmp_path / "random", "--model", "vit-micro", "--lora-rank", "4")  # a named shape: its base is random
    assert "export the run's model/" in error(capsys, tmp_path / "random", "--checkpoint", "last", main=export.main)
