"""What a run did, per file: the run CSV, JSON lines on stdout, and the closing summary."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

from restore_cli.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, the CSV is simply opened
    fcntl = None  # type: ignore[assignment]

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"
STATUS_FAILED = "failed"


@dataclass
class FileRecord:
    """One row of the run CSV (column order = field order)."""

    input: str
    output: str
    model: str
    mode: str = ""
    task: str = ""
    height: int | str = ""
    width: int | str = ""
    tile: int | str = ""
    precision: str = ""
    device: str = ""
    seconds: float | str = ""
    status: str = STATUS_OK
    error: str = ""
    # Model-specific columns after the fixed ones (e.g. a routed model's ``route_*``).
    extra: dict[str, Any] = field(default_factory=dict)


CSV_COLUMNS = [f.name for f in fields(FileRecord) if f.name != "extra"]


class RunLog:
    """Writes each record as soon as it is final: CSV row and optional JSON line.

    The CSV is a log, so it is written in place, one unbuffered write per row: a killed run
    leaves a valid prefix that says exactly which files were done. It is locked while the run
    lasts; a second run logging to the same path (two runs into one folder) writes
    ``NAME.<pid>.csv`` instead of interleaving rows with the first. A row that cannot be written
    (disk full) is cut off again, reported once, and the CSV is left alone from then on; the
    run goes on and counts as failed.
    """

    def __init__(
        self,
        csv_path: Path | None,
        json_stream: TextIO | None = None,
        extra_columns: Sequence[str] = (),
    ) -> None:
        self.csv_path = csv_path
        self.json_stream = json_stream
        self.counts = {STATUS_OK: 0, STATUS_SKIPPED: 0, STATUS_FAILED: 0}
        self.megapixels = 0.0
        self.notices: list[str] = []  # one line each, for the caller to print
        self.log_error: str | None = None
        self._fd: int | None = None
        self._size = 0  # bytes of complete rows in the CSV
        self._columns = [*CSV_COLUMNS, *extra_columns]
        if csv_path is not None:
            self._fd = self._open_locked(csv_path)
            self._append(None)

    def _open_locked(self, path: Path) -> int:
        """Open ``path`` for writing under an exclusive lock (or a per-process sibling)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = _locked(path)
            if fd is None:
                sibling = path.with_name(f"{path.stem}.{os.getpid()}{path.suffix}")
                self.notices.append(f"{path} is in use by another run; this run logs to {sibling}")
                self.csv_path = path = sibling
                fd = _locked(path)
        except OSError as error:
            raise ConfigError(
                f"cannot write the run CSV {path} ({error.strerror or error}); "
                "check -o or pass --csv"
            ) from None
        if fd is None:  # pragma: no cover - our own pid's file is locked by nobody else
            raise ConfigError(f"cannot lock the run CSV {path}")
        return fd

    def add(self, record: FileRecord) -> None:
        self.counts[record.status] += 1
        if record.status == STATUS_OK and record.height and record.width:
            self.megapixels += int(record.height) * int(record.width) / 1e6
        row = asdict(record)
        row |= row.pop("extra")
        if isinstance(row["seconds"], float):
            row["seconds"] = f"{row['seconds']:.3f}"
        self._append(row)
        if self.json_stream is not None:
            self.json_stream.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.json_stream.flush()

    def _append(self, row: dict[str, Any] | None) -> None:
        """Write one row (the header for None) completely, or cut it off and stop logging."""
        if self._fd is None:
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self._columns, restval="")
        if row is None:
            writer.writeheader()
        else:
            writer.writerow(row)
        data = memoryview(text.getvalue().encode("utf-8"))
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as error:
            with suppress(OSError):
                os.ftruncate(self._fd, self._size)  # no half row at the end of the log
            self.log_error = (
                f"{self.csv_path}: cannot write the run CSV any more "
                f"({error.strerror or error}); it stops here"
            )
            self.close()
            return
        self._size += len(data)

    @property
    def failed(self) -> int:
        return self.counts[STATUS_FAILED]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def summary(self, seconds: float, interrupted: bool = False) -> str:
        ok, skipped, failed = (self.counts[s] for s in (STATUS_OK, STATUS_SKIPPED, STATUS_FAILED))
        rate = f", {self.megapixels / seconds:.2f} MP/s" if ok and seconds > 0 else ""
        head = "interrupted: " if interrupted else ""
        text = f"{head}restored {ok}, skipped {skipped}, failed {failed} in {seconds:.1f} s{rate}"
        if self.csv_path is not None:
            text += f" (log: {self.csv_path})"
        return text


def _locked(path: Path) -> int | None:
    """A descriptor of ``path``, emptied, under an exclusive lock; None if another holds it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            pass  # a filesystem without locks
    os.ftruncate(fd, 0)  # only now: truncating first would wipe the other run's log
    return fd
