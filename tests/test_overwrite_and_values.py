"""Issue 14, items 6 and 7: nothing a user made is replaced silently; values are validated at the edge.

Each test fails without its guard. Commands run through the real CLI in subprocesses where that is
cheap (argument checks, refusals before any work); the risk-map resume and staging rules are tested
on ``compute_dataset_risk_maps`` directly (3 real preprocessed cases instead of the CLI's 12).
Where a refusal is tested, every file present before is hashed and must be unchanged after.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import NNUNET_FOLDERS, copy_nnunet_tree
from checkpoints import nnunet_checkpoint, write_zoo
from nnunet_te.errors import UserError
from nnunet_te.io.files import file_sha256

BIN = Path(sys.executable).parent


def _run(command: list[str], env: dict | None = None, cwd: Path | None = None,
         timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / command[0]), *command[1:]], env=env or dict(os.environ), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a file root hashes itself)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({str(p): file_sha256(p) for p in files})
    return out


def _refused(done: subprocess.CompletedProcess, *fragments: str, rc: int = 1) -> None:
    """Exit code ``rc``, no traceback, and every fragment in the message."""
    text = done.stdout + done.stderr
    assert done.returncode == rc, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for fragment in fragments:
        assert fragment in text, (fragment, text[-3000:])


@pytest.fixture(scope="module")
def tree(hippocampus_nnunet, tmp_path_factory):
    """A private copy of the shared 3D tree (these tests write results and maps)."""
    return copy_nnunet_tree(hippocampus_nnunet, tmp_path_factory.mktemp("overwrite"))


# ---- 7: values validated at the edge --------------------------------------------------------------
@pytest.mark.parametrize("env, fragment", [
    ({"nnUNet_te_beta": "nan"}, "nnUNet_te_beta"),
    ({"nnUNet_te_beta": "inf"}, "nnUNet_te_beta"),
    ({"nnUNet_te_beta": "-1"}, "beta"),
    ({"nnUNet_te_sigma": "nan"}, "nnUNet_te_sigma"),
    ({"nnUNet_te_sigma": "inf"}, "nnUNet_te_sigma"),
    ({"nnUNet_te_sigma": "-0.5"}, "nnUNet_te_sigma"),
    ({"nnUNet_te_beta": "1000", "nnUNet_te_weighting": "exp"}, "overflows"),
])
def test_risk_options_refuse_nan_inf_negative(env, fragment):
    from nnunet_te.training.options import read_options

    with pytest.raises(UserError, match=fragment):
        read_options({}, env)
    with pytest.raises(UserError):  # the plans entry is read the same way
        read_options({"nnunet_te": {k.removeprefix("nnUNet_te_"): v for k, v in env.items()}}, {})


@pytest.mark.parametrize("value", [0, -5, 2.5, True])
def test_sampling_config_takes_positive_integer_counts(value):
    from nnunet_te.features.sampling import SamplingConfig

    with pytest.raises(UserError, match="max_points_per_stage must be an integer >= 1"):
        SamplingConfig(max_points_per_stage=value)
    with pytest.raises(UserError, match="patch_size_3d must be odd"):
        SamplingConfig(patch_size_3d=4)
    assert SamplingConfig(max_points_per_stage=1).max_points_per_stage == 1


@pytest.mark.parametrize("command, fragment", [
    (["rank", "-d", "1", "-c", "3d_fullres", "--zoo", "zoo.yaml", "--points", "0"], "argument --points"),
    (["rank", "-d", "1", "-c", "3d_fullres", "--zoo", "zoo.yaml", "--points", "-5"], "argument --points"),
    (["rank", "-d", "1", "-c", "3d_fullres", "--zoo", "zoo.yaml", "--cases", "0"], "argument --cases"),
    (["riskmap", "-d", "1", "-c", "3d_fullres", "--weights", "w.pth", "--sigma", "-1"], "argument --sigma"),
    (["riskmap", "-d", "1", "-c", "3d_fullres", "--weights", "w.pth", "--sigma", "nan"], "argument --sigma"),
])
def test_cli_refuses_bad_counts_and_sigma_before_any_work(command, fragment, tmp_path):
    done = _run(["nnunet-te", *command], cwd=tmp_path, timeout=120)
    _refused(done, fragment, rc=2)  # argparse: the value is named, nothing ran


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf")])
def test_compute_risk_maps_refuses_bad_sigma_first(sigma, tmp_path):
    from nnunet_te.risk.compute import compute_dataset_risk_maps

    with pytest.raises(UserError, match="sigma must be a finite number >= 0"):
        compute_dataset_risk_maps(tmp_path, {}, "3d_fullres", {}, tmp_path / "none.pth", sigma=sigma)


def test_checkpoint_with_nan_weights_is_refused_at_load_naming_the_tensor(tmp_path):
    from nnunet_te.io.checkpoints import read_checkpoint

    good = {"encoder.stages.0.weight": torch.ones(2, 2), "encoder.stages.0.num_batches_tracked": torch.tensor(3)}
    bad = {**good, "decoder.seg_layers.0.bias": torch.tensor([0.0, float("nan")])}
    torch.save({"network_weights": good}, tmp_path / "good.pth")
    torch.save({"network_weights": bad}, tmp_path / "bad.pth")
    assert read_checkpoint(tmp_path / "good.pth").format == "nnunet"
    with pytest.raises(UserError, match=r"1 of 3 tensors hold NaN or inf values: 'decoder.seg_layers.0.bias'"):
        read_checkpoint(tmp_path / "bad.pth")
    torch.save({k: torch.full((2,), float("inf")) for k in "abcdefg"}, tmp_path / "inf.pth")
    with pytest.raises(UserError, match="7 of 7 tensors .* and 2 more"):
        read_checkpoint(tmp_path / "inf.pth")


def _taken_env(tmp_path: Path, where: str) -> dict:
    folders = {name: tmp_path / name for name in NNUNET_FOLDERS}
    for folder in folders.values():
        folder.mkdir()
    (folders[where] / "Dataset010_Other").mkdir()
    (folders[where] / "Dataset010_Other" / "dataset.json").write_text("{}")
    return {**os.environ, **{k: str(v) for k, v in folders.items()}}


@pytest.mark.parametrize("where", ["nnUNet_preprocessed", "nnUNet_results"])
def test_cli_data_refuses_an_id_taken_in_preprocessed_or_results(tmp_path, where):
    env = _taken_env(tmp_path, where)
    before = _hashes(tmp_path)
    for extra in ([], ["--overwrite"]):  # --overwrite replaces raw datasets only: no way around it
        done = _run(["nnunet-te", "data", "msd_hippocampus", "-d", "10", "--cases", "2", *extra], env, tmp_path)
        _refused(done, "dataset id 10 is taken", "Dataset010_Other", "pick another -d")
        assert not list((tmp_path / "nnUNet_raw").iterdir())
    assert _hashes(tmp_path) == before
    done = _run(["nnunet-te", "data", "msd_hippocampus", "-d", "11", "--cases", "2"], env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_cli_convert_weights_refuses_an_all_nan_checkpoint(tree, tmp_path):
    network = nnunet_checkpoint(tree.preprocessed, "3d_fullres", tmp_path / "n.pth")
    weights = torch.load(network, weights_only=False)
    weights["network_weights"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                  for k, v in weights["network_weights"].items()}
    torch.save(weights, tmp_path / "nan.pth")
    done = _run(["nnunet-te", "convert-weights", str(tmp_path / "nan.pth"), "-d", "991", "-c", "3d_fullres",
                 "-o", str(tmp_path / "out.pth")], tree.env, tmp_path)
    _refused(done, "hold NaN or inf values", "encoder.stages.0")
    assert not (tmp_path / "out.pth").exists()


# ---- 6: nothing a user made is replaced silently ----------------------------------------------------
@pytest.mark.parametrize("ext", ["csv", "json", "md", "png"])
def test_write_ranking_refuses_every_file_it_would_write(tmp_path, ext):
    from nnunet_te.features.sampling import CandidateFeatures
    from nnunet_te.metrics.registry import SEGMENTATION, Metric
    from nnunet_te.ranking.report import write_ranking
    from nnunet_te.ranking.scoring import score_zoo

    def features(value):
        return CandidateFeatures(1, {"s": (np.full((4, 2), value), np.array([0, 0, 1, 1]), np.zeros(4))})

    metric = Metric("m", lambda f: float(f.global_stages["s"][0][0, 0]), True, frozenset({SEGMENTATION}), "first")
    zoo = score_zoo({"a": features(1.0), "b": features(2.0)}, [metric], progress=False)
    (tmp_path / f"ranking.{ext}").write_text("the user's own")
    with pytest.raises(UserError, match=f"ranking.{ext}"):
        write_ranking(zoo, tmp_path, primary="m", metadata={})
    assert (tmp_path / f"ranking.{ext}").read_text() == "the user's own"
    assert len(write_ranking(zoo, tmp_path, primary="m", metadata={}, overwrite=True)) == 4


def test_rank_output_folder_checks_every_file_it_writes(tmp_path):
    from nnunet_te.ranking.rank import _output_folder

    for name in ("ranking.csv", "ranking.md", "ranking.png", "training_choice.json"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_text("user")
        with pytest.raises(UserError, match=name):
            _output_folder(folder, tmp_path / "root")
    assert _output_folder(tmp_path / "new", tmp_path / "root") == tmp_path / "new"


def test_cli_demo_refuses_a_folder_holding_a_ranking(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "ranking.json").write_text(json.dumps({"ranking": ["x"], "cases": list(range(20))}))
    (out / "ranking.md").write_text("20-case ranking")
    before = _hashes(out)
    done = _run(["nnunet-te", "demo", "-o", str(out), "--cases", "3", "--ssl-iterations", "1", "-device", "cpu"],
                cwd=tmp_path, timeout=300)
    _refused(done, "ranking.json", "ranking.md", "--overwrite")
    assert "finished in" not in done.stdout  # refused before any work
    assert _hashes(out) == before


def test_cli_evaluate_refuses_existing_evaluation_files_unless_overwrite(tmp_path):
    ranking = {"ranking": ["a", "b", "c"], "metrics": {"m": {"greater_is_better": True,
                                                             "scores": {"a": 3.0, "b": 2.0, "c": 1.0}}}}
    (tmp_path / "ranking.json").write_text(json.dumps(ranking))
    (tmp_path / "truth.csv").write_text("candidate,dice\na,0.9\nb,0.8\nc,0.1\n")
    (tmp_path / "evaluation.md").write_text("my notes")
    before = _hashes(tmp_path)
    command = ["nnunet-te", "evaluate", str(tmp_path / "ranking.json"), str(tmp_path / "truth.csv")]
    _refused(_run(command, cwd=tmp_path, timeout=300), "evaluation.md", "--overwrite")
    assert _hashes(tmp_path) == before and not (tmp_path / "evaluation.csv").exists()
    done = _run([*command, "--overwrite"], cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "evaluation.md").read_text() != "my notes"


def test_trainer_refuses_a_fresh_start_in_a_finished_fold(tmp_path):
    """The rule of RiskWeightedTrainer.on_train_start, on the function it calls."""
    from nnunet_te.training.trainers import check_fresh_start

    (tmp_path / "risk_options.json").write_text("{}")
    check_fresh_start(tmp_path, 0, {})  # no finished run: nothing to protect
    (tmp_path / "checkpoint_final.pth").write_bytes(b"final")
    with pytest.raises(UserError, match=r"(?s)finished run.*risk_options.json.*--c.*nnUNet_te_overwrite=1"):
        check_fresh_start(tmp_path, 0, {})
    check_fresh_start(tmp_path, 2, {})  # --c: nnU-Net resumed the run's checkpoint
    check_fresh_start(tmp_path, 0, {"nnUNet_te_overwrite": "1"})
    with pytest.raises(UserError, match="nnUNet_te_overwrite must be 1"):
        check_fresh_start(tmp_path, 0, {"nnUNet_te_overwrite": "yes please"})


@pytest.mark.slow
def test_nnunetv2_train_refuses_to_replace_a_finished_folds_files(tree, tmp_path):
    """The real ``nnUNetv2_train`` without ``--c`` in a fold holding a finished run: refused before the
    first epoch, the trainer's files unchanged, the message names --c and nnUNet_te_overwrite."""
    trainer = "RiskWeightedTrainer_k5s0_cpu"
    fold = tree.results / tree.preprocessed.name / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").write_bytes(b"a finished run's checkpoint")
    (fold / "risk_options.json").write_text(json.dumps({"options": {"beta": 2.0}}))
    (fold / "risk_source_network.pth").write_bytes(b"the network the run's maps came from")
    (fold / "risk_source").mkdir()
    (fold / "risk_source" / "manifest.json").write_text("{}")
    before = _hashes(fold)
    done = _run(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", trainer, "-device", "cpu"],
                {**tree.env, "nnUNet_n_proc_DA": "0"}, tmp_path, timeout=900)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text[-3000:]
    for fragment in ("holds a finished run", "risk_options.json", "risk_source_network.pth", "--c",
                     "nnUNet_te_overwrite=1", "nnU-Net also replaces its own"):
        assert fragment in text, (fragment, text[-3000:])
    assert "Epoch 0" not in text  # nnU-Net logs it when the first epoch starts
    after = _hashes(fold)
    assert {k: v for k, v in after.items() if k in before} == before


