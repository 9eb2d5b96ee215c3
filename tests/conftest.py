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


@pytest.fixture(scope="session")
def hippocampus_nnunet(tmp_path_factory):
    """12 bundled hippocampus cases as nnU-Net dataset 991, through the real command lines:
    ``nnunet-te data`` then ``nnUNetv2_plan_and_preprocess -c 3d_fullres``. Shared by every
    end-to-end test (planning and preprocessing is the slow part). Tests that write into the
    preprocessed folder must copy it first."""
    import subprocess
    import sys
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("nnunet")
    folders = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env.update({k: str(v) for k, v in folders.items()}, nnUNet_compile="f", nnUNet_def_n_proc="1",
               nnUNet_n_proc_DA="1")
    bin_dir = Path(sys.executable).parent
    for command in (["nnunet-te", "data", "msd_hippocampus", "-d", "991", "--cases", "12"],
                    ["nnUNetv2_plan_and_preprocess", "-d", "991", "-c", "3d_fullres", "-np", "1"]):
        done = subprocess.run([str(bin_dir / command[0]), *command[1:]], env=env, cwd=root,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}"
    return SimpleNamespace(root=root, env=env, bin=bin_dir, dataset_id=991,
                           raw=next(folders["nnUNet_raw"].glob("Dataset991_*")),
                           preprocessed=next(folders["nnUNet_preprocessed"].glob("Dataset991_*")),
                           results=folders["nnUNet_results"])
