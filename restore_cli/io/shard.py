"""``--shard I/N``: split one job list between N independent processes (Slurm job arrays, a shell
loop over servers) with no coordinator.

A job belongs to shard ``hash(key) mod N``, where the key is the job's path relative to its input or
output root, without its extension: so the files of one image (``a.jpg`` restored to ``a.png``, a
prediction and its ground truth, which `eval` pairs by that same key) fall into the same shard
whichever command splits them. Hashing (rather than dealing the sorted list round-robin) keeps every
file in its shard when files are added to or removed from the folder, so a shard rerun after the
folder changed never redoes, or races for, another shard's files; relative keys make the split the
same on servers that mount the data at different places. Keys are case-folded, so outputs that
collide on a case-insensitive disk (``a.JPG``, ``a.jpg``) land in one shard, where the planner
reports the collision.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

from restore_cli.errors import ConfigError

_SHARD_PATTERN = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int

    def owns(self, relative: PurePath | str) -> bool:
        """Whether the job with this root-relative path (extension ignored) is this shard's."""
        path = PurePath(relative)
        key = (path.with_suffix("") if path.suffix else path).as_posix().casefold()
        digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index

    def tag(self, path: Path) -> Path:
        """``run.csv`` → ``run.shard-2-of-8.csv``: one file per shard in a shared folder."""
        return path.with_name(f"{path.stem}.shard-{self.index}-of-{self.count}{path.suffix}")


def parse_shard(text: str | None) -> Shard | None:
    """``"I/N"`` with 0 ≤ I < N, e.g. ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``."""
    if text is None:
        return None
    match = _SHARD_PATTERN.fullmatch(text)
    if match is None:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4 (shards are numbered from 0)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {text}: need 0 <= I < N (shards are numbered from 0)")
    return Shard(index, count)
