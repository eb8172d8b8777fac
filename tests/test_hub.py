"""Without the Hub: a network that is down fails slowly, so vitfood must fail fast, in one line, before any
heavy work; a cached Hub model still works. The "Hub" here is a local server that accepts connections and
never answers (what a dead route or a black-holed proxy does), or nothing at all (HF_HUB_OFFLINE=1)."""

import os
import socket
import threading
import time

import pytest

from conftest import TINY, cli, error_line


@pytest.fixture(scope="module")
def silent_hub():
    """http://127.0.0.1:<port>: accepts every connection, never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def run(*args, module="vitfood.train", env=None):
    """(seconds, CompletedProcess) of a vitfood command with the Hub reachable as `env` says."""
    t0 = time.perf_counter()
    p = cli(*args, module=module, timeout=120, env={"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None, **(env or {})})
    return time.perf_counter() - t0, p


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """fast(seconds): no slower than the same command failing with the Hub switched off (HF_HUB_OFFLINE=1:
    the same imports and start-up, which a loaded machine stretches, and no network at all), plus a few
    seconds: the 3 s probe and the rest of the work."""
    tmp = tmp_path_factory.mktemp("baseline")
    base, p = run("--dataset", "food101", "--model", "vit-micro", "--output-dir", tmp / "a",
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf")})
    assert "HF_HUB_OFFLINE=1" in error_line(p, alone=True)
    return lambda seconds: seconds < base + 6


def test_a_silent_hub_fails_fast_in_one_line(silent_hub, tmp_path, fast):
    hub = {"HF_ENDPOINT": silent_hub, "HF_HOME": str(tmp_path / "hf")}
    seconds, p = run("--dataset", "food101", "--model", "vit-micro", "--output-dir", tmp_path / "a", env=hub)
    line = error_line(p, alone=True)
    assert fast(seconds) and "dataset 'food101'" in line and "unreachable" in line, (seconds, line)
    # a local data set with a Hub model: the model is found missing before the data set is generated
    cache = tmp_path / "vitfood-cache"
    hub["VITFOOD_HUB_PROBE_SECONDS"] = "1"  # the default, 3 s, was shown above; the rest only need a probe
    seconds, p = run("--dataset", "synthetic", "--model", "google/vit-base-patch16-224-in21k",
                     "--output-dir", tmp_path / "b", env={**hub, "VITFOOD_CACHE": str(cache)})
    line = error_line(p, alone=True)
    assert fast(seconds) and "model 'google/vit-base-patch16-224-in21k'" in line and "unreachable" in line
    assert not cache.exists() or not os.listdir(cache), "the data set was prepared before the model was checked"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # no empty run folders left behind


@pytest.mark.slow
@pytest.mark.parametrize("module", ["vitfood.predict", "vitfood.evaluate"])
def test_predict_and_evaluate_fail_fast_on_a_silent_hub(module, silent_hub, tmp_path, fast):
    hub = {"HF_ENDPOINT": silent_hub, "HF_HOME": str(tmp_path / "hf"), "VITFOOD_HUB_PROBE_SECONDS": "1"}
    seconds, p = run("--model", "google/vit-base-patch16-224", *(["x.jpg"] if module == "vitfood.predict" else
                     ["--dataset", "food101"]), module=module, env=hub)
    assert fast(seconds) and "unreachable" in error_line(p, alone=True), (module, seconds)


def test_offline_mode_stays_instant(tmp_path):
    seconds, p = run("--dataset", "food101", "--output-dir", tmp_path / "a",
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    line = error_line(p, alone=True)
    # no probe and no network wait: far below the Hub's own timeout (VITFOOD_HUB_TIMEOUT_SECONDS, 30 s)
    assert "HF_HUB_OFFLINE=1" in line and seconds < 30, seconds


@pytest.mark.slow  # the default tier keeps the silent Hub failing fast in one line
def test_a_cached_hub_model_trains_while_the_hub_is_silent(silent_hub, tmp_path):
    from vitfood.config import Config
    from vitfood.model import build_model
    model, processor = build_model(Config(model="vit-micro"), ["a", "b", "c", "d"])
    revision = "0" * 40  # the Hub cache's layout: refs/main names a snapshot folder
    repo = tmp_path / "hf" / "hub" / "models--vitfood-test--vit-micro"
    model.save_pretrained(repo / "snapshots" / revision)
    processor.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    seconds, p = run(*TINY, "--model", "vitfood-test/vit-micro", "--max-steps", 2, "--eval-steps", 2,
                     "--output-dir", tmp_path / "run", env={"HF_ENDPOINT": silent_hub, "HF_HOME": str(tmp_path / "hf"),
                                                            "VITFOOD_HUB_PROBE_SECONDS": "1"})
    assert p.returncode == 0 and (tmp_path / "run" / "model" / "model.safetensors").is_file(), p.stderr[-3000:]


def test_a_bad_probe_limit_is_one_line(tmp_path):
    seconds, p = run("--dataset", "food101", "--model", "vit-micro", "--output-dir", tmp_path / "a",
                     env={"VITFOOD_HUB_PROBE_SECONDS": "3s"})
    assert "VITFOOD_HUB_PROBE_SECONDS='3s'" in error_line(p, alone=True)


@pytest.mark.slow
def test_a_refused_connection_unprobed_is_one_note_and_names_the_network(tmp_path):
    """VITFOOD_HUB_PROBE_SECONDS=0 and a Hub whose port refuses connections: huggingface_hub retries (about
    25 s); the user sees one note, not two lines per retry, and an error that blames the connection, not a
    missing repository."""
    _, p = run("--dataset", "synthetic", "--model", "google/vit-base-patch16-224-in21k", "--output-dir", tmp_path / "a",
               env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "VITFOOD_HUB_PROBE_SECONDS": "0"})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "could not be reached (no connection)" in lines[-1], lines[-3:]
    assert "Retry" not in p.stderr and len(lines) <= 2, lines
