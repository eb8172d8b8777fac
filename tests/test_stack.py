"""A broken install (a torchvision built for another torch) ends every command in one `error:` line that names
torchvision and the pip command that mends it, not in a traceback. The breakage is simulated, the real install
left alone: a fake torchvision package (its import raises what a mismatched build raises) and its metadata, put
first on PYTHONPATH of a child process."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

from conftest import TINY, cli, error_line
from vitfood import stack

NMS = "operator torchvision::nms does not exist"
ENTRY_POINTS = ["train", "bench", "predict", "evaluate", "export", "audit", "shards"]


def fake_torchvision(root, version_py=None, built_for=None):
    """A torchvision whose import raises RuntimeError(NMS); `version_py`: its version.py's __version__ (the
    build tag); `built_for`: (its version, the torch it pins) as metadata, else the real one's metadata is found."""
    pkg = root / "torchvision"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"raise RuntimeError({NMS!r})\n")
    if version_py:
        (pkg / "version.py").write_text(f"__version__ = {version_py!r}\n")
    if built_for:
        version, torch_version = built_for
        meta = root / f"torchvision-{version}.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torchvision\nVersion: {version}\n"
                                       f"Requires-Dist: torch=={torch_version}\n")
    return root


def with_path(root):
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}


def other_build():
    """A build tag unlike the installed torch's: the CUDA torchvision beside a CPU torch of the user report."""
    return "cu128" if stack._build_kind(stack._build_version("torch")) != "CUDA 12" else "cpu"


def assert_mend(line):
    torch_pin = importlib.metadata.version("torch").partition("+")[0]
    assert "torchvision" in line and f"pip install --force-reinstall torch=={torch_pin} torchvision==" in line, line


def test_the_installed_stack_passes():
    """In a fresh process: nothing to report, and TORCHINDUCTOR_CACHE_DIR (which importing torchvision sets to
    torch's /tmp default) left unset for vitfood.common to read the user's own."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    p = subprocess.run([sys.executable, "-c", "import os, vitfood.stack as s; "
                        "print(s.problem(), os.environ.get('TORCHINDUCTOR_CACHE_DIR'))"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0 and p.stdout.split() == ["None", "None"], p.stdout + p.stderr[-2000:]


def test_the_torchvision_release_for_a_torch_release():
    """torch 2.x goes with torchvision 0.(x + 15), the same patch; the installed pair follows it."""
    assert stack._vision_pin("2.14.1") == "torchvision==0.29.1"
    assert stack._vision_pin("2.13.0+cpu") == "torchvision==0.28.0"
    assert stack._vision_pin("2.5.1") == "torchvision==0.20.1"
    assert stack._vision_pin("3.0.0") == "torchvision"
    torch_v, vision_v = importlib.metadata.version("torch"), importlib.metadata.version("torchvision")
    if torch_v.startswith("2."):
        assert stack._vision_pin(torch_v).rsplit(".", 1)[0] == "torchvision==" + vision_v.rsplit(".", 1)[0]


def test_build_kinds():
    assert [stack._build_kind(v) for v in ("2.13.0+cpu", "0.28.0+cu128", "2.14.1+cu130", "2.14.1", "2.6.0a0+git1f2e")] \
        == ["CPU", "CUDA 12", "CUDA 13", None, None]


def test_torchvision_that_does_not_import_is_one_line(tmp_path, cache_dir):
    """Metadata that agrees, an import that fails as a torchvision built for another torch does: found where the run
    fails (transformers' image processor), not paid for by a healthy start; --help never imports torchvision."""
    env = with_path(fake_torchvision(tmp_path / "fake"))
    assert cli("--help", env=env).returncode == 0
    p = cli(*TINY, "--max-steps", "1", "--output-dir", tmp_path / "run", env=env)
    line = error_line(p)
    assert f"fails to import with torch {stack._build_version('torch')} (RuntimeError: {NMS})" in line, line
    assert_mend(line)


def test_torchvision_pinned_to_another_torch_is_one_line(tmp_path):
    major, minor = map(int, importlib.metadata.version("torch").split(".")[:2])
    other = f"{major}.{minor - 1}.0"
    root = fake_torchvision(tmp_path, built_for=(f"0.{minor - 1 + 15}.0", other))
    line = error_line(cli("--help", env=with_path(root)), alone=True)
    assert f"torchvision 0.{minor + 14}.0 needs torch=={other}, and torch {importlib.metadata.version('torch')}" \
           f" is installed" in line, line
    assert_mend(line)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_torchvision_of_another_build_is_one_line_for_every_command(tmp_path, module):
    """The user report: torch from PyTorch's CPU index, torchvision from PyPI's CUDA build (here the other way
    round where the installed torch is a CPU build). Found before anything heavy is imported."""
    torch_build = stack._build_version("torch")
    vision_build = f"{importlib.metadata.version('torchvision').partition('+')[0]}+{other_build()}"
    line = error_line(cli("--help", module=f"vitfood.{module}",
                          env=with_path(fake_torchvision(tmp_path, version_py=vision_build))), alone=True)
    if stack._build_kind(torch_build):  # a torch without a build tag (macOS): found by the import instead
        assert f"torch {torch_build} ({stack._build_kind(torch_build)}) and torchvision {vision_build}" in line, line
        assert "are different builds" in line, line
    assert_mend(line)


def test_console_script_is_one_line_and_a_library_import_an_import_error(tmp_path):
    if not stack._build_kind(stack._build_version("torch")):
        pytest.skip("a torch without a build tag (macOS, Windows): builds are not compared")
    vision_build = f"{importlib.metadata.version('torchvision').partition('+')[0]}+{other_build()}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **with_path(fake_torchvision(tmp_path, version_py=vision_build))}
    script = os.path.join(os.path.dirname(sys.executable), "vitfood-predict")
    if os.path.exists(script):  # vitfood installed (pip install -e .): its console script imports, then cli()
        line = error_line(subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120, env=env),
                          alone=True)
        assert "are different builds" in line, line
    p = subprocess.run([sys.executable, "-c", "import vitfood.predict"], capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 1 and "ImportError: torch " in p.stderr and "are different builds" in p.stderr, \
        p.stderr[-2000:]