@pytest.mark.slow
def test_cli_rank_train_refuses_a_finished_fold_and_an_earlier_ranking_copy(tree, tmp_path):
    zoo = write_zoo(tmp_path / "zoo.yaml", [
        {"name": "a", "checkpoint": str(nnunet_checkpoint(tree.preprocessed, "3d_fullres", tmp_path / "a.pth"))}])
    trainer_dir = tree.results / tree.preprocessed.name / "RiskWeightedTrainer_cpu__nnUNetPlans__3d_fullres"
    (trainer_dir / "fold_1").mkdir(parents=True)
    (trainer_dir / "fold_1" / "checkpoint_final.pth").write_bytes(b"finished")
    command = ["nnunet-te", "rank", "-d", "991", "-c", "3d_fullres", "--zoo", str(zoo), "--cases", "2",
               "--train", "1", "-tr", "RiskWeightedTrainer_cpu", "-device", "cpu"]
    before = _hashes(tree.results)
    done = _run(command, tree.env, tmp_path)
    _refused(done, "holds a finished run", "--overwrite-training")
    assert "ranking by" not in done.stdout  # before any ranking work
    shutil.rmtree(trainer_dir / "fold_1")
    (trainer_dir / "nnunet_te_ranking.json").write_text(json.dumps({"ranking": ["an earlier choice"]}))
    before = _hashes(tree.results)
    done = _run(command, tree.env, tmp_path)
    _refused(done, "nnunet_te_ranking.json", "--overwrite-training")
    assert "ranking by" not in done.stdout
    assert _hashes(tree.results) == before


