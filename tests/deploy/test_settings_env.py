"""Every GRADSTREAM_* variable the deploy files set names a real server setting and parses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gradstream.server.config import Settings
from tests.deploy.conftest import (
    COMPONENTS,
    OVERLAYS,
    PENDING_SETTINGS,
    Manifest,
    config_data,
    container,
    dockerfile_env,
    load_compose,
    render_with_component,
)

PREFIX = "GRADSTREAM_"


def _names(variables: dict[str, Any]) -> set[str]:
    return {k for k in variables if k.startswith(PREFIX)}


def _unknown(names: set[str]) -> set[str]:
    # The server would silently ignore these: pydantic-settings reads only its fields.
    known = set(Settings.model_fields) | PENDING_SETTINGS
    return {n for n in names if n[len(PREFIX) :].lower() not in known}


def _manifest_variables(objects: list[Manifest]) -> dict[str, str]:
    variables = dict(config_data(objects))
    variables.update({e["name"]: e.get("value", "") for e in container(objects).get("env", [])})
    return variables


def test_overlay_variables_are_settings(overlay: list[Manifest]) -> None:
    """ConfigMap keys and container env of every overlay name Settings fields."""
    variables = _manifest_variables(overlay)
    assert _names(variables), "no GRADSTREAM_* settings found: the ConfigMap moved?"
    assert _unknown(_names(variables)) == set()


@pytest.mark.parametrize("component", COMPONENTS, ids=[p.name for p in COMPONENTS])
def test_component_variables_are_settings(tmp_path: Path, component: Path) -> None:
    """Settings a component adds are Settings fields too."""
    objects = render_with_component(tmp_path / "with", OVERLAYS[0], component)
    assert _unknown(_names(_manifest_variables(objects))) == set()


def test_image_and_compose_variables_are_settings() -> None:
    """The Dockerfile's ENV and compose's environment name Settings fields."""
    image = _names(dockerfile_env())
    assert "GRADSTREAM_HOST" in image
    compose = set()
    for service in load_compose()["services"].values():
        compose |= _names(service.get("environment", {}))
    assert compose
    assert _unknown(image | compose) == set()


def test_a_typo_is_caught() -> None:
    """A misspelt variable is reported (it would be ignored at run time)."""
    assert _unknown({"GRADSTREAM_DRAIN_TIMOUT"}) == {"GRADSTREAM_DRAIN_TIMOUT"}


def test_overlay_settings_parse(overlay: list[Manifest], monkeypatch: pytest.MonkeyPatch) -> None:
    """The server accepts the overlay's values: Settings() reads them from the environment."""
    variables = {
        k: v
        for k, v in _manifest_variables(overlay).items()
        if k.startswith(PREFIX) and k[len(PREFIX) :].lower() in Settings.model_fields
    }
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # raises on a value the server would refuse at start-up
    # Read from the environment, not left at the defaults (127.0.0.1 serves no other pod).
    assert settings.host == variables["GRADSTREAM_HOST"] != Settings.model_fields["host"].default
    assert settings.port == int(variables["GRADSTREAM_PORT"])
