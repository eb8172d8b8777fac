"""The documentation says what the software does: the options page is what `config.Config` says, every docs page
is linked from the README, and the README stays short enough to read in five minutes."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_options_page_is_generated_from_the_config():
    p = subprocess.run([sys.executable, str(ROOT / "docs" / "options.py"), "--check"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    page = (ROOT / "docs" / "options.md").read_text()
    from vitfood.config import Config
    import dataclasses
    assert all(f"`--{f.name.replace('_', '-')}`" in page for f in dataclasses.fields(Config))


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, page.name
    for link in ("ARCHITECTURE.md", "bench/README.md"):
        assert link in readme