@pytest.mark.slow
def test_cli_rank_refuses_an_output_folder_holding_a_users_csv(tree, tmp_path):
    zoo = write_zoo(tmp_path / "zoo.yaml", [
        {"name": "a", "checkpoint": str(nnunet_checkpoint(tree.preprocessed, "3d_fullres", tmp_path / "a.pth"))}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "ranking.csv").write_text("candidate,dice\nmine,0.9\n")
    (out / "ranking.md").write_text("my table")
    before = _hashes(out)
    done = _run(["nnunet-te", "rank", "-d", "991", "-c", "3d_fullres", "--zoo", str(zoo), "-o", str(out),
                 "--cases", "2", "-device", "cpu"], tree.env, tmp_path)
    _refused(done, "ranking.csv", "ranking.md", "choose another output folder")
    assert _hashes(out) == before


# ---- riskmap: only what is missing; --overwrite computes before it removes ---------------------------
def _maps_inputs(tree, tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = tree.preprocessed / "nnUNetPlans.json"
    config = PlansManager(str(plans)).get_configuration("3d_fullres")
    cases = sorted(p.name.removesuffix("_seg.b2nd")
                   for p in (tree.preprocessed / config.data_identifier).glob("*_seg.b2nd"))[:3]
    checkpoint = nnunet_checkpoint(tree.preprocessed, "3d_fullres", tmp_path / "head.pth")  # has a head: fast
    return dict(preprocessed_dataset_dir=tree.preprocessed, plans_file=plans, configuration="3d_fullres",
                dataset_json=tree.preprocessed / "dataset.json", checkpoint=checkpoint), cases


@pytest.mark.slow
def test_riskmap_recomputes_only_a_missing_map_and_overwrite_keeps_old_maps_on_failure(tree, tmp_path,
                                                                                       monkeypatch):
    import nnunet_te.risk.compute as compute

    inputs, cases = _maps_inputs(tree, tmp_path)
    folder = compute.compute_dataset_risk_maps(**inputs, case_ids=cases, overlays=2, progress=False)
    original = np.load(folder / f"{cases[1]}.npy")
    before = _hashes(folder)

    # one map deleted: only it is recomputed (from every fit case's outputs), identical to before
    (folder / f"{cases[1]}.npy").unlink()
    compute.compute_dataset_risk_maps(**inputs, case_ids=cases, overlays=2, progress=False)
    assert np.array_equal(np.load(folder / f"{cases[1]}.npy"), original)
    assert _hashes(folder) == before and not (folder / compute.CACHE).exists()

    # --overwrite whose computation fails half-way: the old maps, manifest and overlays stay
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise RuntimeError("simulated failure after the network pass")
        return save_case_map(*args, **kwargs)

    save_case_map = compute.save_case_map
    monkeypatch.setattr(compute, "save_case_map", failing_save)
    with pytest.raises(RuntimeError, match="simulated"):
        compute.compute_dataset_risk_maps(**inputs, case_ids=cases, sigma=0.5, overlays=2, overwrite=True,
                                          progress=False)
    assert _hashes(folder) == before
    monkeypatch.setattr(compute, "save_case_map", save_case_map)
    # a different setting without --overwrite names the flag of the command the user is in
    with pytest.raises(UserError, match="--overwrite-maps"):
        compute.compute_dataset_risk_maps(**inputs, case_ids=cases, sigma=0.5, progress=False,
                                          overwrite_flag="--overwrite-maps")
    # the interrupted replacement resumes from its staging folder, then replaces the old maps at once
    compute.compute_dataset_risk_maps(**inputs, case_ids=cases, sigma=0.5, overlays=2, overwrite=True,
                                      progress=False)
    assert json.loads((folder / "manifest.json").read_text())["settings"]["sigma"] == 0.5
    assert not compute.staging_folder(folder).exists() and not folder.with_name(folder.name + ".old").exists()
    assert sorted(p.stem for p in folder.glob("*.npy")) == cases


@pytest.mark.slow
def test_cli_riskmap_overwrite_with_a_nan_checkpoint_keeps_the_maps(tree, tmp_path):
    import nnunet_te.risk.compute as compute

    inputs, cases = _maps_inputs(tree, tmp_path)
    folder = compute.compute_dataset_risk_maps(**inputs, case_ids=cases, overlays=0, progress=False,
                                               overwrite=True)
    before = _hashes(folder)
    weights = torch.load(inputs["checkpoint"], weights_only=False)
    name = next(iter(weights["network_weights"]))
    weights["network_weights"][name] = weights["network_weights"][name] * float("nan")
    torch.save(weights, tmp_path / "nan.pth")
    done = _run(["nnunet-te", "riskmap", "-d", "991", "-c", "3d_fullres", "--weights", str(tmp_path / "nan.pth"),
                 "--overwrite", "-device", "cpu"], tree.env, tmp_path)
    _refused(done, "hold NaN or inf values", name)
    assert _hashes(folder) == before
    assert math.isfinite(float(np.load(folder / f"{cases[0]}.npy").astype(np.float32).max()))
