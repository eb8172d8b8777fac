"""vitfood.tune: trials as vitfood runs in an Optuna study, pruning by stopping a run as a user would, a study that
survives kill -9 and is shared by several workers, one line for every bad input."""

import json
import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import TINY, cli, error, same

pytest.importorskip("optuna")
SHORT = ["--max-steps", 20, "--eval-steps", 5, "--save-steps", 5, "--logging-steps", 5]


def _tune(*args, env=None):
    return cli(*args, *TINY, *SHORT, module="vitfood.tune", env=env)


def _study(folder, storage=None):
    import optuna
    return optuna.load_study(study_name="s", storage=storage or f"sqlite:///{folder / 'study.db'}")


def test_a_study_runs_prunes_sums_up_and_is_not_run_twice(tmp_path):
    folder = tmp_path / "study"
    args = ["--study", "s", "--trials", 5, "--study-dir", folder, "--search", "lr=1e-4:3e-3:log",
            "--search", "label_smoothing=0,0.1", "--sampler", "random"]
    p = _tune(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((folder / "summary.json").read_text())
    trials = _study(folder).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert sum(doc["states"].values()) == 5 and doc["states"].get("complete", 0) >= 1
    for t in trials:  # each trial a vitfood run of its own, with its options; pruned ones stopped at an eval, saved
        config = json.loads((folder / f"trial-{t.number}" / "train_config.json").read_text())
        assert config["lr"] == t.params["lr"] and config["label_smoothing"] == t.params["label_smoothing"]
        if t.state.name == "PRUNED":
            step = max(t.intermediate_values)
            assert step < 20 and (folder / f"trial-{t.number}" / f"checkpoint-{step}").is_dir()
        else:
            assert t.value == json.loads((folder / f"trial-{t.number}" / "all_results.json").read_text())["eval_accuracy"]
    best = doc["best"]
    assert best["score"] == max(t.value for t in trials if t.value is not None)
    assert best["command"].startswith("python -m vitfood.train ") and f"--lr {best['params']['lr']}" in best["command"]
    assert os.path.isdir(best["model"]) and f"best: trial {best['trial']}" in p.stdout
    # the same command again: nothing runs again, the same account
    again = _tune(*args)
    assert again.returncode == 0 and f"best: trial {best['trial']}" in again.stdout
    assert not any(line.startswith("trial ") for line in again.stdout.splitlines())  # no trial ran
    assert len(_study(folder).get_trials()) == 5


def test_a_trial_that_fails_for_its_own_reason_is_recorded_and_the_study_goes_on(tmp_path):
    folder = tmp_path / "study"
    # --export-ema without --ema-decay is refused by vitfood.train: each trial fails with that line
    p = _tune("--study", "s", "--trials", 2, "--study-dir", folder, "--search", "export_ema=true",
              "--search", "lr=1e-3:2e-3", "--pruner", "none")
    assert p.returncode == 0, p.stderr[-3000:]
    trials = _study(folder).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert all("--export-ema needs --ema-decay" in t.user_attrs["error"] for t in trials)
    assert "no trial finished" in p.stdout


@pytest.mark.parametrize("search, says", [
    ("nonsense=1:2", "no option 'nonsense'"),
    ("lr=-1:2", "must be positive"),
    ("lr=2:1", "LOW < HIGH"),
    ("model=a:b", "not a number"),
    ("lr", "NAME=LOW:HIGH"),
])
def test_bad_searches_are_one_line(search, says, capsys):
    from vitfood.tune import main
    assert says in error(capsys, "--study", "s", "--search", search, *TINY, main=main, alone=True)


def test_another_search_in_the_same_study_and_an_unreachable_storage_are_one_line(tmp_path, capsys):
    from vitfood.tune import main
    folder = tmp_path / "study"
    assert _tune("--study", "s", "--trials", 1, "--study-dir", folder, "--search", "lr=1e-3:2e-3").returncode == 0
    line = error(capsys, "--study", "s", "--trials", 1, "--study-dir", folder, "--search", "lr=1e-4:2e-3", *TINY,
                 *SHORT, main=main)
    assert "belongs to another search" in line and "lr=1e-3:2e-3" in line
    line = error(capsys, "--study", "s", "--search", "lr=1e-4:2e-3", "--storage", "postgresql://u@127.0.0.1:9/x", *TINY,
                 main=main)
    assert line.startswith("error: cannot open --storage postgresql://u@127.0.0.1:9/x")
    assert "--output-dir and --resume are the tuner's" in error(capsys, "--study", "s", "--search", "lr=1e-4:2e-3",
                                                               "--output-dir", tmp_path, *TINY, main=main)


@pytest.mark.slow
def test_kill_9_of_the_tuner_mid_trial_then_the_same_command_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    folder = tmp_path / "study"
    args = ["--study", "s", "--trials", 3, "--study-dir", folder, "--search", "lr=1e-3:3e-3", "--pruner", "none",
            "--num-workers", 2]
    # the 32nd optimizer step of the process: trial 1's 12th, after its checkpoint-10
    killed = _tune(*args, env={"VITFOOD_FAULT": "step:32"})
    assert killed.returncode == -signal.SIGKILL
    p = _tune(*args)
    assert p.returncode == 0 and "trial 1 (resumed)" in p.stdout, p.stderr[-3000:]
    trials = _study(folder).get_trials()
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state.name == "COMPLETE" for t in trials)
    # trial 1 ended with the weights of the same run never interrupted
    command = trials[1].user_attrs["command"].split()[3:]
    assert cli(*command, "--output-dir", tmp_path / "straight").returncode == 0
    assert same(load_file(folder / "trial-1" / "model" / "model.safetensors"),
                load_file(tmp_path / "straight" / "model" / "model.safetensors"))


