"""A preprocessed nnU-Net target, opened once: ``PreprocessedTarget``.

Ranking (:func:`nnunet_te.ranking.rank.rank_zoo`), risk maps
(:func:`nnunet_te.risk.compute.compute_dataset_risk_maps`), the trainer and the CLI all start
from the same three things: nnU-Net's plans for one configuration, the dataset's
``dataset.json`` and the preprocessed cases. This module reads them and checks them in one
place:

- :func:`configuration_manager`: the one "configuration not in the plans" check (also used by
  :func:`nnunet_te.networks.weights.network_for_configuration`, which builds from plans alone);
- :class:`PlannedConfiguration`: what a network for the target must fit (input channels,
  classes, spatial dimension, patch size) and the label manager (ignore label, regions);
- :class:`PreprocessedTarget`: the above plus the preprocessed folder: the data folder found by
  nnU-Net's own ``infer_dataset_class``, the case ids, and the one case reader
  (:class:`PreprocessedCases`); region-based datasets are refused here unless asked for;
- :func:`training_labels`: the one label normalisation: nnU-Net's ``-1`` (outside the nonzero
  mask) is trained as background (its ``RemoveLabelTansform``), so it is background here too; a
  dataset ignore label becomes :data:`IGNORE`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from nnunet_te.data.paths import dataset_name, nnunet_preprocessed
from nnunet_te.errors import UserError

#: Label of voxels left out of every estimate (a dataset's ignore label).
IGNORE = -1


def training_labels(seg: np.ndarray, ignore_label: int | None) -> np.ndarray:
    """``seg`` (any integer array) as int16 with nnU-Net's ``-1`` -> 0 and ``ignore_label`` -> IGNORE."""
    seg = np.asarray(seg).astype(np.int16)
    seg[seg < 0] = 0
    if ignore_label is not None:
        seg[seg == ignore_label] = IGNORE
    return seg


def configuration_manager(plans_manager, configuration: str):
    """nnU-Net's ``ConfigurationManager`` of ``configuration``; UserError naming the available ones."""
    if configuration not in plans_manager.available_configurations:
        raise UserError(f"configuration {configuration!r} not in the plans; available: "
                        f"{plans_manager.available_configurations}")
    return plans_manager.get_configuration(configuration)


def _json(path_or_dict: str | Path | Mapping, *, remedy: str = "") -> dict:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = Path(path_or_dict)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found{remedy}")
    return json.loads(path.read_text())


class PlannedConfiguration:
    """One configuration of nnU-Net plans with its ``dataset.json``: what a network must fit.

    ``plans`` and ``dataset_json`` are dicts or paths of JSON files. Raises UserError for a
    configuration the plans lack.
    """

    def __init__(self, plans: str | Path | Mapping, configuration: str, dataset_json: str | Path | Mapping):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.plans = _json(plans)
        self.dataset_json = _json(dataset_json)
        self.configuration = configuration
        self.plans_manager = PlansManager(self.plans)
        self.configuration_manager = configuration_manager(self.plans_manager, configuration)
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)

    @property
    def plans_name(self) -> str:
        return self.plans_manager.plans_name

    @property
    def data_identifier(self) -> str:
        return self.configuration_manager.data_identifier

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.configuration_manager.patch_size)

    @property
    def ndim(self) -> int:
        return len(self.patch_size)

    @cached_property
    def n_inputs(self) -> int:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        return determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)

    @property
    def n_classes(self) -> int:
        """Output channels of the network (classes incl. background; regions for region-based data)."""
        return self.label_manager.num_segmentation_heads

    @property
    def ignore_label(self) -> int | None:
        return self.label_manager.ignore_label

    @property
    def labels(self) -> dict:
        """``dataset.json``'s ``labels`` (name -> value)."""
        return self.dataset_json.get("labels", {})


