"""weights.yaml, the download cache and sha256 verification.

Every weight file the program knows is listed in ``weights.yaml`` (schema in that file's header).
A file is either shipped inside the package (``restore_cli/weights/``) or fetched once from a URL
or the Hugging Face Hub into the cache. Nothing is used before its sha256 matches: downloads go to
a temporary file that is renamed into place only after verification, so an interrupted or wrong
download never looks like a cache hit. Hashing multi-GB files on every run would be slow, so a
small sidecar records (size, mtime_ns, sha256) of files already verified.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from restore_cli.errors import ConfigError, WeightsError
from restore_cli.io.atomic import lock_file, remove_stale_temp_files

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_REGISTRY_PATH = Path(__file__).parent / "weights.yaml"
# Shipped weight files; a module attribute so tests can point it elsewhere.
SHIPPED_WEIGHTS_DIR = PACKAGE_DIR / "weights"

EntryStatus = Literal["shipped", "cached", "downloadable", "missing"]

REQUIRED_KEYS = ("name", "arch", "config", "licence", "source", "description")
LOCATION_KEYS = ("file", "url", "hub")
OPTIONAL_KEYS = ("sha256", "default", "tasks", "wrapping")
ALLOWED_KEYS = frozenset(REQUIRED_KEYS + LOCATION_KEYS + OPTIONAL_KEYS)

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256_PATTERN = re.compile(r"^[0-9a-fA-F]{64}$")
_URL_SCHEMES = ("https://", "http://", "file://")
_CHUNK_BYTES = 1 << 20
_TRUE_VALUES = {"1", "true", "yes", "on"}

Fail = Callable[[str, str], ConfigError]


@dataclass(frozen=True)
class WeightsEntry:
    """One entry of weights.yaml: where a weight file comes from and what network it fits."""

    name: str
    arch: str
    config: dict[str, Any] = field(default_factory=dict, hash=False)
    licence: str = ""
    source: str = ""
    description: str = ""
    file: str | None = None
    url: str | None = None
    hub: str | None = None
    sha256: str | None = None
    default: bool = False
    tasks: tuple[str, ...] = ()
    wrapping: str | None = None

    @property
    def download_url(self) -> str | None:
        """The URL a user can fetch by hand (for hub entries, the Hub's resolve URL)."""
        if self.url:
            return self.url
        if self.hub:
            repo_id, filename = split_hub_id(self.hub)
            return f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
        return None


# ----------------------------------------------------------------------------- registry


def load_weights_registry(path: str | Path | None = None) -> dict[str, WeightsEntry]:
    """Read and validate weights.yaml; any problem is a ConfigError naming the entry and key."""
    registry_path = Path(path) if path is not None else DEFAULT_REGISTRY_PATH
    document = _read_yaml(registry_path)
    raw_entries = _models_list(document, registry_path)
    entries: dict[str, WeightsEntry] = {}
    for index, raw in enumerate(raw_entries):
        entry = _parse_entry(raw, index, registry_path)
        if entry.name in entries:
            raise ConfigError(f"{registry_path}: model name {entry.name!r} is listed twice")
        entries[entry.name] = entry
    defaults = [entry.name for entry in entries.values() if entry.default]
    if len(defaults) > 1:
        raise ConfigError(
            f"{registry_path}: key 'default' is true for several entries ({', '.join(defaults)}); "
            "at most one may be the default"
        )
    return entries


def default_entry(path: str | Path | None = None) -> WeightsEntry | None:
    """The entry marked ``default: true``, or None while no default model is shipped."""
    return next((e for e in load_weights_registry(path).values() if e.default), None)


def split_hub_id(hub: str) -> tuple[str, str]:
    """``owner/repo/path/to/file`` → (``owner/repo``, ``path/to/file``)."""
    parts = hub.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            f"cannot read weights registry {path}: {error.strerror or error}"
        ) from None
    except UnicodeDecodeError as error:  # found by tests/fuzz_atheris.py
        raise ConfigError(
            f"weights registry {path} is not UTF-8 text (byte {error.start}: {error.reason})"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        detail = str(error).replace("\n", " ")
        raise ConfigError(f"weights registry {path} is not valid YAML: {detail}") from None


def _models_list(document: Any, path: Path) -> list[Any]:
    if document is None:
        return []
    if not isinstance(document, Mapping) or set(document) - {"models"}:
        raise ConfigError(f"{path}: the top level must be a mapping with the single key 'models'")
    models = document.get("models")
    if models is None:
        return []
    if not isinstance(models, list):
        raise ConfigError(f"{path}: 'models' must be a list of entries")
    return models


def _parse_entry(raw: Any, index: int, path: Path) -> WeightsEntry:
    label = _entry_label(raw, index)

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}: entry {label}: key {key!r} {problem}")

    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: entry {label} must be a mapping of keys to values")
    unknown = sorted(str(key) for key in raw if key not in ALLOWED_KEYS)
    if unknown:
        raise fail(unknown[0], f"is not a known key (allowed: {', '.join(sorted(ALLOWED_KEYS))})")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise fail(key, "is missing")
    locations = [key for key in LOCATION_KEYS if raw.get(key) is not None]
    if len(locations) != 1:
        found = ", ".join(locations) or "none"
        raise fail("file/url/hub", f"must be given exactly once (found: {found})")
    location = locations[0]

    for key in ("name", "arch", "licence", "source", location):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise fail(key, "must be a non-empty string")
    if not isinstance(raw["description"], str):
        raise fail("description", "must be text")
    if not _NAME_PATTERN.match(raw["name"]):
        raise fail("name", "may only contain letters, digits, '.', '_' and '-'")
    if not isinstance(raw["config"], Mapping):
        raise fail("config", "must be a mapping of constructor arguments")
    _check_location(location, raw[location], fail)
    sha256 = _checked_sha256(raw.get("sha256"), location, fail)
    default = raw.get("default", False)
    if not isinstance(default, bool):
        raise fail("default", "must be true or false")
    tasks = raw.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise fail("tasks", "must be a list of task names")
    wrapping = raw.get("wrapping")
    if wrapping is not None and (not isinstance(wrapping, str) or not wrapping):
        raise fail("wrapping", "must be a string such as 'params' or 'state_dict:net.'")

    return WeightsEntry(
        name=raw["name"],
        arch=raw["arch"],
        config=dict(raw["config"]),
        licence=raw["licence"],
        source=raw["source"],
        description=raw["description"],
        sha256=sha256,
        default=default,
        tasks=tuple(tasks),
        wrapping=wrapping,
        **{location: raw[location]},
    )


