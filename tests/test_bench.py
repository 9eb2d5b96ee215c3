"""The benchmark in miniature, end to end through ``python -m benchmarks.finetune_grid`` and the
real nnU-Net CLI: 2 zoo members, 1 real 2D target (EPFL
mitochondria, 12 slices), k = 5, one seed, a 1 x 2 schedule (given for the dataset); then a
resumed run that must not train again."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NNUNET_FOLDERS

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
#: The benchmark's command line; it runs from the checkout (not installed), so REPO is on PYTHONPATH.
BENCH = ["python", "-m", "benchmarks.finetune_grid"]
MEMBERS = ["random_s0", "sup_isbi_membranes"]


def _with_repo(env) -> dict:
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}


def _run(args, env, cwd) -> str:
    done = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def epfl_tree(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    env = {**os.environ, **{name: str(root / name) for name in NNUNET_FOLDERS}}
    _run(["nnunet-te", "data", "epfl_em_mitochondrion", "-d", "981", "--cases", "12"], env, root)
    _run(["nnUNetv2_plan_and_preprocess", "-d", "981", "-c", "2d", "-np", "1"], env, root)
    return root, env


@pytest.mark.slow
def test_bench_miniature_end_to_end_and_resume(epfl_tree, shared_data):
    root, env = epfl_tree
    work, docs = root / "work", root / "benchmark.md"
    env = _with_repo(env)
    command = [*BENCH, "-d", "981", "--work", str(work), "--shared", str(shared_data.parent),
               "--members", *MEMBERS,
               "--zoo-iterations", "2", "--shots", "5", "--seeds", "0", "--schedule", "9", "9",
               "--dataset-schedule", "981", "1", "2",  # the target's own schedule wins
               "--test-cases", "3", "--jobs", "2", "--docs", str(docs), "-device", "cpu", "--risk-trainers", "risk"]
    started = time.time()
    first = _run(command, env, root)
    print(f"first run: {time.time() - started:.0f} s")

    with open(work / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # neither member saw a test image (checked by content), both are ranked and fine-tuned
    exclusions = json.loads((work / "exclusions.json").read_text())["Dataset981_EPFLEM_mitochondrion"]
    assert exclusions == {"test_cases": 3, "members_checked": MEMBERS, "seen": {}}
    assert sorted((r["member"], r["trainer"]) for r in rows) == [
        ("random_s0", "plain"), ("random_s0", "risk"), ("sup_isbi_membranes", "plain"), ("sup_isbi_membranes", "risk")]
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and np.isfinite(float(r["dice"])), r
        assert (r["k"], r["seed"], r["schedule"], r["n_test"]) == ("5", "0", "1x2", "3")
        assert r["torch_threads"] == str(max(1, len(os.sched_getaffinity(0)) // 2))  # 2 jobs share the cores
        assert Path(r["run_folder"]).is_relative_to(work / "runs" / "1x2" / r["member"])  # a schedule never resumes another's
        per_class = json.loads(r["dice_per_class"])
        assert list(per_class) == ["1"] and abs(per_class["1"] - float(r["dice"])) < 1e-9
    ranking = json.loads((work / "rankings" / "Dataset981_EPFLEM_mitochondrion" / "k5s0" / "ranking.json").read_text())
    assert sorted(ranking["ranking"]) == ["random_s0", "sup_isbi_membranes"]
    assert "topology" in ranking["metrics"] and len(ranking["cases"]) == 5

    # the product's few-shot trainer drew the same 5 cases the ranking used, none of them a test case
    splits = json.loads((root / "nnUNet_preprocessed" / "Dataset981_EPFLEM_mitochondrion" / "splits_final.json").read_text())
    run_folder = Path(next(r["run_folder"] for r in rows if r["trainer"] == "plain"))
    few_shot = json.loads((run_folder / "few_shot_split.json").read_text())
    fold = int(rows[0]["fold"])
    assert few_shot["train"] == ranking["cases"] and not set(few_shot["train"]) & set(splits[fold]["val"])
    assert sorted(few_shot["val"]) == sorted(splits[fold]["val"]) and len(few_shot["val"]) == 3
    # risk maps: P(y|z) fitted on the 5 training cases only, maps for training and test cases
    risk_run = Path(next(r["run_folder"] for r in rows if r["trainer"] == "risk" and r["member"] == "random_s0"))
    maps = Path(json.loads((risk_run / "risk_options.json").read_text())["risk_folder"])
    manifest = json.loads((maps / "manifest.json").read_text())
    assert maps.is_relative_to(risk_run) and manifest["settings"]["fit_case_ids"] == few_shot["train"]
    assert len(manifest["shapes"]) == 8
    curve = json.loads((run_folder / "learning_curve.json").read_text())
    assert len(curve["train_losses"]) == 1 and np.isfinite(curve["train_losses"]).all()
    assert (run_folder / "progress.png").is_file()  # drawn after the last epoch
    # the cost table splits each fine-tune's wall time into phases read from nnU-Net's log
    from benchmarks.finetune_grid.ground_truth import read_results
    from benchmarks.finetune_grid.tables import fine_tune_phases

    for row in read_results(work / "results.csv"):
        phases = fine_tune_phases(row)
        assert min(phases.values()) > 0 and sum(phases.values()) == pytest.approx(row["train_seconds"], abs=1.5)

    # zoo: both formats per member, loadable
    from nnunet_te.io.checkpoints import read_checkpoint

    for name in MEMBERS:
        folder = next((work / "zoo").glob(f"{name}-*"))
        assert read_checkpoint(folder / "nnunet.pth").format == "nnunet"
        nnssl = read_checkpoint(folder / "nnssl.pth")
        assert nnssl.format == "nnssl" and nnssl.encoder_only

    text = docs.read_text()
    assert "<!-- bench_results:start -->" in text
    assert "| random_s0 |" in text and "over 2 (target, member, seed) pairs" in text
    # the grid's time as run: the zoo's members as recorded, the 4 fine-tunes side by side (--jobs 2)
    hours = json.loads((work / "report" / "summary.json").read_text())["hours"]
    built = sum(json.loads(next((work / "zoo").glob(f"{m}-*/member.json")).read_text())["seconds"]
                for m in MEMBERS)
    assert hours["zoo"] == pytest.approx(built / 3600)
    assert hours["rankings"] > 0 and 0 < hours["fine_tunes"] < hours["fine_tunes_summed"]
    docs.write_text(text.replace("Measured so far", "STALE"))
    logs = {p: p.stat().st_size for p in (work / "logs").rglob("*.log")}

    records = root / "records"
    second = _run(command + ["--records", str(records)], env, root)
    assert "0 new fine-tune(s)" in second and "4 new fine-tune(s)" in first
    # the measurements reach the records folder (kept in the repository), the zoo's records too
    assert (records / "results.csv").read_bytes() == (work / "results.csv").read_bytes()
    assert len(list((records / "zoo").glob("*.json"))) == len(MEMBERS)
    assert {p: p.stat().st_size for p in (work / "logs").rglob("*.log")} == logs  # nnUNetv2_train not started
    with open(work / "results.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert "STALE" not in docs.read_text() and "Measured so far: 4 fine-tunes" in docs.read_text()
    # the Dice of another schedule are not comparable: its report holds none of these rows
    _run([*BENCH, "--report-only", "--work", str(work), "--schedule", "9", "9", "--docs", str(docs)],
         env, root)
    assert "Measured so far: 0 fine-tunes" in docs.read_text() and "4 fine-tunes of other schedules left out" in docs.read_text()
    # ... unless the target is given its own schedule
    _run([*BENCH, "--report-only", "--work", str(work), "--schedule", "9", "9",
          "--dataset-schedule", "981", "1", "2", "--docs", str(docs)], env, root)
    assert "Measured so far: 4 fine-tunes" in docs.read_text() and "9x9 (981: 1x2)" in docs.read_text()

    # an option variant of RiskWeightedTrainer: its own runs beside the default ones, its option set
    # for nnU-Net's process only (a user's own setting does not leak into the default kind's rows)
    third = _run(command + ["--risk-trainers", "risk_fg_ce"], {**env, "nnUNet_te_beta": "7"}, root)
    assert "2 new fine-tune(s)" in third
    from benchmarks.finetune_grid.ground_truth import read_results

    rows = read_results(work / "results.csv")
    variant = [r for r in rows if r["trainer"] == "risk_fg_ce"]
    assert sorted(r["member"] for r in variant) == ["random_s0", "sup_isbi_membranes"]
    for r in rows:
        if r["trainer"] != "plain":
            options = json.loads((Path(r["run_folder"]) / "risk_options.json").read_text())["options"]
            assert options["ce_normalisation"] == ("foreground" if r in variant else "pixels")
            assert options["beta"] == 1.0
    assert all(Path(r["run_folder"]).is_relative_to(work / "runs" / "1x2" / r["member"] / "risk_fg_ce")
               for r in variant)
    assert "Paired test, risk_fg_ce, over 2 (target, member, seed) pairs" in docs.read_text()

    # the two controls of risk weighting: their own trainer classes through nnUNetv2_train, maps from the
    # same checkpoint, paired with the risk runs in the report
    fourth = _run(command + ["--risk-trainers", "risk_uniform", "risk_shuffled"], env, root)
    assert "4 new fine-tune(s)" in fourth
    controls = [r for r in read_results(work / "results.csv") if r["trainer"] in ("risk_uniform", "risk_shuffled")]
    assert sorted((r["trainer"], r["member"]) for r in controls) == [
        ("risk_shuffled", "random_s0"), ("risk_shuffled", "sup_isbi_membranes"),
        ("risk_uniform", "random_s0"), ("risk_uniform", "sup_isbi_membranes")]
    for r in controls:
        folder = Path(r["run_folder"])
        stem = "RiskUniformControl" if r["trainer"] == "risk_uniform" else "RiskShuffledControl"
        assert folder.parent.name == f"{stem}_k5s0_bench__nnUNetPlans_cpu__2d" and np.isfinite(r["dice"])
        log = "".join(p.read_text() for p in folder.glob("training_log_*.txt"))
        assert ("permutations seeded with 20260" in log) == (r["trainer"] == "risk_shuffled")
        assert (folder / "risk_options.json").is_file()
    text = docs.read_text()
    assert "| risk_uniform | 2 |" in text and "| risk_shuffled | 2 |" in text


@pytest.mark.slow
def test_the_schedule_probe_chooses_from_pool_cases_and_resumes(epfl_tree, shared_data):
    from benchmarks.finetune_grid.plan import bench_split
    from benchmarks.finetune_grid.schedule_rule import final_choice

    root, env = epfl_tree
    env = _with_repo(env)
    work, docs = root / "probe_work", root / "probe.md"
    command = [*BENCH, "-d", "981", "--work", str(work), "--shared", str(shared_data.parent), "--test-cases", "3",
               "--probe", "1", "2", "--probe-only", "-device", "cpu"]
    assert "1 new probe(s)" in _run(command, env, root)
    record = json.loads((work / "schedules.json").read_text())["targets"]["Dataset981_EPFLEM_mitochondrion"]
    data = root / "nnUNet_preprocessed" / "Dataset981_EPFLEM_mitochondrion" / "nnUNetPlans_2d"
    cases = sorted(p.name.removesuffix(".b2nd") for p in data.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    test = set(bench_split(cases, 3, 0)["val"])
    for run_folder in (p.parent for p in (work / "probe" / "runs").rglob("few_shot_split.json")):
        few_shot = json.loads((run_folder / "few_shot_split.json").read_text())
        assert sorted(few_shot["val"]) == sorted(record["validation_cases"]) and len(few_shot["train"]) == 5
        assert not (set(few_shot["train"]) | set(few_shot["val"])) & test  # the rule never sees a test case
    runs = record["runs"]
    assert [r["epochs"] for r in runs] == [1, 2] and [len(r["ema_fg_dice"]) for r in runs] == [1, 2]
    assert record["epochs"] == final_choice({r["epochs"]: r["validation_dice"] for r in runs}).epochs
    assert "0 new probe(s)" in _run(command, env, root)  # resumed: nothing trained again
    _run([*BENCH, "--report-only", "--work", str(work), "--docs", str(docs)], env, root)
    if record["epochs"]:
        assert f"by the schedule rule (981: {record['epochs']}x20)" in docs.read_text()


@pytest.mark.slow
def test_a_few_shot_draw_without_a_class_is_named_before_any_work(epfl_tree, tmp_path):
    """Real EPFL slices whose dataset.json declares a second class no slice has (as EPFL axon, where
    19 of 27 slices have none and the k = 5 draw of seed 0 holds no axon)."""
    import shutil

    from benchmarks.finetune_grid.plan import CPU_PLAN
    from benchmarks.finetune_grid.run import Target, check_few_shot_classes

    root, _ = epfl_tree
    folder = tmp_path / "Dataset981_EPFLEM_mitochondrion"
    shutil.copytree(root / "nnUNet_preprocessed" / folder.name, folder)
    CPU_PLAN.write(folder)
    cases = sorted(p.name.removesuffix(".b2nd") for p in (folder / "nnUNetPlans_2d").glob("*.b2nd")
                   if not p.name.endswith("_seg.b2nd"))
    target = Target(folder.name, 981, folder.name, folder, {"train": cases[:8], "val": cases[8:]}, 0, CPU_PLAN,
                    CPU_PLAN.architecture())
    check_few_shot_classes(target, (5,), (0, 1))  # every slice has mitochondria
    dataset_json = json.loads((folder / "dataset.json").read_text())
    dataset_json["labels"]["ghost"] = 2
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    with pytest.raises(ValueError, match=r"class\(es\) 2 \(ghost\) occur in none .* k = 5 training cases of seed 0"):
        check_few_shot_classes(target, (5,), (0, 1))


def test_a_member_that_saw_a_test_image_is_found_by_content_under_any_name(tmp_path, shared_data):
    """JSRT X-rays converted by the product, and a copy under another name whose images are rescaled,
    transposed and stored as NIfTI: the JSRT-supervised member saw every one of them, the others none."""
    import shutil

    import SimpleITK as sitk

    from benchmarks.finetune_grid.overlap import case_thumbnails, matched_cases, thumbnails
    from benchmarks.finetune_grid.zoo import pretraining_images, select_members

    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw")}
    _run(["nnunet-te", "data", "jsrt_lungs", "-d", "971", "--cases", "4"], env, tmp_path)
    source = next((tmp_path / "raw").glob("Dataset971_*"))
    cases = sorted(p.name.removesuffix("_0000.png") for p in (source / "imagesTr").glob("*.png"))
    copy = tmp_path / "raw" / "Dataset972_Anonymous"
    (copy / "imagesTr").mkdir(parents=True)
    shutil.copytree(source / "labelsTr", copy / "labelsTr")
    for i, case in enumerate(cases):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.png")))
        sitk.WriteImage(sitk.GetImageFromArray((3.0 * image.T + 7).astype(np.float32)),
                        str(copy / "imagesTr" / f"anon{i}_0000.nii.gz"))
        (copy / "labelsTr" / f"{case}.png").rename(copy / "labelsTr" / f"anon{i}.png")
    dataset_json = json.loads((source / "dataset.json").read_text())
    (copy / "dataset.json").write_text(json.dumps({"channel_names": {"0": "anything"}, "labels": dataset_json["labels"],
                                                   "numTraining": len(cases), "file_ending": ".nii.gz"}))
    for f in (copy / "labelsTr").glob("*.png"):  # labels in the images' format
        sitk.WriteImage(sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.ReadImage(str(f))).T.copy()),
                        str(f.with_suffix("").with_suffix(".nii.gz")))
        f.unlink()
    members = select_members(["random_s0", "sup_isbi_membranes", "sup_jsrt_lungs"])
    seen_by = {m.name: thumbnails(pretraining_images(m, shared_data.parent, 2)) for m in members}
    for folder, ids in ((source, cases), (copy, [f"anon{i}" for i in range(len(cases))])):
        tests = case_thumbnails(folder, ids)
        assert {name: matched_cases(t, tests) for name, t in seen_by.items()} == {
            "random_s0": [], "sup_isbi_membranes": [], "sup_jsrt_lungs": sorted(ids)}, folder.name


def test_records_restore_what_a_fresh_work_folder_lacks_and_never_overwrite(tmp_path):
    from benchmarks.finetune_grid.records import RECORD_FILES, restore_records, save_records

    work, records, fresh = tmp_path / "work", tmp_path / "records", tmp_path / "fresh"
    for i, name in enumerate(RECORD_FILES):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(f"measured {i}")
    (work / "zoo" / "ssl_masked-abc").mkdir(parents=True)
    (work / "zoo" / "ssl_masked-abc" / "member.json").write_text("{}")
    assert sorted(save_records(work, records)) == sorted([*RECORD_FILES, "zoo/ssl_masked-abc.json"])
    (fresh / "results.csv").parent.mkdir(parents=True)
    (fresh / "results.csv").write_text("newer")
    restored = restore_records(records, fresh)
    assert sorted(restored) == sorted(n for n in RECORD_FILES if n != "results.csv")
    assert (fresh / "results.csv").read_text() == "newer"  # a work folder's own file wins
    assert all((fresh / n).read_text() == (work / n).read_text() for n in restored)


def test_bad_shots_fail_before_any_work(tmp_path):
    from benchmarks.finetune_grid.run import run_bench

    with pytest.raises(ValueError, match="shots must be among"):
        run_bench([981], tmp_path / "work", shots=(4,))
    assert not (tmp_path / "work" / "zoo").exists()


def test_zoo_members_are_deterministic_and_cached(tmp_path, shared_data):
    from benchmarks.finetune_grid.plan import CPU_PLAN
    from benchmarks.finetune_grid.zoo import build_member, select_members

    shared = shared_data.parent
    member = select_members(["sup_isbi_membranes"], iterations=2)[0]
    a, b = (build_member(member, tmp_path / folder, shared=shared, plan=CPU_PLAN, architecture=CPU_PLAN.architecture())
            for folder in "ab")
    assert a.folder.name == b.folder.name  # same content key
    wa = torch.load(a.nnunet, weights_only=True)["network_weights"]
    wb = torch.load(b.nnunet, weights_only=True)["network_weights"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(".seg_layers." in k for k in wa)  # a supervised member keeps its source head
    mtime = a.nnunet.stat().st_mtime_ns
    assert build_member(member, tmp_path / "a", shared=shared, plan=CPU_PLAN,
                        architecture=CPU_PLAN.architecture()).nnunet.stat().st_mtime_ns == mtime  # reused
    other = select_members(["sup_isbi_membranes"], iterations=3)[0]
    assert build_member(other, tmp_path / "a", shared=shared, plan=CPU_PLAN,
                        architecture=CPU_PLAN.architecture()).folder != a.folder


def test_nt_xent_on_analytic_views():
    from benchmarks.finetune_grid.pretext import nt_xent

    # orthogonal items, each view equal to its twin: the positive has cosine 1, the 2B - 2 negatives 0
    z = torch.eye(4)
    expected = -np.log(np.exp(1 / 0.1) / (np.exp(1 / 0.1) + 6 * np.exp(0.0)))
    assert float(nt_xent(z, z)) == pytest.approx(expected, abs=1e-6)
    # swapping which view is which changes nothing; a view that matches another item's costs more
    assert float(nt_xent(z, z.roll(1, 0))) > float(nt_xent(z, z)) + 5


def test_genesis_corruption_is_seeded_and_keeps_the_intensity_range():
    from benchmarks.finetune_grid.pretext import genesis_corrupt

    batch = torch.randn(4, 1, 64, 48, generator=torch.Generator().manual_seed(0))
    a = genesis_corrupt(batch, torch.Generator().manual_seed(3))
    assert torch.equal(a, genesis_corrupt(batch, torch.Generator().manual_seed(3)))
    assert a.shape == batch.shape and not torch.equal(a, batch)
    for clean, corrupted in zip(batch, a):  # scaled to [0, 1] and back: within the image's own range
        assert clean.min() - 1e-5 <= corrupted.min() and corrupted.max() <= clean.max() + 1e-5


def test_contrastive_pre_training_moves_the_encoder_only_and_is_seeded():
    from benchmarks.finetune_grid.plan import CPU_PLAN, build_network
    from benchmarks.finetune_grid.pretext import pretrain_contrastive

    crops = [np.random.default_rng(i).normal(size=(1, 64, 64)).astype(np.float32) for i in range(6)]
    runs = []
    for _ in range(2):
        network = build_network(CPU_PLAN.architecture(), 1, seed=0)
        before = {k: v.clone() for k, v in network.state_dict().items()}
        losses = pretrain_contrastive(network, crops, iterations=3, seed=1, batch_size=4)
        after = network.state_dict()
        decoder_own = [k for k in after if k.startswith("decoder.") and not k.startswith("decoder.encoder.")]
        assert decoder_own and all(torch.equal(before[k], after[k]) for k in decoder_own)
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("encoder."))
        runs.append(losses)
    assert runs[0] == runs[1] and all(np.isfinite(runs[0]))


def test_version_2_members_build_from_the_shared_data(tmp_path, shared_data):
    from benchmarks.finetune_grid.plan import CPU_PLAN
    from benchmarks.finetune_grid.zoo import build_member, pretraining_images, select_members

    names = ["ssl_genesis", "ssl_contrastive", "ssl_mri", "sup_mni_tissue", "sup_nuclei", "sup_isbi_random_labels"]
    for member in select_members(names, iterations=2):
        built = build_member(member, tmp_path, shared=shared_data.parent, plan=CPU_PLAN,
                             architecture=CPU_PLAN.architecture())
        assert len(built.record["losses"]) == 2 and np.isfinite(built.record["losses"]).all(), member.name
        images = pretraining_images(member, shared_data.parent, 2)
        assert images and all(np.isfinite(i).all() and abs(float(np.mean(i))) < 1e-3 for i in images), member.name


def test_random_labels_belong_to_another_image(shared_data):
    from benchmarks.finetune_grid.zoo import _labelled_images, _npz

    _, labels, n = _labelled_images("isbi_random_labels", shared_data)
    true = _npz(shared_data / "isbi2012_em/train_256.npz")["membrane"] > 0
    assert n == 2 and len(labels) == len(true)
    for i, label in enumerate(labels):  # each image carries exactly one other image's membranes
        assert [j for j in range(len(true)) if np.array_equal(label, true[j])] not in ([], [i])


def test_unknown_dataset_fails_before_the_zoo(tmp_path, monkeypatch):
    from benchmarks.finetune_grid.run import run_bench

    for name in NNUNET_FOLDERS:
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="999"):
        run_bench([999], tmp_path / "work")
    assert not (tmp_path / "work" / "zoo").exists()


def test_the_zoo_data_comes_from_the_shared_folder_passed_in_not_the_installed_package():
    from benchmarks.finetune_grid.zoo import default_shared

    assert default_shared({"NNUNET_TE_SHARED": "/data/shared"}) == Path("/data/shared")
    assert default_shared({}) == REPO.parent / "shared"  # beside the checkout the benchmark runs from


def test_schedules_give_each_dataset_its_own_by_id_or_name():
    from benchmarks.finetune_grid.ground_truth import Schedule, Schedules

    schedules = Schedules(Schedule(5, 20), {"508": Schedule(40, 20), "Dataset501_EPFLEM_mitochondrion": Schedule(3, 20)})
    assert schedules.of("Dataset508_Hippocampus") == schedules.of(508) == Schedule(40, 20)
    assert schedules.of(501).label == "3x20" and schedules.of("Dataset507_JSRTLungs") == Schedule(5, 20)
    assert schedules.describe() == "5x20 (501: 3x20, 508: 40x20)"
    with pytest.raises(ValueError, match="not an nnU-Net dataset id"):
        Schedules(Schedule(5, 20), {"Hippocampus": Schedule(40, 20)})


def test_schedules_take_the_given_one_before_the_rules():
    from benchmarks.finetune_grid.ground_truth import Schedule, Schedules

    ruled = Schedules(None, {"508": Schedule(40, 20)}).with_rule({501: Schedule(25, 20), 508: Schedule(10, 20)})
    assert ruled.of(508) == Schedule(40, 20) and ruled.of(501) == Schedule(25, 20)  # given for 508, ruled for 501
    assert ruled.needs_rule(501) and not ruled.needs_rule(508) and not ruled.has(502)
    with pytest.raises(ValueError, match="502: no fine-tuning schedule"):
        ruled.of(502)
    assert ruled.describe() == "by the schedule rule (501: 25x20, 508: 40x20)"
    everywhere = Schedules(Schedule(5, 20)).with_rule({501: Schedule(25, 20)})
    assert everywhere.of(501) == Schedule(5, 20) and not everywhere.needs_rule(501)  # --schedule wins over the rule


def test_the_schedule_rule_doubles_until_the_longer_run_adds_under_5_percent():
    from benchmarks.finetune_grid.schedule_rule import LEARNED, Probe, doubling_choice, final_choice

    assert Probe().lengths == [10, 20, 40, 80] and Probe(start=1, longest=2).lengths == [1, 2]
    with pytest.raises(ValueError, match="longest = start x 2"):
        Probe(start=10, longest=60)
    assert doubling_choice({10: 0.5}) is None  # needs the next run
    assert doubling_choice({10: 0.5, 20: 0.7}) is None  # 0.5 < 0.95 * 0.7
    choice = doubling_choice({10: 0.5, 20: 0.7, 40: 0.72})  # 0.7 >= 0.684
    assert (choice.epochs, choice.converged) == (20, True)
    # equal Dice of zero is the all-background phase, not convergence
    assert doubling_choice({10: 0.0, 20: 0.0}) is None
    assert final_choice({10: 0.0, 20: 0.01, 40: LEARNED}).epochs is None
    late = final_choice({10: 0.1, 20: 0.3, 40: 0.5, 80: 0.7})
    assert (late.epochs, late.converged) == (40, False)


def test_the_probe_validates_on_pool_cases_never_on_test_cases():
    from benchmarks.finetune_grid.plan import bench_split
    from benchmarks.finetune_grid.schedule_rule import PROBE_K, probe_split, probe_validation_size

    cases = [f"case_{i:03d}" for i in range(60)]
    split = bench_split(cases, 20, seed=0)
    n_val = probe_validation_size(len(split["train"]))
    probe = probe_split(split, n_val, seed=0)
    assert len(probe["val"]) == n_val and len(probe["train"]) >= 10 > PROBE_K
    assert not set(probe["val"]) & set(split["val"]) and not set(probe["train"]) & set(split["val"])
    assert sorted(probe["train"] + probe["val"]) == sorted(split["train"])
    assert probe == probe_split(split, n_val, seed=0)
    with pytest.raises(ValueError, match="validation cases from a pool"):
        probe_split(split, len(split["train"]), seed=0)


def test_dataset_schedule_needs_integers(tmp_path):
    done = subprocess.run([str(BIN / BENCH[0]), *BENCH[1:], "--report-only", "--work", str(tmp_path),
                           "--dataset-schedule", "508", "forty", "20"], capture_output=True, text=True,
                          env=_with_repo(os.environ), cwd=tmp_path)
    assert done.returncode == 1 and "--dataset-schedule D EPOCHS ITERATIONS takes integer" in done.stderr


def test_fine_tune_phases_come_from_the_last_log(tmp_path):
    from benchmarks.finetune_grid.tables import fine_tune_phases

    (tmp_path / "training_log_2026_01_01_10_00_00.txt").write_text("2026-01-01 10:00:05.000001: Epoch 0\n")
    (tmp_path / "training_log_2026_01_01_11_00_00.txt").write_text(  # resumed with --c: this invocation counts
        "Configuration name: 2d\n2026-01-01 11:00:10: Epoch 3 \n2026-01-01 11:00:20.5: Epoch 4 \n"
        "2026-01-01 11:00:40.250000: Training done.\n")
    row = {"run_folder": str(tmp_path), "finished": "2026-01-01T11:00:55", "train_seconds": 50.0}
    assert fine_tune_phases(row) == {"start": 5.0, "epochs": 30.25, "validation": 14.75}
    (tmp_path / "training_log_2026_01_01_12_00_00.txt").write_text("2026-01-01 12:00:10: Using splits\n")
    assert fine_tune_phases(row) is None  # --val only: no epoch in the last invocation


def test_bench_trainers_draw_nnunets_progress_plot_after_the_last_epoch_only(tmp_path):
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    from benchmarks.finetune_grid.trainers import _ProgressPlotAfterLastEpoch

    logger = _ProgressPlotAfterLastEpoch(MetaLogger(str(tmp_path), False), num_epochs=3)
    for epoch in range(3):
        for key in ("mean_fg_dice", "ema_fg_dice", "train_losses", "val_losses", "lrs"):
            logger.log(key, 0.5, epoch)
        logger.log("dice_per_class_or_region", [0.5], epoch)
        logger.log("epoch_start_timestamps", float(epoch), epoch)
        logger.log("epoch_end_timestamps", epoch + 1.0, epoch)
        logger.plot_progress_png(str(tmp_path))
        assert (tmp_path / "progress.png").is_file() == (epoch == 2), epoch
    assert logger.get_checkpoint()["epoch_end_timestamps"] == [1.0, 2.0, 3.0]  # the rest is nnU-Net's logger


def test_fine_tune_hours_count_overlapping_runs_once():
    from benchmarks.finetune_grid.tables import fine_tune_hours

    rows = [{"finished": "2026-01-01T10:30:00", "train_seconds": 1800.0},  # 10:00-10:30
            {"finished": "2026-01-01T10:45:00", "train_seconds": 1800.0},  # 10:15-10:45, beside the first
            {"finished": "2026-01-01T10:40:00", "train_seconds": 300.0},   # inside both
            {"finished": "2026-01-01T13:00:00", "train_seconds": 3600.0}]  # after a pause
    hours = fine_tune_hours(rows)
    assert hours["summed"] == 7500 / 3600
    assert abs(hours["elapsed"] - 1.75) < 1e-9


def test_classes_no_member_segmented_are_named():
    from benchmarks.finetune_grid.tables import unlearned_classes

    def row(member, seed, per_class, trainer="plain"):
        return {"dataset": "D8_h", "k": 5, "member": member, "seed": seed, "trainer": trainer,
                "dice_per_class": json.dumps(per_class)}

    rows = [row("a", 0, {"1": 0.0, "2": 0.0}), row("a", 1, {"1": 0.4, "2": 0.0}), row("b", 0, {"1": 0.0, "2": 0.0}),
            row("b", 0, {"1": 0.0, "2": 0.3}, trainer="risk")]  # risk runs are not the ground truth
    assert unlearned_classes(rows) == {("D8_h", 5): ["2"]}
    assert unlearned_classes(rows[1:2] + [row("b", 1, {"1": 0.1, "2": 0.2})]) == {}


def _quality(k, taus):
    return [{"dataset": d, "k": k, "metric": m, "weighted_tau": t} for (d, m), t in taus.items()]


def test_goals_judge_ranking_and_risk_from_the_tables():
    from benchmarks.finetune_grid.tables import goals

    quality = _quality(5, {("D1_a", "topology"): 0.6, ("D2_b", "topology"): -0.1, ("D1_a", "ccfv"): 0.7,
                           ("D2_b", "ccfv"): -0.3, ("D1_a", "logme"): 0.1, ("D2_b", "logme"): 0.1,
                           ("D1_a", "grtd"): 0.9, ("D2_b", "grtd"): 0.9})  # grtd is a component, not a baseline
    def spread_row(dataset, noise_floor, spread):
        return {"dataset": dataset, "k": 5, "noise_floor": noise_floor, "spread": spread,
                "judges": spread >= 2 * noise_floor}

    noise = [spread_row("D1_a", 1.0, 4.0), spread_row("D2_b", 3.0, 6.0)]
    pairs = [{"dataset": "D1_a", "k": 5, "trainer": "risk", "difference": d} for d in (3.0, 2.0)] + \
            [{"dataset": "D2_b", "k": 5, "trainer": "risk", "difference": d} for d in (-4.0, -3.0)]
    rows = {g["goal"].split(": ", 1)[1]: g for g in goals(quality, noise, pairs, {})}
    ahead = rows["fused topology score ahead of every baseline on mean weighted tau"]
    # topology 0.25 vs ccfv 0.20 and logme 0.10
    assert ahead["met"] is True and "topology 0.250 vs best baseline ccfv 0.200 (2 target(s))" == ahead["measured"]
    # a baseline measured on one target only is compared on that target
    ahead_with_leep = goals(quality + _quality(5, {("D2_b", "leep"): 0.0}), noise, pairs, {})[0]
    assert ahead_with_leep["measured"] == "topology -0.100 vs best baseline leep 0.000 (1 target(s))"
    assert ahead_with_leep["met"] is False
    # a tie names the same baseline whatever the process's string hashing (LEEP and NCE often tie)
    tied = goals(quality + _quality(5, {("D2_b", "nce"): 0.0, ("D2_b", "leep"): 0.0}), noise, pairs, {})[0]
    assert tied["measured"] == "topology -0.100 vs best baseline leep 0.000 (1 target(s))"
    positive = rows["topology weighted tau > 0 on every target that can judge a ranking"]
    assert positive["met"] is False and positive["measured"] == "1 of 2 such target(s) positive; not positive: b"
    gain = rows["risk weighting >= +2 Dice points on average"]
    assert gain["met"] is False and gain["measured"] == "-0.50 points over 4 pairs"
    floor = rows["risk weighting never worse than minus the noise floor on any target"]
    assert floor["met"] is False and floor["measured"] == "1 of 2 target(s) within; b -3.50"

    # a target whose spread is below twice its noise floor cannot judge a ranking; nothing measured: not judged
    noise[1] = spread_row("D2_b", 3.0, 5.9)
    rows = {g["goal"].split(": ", 1)[1]: g for g in goals(quality, noise, pairs[:2], {})}
    assert rows["topology weighted tau > 0 on every target that can judge a ranking"]["met"] is True
    assert rows["fused topology score ahead of every baseline on mean weighted tau"]["measured"] == (
        "topology 0.600 vs best baseline ccfv 0.700 (1 target(s))")  # D2_b left out
    assert rows["risk weighting >= +2 Dice points on average"]["met"] is True
    assert all(g["met"] is None for g in goals([], [], [], {}))

    # an option variant is judged on its own pairs, beside the product's defaults
    variant = [{**p, "trainer": "risk_fg_ce", "difference": p["difference"] + 5} for p in pairs]
    rows = {g["goal"].split(": ", 1)[1]: g for g in goals(quality, noise, pairs + variant, {})}
    assert rows["risk weighting >= +2 Dice points on average"]["measured"] == "-0.50 points over 4 pairs"
    assert rows["risk weighting (risk_fg_ce) >= +2 Dice points on average"]["measured"] == "+4.50 points over 4 pairs"
    assert rows["risk weighting (risk_fg_ce) never worse than minus the noise floor on any target"]["met"] is True


def test_risk_pairs_and_tests_per_trainer_kind():
    from benchmarks.finetune_grid.tables import risk_vs_plain

    def row(member, seed, trainer, dice):
        return {"dataset": "D1_a", "member": member, "k": 5, "seed": seed, "trainer": trainer, "dice": dice}

    rows = [row(m, s, "plain", 0.5) for m in "ab" for s in (0, 1)]
    rows += [row("a", 0, "risk", 0.4), row("a", 1, "risk", 0.45), row("a", 0, "risk_fg_ce", 0.6),
             row("b", 2, "risk", 0.9)]  # no plain run of that seed: not a pair
    pairs, tests = risk_vs_plain(rows)
    assert sorted((p["trainer"], p["seed"], round(p["difference"], 6)) for p in pairs) == [
        ("risk", 0, -10.0), ("risk", 1, -5.0), ("risk_fg_ce", 0, 10.0)]
    assert tests["risk"]["n_pairs"] == 2 and tests["risk"]["mean_difference"] == pytest.approx(-7.5)
    assert "wilcoxon_p" in tests["risk"] and tests["risk_fg_ce"] == {"n_pairs": 1, "mean_difference": pytest.approx(10.0)}


def test_risk_against_its_controls_is_paired_and_judged():
    from benchmarks.finetune_grid.tables import goals, risk_vs_controls, risk_vs_plain

    def row(member, seed, trainer, dice):
        return {"dataset": "D1_a", "member": member, "k": 5, "seed": seed, "trainer": trainer, "dice": dice}

    rows = [row(m, s, "plain", 0.5) for m in "abc" for s in (0, 1)]
    rows += [row(m, s, "risk", 0.6 + 0.01 * s) for m in "abc" for s in (0, 1)]
    rows += [row(m, s, "risk_uniform", 0.6 + 0.01 * s) for m in "abc" for s in (0, 1)]  # as good as the map
    rows += [row(m, s, "risk_shuffled", 0.5 - 0.01 * i - 0.001 * s) for i, m in enumerate("abc") for s in (0, 1)]
    controls = risk_vs_controls(rows)
    assert controls["risk_uniform"] == {"n_pairs": 6, "mean_difference": 0.0}  # no difference: no test
    assert controls["risk_shuffled"]["mean_difference"] == pytest.approx(100 * np.mean(
        [0.6 + 0.01 * s - (0.5 - 0.01 * i - 0.001 * s) for i in range(3) for s in (0, 1)]))
    pairs, tests = risk_vs_plain(rows)
    assert set(tests) == {"risk", "risk_uniform", "risk_shuffled"}
    judged = {g["goal"]: g["met"] for g in goals([], [], pairs, controls)}
    assert judged["risk weighting ahead of its uniform control (paired, p < 0.05)"] is False
    assert judged["risk weighting ahead of its shuffled control (paired, p < 0.05)"] is True
    assert not any("risk_uniform" in g or "risk_shuffled" in g for g in judged)  # controls get no gain goals


def test_uniform_control_keeps_each_patch_mean_and_removes_the_pattern():
    from benchmarks.finetune_grid.controls import uniform_weights

    weights = 1 + torch.rand(3, 1, 8, 6, generator=torch.Generator().manual_seed(0))
    flat = uniform_weights(weights)
    assert flat.shape == weights.shape
    assert torch.allclose(flat.flatten(1).mean(1), weights.flatten(1).mean(1))
    assert torch.all(flat.flatten(1).std(1) == 0) and weights.flatten(1).std(1).min() > 0


def test_shuffled_control_permutes_within_foreground_and_background_only():
    from benchmarks.finetune_grid.controls import shuffled_weights

    generator = torch.Generator().manual_seed(1)
    weights = 1 + torch.rand(2, 1, 10, 12, generator=generator)
    labels = (torch.rand(2, 1, 10, 12, generator=generator) > 0.7).long() * torch.randint(1, 3, (2, 1, 10, 12),
                                                                                         generator=generator)
    shuffled = shuffled_weights(weights, labels, torch.Generator().manual_seed(5))
    for b in range(2):
        for side in (labels[b] == 0, labels[b] != 0):
            assert torch.equal(weights[b][side].sort().values, shuffled[b][side].sort().values)  # same values
    assert (shuffled != weights).float().mean() > 0.5  # moved
    assert torch.equal(shuffled, shuffled_weights(weights, labels, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="differ in shape"):
        shuffled_weights(weights, labels[:, :, :5], generator)


def test_regret_of_the_picks_a_user_would_make_instead():
    from benchmarks.finetune_grid.tables import pick_regrets

    dice = {"random_s0": 0.50, "ssl_masked": 0.60, "sup_isbi_membranes": 0.70, "sup_jsrt_lungs": 0.40}
    quality = [{"dataset": "D501_a", "k": 5, "metric": "topology", "top1_regret": 3.0}]
    (row,) = pick_regrets(quality, {("D501_a", 5, 0): dice}, {"D501_a": "epfl_em_membranes"})
    assert row["ranking (topology)"] == 3.0
    assert row["random pick"] == pytest.approx(100 * np.mean([0.2, 0.1, 0.0, 0.3]))
    # ssl_masked and both supervised members have 250 iterations: their regrets averaged
    assert row["most pre-training"] == pytest.approx(100 * np.mean([0.1, 0.0, 0.3]))
    assert row["closest source task"] == pytest.approx(0.0)  # EM membranes for EM membranes
    (mri,) = pick_regrets([], {("D508_h", 5, 0): {"random_s0": 0.5, "sup_isbi_membranes": 0.7}},
                          {"D508_h": "msd_hippocampus"})
    assert np.isnan(mri["closest source task"]) and np.isnan(mri["ranking (topology)"])  # no MRI member


def test_a_target_judges_a_ranking_when_members_spread_twice_the_seed_noise():
    from benchmarks.finetune_grid.tables import judging, noise_floor

    def row(dataset, member, seed, dice):
        return {"dataset": dataset, "member": member, "k": 5, "seed": seed, "trainer": "plain", "dice": dice}

    # members 10 points apart, seeds 2 points apart: spread std(0.49, 0.59) = 5 points, noise 2
    rows = [row("D1_a", "m", 0, 0.48), row("D1_a", "m", 1, 0.50), row("D1_a", "n", 0, 0.58), row("D1_a", "n", 1, 0.60)]
    # the same members with seeds 6 points apart: noise 6, spread 5
    rows += [row("D2_b", "m", 0, 0.46), row("D2_b", "m", 1, 0.52), row("D2_b", "n", 0, 0.56), row("D2_b", "n", 1, 0.62)]
    a, b = noise_floor(rows)
    assert (a["noise_floor"], a["spread"], a["ratio"], a["judges"]) == pytest.approx((2.0, 5.0, 2.5, True))
    assert (b["noise_floor"], b["spread"], b["judges"]) == pytest.approx((6.0, 5.0, False))
    quality = [{"dataset": d, "k": 5, "metric": "topology"} for d in ("D1_a", "D2_b")]
    assert judging(quality, [a, b]) == quality[:1]


def test_results_csv_with_other_columns_is_refused(tmp_path):
    from benchmarks.finetune_grid.ground_truth import COLUMNS, append_csv_row

    path = tmp_path / "results.csv"
    row = dict.fromkeys(COLUMNS, "1")
    append_csv_row(path, row, COLUMNS)
    append_csv_row(path, row, COLUMNS)
    assert path.read_text().count("\n") == 3
    older = [c for c in COLUMNS if c != "torch_threads"]
    path.write_text(",".join(older) + "\n")
    with pytest.raises(ValueError, match="torch_threads"):
        append_csv_row(path, row, COLUMNS)
    assert path.read_text() == ",".join(older) + "\n"


def test_ranking_quality_skips_a_split_where_every_member_reached_the_same_dice(tmp_path):
    from benchmarks.finetune_grid.tables import ranking_quality

    for seed in (0, 1):
        folder = tmp_path / "rankings" / "D1_a" / f"k5s{seed}"
        folder.mkdir(parents=True)
        scores = {"m0": 0.1, "m1": 0.2, "m2": 0.3}
        folder.joinpath("ranking.json").write_text(json.dumps(
            {"metrics": {"topology": {"greater_is_better": True, "scores": scores}}}))
    truth = {("D1_a", 5, 0): {"m0": 0.0, "m1": 0.0, "m2": 0.0},  # no member left the background
             ("D1_a", 5, 1): {"m0": 0.5, "m1": 0.6, "m2": 0.7}}
    (row,) = ranking_quality(tmp_path, truth)
    assert row["n_seeds"] == 1 and row["weighted_tau"] == pytest.approx(1.0) and row["top1_regret"] == 0.0
    truth[("D1_a", 5, 1)] = {"m0": 0.0, "m1": 0.0, "m2": 0.0}
    assert ranking_quality(tmp_path, truth) == []


def test_a_checkpoint_cut_off_mid_save_is_set_aside_and_a_whole_one_kept(tmp_path):
    from benchmarks.finetune_grid.ground_truth import _set_aside_truncated

    torch.save({"w": torch.arange(1000)}, tmp_path / "checkpoint_latest.pth")
    torch.save({"w": torch.arange(1000)}, tmp_path / "checkpoint_final.pth")
    whole = (tmp_path / "checkpoint_final.pth").read_bytes()
    (tmp_path / "checkpoint_final.pth").write_bytes(whole[: len(whole) // 2])  # killed while writing
    _set_aside_truncated(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_final.pth.truncated", "checkpoint_latest.pth"]
    assert torch.load(tmp_path / "checkpoint_latest.pth", weights_only=True)["w"].sum() == 499500
