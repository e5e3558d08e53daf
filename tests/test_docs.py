"""The documentation stays in step with the code: config descriptions, the generated reference,
the YAML files in configs/, the manifest fields and the links between pages."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

from dist_bnn.checkpoint.manifest import Manifest
from dist_bnn.config import Config, load_config
from dist_bnn.config_reference import (
    REGENERATE_COMMAND,
    UndocumentedFieldError,
    attribute_docstrings,
    render_reference,
    section_classes,
    undocumented_fields,
)

DOCS = REPO / "docs"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_every_config_field_has_description():
    assert undocumented_fields() == [], "add a docstring below each of these fields in dist_bnn/config.py"


@dataclass
class _PartlyDocumented:
    described: int = 1
    """A field with a description."""
    bare: int = 2


def test_missing_description_detected():
    docs = attribute_docstrings(_PartlyDocumented)
    assert docs == {"described": "A field with a description."}


def test_reference_covers_every_section():
    assert [name for name, _ in section_classes()] == [item.name for item in dataclasses.fields(Config)]


def test_reference_rejects_undocumented_field(monkeypatch):
    monkeypatch.setattr("dist_bnn.config_reference.section_classes", lambda: [("example", _PartlyDocumented)])
    with pytest.raises(UndocumentedFieldError, match="example.bare"):
        render_reference()


def test_configuration_page_is_generated():
    expected = render_reference()
    actual = (DOCS / "configuration.md").read_text()
    assert actual == expected, f"docs/configuration.md is out of date; regenerate it with `{REGENERATE_COMMAND}`"


def test_reference_command_prints_page():
    result = subprocess.run(
        [sys.executable, "-m", "dist_bnn.config_reference"], capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (DOCS / "configuration.md").read_text(), f"regenerate it with `{REGENERATE_COMMAND}`"


def test_reference_lists_every_key():
    page = (DOCS / "configuration.md").read_text()
    for section, cls in section_classes():
        for item in dataclasses.fields(cls):
            assert f"| `{section}.{item.name}` |" in page


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_config_file_loads(path):
    load_config(path)


def test_configs_exist():
    assert CONFIGS, "configs/ holds no YAML file"


def test_manifest_fields_documented():
    page = (DOCS / "run-directory.md").read_text()
    for item in dataclasses.fields(Manifest):
        assert f"| `{item.name}` |" in page, f"manifest field {item.name} is missing from docs/run-directory.md"


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda page: page.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