@pytest.mark.slow
def test_two_workers_share_one_study_each_trial_run_once(tmp_path):
    folder = tmp_path / "study"
    cmd = [sys.executable, "-m", "vitfood.tune", "--study", "s", "--trials", 6, "--study-dir", folder,
           "--search", "lr=1e-3:3e-3", "--pruner", "none", *TINY, *SHORT]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    outs = [w.communicate(timeout=900) for w in workers]
    assert all(w.returncode == 0 for w in workers), [e[-2000:] for _, e in outs]
    ran = [line.split(":")[0] for out, _ in outs for line in out.splitlines()
           if line.startswith("trial ") and ": --lr" in line]
    assert sorted(ran) == [f"trial {n}" for n in range(6)]  # every trial once, over the two workers
    assert all(out.count(": --lr") >= 1 for out, _ in outs)  # both worked
    trials = [t for t in _study(folder).get_trials() if not t.user_attrs.get("surplus")]
    assert [t.number for t in trials] == list(range(6)) and all(t.state.name == "COMPLETE" for t in trials)


@pytest.fixture
def postgres():
    """A PostgreSQL server of its own in a temporary folder (Debian's postgresql package), torn down after: its
    SQLAlchemy URL. Skipped where the package or psycopg is missing."""
    import glob
    import shutil
    import socket
    pytest.importorskip("psycopg")  # SQLAlchemy's driver for postgresql:// URLs
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or [shutil.which("pg_ctl")]
    if not found[-1]:
        pytest.skip("no PostgreSQL server (apt-get install postgresql)")
    bin_dir = os.path.dirname(found[-1])
    import pathlib
    import tempfile
    home = pathlib.Path(tempfile.mkdtemp(prefix="vitfood-pg-"))  # outside pytest's folder, which only root may enter
    data = home / "pg"
    data.mkdir()
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root: as Debian's postgres user
        os.chmod(home, 0o755)
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)
    run(f"{bin_dir}/initdb", "-D", str(data), "--auth=trust", "-U", "postgres")
    # its log to a file: a server holding this process's pipes would keep subprocess.run waiting for their end
    run(f"{bin_dir}/pg_ctl", "-D", str(data), "-w", "-l", str(data / "log"), "-o", f"-p {port} -k {data} -h 127.0.0.1",
        "start")
    try:
        run(f"{bin_dir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "study")
        yield f"postgresql://postgres@127.0.0.1:{port}/study"
    finally:
        run(f"{bin_dir}/pg_ctl", "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_study_in_postgresql(postgres, tmp_path):
    cmd = [sys.executable, "-m", "vitfood.tune", "--study", "s", "--trials", 4, "--storage", postgres, "--search",
           "lr=1e-3:3e-3", "--pruner", "none", *TINY, *SHORT]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(list(map(str, [*cmd, "--study-dir", tmp_path / "study"])), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [w.communicate(timeout=900) for w in workers]
    assert all(w.returncode == 0 for w in workers), [e[-2000:] for _, e in outs]
    trials = [t for t in _study(None, postgres).get_trials() if not t.user_attrs.get("surplus")]
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in trials)
    ran = sorted(line.split(":")[0] for out, _ in outs for line in out.splitlines() if ": --lr" in line
                 and line.startswith("trial "))
    assert ran == [f"trial {n}" for n in range(4)]
