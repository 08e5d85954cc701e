"""The suite's tiers and its one slow convention.

    tests/unit/<package>/   one package of moe_dist (or tools/) in one process
    tests/distributed/             several gloo processes against a single-process reference (harness.dist,
                            harness.train's run_deepspeed_ranks)
    tests/e2e/              the real `deepspeed` launcher and the entry points, faults injected
    tests/harness/          what the tiers share (imported as tests.harness.<name>)

Slow checks carry `@pytest.mark.slow` and nothing else marks them: the default run (`python -m
pytest -q`) deselects them, CI runs `-m slow` after it where time allows. A module that names
itself slow (`*_slow.py`) instead of marking its tests is refused at collection, so the
convention stays one.
"""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.stem.endswith("_slow"):
        raise pytest.UsageError(f"{file_path}: mark slow tests with @pytest.mark.slow instead of a _slow.py name "
                                f"(tests/conftest.py)")
    return None
