"""Shared access to ../shared/parity (official-architecture fixtures) for the parity tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

PARITY_ROOT = Path(__file__).resolve().parents[2] / "shared" / "parity"


def missing_reason(label: str, folder: Path) -> str:
    return f"{label} parity fixtures not found at {folder}"


def full_configs(folder: Path) -> dict[str, Any]:
    """``configs`` of the folder's full_shapes.json ({} when the fixtures are absent)."""
    path = folder / "full_shapes.json"
    return json.loads(path.read_text())["configs"] if path.is_file() else {}


def config_params(folder: Path, reason: str) -> list[Any]:
    """One pytest param per released config, or a single skipped one without fixtures."""
    names = list(full_configs(folder))
    if not names:
        return [pytest.param(None, id="no-fixtures", marks=pytest.mark.skip(reason))]
    return [pytest.param(name, id=name) for name in names]


def load_check_fixture() -> ModuleType:
    """The shared checker, imported from its file (it is not a package)."""
    spec = importlib.util.spec_from_file_location("check_fixture", PARITY_ROOT / "check_fixture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
