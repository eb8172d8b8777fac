"""`tensorboard --logdir runs` as a user sees it: six kinds of runs in one folder (plain, EMA with label smoothing,
multi-label, stopped and resumed, an evaluate run, an audit) opened in Chromium at 1400 x 900 px, driven by
Playwright. Screenshots of the landing view, HParams, Images, Text and Custom Scalars go to the test's folder (or
to $VITFOOD_SCREENSHOTS), and the page's DOM is asserted on.

Needs Chromium (Debian: apt-get install chromium) and `pip install playwright`; slow tier."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import TINY, cli, stop
from vitfood import logs

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHORT = ["--max-steps", 60, "--eval-steps", 20, "--save-steps", 20, "--logging-steps", 5]
AUDIT = ["--dataset", "synthetic", "--synthetic-size", "240", "--synthetic-classes", "4", "--synthetic-max-px", "128",
         "--model", "vit-micro", "--image-size", 32, "--precision", "fp32", "--batch-size", 16, "--num-workers", 0,
         "--lr", "2e-3", "--max-steps", 30, "--eval-steps", 30, "--save-steps", 30, "--logging-steps", 30, "--folds", 2]


def _ok(p):
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """The folder of six runs (run names as vitfood gives them: the time first)."""
    root = tmp_path_factory.mktemp("tb") / "runs"
    plain = root / "1208-100000-vit-micro-synthetic"
    _ok(cli(*TINY, *SHORT, "--output-dir", plain))
    _ok(cli(*TINY, *SHORT, "--ema-decay", "0.9", "--label-smoothing", "0.1", "--output-dir", root / "1208-100100-ema"))
    _ok(cli(*TINY, *SHORT, "--synthetic-dishes", "3", "--output-dir", root / "1208-100200-multilabel"))
    resumed = root / "1208-100300-resumed"
    assert stop(resumed, signal.SIGTERM)[0] == 75
    _ok(cli(*TINY, "--max-steps", 30, "--eval-steps", 10, "--save-steps", 5, "--num-workers", 2, "--resume", "auto",
            "--output-dir", resumed))
    _ok(cli("--model", plain / "model", "--precision", "fp32", "--tensorboard", plain / "eval", "--output-dir",
            root.parent / "evaluated", module="vitfood.evaluate"))
    _ok(cli(*AUDIT, "--output-dir", root / "1208-100500-audit", module="vitfood.audit"))
    return root


@pytest.fixture(scope="module")
def browser(runs, tmp_path_factory):
    """(page, TensorBoard's port, screenshot folder): TensorBoard on the folder, a 1400 x 900 Chromium page."""
    if not CHROMIUM:
        pytest.skip("no Chromium (apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(runs), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shots = os.environ.get("VITFOOD_SCREENSHOTS") or str(tmp_path_factory.mktemp("screenshots"))
    os.makedirs(shots, exist_ok=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                if json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2).read()):
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, "TensorBoard did not start"
            time.sleep(0.5)
        with sync_playwright() as p:
            chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            yield chromium.new_page(viewport={"width": 1400, "height": 900}), port, shots
            chromium.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _open(page, url, ready, shots, name):
    """`url` opened, waited on until the locator `ready` shows, then a screenshot."""
    page.goto(url)
    page.locator(ready).first.wait_for(timeout=60_000)
    time.sleep(3)  # the charts' data arrive after their cards
    page.screenshot(path=os.path.join(shots, f"{name}.png"))


def test_the_printed_link_opens_true_values_with_the_score_and_losses_pinned(runs, browser):
    page, port, shots = browser
    results = json.loads((runs / "1208-100000-vit-micro-synthetic" / "all_results.json").read_text())
    _open(page, logs.link(port=port).replace("localhost", "127.0.0.1"), "metrics-pinned-view card-view", shots,
          "landing")
    pinned = page.locator("metrics-pinned-view card-view .heading")
    assert [pinned.nth(k).inner_text().replace("\n", "").replace(" ", "") for k in range(pinned.count())] == [
        "accuracy/top1", "loss/eval", "loss/train", "optim/lr", "speed/img_per_s"]
    assert page.locator(".scalars-smoothing input").first.input_value() == "0"
    # the score's card: no smoothed column, the plain run's last value the run's result
    card = page.locator("metrics-pinned-view card-view").first
    table = card.inner_text()
    assert "Smoothed" not in table and "Value" in table
    assert f"{results['eval_accuracy']:.4f}" in table
    # above the fold, side by side: the score and eval loss; train loss right under them
    boxes = [pinned.nth(k).bounding_box() for k in range(3)]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[2]["y"] < 900


def test_hparams_shows_first_the_options_that_differ(runs, browser):
    page, port, shots = browser
    _open(page, f"http://127.0.0.1:{port}/#hparams", "tf-hparams-query-pane paper-checkbox", shots, "hparams")
    configs = [json.loads(p.read_text()) for p in runs.rglob("train_config.json")]
    differ = {k for k in configs[0] if len({json.dumps(c.get(k)) for c in configs}) > 1}
    boxes = page.locator("tf-hparams-query-pane paper-checkbox")
    shown = [boxes.nth(k).inner_text().strip() for k in range(boxes.count()) if
             boxes.nth(k).get_attribute("aria-checked") == "true" and boxes.nth(k).inner_text().strip() in configs[0]]
    assert len(shown) == 5 and set(shown) <= differ, (shown, sorted(differ))
    names = {boxes.nth(k).inner_text().strip() for k in range(boxes.count())}
    assert {"ema_decay", "label_smoothing", "multi_label"} <= names and not {"output_dir", "resume"} & names
    # the metric columns: the runs' scalars, the scores and losses first (ticked), no status code among them
    metrics = [n for n in (boxes.nth(k).inner_text().strip() for k in range(boxes.count())) if re.fullmatch(
        r"[a-z_]+/[a-z0-9_]+", n)]
    assert metrics[:2] == ["accuracy/map", "accuracy/top1"] and "loss/bce_eval" in metrics[:5], metrics
    assert not {"run/end_status", "run/score"} & set(metrics)
    page.locator('paper-tab[view-id="parallel-coords-view"]').click()
    time.sleep(3)
    page.screenshot(path=os.path.join(shots, "hparams-parallel-coordinates.png"))


def test_images_are_drawn_at_their_size_and_text_starts_with_the_runs_own(runs, browser):
    page, port, shots = browser
    _open(page, f"http://127.0.0.1:{port}/#images", "tf-image-loader img", shots, "images")
    imgs = page.locator("tf-image-loader img")
    sizes = [imgs.nth(k).evaluate("e => [e.naturalWidth, e.clientWidth, e.getRootNode().host.tag]")
             for k in range(imgs.count())]
    audit = [(n, c) for n, c, tag in sizes if tag.startswith("audit/")]
    assert audit and all(n <= c + 1 for n, c in audit), audit  # not shrunk: the captions stay legible
    _open(page, f"http://127.0.0.1:{port}/#text", "tf-text-loader", shots, "text")
    loaders = page.locator("tf-text-loader")
    tags = [loaders.nth(k).evaluate("e => e.tag") for k in range(loaders.count())]
    assert tags[0] == "run/status" and not any(t.endswith("text_summary") for t in tags), tags


def test_custom_scalars_keeps_each_kind_of_loss_on_its_own_chart(runs, browser):
    page, port, shots = browser
    _open(page, f"http://127.0.0.1:{port}/#custom_scalars&_smoothingWeight=0",
          "tf-custom-scalar-multi-line-chart-card", shots, "custom_scalars")
    titles = page.locator("tf-custom-scalar-multi-line-chart-card tf-card-heading")
    titles = [titles.nth(k).evaluate("e => e.displayName") for k in range(titles.count())]
    assert {"train loss", "train loss (multi-label)", "learning rate"} <= set(titles), titles
    assert any(t.startswith("eval loss (multi-label)") for t in titles) and any(t.startswith("eval mAP") for t in titles)
