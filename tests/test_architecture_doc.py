"""docs/architecture.md names every module of reliable/ and integrations/, and the layer
picture agrees with the layers tests/test_structure.py enforces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_structure import LAYERS

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()


def module_files() -> list[Path]:
    files = [*(ROOT / "reliable").rglob("*.py"), *(ROOT / "integrations").glob("*.py")]
    return sorted(
        path
        for path in files
        if path.name != "__init__.py"
        and "migrations" not in path.parts
        and "templates" not in path.parts
    )


@pytest.mark.parametrize("path", module_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_is_named_in_the_architecture_document(path: Path) -> None:
    name = path.name
    stem = path.stem
    package = path.parent.name
    if package not in ("reliable", "store", "web", "integrations"):
        # A package of its own (the CLI, the dashboard) may be described as a whole.
        name = stem = package
    mentioned = re.search(rf"\b{re.escape(name)}\b", DOC) or re.search(
        rf"(·|`)\s*{re.escape(stem)}\b", DOC
    )
    assert mentioned, f"docs/architecture.md does not say what {path.relative_to(ROOT)} owns"


def test_the_picture_shows_every_module_of_every_layer() -> None:
    picture = DOC.split("## What each module owns")[0]
    for number, layer in enumerate(LAYERS):
        for module in layer:
            if module == "reliable":
                continue
            short = module.removeprefix("reliable.")
            assert re.search(rf"\b{re.escape(short)}\b", picture), (
                f"the layer picture in docs/architecture.md lacks {short} (layer {number})"
            )
