"""weights.yaml validation, sha256 verification, the download cache and its sidecars."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from restore_cli import weights
from restore_cli.errors import ConfigError, WeightsError
from restore_cli.weights import (
    WeightsEntry,
    cache_dir,
    cached_path,
    default_entry,
    entry_status,
    load_weights_registry,
    resolve_weights,
    sha256_file,
    verify_sha256,
)

PAYLOAD = b"not really weights, but bytes with a known sha256\n" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
WRONG_SHA = "0" * 64


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache and starts online (the suite runs with HF_HUB_OFFLINE=1)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RESTORE_CLI_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("RESTORE_CLI_OFFLINE", raising=False)
    return cache


def valid_entry(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "tiny",
        "arch": "nafnet",
        "config": {"width": 8},
        "url": "https://example.invalid/tiny.pth",
        "sha256": PAYLOAD_SHA,
        "licence": "MIT",
        "source": "tests",
        "description": "a test entry",
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


def write_registry(tmp_path: Path, models: Any) -> Path:
    path = tmp_path / "weights.yaml"
    path.write_text(yaml.safe_dump({"models": models}), encoding="utf-8")
    return path


def url_entry(url: str, sha256: str | None = PAYLOAD_SHA, name: str = "tiny") -> WeightsEntry:
    return WeightsEntry(name=name, arch="nafnet", url=url, sha256=sha256, licence="MIT", source="t")


def source_file(tmp_path: Path, data: bytes = PAYLOAD) -> Path:
    path = tmp_path / "remote" / "tiny.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# ----------------------------------------------------------------------------- registry


def test_valid_registry_parses_into_entries(tmp_path: Path) -> None:
    path = write_registry(
        tmp_path,
        [
            valid_entry(tasks=["denoise"], wrapping="params", sha256=PAYLOAD_SHA.upper()),
            valid_entry(name="other", url=None, hub="owner/repo/sub/w.safetensors"),
            valid_entry(name="packaged", url=None, file="w.safetensors", default=True),
        ],
    )
    entries = load_weights_registry(path)
    assert list(entries) == ["tiny", "other", "packaged"]
    tiny = entries["tiny"]
    assert tiny.tasks == ("denoise",)
    assert tiny.wrapping == "params"
    assert tiny.sha256 == PAYLOAD_SHA  # normalised to lower case
    assert entries["other"].sha256 == PAYLOAD_SHA
    assert entries["other"].download_url == (
        "https://huggingface.co/owner/repo/resolve/main/sub/w.safetensors"
    )
    assert default_entry(path) == entries["packaged"]


def test_no_default_entry_gives_none(tmp_path: Path) -> None:
    assert default_entry(write_registry(tmp_path, [valid_entry()])) is None
    assert load_weights_registry(write_registry(tmp_path, [])) == {}


BAD_ENTRIES = {
    "unknown key": ([valid_entry(colour="red")], "'colour'"),
    "missing licence": ([valid_entry(licence=None)], "'licence' is missing"),
    "missing config": ([valid_entry(config=None)], "'config' is missing"),
    "config not a mapping": ([valid_entry(config=[1, 2])], "'config'"),
    "no location": ([valid_entry(url=None)], "exactly once"),
    "two locations": ([valid_entry(file="w.safetensors")], "exactly once"),
    "short sha256": ([valid_entry(sha256="abc123")], "'sha256' must be 64"),
    "non-hex sha256": ([valid_entry(sha256="g" * 64)], "'sha256' must be 64"),
    "url without sha256": ([valid_entry(sha256=None)], "'sha256' is missing"),
    "file without sha256": (
        [valid_entry(url=None, sha256=None, file="w.safetensors")],
        "'sha256' is missing",
    ),
    "hub without sha256": (
        [valid_entry(url=None, sha256=None, hub="owner/repo/w.safetensors")],
        "'sha256' is missing",
    ),
    "file with a folder": ([valid_entry(url=None, file="../w.safetensors")], "'file'"),
    "bad url scheme": ([valid_entry(url="ftp://x/y.pth")], "'url'"),
    "bad hub id": ([valid_entry(url=None, hub="just-a-name")], "'hub'"),
    "default not bool": ([valid_entry(default="yes")], "'default'"),
    "tasks not a list": ([valid_entry(tasks="denoise")], "'tasks'"),
    "empty name": ([valid_entry(name="")], "'name'"),
    "name with a space": ([valid_entry(name="two words")], "'name'"),
    "duplicate names": ([valid_entry(), valid_entry()], "'tiny' is listed twice"),
    "two defaults": (
        [valid_entry(default=True), valid_entry(name="b", default=True)],
        "'default' is true for several entries (tiny, b)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES), ids=list(BAD_ENTRIES))
def test_registry_validation_names_entry_and_key(tmp_path: Path, case: str) -> None:
    models, expected = BAD_ENTRIES[case]
    with pytest.raises(ConfigError) as caught:
        load_weights_registry(write_registry(tmp_path, models))
    message = str(caught.value)
    assert expected in message
    assert str(tmp_path / "weights.yaml") in message
    assert "\n" not in message
    if case not in ("two defaults",):
        assert "tiny" in message or "#1" in message


@pytest.mark.parametrize(
    "text",
    ["models: {a: 1}\n", "- a\n- b\n", "models: []\nextra: 1\n", "models: [\n"],
    ids=["models-not-list", "top-level-list", "extra-top-level-key", "invalid-yaml"],
)
def test_registry_shape_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "weights.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="weights"):
        load_weights_registry(path)


def test_missing_registry_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read weights registry"):
        load_weights_registry(tmp_path / "nope.yaml")


def test_shipped_registry_is_valid_and_uses_known_architectures() -> None:
    from restore_cli.models.registry import get_architecture

    entries = load_weights_registry()
    assert sum(e.default for e in entries.values()) <= 1
    for entry in entries.values():
        if entry.arch != "spandrel":
            get_architecture(entry.arch)  # raises for an unregistered architecture
        assert entry.licence and entry.source


def test_packaged_symlink_points_at_top_level_file() -> None:
    packaged = Path(weights.__file__).parent / "weights.yaml"
    top_level = Path(weights.__file__).parents[1] / "weights.yaml"
    assert packaged.resolve() == top_level.resolve()


# ----------------------------------------------------------------------------- cache location


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("RESTORE_CLI_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "restore-cli"


# ----------------------------------------------------------------------------- shipped files


@pytest.fixture
def shipped_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "package-weights"
    folder.mkdir()
    monkeypatch.setattr(weights, "SHIPPED_WEIGHTS_DIR", folder)
    return folder


def shipped_entry(sha256: str = PAYLOAD_SHA) -> WeightsEntry:
    return WeightsEntry(
        name="packaged", arch="nafnet", file="w.safetensors", sha256=sha256, licence="MIT"
    )


def test_shipped_file_is_verified_and_returned(shipped_dir: Path) -> None:
    (shipped_dir / "w.safetensors").write_bytes(PAYLOAD)
    assert entry_status(shipped_entry()) == "shipped"
    assert resolve_weights(shipped_entry()) == shipped_dir / "w.safetensors"


def test_shipped_file_with_wrong_sha256_is_refused(shipped_dir: Path) -> None:
    path = shipped_dir / "w.safetensors"
    path.write_bytes(PAYLOAD)
    with pytest.raises(WeightsError) as caught:
        resolve_weights(shipped_entry(WRONG_SHA))
    message = str(caught.value)
    assert str(path) in message and WRONG_SHA in message and PAYLOAD_SHA in message


def test_missing_shipped_file(shipped_dir: Path) -> None:
    assert entry_status(shipped_entry()) == "missing"
    with pytest.raises(WeightsError, match="missing"):
        resolve_weights(shipped_entry())


# ----------------------------------------------------------------------------- downloads


def test_file_url_download_is_verified_into_cache(tmp_path: Path, isolated_cache: Path) -> None:
    source = source_file(tmp_path)
    entry = url_entry(source.as_uri())
    assert entry_status(entry) == "downloadable"
    path = resolve_weights(entry)
    assert path == cached_path(entry)
    assert path.is_relative_to(isolated_cache)
    assert path.read_bytes() == PAYLOAD
    assert entry_status(entry) == "cached"
    source.unlink()  # a second call must be a cache hit, not another download
    assert resolve_weights(entry) == path
    assert not [p for p in files_under(path.parent) if p.name.endswith(".part")]


def test_file_url_still_works_when_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = url_entry(source_file(tmp_path).as_uri())
    assert entry_status(entry) == "downloadable"
    assert resolve_weights(entry).read_bytes() == PAYLOAD


def test_wrong_sha_download_leaves_nothing_cached(tmp_path: Path, isolated_cache: Path) -> None:
    entry = url_entry(source_file(tmp_path).as_uri(), sha256=WRONG_SHA)
    for _ in range(2):  # the failed attempt must not turn into a cache hit
        with pytest.raises(WeightsError) as caught:
            resolve_weights(entry)
        message = str(caught.value)
        assert WRONG_SHA in message and PAYLOAD_SHA in message and "nothing was saved" in message
        assert files_under(isolated_cache / "weights") == []
        assert entry_status(entry) == "downloadable"


def test_failed_download_names_url_and_target(tmp_path: Path, isolated_cache: Path) -> None:
    entry = url_entry((tmp_path / "does-not-exist.pth").as_uri())
    with pytest.raises(WeightsError) as caught:
        resolve_weights(entry)
    message = str(caught.value)
    assert entry.url in message and str(cached_path(entry)) in message
    assert files_under(isolated_cache / "weights") == []


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "RESTORE_CLI_OFFLINE"])
def test_offline_missing_file_says_where_to_put_it(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "1")

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tried to use the network while offline")

    monkeypatch.setattr(weights.urllib.request, "urlopen", no_network)
    entry = url_entry("https://example.invalid/models/tiny.pth")
    assert entry_status(entry) == "missing"
    with pytest.raises(WeightsError) as caught:
        resolve_weights(entry)
    message = str(caught.value)
    assert "\n" not in message
    assert entry.url in message
    assert str(cached_path(entry)) in message
    assert variable in message


def test_download_not_allowed_by_caller(tmp_path: Path) -> None:
    entry = url_entry(source_file(tmp_path).as_uri())
    with pytest.raises(WeightsError, match="not allowed"):
        resolve_weights(entry, allow_download=False)


def test_hub_entry_without_huggingface_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "_huggingface_hub_available", lambda: False)
    entry = WeightsEntry(name="hubbed", arch="nafnet", hub="owner/repo/w.safetensors")
    assert entry_status(entry) == "missing"
    with pytest.raises(WeightsError) as caught:
        resolve_weights(entry)
    message = str(caught.value)
    assert "huggingface_hub" in message
    assert "https://huggingface.co/owner/repo/resolve/main/w.safetensors" in message
    assert str(cached_path(entry)) in message


def test_cached_file_that_changed_is_refused(tmp_path: Path) -> None:
    entry = url_entry(source_file(tmp_path).as_uri())
    path = resolve_weights(entry)
    path.write_bytes(b"tampered")
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve_weights(entry)


# ----------------------------------------------------------------------------- hashing


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = source_file(tmp_path)
    assert sha256_file(path) == PAYLOAD_SHA


def test_sidecar_avoids_rehash_until_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = source_file(tmp_path)
    assert verify_sha256(path, PAYLOAD_SHA) == PAYLOAD_SHA
    assert weights.sidecar_path(path).is_file()

    calls: list[Path] = []
    real_sha256_file = weights.sha256_file

    def counting_sha256_file(target: str | Path) -> str:
        calls.append(Path(target))
        return real_sha256_file(target)

    monkeypatch.setattr(weights, "sha256_file", counting_sha256_file)
    assert verify_sha256(path, PAYLOAD_SHA) == PAYLOAD_SHA
    assert calls == []  # unchanged size and mtime: the sidecar answers

    # Same size, new content and mtime: must be re-hashed and refused.
    stat = path.stat()
    path.write_bytes(PAYLOAD[::-1])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        verify_sha256(path, PAYLOAD_SHA)
    assert calls == [path]

    # Different size: re-hashed again, and the new hash is what the sidecar now remembers.
    path.write_bytes(b"short")
    assert verify_sha256(path, None) == hashlib.sha256(b"short").hexdigest()
    assert len(calls) == 2
