"""A digest of every file of a tag, recorded in its completion marker at the commit and compared
before a tag is trusted (`--resume`'s preflight, `inspect`, every conversion): flipped bytes
inside a tensor keep the file's size and torch never reads the zip CRCs, so without it a
corrupted checkpoint loads silently.

sha256 through `hashlib.file_digest` (SHA extensions where the CPU has them; its cost against
the save's: BENCHMARKS.md, "Checkpoint digests"). Each rank hashes the files it wrote, right after
fsyncing them (still in its page cache, all ranks at once), into a hidden `.digests_<rank>.json`
of the tag; rank 0 merges them into the marker at the commit and hashes whatever no rank
reported. A tag committed before digests existed has none: it is still trusted, with a line
saying its bytes were not verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

ALGORITHM = "sha256"
DIGESTS_KEY = "digests"  # in the completion marker: file name -> "sha256:<hex>"

# (path, size, mtime_ns, inode) -> digest: `inspect` checks the tag, then opens it, in one process.
_seen: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _seen:
        with open(path, "rb") as f:
            _seen[key] = f"{ALGORITHM}:{hashlib.file_digest(f, ALGORITHM).hexdigest()}"
    return _seen[key]


def tag_digests(tag_dir: str, names: list[str]) -> dict[str, str]:
    return {name: file_digest(os.path.join(tag_dir, name)) for name in names}


def rank_digests_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f".digests_{rank:05d}.json")  # hidden: not a data file of the tag


def write_rank_digests(tag_dir: str, rank: int, names: list[str]) -> None:
    path = rank_digests_file(tag_dir, rank)
    with open(path + ".tmp", "w") as f:
        json.dump(tag_digests(tag_dir, names), f)
    os.replace(path + ".tmp", path)


def take_rank_digests(tag_dir: str) -> dict[str, str]:
    """The digests every rank reported for the tag (their files removed)."""
    found: dict[str, str] = {}
    for name in sorted(os.listdir(tag_dir)):
        if name.startswith(".digests_") and name.endswith(".json"):
            with open(os.path.join(tag_dir, name)) as f:
                found.update(json.load(f))
            os.remove(os.path.join(tag_dir, name))
    return found


def digest_problems(tag_dir: str, marker: dict, marker_name: str) -> list[str]:
    """'<file>: sha256 X, <marker> recorded Y' for each present file whose bytes differ from the
    commit's; [] and a line on stderr for a tag committed without digests. Files missing or of
    another size are the size check's findings, not repeated here."""
    recorded = marker.get(DIGESTS_KEY)
    if recorded is None:
        print(f"note: checkpoint {tag_dir!r} was committed without file digests (before they existed): its "
              f"files' sizes are checked, their bytes are not", file=sys.stderr, flush=True)
        return []
    sizes = marker.get("files", {})
    problems = []
    for name, expected in sorted(recorded.items()):
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path) or os.path.getsize(path) != sizes.get(name):
            continue
        found = file_digest(path)
        if found != expected:
            problems.append(f"{path}: content differs from the commit ({found[:23]}..., {marker_name} recorded "
                            f"{expected[:23]}...): the file is corrupted or was changed after the save")
    return problems
