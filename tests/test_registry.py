"""Mode/task checks: instruction mode only for models that take task instructions."""

from __future__ import annotations

import pytest
from torch import nn

from restore_cli.errors import ModelError
from restore_cli.models.registry import LoadedModel, ModelSpec, apply_mode


def model(**spec) -> LoadedModel:
    return LoadedModel(name="m", module=nn.Identity(), spec=ModelSpec(arch="test", **spec))


def test_instruction_mode_sets_tasks_for_instructable_models():
    loaded = model(tasks=("denoise", "derain"), instructable=True)
    apply_mode(loaded, "instruction", ["derain"])
    assert loaded.conditions["tasks"] == ("derain",)
    apply_mode(loaded, "auto", [])
    assert "tasks" not in loaded.conditions


@pytest.mark.parametrize(
    ("spec", "mode", "tasks", "message"),
    [
        ({"tasks": ("denoise",)}, "instruction", ["denoise"], "takes no task instructions"),
        ({}, "instruction", ["denoise"], "takes no task instructions"),
        ({"tasks": ("denoise",), "instructable": True}, "instruction", ["fly"], "valid: denoise"),
        ({"tasks": ("denoise",), "instructable": True}, "instruction", [], "needs --task"),
        ({}, "auto", ["denoise"], "only used with --mode instruction"),
        ({}, "manual", [], "--mode 'manual'"),
    ],
)
def test_bad_mode_and_task_combinations_are_clear_errors(spec, mode, tasks, message):
    with pytest.raises(ModelError, match=message):
        apply_mode(model(**spec), mode, tasks)
