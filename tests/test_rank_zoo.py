"""Zoo files, candidate networks and ``nnunet-te rank`` end to end on real nnU-Net data (2D and 3D)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import (BASIC_UNET, basic_unet_checkpoint, nnssl_checkpoint, nnunet_checkpoint,
                         plans_and_dataset, write_zoo)
from conftest import NNUNET_FOLDERS, copy_nnunet_tree, point_nnunet_at

from nnunet_te.errors import UserError
from nnunet_te.ranking.rank import rank_zoo
from nnunet_te.networks.stages import stage_modules, window_size
from nnunet_te.data.target import PlannedConfiguration
from nnunet_te.ranking.zoo import CandidateError, candidate_network, read_zoo
from nnunet_te.io.files import file_sha256

BIN = Path(sys.executable).parent


def _run(command: list[str], env: dict, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / command[0]), *command[1:]], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    if check:
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return done


@pytest.fixture(scope="module")
def tree_3d(hippocampus_nnunet, tmp_path_factory):
    """A private copy of the shared 3D nnU-Net tree (ranking writes results and risk maps)."""
    tree = copy_nnunet_tree(hippocampus_nnunet, tmp_path_factory.mktemp("rank3d"))
    return tree.root, tree.env, tree.preprocessed


@pytest.fixture
def nnunet_env(tree_3d, monkeypatch):
    root, env, preprocessed = tree_3d
    point_nnunet_at(env, monkeypatch)
    return preprocessed


# ---- zoo files -----------------------------------------------------------------------------------
def test_read_zoo_yaml_and_json_resolve_paths_and_detect_mistakes(tmp_path):
    (tmp_path / "a.pth").write_bytes(b"x")
    zoo = read_zoo(write_zoo(tmp_path / "zoo.yaml", [
        {"name": "a", "checkpoint": "a.pth", "notes": "n"},
        {"name": "m", "checkpoint": str(tmp_path / "a.pth"), "format": "monai", "architecture": BASIC_UNET}]))
    assert [c.name for c in zoo] == ["a", "m"] and zoo[0].checkpoint == (tmp_path / "a.pth").resolve()
    assert zoo[1].architecture["kwargs"]["features"] == [4, 4, 8, 8, 16, 4]
    assert read_zoo(write_zoo(tmp_path / "zoo.json", [{"name": "a", "checkpoint": "a.pth"}]))[0].name == "a"
    # the hash follows the bytes and the architecture, not the name
    assert zoo[0].content_hash() != zoo[1].content_hash()

    cases = {
        "empty": ([], "zoo is empty"),
        "dup": ([{"name": "a", "checkpoint": "a.pth"}] * 2, "candidate 'a': duplicate"),
        "missing": ([{"name": "b", "checkpoint": "nope.pth"}], "candidate 'b': checkpoint file not found"),
        "format": ([{"name": "c", "checkpoint": "a.pth", "format": "onnx"}], "candidate 'c': unknown format"),
        "monai": ([{"name": "d", "checkpoint": "a.pth", "format": "monai"}], "candidate 'd': MONAI"),
        "key": ([{"name": "e", "checkpoint": "a.pth", "weights": 1}], "candidate 'e': unknown key"),
    }
    for label, (entries, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            read_zoo(write_zoo(tmp_path / f"{label}.yaml", entries))


def test_monai_stage_hooks_fire_and_windows_fit():
    from monai.networks.nets import UNet, SwinUNETR

    from nnunet_te.features.hooks import stage_outputs

    unet = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16, 32), strides=(2, 2, 2),
                num_res_units=1)
    swin = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, spatial_dims=3)
    for network, decoder_count, multiple in ((unet, 2, 8), (swin, 5, 32)):
        global_modules, local_modules, _ = stage_modules(network)
        assert list(global_modules) == [f"decoder.{s}" for s in range(decoder_count)]
        window = window_size(network, (20, 36, 40))
        assert all(w % multiple == 0 and w >= p for w, p in zip(window, (20, 36, 40)))
        maps = stage_outputs(network, np.zeros((1, *window), np.float32), {**global_modules, **local_modules})
        # decoder stages go from coarse to fine; the last one is at the finest decoder resolution
        sizes = [maps[name].shape[1] for name in global_modules]
        assert sizes == sorted(sizes)
    assert list(stage_modules(unet)[1]) == ["encoder.1", "encoder.2"]
    assert list(stage_modules(swin)[1]) == ["encoder.1", "encoder.2"]  # MONAI: strides 2 and 4 only


def test_class_missing_from_every_sampled_case_is_named_before_extraction(nnunet_env, tmp_path):
    """Real hippocampus cases whose dataset.json declares a third foreground class no case has."""
    dataset_json = nnunet_env / "dataset.json"
    original = dataset_json.read_text()
    declared = json.loads(original)
    declared["labels"]["Tail"] = 3
    zoo = write_zoo(tmp_path / "zoo.json", [{"name": "monai", "architecture": BASIC_UNET,
                                              "checkpoint": str(basic_unet_checkpoint(tmp_path / "b.pt", 3))}])
    try:
        dataset_json.write_text(json.dumps(declared))
        with pytest.raises(ValueError, match=r"class\(es\) 3 \(Tail\) occur in none of the 2 sampled cases"):
            rank_zoo(nnunet_env.name, "3d_fullres", zoo, max_cases=2, out_dir=tmp_path / "out", progress=False)
    finally:
        dataset_json.write_text(original)
    assert not (tmp_path / "out").exists()


# ---- bad candidates ------------------------------------------------------------------------------
def test_input_channel_mismatch_names_the_candidate(nnunet_env, tmp_path):
    plans, dataset = plans_and_dataset(nnunet_env)
    nnssl = nnssl_checkpoint(nnunet_env, tmp_path / "two_channels.pth", in_channels=2)
    basic = basic_unet_checkpoint(tmp_path / "basic2.pt", 3, in_channels=2)
    zoo = read_zoo(write_zoo(tmp_path / "zoo.yaml", [
        {"name": "ssl_2ch", "checkpoint": str(nnssl)},
        {"name": "basic_2ch", "checkpoint": str(basic), "architecture": BASIC_UNET},
        {"name": "basic_kwargs_2ch", "checkpoint": str(basic),
         "architecture": {**BASIC_UNET, "kwargs": {**BASIC_UNET["kwargs"], "in_channels": 2}}}]))
    for candidate in zoo:
        with pytest.raises(CandidateError, match=f"candidate '{candidate.name}': .*input channel"):
            candidate_network(candidate, PlannedConfiguration(plans, "3d_fullres", dataset))
    with pytest.raises(UserError, match="candidate 'ssl_2ch'.*\n.*candidate 'basic_2ch'"):
        rank_zoo(991, "3d_fullres", zoo, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                 max_cases=2, progress=False)


def test_empty_zoo_is_refused(nnunet_env, tmp_path):
    with pytest.raises(ValueError, match="zoo is empty"):
        rank_zoo(991, "3d_fullres", [], out_dir=tmp_path / "out")


def test_a_zoo_of_one_is_ranked_and_its_fused_score_is_reported_as_not_defined(nnunet_env, tmp_path, capsys):
    """The fused topology score min-max normalises over the zoo: for one model it has no value, so
    it is NaN with a note while every single-model metric (its GRTD and LBTC components too) is scored."""
    from nnunet_te.cli import main

    zoo = write_zoo(tmp_path / "zoo.yaml", [{"name": "only", "architecture": BASIC_UNET,
                                              "checkpoint": str(basic_unet_checkpoint(tmp_path / "b.pt", 3))}])
    out = tmp_path / "out"
    code = main(["rank", "-d", "991", "-c", "3d_fullres", "--zoo", str(zoo), "-o", str(out), "--cases", "1",
                 "--points", "300", "--consistency-rates", "-device", "cpu", "--metrics", "topology", "grtd",
                 "lbtc", "logme", "ncti"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    record = json.loads((out / "ranking.json").read_text())
    assert record["ranking"] == ["only"] and record["candidate_errors"] == {}
    scores = {name: metric["scores"]["only"] for name, metric in record["metrics"].items()}
    assert scores["topology"] is None
    assert all(math.isfinite(scores[name]) for name in ("grtd", "lbtc", "logme", "ncti")), scores
    assert record["primary_metric"] == "grtd"  # the first metric that has a score
    notes = [e for e in record["errors"] if e["metric"] == "topology"]
    assert len(notes) == 1 and "not defined for a zoo of 1 scored candidate(s)" in notes[0]["reason"]
    assert printed.out.count("note: topology not computed for only: zoo-relative score") == 1
    assert "ranking by grtd" in printed.out


# ---- end to end ----------------------------------------------------------------------------------
def _check_ranking(out: Path, scored: list[str]) -> dict:
    for ext in ("csv", "json", "md", "png"):
        assert (out / f"ranking.{ext}").stat().st_size > 0
    record = json.loads((out / "ranking.json").read_text())
    assert sorted(record["ranking"]) == sorted(scored)
    not_computed = {(e["metric"], e["candidate"]): e["reason"] for e in record["errors"]}
    for name, metric in record["metrics"].items():
        for candidate in scored:
            score = metric["scores"][candidate]
            if (name, candidate) in not_computed:  # only source-head metrics may lack a score
                assert "source head" in not_computed[name, candidate] and score is None
            else:
                assert score is not None and math.isfinite(score), (name, candidate, score)
    for name in ("topology", "grtd", "lbtc", "ccfv", "consistency", "logme", "nleep"):
        assert name in record["metrics"]
    for candidate in scored:
        timing = record["timings"][candidate]
        assert timing["extraction_seconds"] > 0 and timing["metric_total_seconds"] > 0
        assert set(timing["metric_seconds"]) == {m for m in record["metrics"] if (m, candidate) not in not_computed}
    # sampling depends only on labels, grid and seed: the same voxels for every candidate
    assert len({json.dumps(s, sort_keys=True) for s in record["final_stage_samples"].values()}) == 1
    return record


@pytest.mark.slow
def test_cli_rank_3d_zoo_of_three_formats_then_prepare_training(tree_3d, tmp_path):
    root, env, preprocessed = tree_3d
    (tmp_path / "corrupt.pth").write_bytes(b"this is not a checkpoint")
    zoo = write_zoo(tmp_path / "zoo.yaml", [
        {"name": "nnunet_ckpt", "checkpoint": str(nnunet_checkpoint(preprocessed, "3d_fullres",
                                                                     tmp_path / "nnunet.pth"))},
        {"name": "openmind_ssl", "checkpoint": str(nnssl_checkpoint(preprocessed, tmp_path / "ssl.pth")),
         "format": "nnssl", "notes": "encoder only"},
        {"name": "monai_basic", "checkpoint": str(basic_unet_checkpoint(tmp_path / "basic.pt", 3)),
         "architecture": BASIC_UNET},
        {"name": "broken", "checkpoint": str(tmp_path / "corrupt.pth")}])
    out = tmp_path / "ranking"
    done = _run(["nnunet-te", "rank", "-d", "991", "-c", "3d_fullres", "--zoo", str(zoo), "-o", str(out),
                 "--cases", "3", "--points", "600", "--seed", "3", "-device", "cpu", "--consistency-rates", "0.2",
                 "--train", "0", "-tr", "RiskWeightedTrainer_cpu", "--run"],
                {**env, "nnUNet_n_proc_DA": "0"}, tmp_path)
    record = _check_ranking(out, ["nnunet_ckpt", "openmind_ssl", "monai_basic"])
    assert "candidate 'broken' not ranked: checkpoint does not load" in done.stderr
    assert "checkpoint does not load" in record["candidate_errors"]["broken"]
    formats = {c["name"]: c["load_report"]["checkpoint_format"] for c in record["zoo"] if c["load_report"]}
    assert formats == {"nnunet_ckpt": "nnunet", "openmind_ssl": "nnssl", "monai_basic": "monai"}
    assert record["seed"] == 3 and len(record["cases"]) == 3

    # the hook before training: converted weights, maps, the ranking beside the results, the command
    choice = json.loads((out / "training_choice.json").read_text())
    assert choice["chosen"] in ("nnunet_ckpt", "openmind_ssl")
    weights = Path(choice["weights"])
    assert weights.is_file() and weights.parent == out
    assert len(list(Path(choice["risk_maps"]).glob("*.npy"))) == 12
    results = root / "nnUNet_results" / preprocessed.name / "RiskWeightedTrainer_cpu__nnUNetPlans__3d_fullres"
    assert json.loads((results / "nnunet_te_ranking.json").read_text())["ranking"] == record["ranking"]
    assert (f"nnUNetv2_train 991 3d_fullres 0 -tr RiskWeightedTrainer_cpu -pretrained_weights {weights}"
            in done.stdout)
    # --run started it: the CPU schedule's two epochs finished, on the maps of the chosen weights
    final = torch.load(results / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert len(final["logging"]["train_losses"]) == 2
    used = json.loads((results / "fold_0" / "risk_options.json").read_text())
    assert used["maps"]["checkpoint_sha256"] == file_sha256(weights)

    bad = _run(["nnunet-te", "rank", "-d", "991", "-c", "3d_fullres", "--zoo", str(zoo), "--train", "0",
                "-tr", "nnUNetTrainer"], env, tmp_path, check=False)
    assert bad.returncode != 0 and "'nnUNetTrainer' is not RiskWeightedTrainer or one of its variants" in bad.stderr
    assert "ranking by" not in bad.stdout  # refused before any ranking work


@pytest.mark.slow
def test_cli_rank_2d_epfl(shared_data, tmp_path):
    folders = {name: tmp_path / name for name in NNUNET_FOLDERS}
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env.update({k: str(v) for k, v in folders.items()}, nnUNet_compile="f", nnUNet_def_n_proc="1",
               nnUNet_n_proc_DA="1")
    _run(["nnunet-te", "data", "epfl_em_mitochondrion", "-d", "992", "--cases", "5"], env, tmp_path)
    _run(["nnUNetv2_plan_and_preprocess", "-d", "992", "-c", "2d", "-np", "1"], env, tmp_path)
    preprocessed = next(folders["nnUNet_preprocessed"].glob("Dataset992_*"))
    zoo = write_zoo(tmp_path / "zoo.json", [
        {"name": "nnunet_2d", "checkpoint": str(nnunet_checkpoint(preprocessed, "2d", tmp_path / "n2d.pth"))},
        {"name": "monai_basic_2d", "checkpoint": str(basic_unet_checkpoint(tmp_path / "b2d.pt", 2)),
         "format": "monai", "architecture": BASIC_UNET}])
    _run(["nnunet-te", "rank", "-d", "992", "-c", "2d", "--zoo", str(zoo), "--points", "600",
          "--cases", "3", "--consistency-rates", "0.2", "-device", "cpu"], env, tmp_path)
    runs = list((folders["nnUNet_results"] / preprocessed.name / "nnunet_te_ranking__nnUNetPlans__2d").glob("2*"))
    assert len(runs) == 1
    _check_ranking(runs[0], ["nnunet_2d", "monai_basic_2d"])
