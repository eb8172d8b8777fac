"""Is the installed stack whole: do torch, torchvision, transformers and datasets import, and is torchvision a
build made for the installed torch?

A broken install otherwise surfaces far from its cause: a torchvision built for another torch (pip fell back to
PyPI for torchvision while torch came from PyTorch's CPU index) ends `vitfood.train` in transformers' "Could not
import module 'ViTImageProcessor'", 40 lines below the real "operator torchvision::nms does not exist". Here it is
one line that names the cause and the command that mends it.

Checked in two steps, so that a whole stack pays nothing: as each command starts (require), what the packages'
metadata say (torchvision's requirement on torch, the two builds, transformers' and datasets' versions) and that
torch imports, which the command does next anyway; and only when a command fails with an error of no known kind
(run_main), whether each of the four imports (torchvision and datasets cost 2-3 s of imports that `--help` and a
usage error never need).
"""

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys

PACKAGES = ("torch", "torchvision", "transformers", "datasets")  # imported in this order: each needs the ones before
TORCH_INDEX = "https://download.pytorch.org/whl/"


def require(module_name):
    """The first thing each entry module (vitfood.train, ...) does, with its __name__. A command ends with one
    `error:` line and exit status 2: run as `python -m vitfood.X` (__main__) or as a console script `vitfood-X`,
    which imports the module before it calls cli(), so that neither run_main nor cli() is there yet to do it.
    Imported as a library (a test, a notebook), a broken stack is an ImportError with the same line."""
    line = _mismatched_pair() or _out_of_range() or _import_all(PACKAGES[:1])
    if line is None:
        return
    if module_name == "__main__" or os.path.basename((sys.argv or [""])[0]).startswith("vitfood-"):
        sys.stderr.write(f"error: {line}\n")
        sys.exit(2)
    raise ImportError(line)


@functools.cache
def problem():
    """None when the four packages import and agree; else what is wrong and the command that mends it, one line.
    Cached: a process checks once."""
    return _mismatched_pair() or _out_of_range() or _import_all(PACKAGES)


def _mismatched_pair():
    """Before importing anything (an import of a mismatched torchvision can fail anywhere, or not at all until a
    kernel is called): torchvision's own requirement on torch, and the two builds (CPU, CUDA major, ...)."""
    torch_v, vision_v = _version("torch"), _version("torchvision")
    if torch_v is None or vision_v is None:
        return None  # a missing one is named by _import_all
    wanted = _needs("torchvision").get("torch")  # '==2.14.1' (the one it was built with), or '>=2.14.0'
    if wanted and not _fits(torch_v, wanted):
        return (f"torchvision {vision_v} needs torch{wanted}, and torch {torch_v} is installed; "
                f"mend: {_pair_command()}")
    # the build's own version (torch/version.py: '2.14.1+cu130') carries the tag even for PyPI's default build,
    # whose package version ('2.14.1') has none
    torch_b, vision_b = _build_version("torch"), _build_version("torchvision")
    torch_kind, vision_kind = _build_kind(torch_b), _build_kind(vision_b)
    if torch_kind and vision_kind and torch_kind != vision_kind:
        return (f"torch {torch_b} ({torch_kind}) and torchvision {vision_b} ({vision_kind}) are different builds; "
                f"mend: {_pair_command()}")
    return None


def _out_of_range():
    """transformers and datasets within vitfood's own requirements (pyproject.toml), when vitfood is installed."""
    for name, spec in _needs("vitfood").items():
        installed = _version(name)
        if name in ("transformers", "datasets") and installed and not _fits(installed, spec):
            return f"vitfood needs {name}{spec}, and {name} {installed} is installed; mend: pip install '{name}{spec}'"
    return None


def _import_all(packages):
    # importing torchvision imports torch._dynamo, which sets TORCHINDUCTOR_CACHE_DIR to its /tmp default; put back
    # the user's own setting (or none), which vitfood.common reads when it is imported, after this check
    inductor_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        for name in packages:
            try:
                importlib.import_module(name)
            except Exception as e:  # ImportError, RuntimeError, OSError, AttributeError: all mean "does not import"
                return _import_failure(name, e)
    finally:
        if inductor_dir is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir
    return None


