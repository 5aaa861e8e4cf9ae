"""What a run did, per file: the run CSV, JSON lines on stdout, and the closing summary."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

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
    """Writes each record as soon as it is final: CSV row (flushed) and optional JSON line.

    The CSV is a log, so it is written in place and flushed per row: a killed run leaves a valid
    prefix that says exactly which files were done.
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
        self._file: TextIO | None = None
        self._writer: csv.DictWriter | None = None
        if csv_path is not None:
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = csv_path.open("w", newline="", encoding="utf-8")
            columns = [*CSV_COLUMNS, *extra_columns]
            self._writer = csv.DictWriter(self._file, fieldnames=columns, restval="")
            self._writer.writeheader()
            self._file.flush()

    def add(self, record: FileRecord) -> None:
        self.counts[record.status] += 1
        if record.status == STATUS_OK and record.height and record.width:
            self.megapixels += int(record.height) * int(record.width) / 1e6
        row = asdict(record)
        row |= row.pop("extra")
        if isinstance(row["seconds"], float):
            row["seconds"] = f"{row['seconds']:.3f}"
        if self._writer is not None and self._file is not None:
            self._writer.writerow(row)
            self._file.flush()
        if self.json_stream is not None:
            self.json_stream.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.json_stream.flush()

    @property
    def failed(self) -> int:
        return self.counts[STATUS_FAILED]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self, seconds: float, interrupted: bool = False) -> str:
        ok, skipped, failed = (self.counts[s] for s in (STATUS_OK, STATUS_SKIPPED, STATUS_FAILED))
        rate = f", {self.megapixels / seconds:.2f} MP/s" if ok and seconds > 0 else ""
        head = "interrupted: " if interrupted else ""
        text = f"{head}restored {ok}, skipped {skipped}, failed {failed} in {seconds:.1f} s{rate}"
        if self.csv_path is not None:
            text += f" (log: {self.csv_path})"
        return text
