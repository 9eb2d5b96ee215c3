"""Packaging pieces that pyproject.toml cannot express (everything else lives there).

1. The top-level ``trainers/`` folder (the folder nnU-Net scans for ``-tr`` names) is installed as
   the package ``nnunet_te_trainers``. Declaring packages here, not in ``[tool.setuptools]``,
   is needed because setuptools' ``packages.find`` cannot rename a folder.
2. ``nnunet_te_trainers.pth`` is written into site-packages by both ``pip install .`` and
   ``pip install -e .``; at interpreter start it appends the trainer folder to
   ``nnUNet_extTrainer`` (see ``trainers/__init__.py``), so nnU-Net finds our trainers with no
   manual export.
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH_NAME = "nnunet_te_trainers.pth"
# site.py executes .pth lines that start with "import"; register() only touches os.environ.
PTH_LINE = "import nnunet_te_trainers; nnunet_te_trainers.register()\n"


class BuildPyWithPth(build_py):
    """build_py that also writes :data:`PTH_NAME` to the root of what gets installed.

    A wheel installs its root into site-packages: a regular build packs ``build_lib``; an
    editable build (PEP 660) links the packages and packs the ``install_lib`` folder that
    setuptools' ``editable_wheel`` points at the wheel root, so the file goes there instead.
    """

    def run(self):
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, PTH_NAME), "w", encoding="utf-8") as handle:
            handle.write(PTH_LINE)


setup(
    packages=find_packages(include=["nnunet_te*"]) + ["nnunet_te_trainers"],
    package_dir={"nnunet_te_trainers": "trainers"},
    cmdclass={"build_py": BuildPyWithPth},
)