def _entry_label(raw: Any, index: int) -> str:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    return f"#{index + 1} ({name!r})" if isinstance(name, str) else f"#{index + 1}"


def _check_location(location: str, value: str, fail: Fail) -> None:
    if location == "file" and (Path(value).name != value or value in (".", "..")):
        raise fail("file", "must be a plain file name inside restore_cli/weights/")
    if location == "url" and not value.startswith(_URL_SCHEMES):
        raise fail("url", f"must start with one of {', '.join(_URL_SCHEMES)}")
    if location == "hub":
        repo_id, filename = split_hub_id(value)
        if repo_id.count("/") != 1 or not filename or "" in value.split("/"):
            raise fail("hub", "must look like 'owner/repo/filename'")


def _checked_sha256(value: Any, location: str, fail: Fail) -> str:
    """Every entry needs one: nothing is loaded that was not checked byte for byte."""
    if value is None:
        raise fail("sha256", f"is missing (required for every entry, '{location}' included)")
    if not isinstance(value, str) or not _SHA256_PATTERN.match(value):
        raise fail("sha256", "must be 64 hexadecimal characters")
    return value.lower()


# ----------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """Where downloaded weights live: ``$RESTORE_CLI_CACHE`` or ``~/.cache/restore-cli``."""
    configured = os.environ.get("RESTORE_CLI_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "restore-cli"


def cached_path(entry: WeightsEntry) -> Path:
    """Cache location of a url/hub entry: one folder per entry, so equal basenames never clash."""
    if entry.url:
        basename = Path(urllib.parse.unquote(urllib.parse.urlsplit(entry.url).path)).name
    elif entry.hub:
        basename = Path(split_hub_id(entry.hub)[1]).name
    else:
        raise ValueError(f"entry {entry.name!r} is a shipped file, not a download")
    return cache_dir() / "weights" / entry.name / (basename or "weights")


def shipped_path(entry: WeightsEntry) -> Path:
    if entry.file is None:
        raise ValueError(f"entry {entry.name!r} is not a shipped file")
    return SHIPPED_WEIGHTS_DIR / entry.file


def downloads_disabled() -> str | None:
    """The environment variable that turns network downloads off, if one is set."""
    for variable in ("RESTORE_CLI_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in _TRUE_VALUES:
            return variable
    return None


def entry_status(entry: WeightsEntry) -> EntryStatus:
    """shipped / cached (present, not re-verified here) / downloadable / missing (cannot be
    had now: shipped file absent, or not cached while offline or without huggingface_hub)."""
    if entry.file is not None:
        return "shipped" if shipped_path(entry).is_file() else "missing"
    if cached_path(entry).is_file():
        return "cached"
    if _needs_network(entry) and downloads_disabled():
        return "missing"
    if entry.hub and not _huggingface_hub_available():
        return "missing"
    return "downloadable"


# ----------------------------------------------------------------------------- resolving


def resolve_weights(entry: WeightsEntry, *, allow_download: bool = True) -> Path:
    """Path of the entry's verified weight file, downloading it into the cache if needed."""
    if entry.file is not None:
        path = shipped_path(entry)
        if not path.is_file():
            raise WeightsError(
                f"shipped weights for {entry.name!r} are missing: {path} (reinstall restore-cli)"
            )
        verify_sha256(path, entry.sha256)
        return path

    target = cached_path(entry)
    if target.is_file():
        verify_sha256(target, entry.sha256, hint="delete it to download it again")
        return target
    blocked = _download_blocker(entry, allow_download)
    if blocked:
        raise WeightsError(
            f"weights for {entry.name!r} are not in the cache and {blocked}; "
            f"download {entry.download_url} and save it as {target}"
        )
    _download_verified(entry, target)
    return target


def _download_blocker(entry: WeightsEntry, allow_download: bool) -> str | None:
    if not allow_download:
        return "downloading is not allowed here"
    variable = downloads_disabled()
    if variable and _needs_network(entry):
        return f"downloads are off ({variable}=1)"
    if entry.hub and not _huggingface_hub_available():
        return "the huggingface_hub package is not installed (pip install huggingface_hub)"
    return None


def _needs_network(entry: WeightsEntry) -> bool:
    # A file:// URL is a local copy, so it stays usable when downloads are switched off.
    return not (entry.url or "").startswith("file://")


def _huggingface_hub_available() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def _download_verified(entry: WeightsEntry, target: Path) -> None:
    """Fetch into a temporary file beside ``target``; rename only after the sha256 matched.

    The ``.part`` file stays locked while we write it, so partial files of killed downloads
    (unlocked) are removed before a new download while a concurrent one is left alone.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    stale = re.compile(rf"^\.{re.escape(target.name)}\..+\.part$")
    for path in remove_stale_temp_files([target.parent], pattern=stale):
        log.info("removed %s, left by an interrupted download", path)
    descriptor, temp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".part"
    )
    lock_file(descriptor)
    temp_path = Path(temp_name)
    try:
        log.info("downloading %s to %s", entry.download_url, target)
        try:
            if entry.url:
                actual = _download_url(entry.url, temp_path)
            else:
                actual = _download_hub(entry.hub or "", temp_path)
        except (OSError, ValueError, http.client.HTTPException) as error:
            raise WeightsError(
                f"could not download {entry.download_url} ({_short_reason(error)}); "
                f"download it by hand and save it as {target}"
            ) from None
        if entry.sha256 and actual != entry.sha256:
            raise WeightsError(
                f"download of {entry.download_url} does not match its sha256 "
                f"(expected {entry.sha256}, got {actual}); nothing was saved to {target}"
            )
        os.replace(temp_path, target)
        _write_sidecar(target, actual)
    finally:
        temp_path.unlink(missing_ok=True)
        os.close(descriptor)


def _download_url(url: str, destination: Path) -> str:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, destination.open("wb") as out:
        while chunk := response.read(_CHUNK_BYTES):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _download_hub(hub: str, destination: Path) -> str:
    from huggingface_hub import hf_hub_download

    repo_id, filename = split_hub_id(hub)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=".hub-"))
    try:
        fetched = Path(hf_hub_download(repo_id=repo_id, filename=filename, local_dir=staging))
        shutil.copyfile(fetched, destination)  # into our locked .part file, not over it
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sha256_file(destination)


def _short_reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
    return str(reason).replace("\n", " ")


# ----------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB chunks so multi-GB files never sit in memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str | None, *, hint: str = "") -> str:
    """Check a file against its expected sha256, trusting the sidecar while size and mtime match."""
    actual = verified_sha256(path)
    if expected is not None and actual != expected.lower():
        advice = f"; {hint}" if hint else ""
        raise WeightsError(
            f"sha256 mismatch for {path}: expected {expected.lower()}, got {actual}{advice}"
        )
    return actual


def verified_sha256(path: Path) -> str:
    """sha256 of ``path``, from the sidecar when the file is unchanged since it was hashed."""
    stat = path.stat()
    recorded = _read_sidecar(path)
    if (
        recorded
        and recorded.get("size") == stat.st_size
        and recorded.get("mtime_ns") == stat.st_mtime_ns
    ):
        return str(recorded["sha256"])
    actual = sha256_file(path)
    _write_sidecar(path, actual)
    return actual


def sidecar_path(path: Path) -> Path:
    """Sidecars live in the cache (the package folder may be read-only), keyed by file path."""
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "verified" / f"{key}.json"


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("path") != str(path.resolve()):
        return None
    return record


def _write_sidecar(path: Path, sha256: str) -> None:
    """Best effort: a cache we cannot write only costs a re-hash next time."""
    stat = path.stat()
    record = {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": sha256,
    }
    sidecar = sidecar_path(path)
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        temp = sidecar.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(temp, sidecar)
    except OSError as error:
        log.debug("could not write sha256 sidecar %s: %s", sidecar, error)
