"""Shared fixtures: paths to the real data and the reference values beside the checkout.

``../shared`` holds the project's real data and the official-implementation reference values.
CI always has it; on a machine without it the tests that need it are skipped, except under
CI=true where its absence is an error (a silently skipped parity test would prove nothing).
"""

import json
import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("NNUNET_TE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def _require(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path} is missing; CI must run beside ../shared")
        pytest.skip(f"{path} not available on this machine")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(SHARED / "data")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _require(SHARED / "reference")


@pytest.fixture(scope="session")
def reference_cases(reference_dir) -> list[dict]:
    return json.loads((reference_dir / "expected.json").read_text())["cases"]
