"""A target preprocessed for other plans (another spacing, normalisation or architecture) by
nnU-Net's own preprocessing, written beside the user's plans and never over them.

Ranking a candidate at the geometry it was pre-trained at and fine-tuning it with nnU-Net both
need the target's cases as nnU-Net's ``DefaultPreprocessor`` writes them for a plans file that is
not the user's. :func:`preprocessed_for_plans` writes such a plans dict as
``<nnUNet_preprocessed>/<Dataset>/<plans_name>.json`` and preprocesses the raw dataset into the
plans' own data folder; the user's plans, data and ``gt_segmentations`` are never written to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nnunet_te.data.paths import nnunet_raw
from nnunet_te.data.target import PreprocessedTarget, configuration_manager
from nnunet_te.errors import UserError
from nnunet_te.io.files import atomic_write, exclusive


@dataclass(frozen=True)
class PreprocessedPlans:
    """What :func:`preprocessed_for_plans` made: the plans identifier (``-p``), its file, the data
    folder nnU-Net's preprocessing wrote, and whether this call wrote them (False: reused)."""

    plans_name: str
    plans_file: Path
    data_folder: Path
    created: bool


def resolved_configuration(plans: dict, configuration: str) -> dict:
    """The configuration's entries with ``inherits_from`` resolved (nnU-Net's ConfigurationManager)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return json.loads(json.dumps(configuration_manager(PlansManager(plans), configuration).configuration))


def _preprocessed_cases(folder: Path) -> set[str]:
    return {p.name[:-len(".b2nd")] for p in folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd")}


def preprocessed_for_plans(target: PreprocessedTarget, planned: dict, *, case_ids: list[str] | None = None,
                           num_processes: int = 1) -> PreprocessedPlans:
    """Write ``planned`` (a plans dict with one configuration, ``target``'s) beside ``target``'s
    plans and preprocess the dataset for it with nnU-Net's own preprocessor; return where. A plans
    file of that name with the same content and a data folder holding the cases are reused; one
    with other content, or a data folder without its plans file, raises UserError (nothing is
    replaced). ``case_ids``: only these cases are needed (a ranking's), and only those missing are
    preprocessed, case by case with the same preprocessor; None: every case (nnU-Net's whole-dataset
    run, which rewrites the folder: what training needs). Needs the raw dataset in ``nnUNet_raw``."""
    configuration = target.configuration
    plans_file = target.folder / f"{planned['plans_name']}.json"
    data_folder = target.folder / planned["configurations"][configuration]["data_identifier"]
    if plans_file.exists() and json.loads(plans_file.read_text()) != planned:
        raise UserError(f"{plans_file} exists with other content (another patch size, written from other plans of "
                        "yours (-p), or plans of another dataset version); it is not replaced: move it away, or "
                        "pass another --patch-size")
    if data_folder.exists() and not plans_file.exists():
        raise UserError(f"{data_folder} exists without {plans_file.name}: it is not ours to replace; move it away")
    raw = nnunet_raw() / target.folder.name
    if not raw.is_dir():
        raise UserError(f"the raw dataset {raw} is needed to preprocess it at the candidate's geometry "
                        "(nnU-Net preprocesses from raw images); set nnUNet_raw to where it is")
    expected = set(target.case_ids if case_ids is None else target.check_cases(case_ids))
    with exclusive(target.folder / f".{planned['plans_name']}.lock"):  # another shard may preprocess them now
        present = _preprocessed_cases(data_folder) if data_folder.is_dir() else set()
        if plans_file.exists() and present >= expected:
            return PreprocessedPlans(planned["plans_name"], plans_file, data_folder, created=False)
        text = json.dumps(planned, indent=2).encode()
        atomic_write(plans_file, lambda handle: handle.write(text))
        _preprocess(PreprocessedTarget(target.folder, planned, configuration, target.dataset_json, regions=True),
                    raw, None if case_ids is None else sorted(expected - present), num_processes)
    missing = expected - _preprocessed_cases(data_folder)
    if missing:
        raise RuntimeError(f"nnU-Net's preprocessing left {len(missing)} case(s) out of {data_folder}, "
                           f"e.g. {sorted(missing)[:3]}")
    return PreprocessedPlans(planned["plans_name"], plans_file, data_folder, created=True)


def _preprocess(planned: PreprocessedTarget, raw: Path, case_ids: list[str] | None, num_processes: int) -> None:
    """nnU-Net's own preprocessor of ``planned``'s configuration, from the raw dataset ``raw``: with
    ``case_ids`` None its whole-dataset ``run`` (what ``nnUNetv2_preprocess -plans_name`` runs,
    without the gt_segmentations copy that command makes into the user's folder), which rewrites
    the data folder; else ``run_case_save`` for those cases only, in this process, the rest of the
    folder left as it is."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    preprocessor = planned.configuration_manager.preprocessor_class(verbose=False)
    if case_ids is None:
        preprocessor.run(planned.dataset_name, planned.configuration, planned.plans_name, num_processes=num_processes)
        return
    files = get_filenames_of_train_images_and_targets(str(raw), planned.dataset_json)
    output = planned.folder / planned.data_identifier
    output.mkdir(exist_ok=True)
    for case in case_ids:
        preprocessor.run_case_save(str(output / case), files[case]["images"], files[case]["label"],
                                   planned.plans_manager, planned.configuration_manager, planned.dataset_json)