class PreprocessedTarget(PlannedConfiguration):
    """A dataset preprocessed by ``nnUNetv2_plan_and_preprocess`` for one configuration and plans.

    Open it with :meth:`open` (dataset id or name, resolved once; ``preprocessed_root`` replaces
    ``$nnUNet_preprocessed``) or construct it from a dataset folder and the plans and
    ``dataset.json``, as paths or dicts (the trainer's own risk folder holds a link to the data).
    ``folder`` is the dataset folder ``<root>/DatasetXXX_Name``; nothing of it is read until
    :attr:`data_folder`, :attr:`case_ids` or :meth:`cases` are used.

    Raises UserError for a configuration the plans lack and, unless ``regions=True``, for a
    region-based dataset (ranking metrics, risk maps and the risk-weighted loss need one class per
    voxel).
    """

    def __init__(self, folder: str | Path, plans: str | Path | Mapping, configuration: str,
                 dataset_json: str | Path | Mapping, *, regions: bool = False):
        self.folder = Path(folder)
        remedy = f": run `nnUNetv2_plan_and_preprocess -d {self.folder.name} -c {configuration}` first"
        super().__init__(_json(plans, remedy=remedy), configuration, _json(dataset_json, remedy=remedy))
        if self.label_manager.has_regions and not regions:
            raise UserError("region-based datasets are not supported: ranking, risk maps and the risk-weighted "
                            "loss need one class per voxel (softmax over classes)")

    @classmethod
    def open(cls, dataset: int | str, configuration: str, plans: str = "nnUNetPlans", *,
             preprocessed_root: str | Path | None = None, regions: bool = False) -> PreprocessedTarget:
        """``<root>/DatasetXXX_Name/{plans}.json`` and ``dataset.json`` for ``configuration``;
        ``root`` is ``preprocessed_root`` or ``$nnUNet_preprocessed``."""
        name = dataset_name(dataset)
        folder = Path(preprocessed_root if preprocessed_root is not None else nnunet_preprocessed()) / name
        return cls(folder, folder / f"{plans}.json", configuration, folder / "dataset.json", regions=regions)

    @property
    def dataset_name(self) -> str:
        """``DatasetXXX_Name``."""
        return self.folder.name

    @property
    def data_folder(self) -> Path:
        """``<folder>/<data_identifier>``; FileNotFoundError with the command that creates it."""
        data = self.folder / self.data_identifier
        if not data.is_dir():
            raise FileNotFoundError(f"preprocessed data folder {data} does not exist; run "
                                    f"`nnUNetv2_plan_and_preprocess -d {self.dataset_name} -c {self.configuration}` "
                                    "first")
        return data

    @cached_property
    def dataset_class(self) -> type:
        """nnU-Net's dataset class for the stored format (``infer_dataset_class``, as its trainer)."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        return infer_dataset_class(str(self.data_folder))

    @cached_property
    def case_ids(self) -> list[str]:
        """Sorted ids of every preprocessed case; FileNotFoundError when there is none."""
        ids = sorted(self.dataset_class.get_identifiers(str(self.data_folder)))
        if not ids:
            raise FileNotFoundError(f"no preprocessed cases in {self.data_folder}; re-run "
                                    "`nnUNetv2_plan_and_preprocess`")
        return ids

    def check_cases(self, case_ids: Sequence[str], what: str = "case_ids") -> list[str]:
        """``case_ids`` sorted, after checking each is a preprocessed case with its files.

        Raises UserError for an empty list, FileNotFoundError naming the first case without
        preprocessed files.
        """
        if not case_ids:
            raise UserError(f"{what} is empty: no case to work on")
        present = set(self.case_ids)
        suffixes = _CASE_FILES.get(self.dataset_class.__name__, (".pkl",))
        absent = [c for c in case_ids if c not in present
                  or not all((self.data_folder / f"{c}{s}").is_file() for s in suffixes)]
        if absent:
            raise FileNotFoundError(f"{len(absent)} case(s) of {what} lack preprocessed files in "
                                    f"{self.data_folder} (need {', '.join(f'<case>{s}' for s in suffixes)}), "
                                    f"e.g. {absent[0]!r}; re-run `nnUNetv2_plan_and_preprocess`")
        return sorted(case_ids)

    def cases(self, case_ids: Sequence[str] | None = None, *, slices: bool | None = None) -> PreprocessedCases:
        """The one reader of preprocessed cases (default: every case; ``slices`` default: a 2D
        configuration is read slice by slice)."""
        return PreprocessedCases(self, self.case_ids if case_ids is None else case_ids,
                                 slices=self.ndim == 2 if slices is None else slices)


#: Files of one case per nnU-Net dataset class (others: the ``.pkl`` beside the identifiers).
_CASE_FILES = {"nnUNetDatasetBlosc2": (".b2nd", "_seg.b2nd", ".pkl"), "nnUNetDatasetNumpy": (".npz", ".pkl")}


class PreprocessedCases(Sequence):
    """Preprocessed cases as ``(item_id, image (C, *spatial) float32, labels (*spatial))``, read on
    access so one case is in memory at a time; labels as :func:`training_labels`.

    With ``slices`` every slice along the first axis is an item (nnU-Net stores 2D images as
    one-slice volumes; its 2d configuration of a 3D dataset works slice by slice); items of a
    multi-slice case are named ``<case>:z<index>``. Whole cases are also read by id
    (:meth:`case_image`, :meth:`case_labels`, :meth:`case_shape`, :meth:`stored`).
    """

    def __init__(self, target: PreprocessedTarget, case_ids: Sequence[str], *, slices: bool = False):
        self._dataset = target.dataset_class(str(target.data_folder), list(case_ids))
        self._ignore = target.ignore_label
        self._items: list[tuple[str, int | None]] = []
        self.case_ids: list[str] = []
        for case in case_ids:
            depth = self.case_shape(case)[0] if slices else None
            items = [None] if depth is None else range(depth)
            self._items += [(case, z) for z in items]
            self.case_ids += [case if depth in (None, 1) else f"{case}:z{z}" for z in items]

    def __len__(self) -> int:
        return len(self._items)

    def _read(self, case: str, z: int | None, part: int) -> np.ndarray:
        array = self._dataset.load_case(case)[part]
        return np.asarray(array[:] if z is None else array[:, z])

    def stored(self, case: str) -> tuple[np.ndarray, np.ndarray]:
        """(data (C, *spatial), seg (1, *spatial)) of a whole case as nnU-Net stored them."""
        return self._read(case, None, 0), self._read(case, None, 1)

    def case_shape(self, case: str) -> tuple[int, ...]:
        """Spatial shape of a whole case (read from the array header only)."""
        return tuple(self._dataset.load_case(case)[0].shape[1:])

    def case_image(self, case: str) -> np.ndarray:
        return self._read(case, None, 0).astype(np.float32)

    def case_labels(self, case: str) -> np.ndarray:
        return training_labels(self._read(case, None, 1)[0], self._ignore)

    def labels(self, index: int) -> np.ndarray:
        return training_labels(self._read(*self._items[index], 1)[0], self._ignore)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.case_ids[index], self._read(*self._items[index], 0).astype(np.float32), self.labels(index)


def check_classes_present(cases: PreprocessedCases, n_classes: int, labels: dict, *,
                          remedy: str = "sample more cases (all: no --cases) or fix the labels") -> None:
    """Raise UserError naming every foreground class absent from all sampled cases, and ``remedy``."""
    present: set[int] = set()
    for index in range(len(cases)):
        present |= set(np.unique(cases.labels(index)).tolist())
    names = {int(v): k for k, v in labels.items() if isinstance(v, int)}
    absent = [c for c in range(1, n_classes) if c not in present]
    if absent:
        described = ", ".join(f"{c} ({names.get(c, '?')})" for c in absent)
        raise UserError(f"foreground class(es) {described} occur in none of the {len(cases)} sampled "
                        f"cases; no metric can score them: {remedy}")
