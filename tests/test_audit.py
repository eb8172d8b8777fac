"""vitfood.audit: out-of-fold label scores ranked by confident learning, duplicates and leakage, outliers."""

import csv
import json
import shutil

import pytest
from conftest import cli, error_line, image_folder

pytest.importorskip("cleanlab")

FOLD_RUN = ["--model", "vit-micro", "--image-size", 32, "--precision", "fp32", "--batch-size", 16, "--num-workers", 0,
            "--lr", "2e-3", "--max-steps", 60, "--eval-steps", 60, "--save-steps", 60, "--logging-steps", 60]


def rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """Three colours, 30 noisy images each in train and 8 in eval; 2 train images of each class moved to the next
    class's folder (their labels flipped), and one eval image copied into train."""
    root = image_folder(tmp_path_factory.mktemp("data") / "photos", {"train": 30, "validation": 8},
                        classes=("red", "green", "blue"), splits=["train", "validation"], size=(32, 32), noise=True)
    flipped = []
    for k, c in enumerate(("red", "green", "blue")):
        other = ("red", "green", "blue")[(k + 1) % 3]
        for i in (0, 1):
            target = root / "train" / other / f"from-{c}-{i}.jpg"
            (root / "train" / c / f"{i}.jpg").rename(target)
            flipped.append(str(target))
    leaked = root / "train" / "green" / "copied.jpg"
    shutil.copyfile(root / "validation" / "green" / "3.jpg", leaked)
    out = tmp_path_factory.mktemp("audit") / "audit"
    p = cli("--dataset", root, "--train-split", "train", "--eval-split", "validation", *FOLD_RUN, "--folds", 2,
            "--output-dir", out, module="vitfood.audit", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, flipped, leaked, root, p


def test_flipped_labels_rank_above_the_clean_ones(audited):
    out, flipped, _, _, p = audited
    found = [r["path"] for r in rows(out / "label_issues.csv")]
    assert set(flipped) <= set(found), (found, flipped)  # every flipped file is flagged
    ranks = [found.index(f) for f in flipped]
    assert max(ranks) < len(flipped) + 2, found[:12]  # at most 2 clean files among the first flagged
    first = rows(out / "label_issues.csv")[0]
    assert first["path"] in flipped and first["given_label"] != first["suggested_label"]
    assert (out / "folds" / "fold-2" / "model" / "config.json").is_file() and "likely label errors" in p.stdout


def test_an_eval_image_copied_into_train_is_reported_as_leakage(audited):
    out, _, leaked, root, _ = audited
    dups = rows(out / "duplicates.csv")
    pair = {dups[0]["path"], dups[0]["other_path"]}
    assert pair == {str(leaked), str(root / "validation" / "green" / "3.jpg")}
    assert dups[0]["exact"] == "True" and dups[0]["leakage"] == "True" and float(dups[0]["similarity"]) > 0.999
    summary = json.loads((out / "audit.json").read_text())
    assert summary["leakage"] >= 1 and summary["exact_duplicates"] == 1 and summary["images"] == {"train": 91, "eval": 24}
    assert rows(out / "outliers.csv") is not None and (out / "outliers.csv").read_text().startswith("path,")


@pytest.mark.slow
def test_a_second_audit_reuses_the_folds_and_a_trained_run_audits_its_eval_split(audited, tmp_path):
    out, _, _, root, _ = audited
    p = cli("--dataset", root, "--train-split", "train", "--eval-split", "validation", *FOLD_RUN, "--folds", 2,
            "--output-dir", out, module="vitfood.audit")
    assert p.returncode == 0 and "fold 1 of 2" not in p.stdout, p.stderr[-2000:]  # the finished folds are kept
    p = cli("--model", out / "folds" / "fold-1", "--output-dir", tmp_path / "run-audit", module="vitfood.audit")
    assert p.returncode == 0, p.stderr[-2000:]
    assert {r["split"] for r in rows(tmp_path / "run-audit" / "label_issues.csv")} <= {"eval"}


def test_bad_audit_input_is_one_line(tmp_path):
    assert "single-label" in error_line(cli("--dataset", "synthetic", "--synthetic-dishes", 3, "--synthetic-size", 40,
                                            "--output-dir", tmp_path / "a", module="vitfood.audit"))
    assert "--output-dir is required" in error_line(cli("--dataset", "synthetic", module="vitfood.audit"))
    assert "--resume is the audit's" in error_line(cli("--resume", "auto", "--output-dir", tmp_path / "b",
                                                       module="vitfood.audit"))


@pytest.mark.slow
def test_an_audit_killed_in_a_fold_resumes_to_the_same_findings(audited, tmp_path):
    """kill -9 of the audit while fold 2 trains: the fold run gets SIGTERM (its parent died), saves and stops; the
    same command then resumes it and ends with the files of an audit never stopped."""
    import os
    import subprocess
    import sys
    from conftest import HOLD, output, wait_for
    out, _, _, root, _ = audited
    cmd = [sys.executable, "-m", "vitfood.audit", "--dataset", str(root), "--train-split", "train", "--eval-split",
           "validation", *map(str, FOLD_RUN), "--logging-steps", "10", "--folds", "2", "--output-dir", str(tmp_path / "a")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", **HOLD})
    wait_for(p, "fold 2 of 2", timeout=300)
    wait_for(p, "step 10/60", timeout=300)  # each fold run is then held for HOLD_S at step 11: killed in it
    p.kill()
    said, err = output(p)  # ends when the fold run, which shares its output, has ended too
    assert "stopped by SIGTERM" in said, (said[-2000:], err[-2000:])
    done = cli(*cmd[3:], module="vitfood.audit", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("label_issues.csv", "duplicates.csv", "outliers.csv"):
        assert (tmp_path / "a" / name).read_text() == (out / name).read_text(), name


def test_a_fold_run_still_finishing_is_waited_for_not_started_beside(tmp_path):
    """An audit killed -9 leaves its fold run saving (its parent-death SIGTERM); the audit run again at once waits
    for that run's lock instead of starting the same fold beside it."""
    import subprocess
    import sys
    import time
    from vitfood import rundir
    run = tmp_path / "fold-1"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from vitfood import rundir; "
                               f"rundir.lock({str(run)!r}); print('held', flush=True); time.sleep(2)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    said, t0 = [], time.monotonic()
    rundir.wait_unlocked(str(run), said.append)
    assert holder.wait(timeout=30) == 0 and time.monotonic() - t0 > 1  # it waited for the holder to end
    assert said == [f"waiting for the vitfood process still running in {run} to finish"]
    rundir.wait_unlocked(str(run), said.append)  # nothing holds it now: no wait, nothing said
    assert len(said) == 1
    rundir.lock(str(run))  # and a run can take it
    rundir.unlock(str(run))
