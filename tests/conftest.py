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
#: nnU-Net's three folders, each named by the environment variable that points at it.
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


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
    end-to-end test (planning and preprocessing is the slow part) and never written to: tests
    that train, rank or compute maps work on :func:`copy_nnunet_tree`."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("nnunet")
    folders = {name: root / name for name in NNUNET_FOLDERS}
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env.update({k: str(v) for k, v in folders.items()}, nnUNet_compile="f", nnUNet_def_n_proc="1",
               nnUNet_n_proc_DA="1")
    bin_dir = Path(sys.executable).parent
    for command in (["nnunet-te", "data", "msd_hippocampus", "-d", "991", "--cases", "12"],
                    ["nnUNetv2_plan_and_preprocess", "-d", "991", "-c", "3d_fullres", "-np", "1"]):
        done = subprocess.run([str(bin_dir / command[0]), *command[1:]], env=env, cwd=root,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}"
    return _tree(root, env)


def _tree(root: Path, env: dict):
    from types import SimpleNamespace

    return SimpleNamespace(root=root, env=env, dataset_id=991,
                           raw=next((root / "nnUNet_raw").glob("Dataset991_*")),
                           preprocessed=next((root / "nnUNet_preprocessed").glob("Dataset991_*")),
                           results=root / "nnUNet_results")


def point_nnunet_at(env: dict, monkeypatch) -> None:
    """Set nnU-Net's folder variables of this process to those of ``env`` (a tree's) for one test."""
    for name in NNUNET_FOLDERS:
        monkeypatch.setenv(name, env[name])


def copy_nnunet_tree(shared, root: Path):
    """A private copy of ``hippocampus_nnunet`` under ``root`` (raw and preprocessed data, empty
    results) with the environment pointing at it, for tests that write."""
    import shutil

    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(shared.root / name, root / name)
    (root / "nnUNet_results").mkdir()
    env = {**shared.env, **{name: str(root / name) for name in NNUNET_FOLDERS}}
    return _tree(root, env)