def _import_failure(name, e):
    """The line for a package whose import raised `e`: the package, its version, the error's first line."""
    pair = name in ("torch", "torchvision")
    if isinstance(e, ModuleNotFoundError) and e.name == name:
        if name == "torchvision" and _version("torch"):
            return f"torchvision is not installed; mend: pip install {_vision_pin(_version('torch'))}"
        return f"{name} is not installed; mend: pip install {'torch torchvision' if pair else _requirement(name)}"
    version = (_build_version(name) if pair else _version(name)) or "(no version)"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = f"{type(e).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")
    with_torch = f" with torch {_build_version('torch')}" if name == "torchvision" else ""
    mend = _pair_command() if pair else f"pip install --force-reinstall {name}=={version}"
    return f"{name} {version} fails to import{with_torch} ({cause}); mend: {mend}"


def _pair_command():
    """Reinstall the installed torch and the torchvision release made for it, from PyPI (reachable where PyTorch's
    index is not; on Linux its torch brings CUDA libraries, and runs on a CPU as well); PyTorch's index for the
    installed build (CPU-only wheels where the build has no tag) is the alternative."""
    torch_v = _version("torch") or ""
    base = re.match(r"\d+(\.\d+)*", torch_v)
    tag = torch_v.partition("+")[2]
    index = tag if _build_kind(torch_v) and tag else "cpu"
    return (f"pip install --force-reinstall {'torch==' + base[0] if base else 'torch'} {_vision_pin(torch_v)} "
            f"(or PyTorch's {index} wheels: add --index-url {TORCH_INDEX}{index})")


def _vision_pin(torch_version):
    """The torchvision release made with a torch release: for torch 2.x, 0.(x + 15) with the same patch (torch 2.14.1,
    torchvision 0.29.1; 2.5.1, 0.20.1). For another torch, no pin: pip picks one that declares it fits."""
    m = re.match(r"2\.(\d+)\.(\d+)", torch_version)
    return f"torchvision==0.{int(m[1]) + 15}.{m[2]}" if m else "torchvision"


def _version(name):
    """The installed package's version (its metadata), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _build_version(name):
    """torch's or torchvision's `__version__` as their version.py has it, read without importing the package; else
    the package version."""
    spec = importlib.util.find_spec(name)
    for folder in (spec and spec.submodule_search_locations) or []:
        try:
            with open(os.path.join(folder, "version.py"), encoding="utf-8") as fh:
                found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)", fh.read(), re.M)
        except OSError:
            continue
        if found:
            return found[1]
    return _version(name)


def _build_kind(version):
    """What a build runs on, from its local version tag: 'CPU', 'CUDA 12' (cu126 and cu128 mix: one CUDA runtime),
    'ROCm', 'XPU'; None for no tag (PyPI's default build on macOS and Windows) or another one (+git...: built from
    source), which are not compared."""
    tag = (version or "").partition("+")[2]
    if tag == "cpu":
        return "CPU"
    if re.fullmatch(r"cu\d{2,}", tag):
        return f"CUDA {tag[2:-1]}"
    if re.fullmatch(r"rocm[\d.]+", tag):
        return "ROCm"
    return "XPU" if tag == "xpu" else None


def _needs(dist):
    """An installed package's requirements that hold everywhere (no marker), {name: specifier}: torchvision's
    'torch (>=2.14.0)' is {'torch': '>=2.14.0'}. A regex, not packaging.requirements: its import alone costs more
    than this whole check."""
    try:
        texts = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:  # vitfood run from a checkout that was never installed
        return {}
    found = (re.fullmatch(r"\s*([\w.-]+)\s*(?:\[[^]]*\])?\s*\(?\s*([^;()]*?)\s*\)?\s*", text) for text in texts)
    return {m[1].lower(): m[2] for m in found if m}


def _fits(version, spec):
    """Whether `version` is within `spec`; True where either cannot be read (not this check's business)."""
    try:
        from packaging.specifiers import SpecifierSet  # a dependency of transformers, datasets, huggingface_hub
        from packaging.version import Version
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except (ImportError, ValueError):  # no packaging; an invalid specifier or version (a URL, a local build)
        return True


def _requirement(name):
    """vitfood's requirement on a package, quoted for a shell ('transformers<6,>=5.0'), or its bare name."""
    spec = _needs("vitfood").get(name)
    return f"'{name}{spec}'" if spec else name
