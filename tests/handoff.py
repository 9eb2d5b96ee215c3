"""The end of ``nnunet-te rank ... --train 0``, run for a given winner: the hand-off (plans,
weights, risk maps, command), then the printed ``nnUNetv2_train`` command in a subprocess, to the
end and the prediction of its validation cases."""

import json
import subprocess
import sys
from pathlib import Path

from nnunet_te.data.target import PreprocessedTarget

BIN = Path(sys.executable).parent


def handoff_trains_to_the_end(tree, checkpoint: Path, folder: Path, *, plans: str, trainer: str,
                              patch_size: list[int] | None = None) -> str:
    """Hand ``checkpoint`` off as the winner of a ranking in ``folder`` with ``-tr RiskWeightedTrainer_cpu``,
    check the plans and ``trainer`` it names, run the command; return the training log."""
    from nnunet_te.ranking.rank import RankingResult
    from nnunet_te.ranking.zoo import Candidate
    from nnunet_te.training.handoff import prepare_training

    (folder / "ranking.json").write_text("{}")
    result = RankingResult([Candidate("winner", checkpoint, None, None, "")], None, "score", ["winner"], {},
                           folder, {"json": folder / "ranking.json"}, {})
    plan = prepare_training(result, tree.dataset_id, "3d_fullres", 0, trainer="RiskWeightedTrainer_cpu",
                            patch_size=patch_size, progress=False)
    assert plan.plans == plans
    assert plan.command[plan.command.index("-tr") + 1] == trainer
    assert plan.command[plan.command.index("-p") + 1] == plans
    target = PreprocessedTarget.open(tree.dataset_id, "3d_fullres", plans)
    assert len(list(plan.risk_maps.glob("*.npy"))) == len(target.case_ids)

    done = subprocess.run([str(BIN / plan.command[0]), *plan.command[1:]], env=tree.env, capture_output=True,
                          text=True, timeout=1800, check=False)
    fold = Path(tree.env["nnUNet_results"]) / target.dataset_name / f"{trainer}__{plans}__3d_fullres" / "fold_0"
    log = "\n".join(p.read_text() for p in fold.glob("training_log_*.txt")) if fold.is_dir() else ""
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:] + log[-2000:]
    assert (fold / "checkpoint_final.pth").is_file()
    options = json.loads((fold / "risk_options.json").read_text())
    assert Path(options["risk_folder"]) == plan.risk_maps  # the hand-off's maps, not recomputed
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    predicted = sorted(p.name for p in (fold / "validation").glob("*.nii.gz"))
    assert len(predicted) == len(summary["metric_per_case"]) >= 1
    return log
