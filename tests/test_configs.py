"""Every config in configs/ parses, and its model config is one its architecture accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from restore_cli.models.registry import get_architecture
from restore_cli.train.config import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_parses_and_its_model_config_is_valid(path):
    config = load_config(path)
    spec = get_architecture(config.model.arch).spec(dict(config.model.config))
    assert spec.arch == config.model.arch
