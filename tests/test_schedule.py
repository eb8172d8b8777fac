"""A run that stops itself and fits the machine: early stopping on a chosen figure, the head trained alone
before the whole model (--freeze-epochs), --batch-size auto, and test-time augmentation."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import error, events, killed_and_resumed, resumed_copy, same, train, weights
from vitfood import checkpoint

# evals every 2 steps; a min-delta no figure can beat: the first eval stays the best, the third after it stops
PLATEAU = ["--max-steps", 40, "--eval-steps", 2, "--save-steps", 2, "--early-stopping-patience", 2,
           "--early-stopping-min-delta", 1.0]


def state(folder):
    return torch.load(folder / checkpoint.STATE, weights_only=True)


@pytest.fixture(scope="module")
def plateau_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plateau") / "run"
    return out, train(*PLATEAU, "--output-dir", out)


def test_early_stopping_stops_at_the_eval_that_exhausts_the_patience(plateau_run, capsys):
    out, results = plateau_run
    assert results["global_step"] == 6 and results["best_metric"] == "accuracy"  # evals at 2, 4, 6
    assert results["stopped_early"].startswith("accuracy has not improved by more than 1 for 2 evals")
    assert "best" in results["stopped_early"] and "at step 2" in results["stopped_early"]
    assert [h["step"] for h in state(out / "checkpoint-6")["progress"]["history"]] == [2, 4, 6]
    assert "Training stopped early at step 6" in (out / "model" / "README.md").read_text()
    ea = events(out)
    assert "run/end_status" not in ea.Tags()["scalars"]  # the status is a word: text, and HParams' own
    assert "stopped early" in ea.Tensors("run/status")[-1].tensor_proto.string_val[0].decode()
    assert train(*PLATEAU, "--output-dir", out, "--resume", "auto") is None  # finished: nothing to do
    assert "stopped early" in capsys.readouterr().out


def test_a_run_resumed_before_its_early_stop_stops_at_the_same_step_with_the_same_weights(plateau_run, tmp_path):
    out, results = plateau_run
    copy = resumed_copy(out, tmp_path / "copy", *PLATEAU, later=("checkpoint-6",))  # resumes at step 4
    again = json.loads((copy / "all_results.json").read_text())
    assert again["global_step"] == 6 and again["stopped_early"] == results["stopped_early"]
    assert same(weights(copy), weights(out))


def test_best_metric_loss_keeps_the_lowest_loss_and_a_figure_the_run_lacks_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    results = train("--max-steps", 12, "--eval-steps", 2, "--save-steps", 2, "--best-metric", "loss",
                    "--save-total-limit", 1, "--export", "best", "--output-dir", out)
    history = state(out / "checkpoint-12")["progress"]["history"]
    lowest = min(history, key=lambda h: h["loss"])
    best = json.loads((out / checkpoint.BEST).read_text())
    assert best["step"] == lowest["step"] and best["eval_loss"] == lowest["loss"]
    assert results["exported_step"] == lowest["step"] and results["best_metric"] == "loss"
    assert (out / f"checkpoint-{lowest['step']}").is_dir()  # kept past --save-total-limit 1
    assert "use auto or one of loss, accuracy, top5" in error(capsys, "--best-metric", "map", "--max-steps", 2,
                                                             "--output-dir", tmp_path / "map")
    assert "needs evals before the end" in error(capsys, "--early-stopping-patience", 3, "--max-steps", 4,
                                                 "--eval-steps", 4, "--output-dir", tmp_path / "none")


@pytest.mark.slow
def test_early_stopping_survives_kill_9(tmp_path):
    ref, killed = killed_and_resumed(tmp_path, "--eval-steps", 2, "--early-stopping-patience", 2,
                                     "--early-stopping-min-delta", 1.0)
    a, b = (json.loads((d / "all_results.json").read_text()) for d in (ref, killed))
    assert a["global_step"] == b["global_step"] == 6 and a["stopped_early"] == b["stopped_early"]
    assert same(weights(ref), weights(killed))


# ---- the head first, then the whole model
FREEZE = ["--max-steps", 8, "--eval-steps", 4, "--save-steps", 2, "--freeze-steps", 4, "--logging-steps", 1]


@pytest.fixture(scope="module")
def freeze_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("freeze") / "run"
    return out, train(*FREEZE, "--save-total-limit", 4, "--output-dir", out)


def test_the_backbone_unfreezes_at_the_set_step_and_the_optimizer_holds_it_only_after(freeze_run):
    out, _ = freeze_run
    at = {step: load_file(out / f"checkpoint-{step}" / "model.safetensors") for step in (2, 4, 6)}
    backbone = [k for k in at[2] if not k.startswith("classifier")]
    assert all(torch.equal(at[2][k], at[4][k]) for k in backbone)  # frozen up to the switch
    assert not torch.equal(at[2]["classifier.weight"], at[4]["classifier.weight"])  # the head trained
    assert not all(torch.equal(at[4][k], at[6][k]) for k in backbone)  # the whole model after it
    held = {step: len(state(out / f"checkpoint-{step}")["optimizer"]["state"]) for step in (4, 6)}
    assert held[4] == 2 and held[6] == len(at[6])  # AdamW's moments: the head's weight and bias, then every tensor
    lrs = [s.value for s in events(out).Scalars("optim/lr")]
    assert max(lrs[:4]) == pytest.approx(5 * 2e-3) and lrs[4] == pytest.approx(2e-3)  # the head: 5x --lr by default
    texts = [t.tensor_proto.string_val[0].decode() for t in events(out).Tensors("run/schedule")]
    assert len(texts) == 1 and texts[0].startswith("step 4: the backbone unfreezes")


def test_a_run_resumed_across_the_switch_ends_with_the_same_weights(freeze_run, tmp_path):
    out, _ = freeze_run
    copy = resumed_copy(out, tmp_path / "copy", *FREEZE, later=("checkpoint-4", "checkpoint-6", "checkpoint-8"))
    assert same(weights(copy), weights(out))


@pytest.mark.parametrize("args, message", [
    (["--freeze-steps", 2, "--freeze-backbone"], "the backbone never trains"),
    (["--freeze-epochs", 1, "--lora-rank", 4], "the backbone never trains"),
    (["--freeze-steps", 8], "leaving the whole model none"),
    (["--freeze-lr", 0, "--freeze-steps", 2], "must be positive"),
])
def test_bad_freeze_combinations_are_one_line(args, message, tmp_path, capsys):
    assert message in error(capsys, "--max-steps", 8, *args, "--output-dir", tmp_path / "run")


# ---- --batch-size auto
def test_activations_are_measured_per_image_and_checkpointing_keeps_fewer():
    from vitfood import autobatch as fit
    from vitfood.config import Config
    from vitfood.model import build_model
    cpu = torch.device("cpu")
    full = None
    for checkpointing in (False, True):
        model, _ = build_model(Config(model="vit-micro", gradient_checkpointing=checkpointing), ["a", "b"])
        model.train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        kept = [fit.activation_bytes(model, fit.example((64, 64), b, cpu), "fp32", cpu) for b in (2, 4)]
        assert kept[1] == pytest.approx(2 * kept[0], rel=0.05)
        assert same(model.state_dict(), before) and torch.equal(torch.get_rng_state(), rng)  # no trace left
        if checkpointing:
            assert kept[0] < full / 2
        full = kept[0]
    assert fit.divisor_at_most(48, 20) == 16 and fit.divisor_at_most(32, 10) == 8 and fit.divisor_at_most(7, 3) == 1


def test_batch_size_auto_splits_the_global_batch_into_what_fits_and_keeps_its_gradient(tmp_path, monkeypatch, capsys):
    """A machine that holds 5 images per step: the global batch of 16 trains as 4 micro-batches of 4, with the
    gradient of one batch of 16."""
    from vitfood import autobatch as fit
    monkeypatch.setattr(fit, "activation_bytes", lambda *args: 2 * 2 ** 20)  # 1 MB an image
    monkeypatch.setattr(fit, "free_bytes", lambda device: (fit.state_bytes(model_of[0]) + 5.5 * fit.BACKWARD * 2 ** 20)
                        / fit.SHARE)
    model_of = []
    real_choose = fit.choose
    monkeypatch.setattr(fit, "choose", lambda cfg, model, *args: (model_of.append(model), real_choose(cfg, model, *args))[1])
    args = ["--max-steps", 2, "--logging-steps", 1, "--eval-steps", 2, "--save-steps", 2, "--max-grad-norm", 0]
    train(*args, "--batch-size", "auto", "--output-dir", tmp_path / "auto")
    assert "micro-batch 4 x 4 accumulation step(s) x 1 process(es) = global batch 16 (as asked)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "auto" / "train_config.json").read_text())
    assert (saved["batch_size"], saved["grad_accum_steps"], saved["global_batch"]) == (4, 4, 16)
    train(*args, "--output-dir", tmp_path / "asked")  # TINY's batch of 16 in one micro-batch
    norms = [[s.value for s in events(tmp_path / d).Scalars("optim/grad_norm")] for d in ("auto", "asked")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    monkeypatch.undo()
    results = train(*args, "--batch-size", "auto", "--global-batch", "auto", "--output-dir", tmp_path / "largest")
    saved = json.loads((tmp_path / "largest" / "train_config.json").read_text())
    assert saved["grad_accum_steps"] == 1 and saved["batch_size"] == saved["global_batch"] == 192  # every image
    assert results["global_step"] == 2


@pytest.mark.parametrize("args, message", [
    (["--global-batch", "auto"], "--global-batch auto needs --batch-size auto"),
    (["--global-batch", 20], "is not --batch-size 16 x --grad-accum-steps 1 x 1 process(es)"),
    (["--batch-size", "many"], "invalid int value: 'many'"),
])
def test_bad_batch_options_are_one_line(args, message, tmp_path, capsys):
    assert message in error(capsys, "--max-steps", 2, *args, "--output-dir", tmp_path / "run")


# ---- test-time augmentation
def test_tta_views_and_a_single_view_is_the_model_itself():
    from vitfood.images import VIEWS, averaged, views
    x = torch.randn(3, 3, 16, 16)
    for mode, count in VIEWS.items():
        got = views(x, mode)
        assert len(got) == count and got[0] is x and all(v.shape == x.shape for v in got)
    assert torch.equal(views(x, "flip")[1], x.flip(-1))
    logits = torch.randn(3, 5)
    assert averaged([logits], False) is logits
    for multi, probs in ((False, lambda l: l.softmax(-1)), (True, torch.sigmoid)):  # the same view twice: no change
        assert torch.allclose(probs(averaged([logits, logits], multi)), probs(logits), atol=1e-6)
    two = averaged([logits, -logits], False).softmax(-1)
    assert torch.allclose(two, (logits.softmax(-1) + (-logits).softmax(-1)) / 2, atol=1e-6)


def test_evaluate_reports_with_and_without_tta_and_predict_averages_the_views(tiny_run, tmp_path, capsys):
    import contextlib
    import io
    import numpy as np
    from PIL import Image
    from vitfood.evaluate import main as evaluate
    from vitfood.predict import main as predict
    out, results = tiny_run
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        r = evaluate(["--model", str(out / "model"), "--tta", "flip", "--output-dir", str(tmp_path / "eval")])
    assert r["eval_accuracy"] == pytest.approx(results["eval_accuracy"])  # the plain figures as before
    assert r["tta"]["mode"] == "flip" and r["tta"]["views"] == 2 and 0 <= r["tta"]["eval_accuracy"] <= 1
    assert "with test-time augmentation (flip, 2 views per image)" in printed.getvalue()
    half = np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8)
    Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(tmp_path / "mirror.png")  # its own mirror
    scores = []
    for tta in ("none", "flip", "flip+crops"):
        predict(["--model", str(out / "model"), "--precision", "fp32", "--json", "--tta", tta, str(tmp_path / "mirror.png")])
        scores.append(json.loads(capsys.readouterr().out)["predictions"])
    assert [p["label"] for p in scores[0]] == [p["label"] for p in scores[1]]
    assert all(abs(p["score"] - q["score"]) < 1e-5 for p, q in zip(scores[0], scores[1]))  # a mirror adds nothing
    assert scores[2] != scores[0]  # crops do
