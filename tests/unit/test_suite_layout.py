"""The suite's layout (tests/conftest.py): every test module sits in a tier, a unit test in the
folder of what it tests, and slow tests are marked, never named `*_slow.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import conftest
from tests.harness import REPO

TESTS = Path(REPO) / "tests"
TIERS = {"unit", "distributed", "e2e"}
# unit/<folder>: a package of moe_dist, or the scripts of tools/.
UNIT_FOLDERS = {p.name for p in (Path(REPO) / "moe_dist").iterdir() if (p / "__init__.py").is_file()} | {"tools"}


def test_every_test_module_sits_in_a_tier():
    misplaced = []
    for path in sorted(TESTS.rglob("test_*.py")):
        parts = path.relative_to(TESTS).parts
        if parts[0] not in TIERS:
            misplaced.append(f"{path.relative_to(REPO)}: not under tests/{{{','.join(sorted(TIERS))}}}/")
        elif parts[0] == "unit" and len(parts) > 2 and parts[1] not in UNIT_FOLDERS:
            misplaced.append(f"{path.relative_to(REPO)}: tests/unit/{parts[1]}/ names no package of moe_dist "
                             f"(expected one of {sorted(UNIT_FOLDERS)})")
    assert not misplaced, "\n".join(misplaced)


def test_a_module_named_slow_is_refused_at_collection(tmp_path):
    with pytest.raises(pytest.UsageError, match="mark slow tests with @pytest.mark.slow"):
        conftest.pytest_collect_file(tmp_path / "test_resume_slow.py", None)
    assert conftest.pytest_collect_file(tmp_path / "test_resume.py", None) is None
