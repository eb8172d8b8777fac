"""What a run resumes: every part in one training_state.pt, checkpoints of earlier versions, and the options a
resumed run may not change."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, same, train, weights
from vitfood import checkpoint, rundir
from vitfood.common import UserError
from vitfood.config import FIXED_ON_RESUME, LEGACY, RUN_KEYS, Config, to_dict

LEGACY_RUN = Path(__file__).parent / "fixtures" / "legacy-a6e3668"  # written by vitfood a6e3668: max_steps 8, killed
SHORT = ["--max-steps", "8", "--eval-steps", "4", "--save-steps", "4", "--logging-steps", "2"]  # after its first save


def to_flat(state):
    """A training state in the flat layout vitfood wrote before FORMAT 2 (as a6e3668's train.save did)."""
    p, data = state["progress"], state["data"]
    return dict(step=p["step"], metrics=p["metrics"], history=p["history"], best=p["best"],
                global_batch=data["global_batch"], world_size=data["world_size"],
                data_position=dict(epoch=data["epoch"], batch=data["batch"]), optimizer=state["optimizer"],
                scheduler=state["scheduler"], scaler=state["scaler"], rng=state["rng"]["ranks"][0],
                rng_ranks=state["rng"]["ranks"], elapsed=state["ledger"])


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """SHORT never interrupted: checkpoint-4, checkpoint-8 and the final weights."""
    ref = tmp_path_factory.mktemp("short") / "ref"
    train(*SHORT, "--output-dir", ref)
    return ref


def _resumable_copy(ref, run):
    """`run`: the run of `ref` as it was when checkpoint-4 was its newest."""
    run.mkdir()
    shutil.copy(ref / "train_config.json", run)
    shutil.copytree(ref / "checkpoint-4", run / "checkpoint-4")
    return run


def test_a_checkpoint_in_the_flat_layout_resumes_to_the_same_weights(tmp_path, short_run):
    ref = short_run
    run = tmp_path / "old"
    _resumable_copy(ref, run)
    state = torch.load(run / "checkpoint-4" / checkpoint.STATE, weights_only=True)
    assert state["format"] == checkpoint.FORMAT and state["progress"]["step"] == 4
    (run / "checkpoint-4" / checkpoint.MARKER).unlink()
    torch.save(to_flat(state), run / "checkpoint-4" / checkpoint.STATE)
    checkpoint._seal(run / "checkpoint-4", 4)  # sealed as that version sealed it
    results = train(*SHORT, "--output-dir", run, "--resume", "auto")
    assert results["segments"] == 2 and results["global_step"] == 8
    assert same(weights(run), weights(ref))


def test_a_checkpoint_written_by_an_earlier_version_resumes(tmp_path, capsys):
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY_RUN, run)
    state = checkpoint.load_state(run / "checkpoint-4")  # in today's layout
    assert state["progress"]["step"] == 4 and state["data"] == dict(epoch=0, batch=4, global_batch=16, world_size=1)
    assert len(state["rng"]["ranks"]) == 1 and state["ledger"]["segments"] == 1
    results = train(*SHORT, "--output-dir", run, "--resume", "auto")
    assert f"resuming from {run / 'checkpoint-4'} at step 4" in capsys.readouterr().out
    assert results["global_step"] == 8 and results["segments"] == 2
    final = torch.load(run / "checkpoint-8" / checkpoint.STATE, weights_only=True)
    assert final["ledger"]["images"] == 8 * 16 and [h["step"] for h in final["progress"]["history"]] == [4, 8]
    assert {s["step"].item() for s in final["optimizer"]["state"].values()} == {8}


