"""The documentation site stays in step with the code: one page per method, generated from the registry, each in the
site's navigation; the README stays a landing page."""

from pathlib import Path

import pytest
import yaml

from cliptune.methods import METHODS, method_page

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_has_its_generated_page(name):
    page = ROOT / "docs" / "methods" / f"{name}.md"
    assert page.is_file() and page.read_text() == method_page(name), "run: python scripts/write_method_pages.py"


def test_the_site_navigation_lists_every_method_page_and_the_readme_is_a_landing_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    methods = next(entry["Methods"] for entry in config["nav"] if isinstance(entry, dict) and "Methods" in entry)
    listed = {next(iter(item.values())) for item in methods}
    assert {f"methods/{name}.md" for name in METHODS} <= listed
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_the_changelog_has_a_section_for_this_version():
    import cliptune

    assert f"## [{cliptune.__version__}] - " in (ROOT / "CHANGELOG.md").read_text()