def test_every_part_comes_back_as_it_was_saved(tmp_path, short_run):
    """Resumed, then saved again at once: each part's state is the one it was loaded from."""
    again = _resumable_copy(short_run, tmp_path / "again")
    saved = torch.load(again / "checkpoint-4" / checkpoint.STATE, weights_only=True)
    from vitfood.common import seed_everything
    from vitfood.state import rng_state
    seed_everything(1234)  # random streams unlike those of a fresh run (this tiny ViT draws none while training)
    saved["rng"] = dict(ranks=[rng_state()])
    torch.save(saved, again / "checkpoint-4" / checkpoint.STATE)
    (again / "checkpoint-4" / checkpoint.MARKER).unlink()
    checkpoint._seal(again / "checkpoint-4", 4)
    from vitfood.rundir import parse_run
    from vitfood.start import resumable, setup
    cfg, out, resume = parse_run([*TINY, *SHORT, "--output-dir", str(again), "--resume", "auto"])
    r = setup(cfg, resume, 0, 1, torch.device("cpu"), rundir.Checkpoints(out, 2))
    state = checkpoint.state_of(resumable(r))
    r.log.close()
    assert set(state) == set(saved)
    for name in ("progress", "data", "scheduler", "scaler"):
        assert state[name] == saved[name], name
    led, led_saved = state["ledger"], saved["ledger"]
    assert led["segments"] == led_saved["segments"] + 1 and led["images"] == led_saved["images"]
    assert led["damaged_files"] == led_saved["damaged_files"] and led["nonfinite_steps"] == led_saved["nonfinite_steps"]
    rng, rng_saved = state["rng"]["ranks"][0], saved["rng"]["ranks"][0]
    assert rng["python"] == rng_saved["python"] and torch.equal(rng["torch"], rng_saved["torch"])
    assert torch.equal(rng["numpy"]["keys"], rng_saved["numpy"]["keys"]) and rng["numpy"]["pos"] == rng_saved["numpy"]["pos"]
    opt, opt_saved = state["optimizer"], saved["optimizer"]
    assert all(torch.equal(opt["state"][k][m], opt_saved["state"][k][m]) for k in opt_saved["state"]
               for m in opt_saved["state"][k])


def _saved_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps(to_dict(Config(dataset="synthetic", model="vit-micro"))))
    return run


def test_options_that_decide_the_weights_or_the_data_order_are_fixed_on_resume(tmp_path):
    from vitfood.rundir import parse_run
    run = _saved_run(tmp_path)
    changed = dict(dataset="other", train_split="train[:10]", eval_split="validation", test_size=0.3,
                   max_train_samples=9, max_eval_samples=9, image_column="img", label_column="y", synthetic_size=99,
                   synthetic_classes=3, synthetic_max_px=99, fast_decode=False, model="vit-tiny", image_size=96,
                   grad_accum_steps=2, lr=0.5, weight_decay=0.5, seed=7, label_smoothing=0.1, layer_decay=0.5,
                   drop_path=0.1, auto_augment="randaugment", randaugment_ops=3, randaugment_magnitude=5,
                   random_erasing=0.5, mixup=0.5, cutmix=0.5, mixup_prob=0.5, mixup_switch_prob=0.2, ema_decay=0.5,
                   freeze_backbone=True, lora_rank=4, lora_alpha=8.0, lora_dropout=0.2, lora_targets="q_proj",
                   gradient_checkpointing=True, class_weights="balanced", sampler="balanced", multi_label=True,
                   label_separator="|", synthetic_dishes=2, freeze_epochs=1.0, freeze_steps=5, freeze_lr=0.1,
                   best_metric="loss", fold="1/3", streaming=True, shuffle_buffer=10, fsdp=True, teacher="runs/big/model",
                   distill="hard", distill_alpha=0.9, distill_temperature=4.0)
    assert set(changed) == set(FIXED_ON_RESUME)  # the marks in Config say what decides the weights and data order
    for name, value in changed.items():
        flag = f"--{name.replace('_', '-')}"
        args = [f"--no-{flag[2:]}"] if value is False else [flag] if value is True else [flag, str(value)]
        with pytest.raises(UserError, match=f"{flag} differs from the run being resumed"):
            parse_run(["--resume", "auto", "--output-dir", str(run), *args])
    cfg, _, _ = parse_run(["--resume", "auto", "--output-dir", str(run), "--max-steps", "9", "--eval-steps", "3",
                           "--batch-size", "4", "--precision", "fp32", "--num-workers", "1"])
    assert (cfg.max_steps, cfg.eval_steps, cfg.batch_size) == (9, 3, 4)  # the rest may change


def test_a_run_config_missing_what_decides_the_run_is_refused(tmp_path):
    run = _saved_run(tmp_path)
    saved = json.loads((run / "train_config.json").read_text())
    from vitfood.config import read_config_file
    assert "max_steps" in RUN_KEYS and "fast_decode" not in RUN_KEYS and LEGACY["fast_decode"] is False
    for key in ("max_steps", "seed", "lr"):
        (run / "train_config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != key}))
        with pytest.raises(UserError, match=f"lacks {key}"):
            read_config_file(str(run / "train_config.json"), run=True)
    (run / "train_config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "fast_decode"}))
    assert read_config_file(str(run / "train_config.json"), run=True)["fast_decode"] is False  # as runs before it
    assert all(f.metadata["decides"] in (None, "weights", "data", "schedule") for f in dataclasses.fields(Config))
