"""Fault injection through the real command lines (``nnunet-te``, ``nnUNetv2_train``) in subprocesses.

Every case asserts the exit code, that no traceback is printed, that the message names the
problem, that no file of the inputs changed (sha256 of every file before and after) and that no
code from an input file ran (a ``touch pwned`` payload). docs/bad_input.md lists the cases and
what the user sees.
"""

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BIN = Path(sys.executable).parent
EXIT_USER_ERROR = 1


class _Payload:
    """A pickle whose loading runs ``touch <path>``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _tree_hashes(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _run(command: list[str], env: dict, cwd: Path, watched: list[Path], timeout: int = 300):
    """Run ``command``; assert it changed no file under ``watched`` and ran no payload."""
    before = _tree_hashes(*watched)
    done = subprocess.run([str(BIN / command[0]), *command[1:]], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert _tree_hashes(*watched) == before, f"{command} changed an input file:\n{output[-3000:]}"
    assert not (cwd / "pwned").exists(), f"{command} ran code from an input file"
    assert "Traceback" not in output, f"{command} printed a traceback:\n{output[-4000:]}"
    return done


def _expect_error(done, *fragments: str, verb: str | None = None) -> None:
    assert done.returncode == EXIT_USER_ERROR, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    if verb:
        assert f"nnunet-te {verb}: error:" in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, f"{fragment!r} not in:\n{done.stderr}"


# ---- inputs: bad checkpoints, bad zoo files ---------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One folder of bad input files, written once and hashed around every command."""
    root = tmp_path_factory.mktemp("bad_input")
    work = root / "work"  # the commands' cwd: a payload would create work/pwned
    work.mkdir()
    files = root / "files"
    files.mkdir()
    torch.save({"network_weights": {"encoder.w": torch.zeros(2, 2)}}, files / "good.pth")
    good = (files / "good.pth").read_bytes()
    (files / "empty.pth").write_bytes(b"")
    (files / "truncated.pth").write_bytes(good[: len(good) // 2])
    (files / "text.pth").write_text("this is a README, not weights\n")
    with (files / "evil.pkl").open("wb") as fh:  # a plain pickle whose reduce calls os.system
        pickle.dump({"network_weights": _Payload(work / "pwned")}, fh)
    torch.save({"network_weights": {"encoder.w": torch.zeros(2)}, "extra": _Payload(work / "pwned")},
               files / "evil.pth")  # a torch file holding the same payload
    torch.save({"network_weights": {"encoder.w": torch.tensor([1.0, float("nan")]),
                                    "encoder.b": torch.tensor([float("inf")])}}, files / "nan.pth")
    torch.save([1, 2, 3], files / "list.pth")
    (files / "not_ranking.json").write_text(json.dumps({"candidates": ["a", "b"]}))
    (files / "not_json.json").write_text("candidate,dice\na,0.5\n")
    (files / "truth.csv").write_text("candidate,dice\na,0.5\nb,0.7\n")
    rng = np.random.default_rng(0)
    np.savez(files / "images.npz", images=rng.integers(0, 255, (8, 16, 16), dtype=np.uint8),
             labels=np.arange(8) % 2)
    np.savez(files / "one_class.npz", images=rng.integers(0, 255, (8, 16, 16), dtype=np.uint8),
             labels=np.zeros(8, dtype=int))

    def zoo(name: str, text: str) -> Path:
        (files / name).write_text(text)
        return files / name

    zoo("os_system.yaml", "candidates:\n  - name: innocent\n    checkpoint: good.pth\n"
                          "    architecture: {class: os.system, kwargs: {command: \"touch ../work/pwned\"}}\n")
    zoo("valid.yaml", "candidates:\n  - {name: a, checkpoint: good.pth}\n")
    zoo("duplicate.yaml", "candidates:\n  - {name: a, checkpoint: good.pth}\n  - {name: a, checkpoint: good.pth}\n")
    zoo("unknown_key.yaml", "candidates:\n  - {name: a, checkpoint: good.pth, weights: x.pth}\n")
    zoo("not_a_list.yaml", "candidates: {name: a, checkpoint: good.pth}\n")
    zoo("bad_yaml.yaml", "candidates:\n  - name: a\n   checkpoint: [unclosed\n")
    zoo("missing_file.yaml", "candidates:\n  - {name: a, checkpoint: no_such_file.pth}\n")
    zoo("file_kwarg.yaml", "candidates:\n  - name: t\n    checkpoint: good.pth\n    architecture: "
                           "{class: timm.create_model, kwargs: {model_name: resnet18, checkpoint_path: evil.pth}}\n")
    zoo("none_loads.yaml", "candidates:\n" + "".join(
        f"  - {{name: {kind}_candidate, checkpoint: {kind}.pth}}\n"
        for kind in ("empty", "truncated", "text", "evil", "nan", "list")))
    env = {k: v for k, v in os.environ.items() if k not in ("NNUNET_TE_DEBUG", "NNUNET_TE_ALLOW_MODULES")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    from types import SimpleNamespace
    return SimpleNamespace(root=root, work=work, files=files, env=env)


# ---- no dataset needed --------------------------------------------------------------------------
@pytest.mark.parametrize("ranking, message", [
    ("not_ranking.json", "not a ranking.json (expected keys 'ranking' and 'metrics'"),
    ("not_json.json", "not a ranking.json (not JSON"),
])
def test_evaluate_refuses_what_is_not_a_ranking(inputs, ranking, message):
    done = _run(["nnunet-te", "evaluate", str(inputs.files / ranking), str(inputs.files / "truth.csv"),
                 "-o", str(inputs.root / "evaluation")], inputs.env, inputs.work, [inputs.files])
    _expect_error(done, message, verb="evaluate")
    assert not (inputs.root / "evaluation").exists()


@pytest.mark.parametrize("zoo, fragments", [
    ("os_system.yaml", ["candidate 'innocent'", "'os.system' refused, nothing was imported",
                        "standard library"]),
    ("duplicate.yaml", ["candidate 'a'", "duplicate name"]),
    ("unknown_key.yaml", ["candidate 'a'", "unknown key(s) ['weights']"]),
    ("not_a_list.yaml", ["'candidates' must be a list"]),
    ("bad_yaml.yaml", ["invalid YAML"]),
    ("missing_file.yaml", ["candidate 'a'", "checkpoint file not found"]),
    ("file_kwarg.yaml", ["candidate 't'", "keyword argument 'checkpoint_path' refused"]),
])
def test_rank_cls_refuses_bad_zoo_files(inputs, zoo, fragments):
    out = inputs.root / f"cls_{zoo}"
    done = _run(["nnunet-te", "rank-cls", "--zoo", str(inputs.files / zoo), "-i", str(inputs.files / "images.npz"),
                 "-o", str(out), "-device", "cpu"], inputs.env, inputs.work, [inputs.files])
    _expect_error(done, *fragments, verb="rank-cls")
    assert not out.exists() or not any(out.iterdir())


def test_rank_cls_refuses_single_class_labels(inputs):
    done = _run(["nnunet-te", "rank-cls", "--zoo", str(inputs.files / "duplicate.yaml"),
                 "-i", str(inputs.files / "one_class.npz"), "-o", str(inputs.root / "one_class"), "-device", "cpu"],
                inputs.env, inputs.work, [inputs.files])
    _expect_error(done, "one_class.npz", "class", verb="rank-cls")


def test_allow_module_refuses_the_standard_library(inputs):
    done = _run(["nnunet-te", "rank-cls", "--allow-module", "subprocess", "--zoo", str(inputs.files / "os_system.yaml"),
                 "-i", str(inputs.files / "images.npz"), "-o", str(inputs.root / "allow"), "-device", "cpu"],
                inputs.env, inputs.work, [inputs.files])
    _expect_error(done, "'subprocess' cannot be allowed", verb="rank-cls")


# ---- on a real preprocessed nnU-Net dataset (shared, read-only: hashed around every command) -----
@pytest.fixture(scope="module")
def dataset(hippocampus_nnunet, inputs, tmp_path_factory):
    """The shared dataset with nnUNet_results in a private folder: commands may write results only there."""
    results = tmp_path_factory.mktemp("results")
    env = {**inputs.env, **hippocampus_nnunet.env, "nnUNet_results": str(results)}
    env.pop("NNUNET_TE_DEBUG", None)
    from types import SimpleNamespace
    return SimpleNamespace(tree=hippocampus_nnunet, env=env, results=results,
                           watched=[inputs.files, hippocampus_nnunet.raw, hippocampus_nnunet.preprocessed])


BAD_CHECKPOINTS = {
    "empty": "empty file (0 bytes)",
    "truncated": "truncated or damaged torch file",
    "text": "not a torch file: it holds text",
    "evil_pickle": "not a torch file: a plain Python pickle",
    "evil_torch": "refused by torch.load(weights_only=True), nothing in it was run",
    "nan": "hold NaN or inf values: 'encoder.w', 'encoder.b'",
    "list": "not a checkpoint, it holds a list",
}
_FILE = {"evil_pickle": "evil.pkl", "evil_torch": "evil.pth"}


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_convert_weights_refuses_bad_checkpoints(inputs, dataset, kind):
    checkpoint = inputs.files / _FILE.get(kind, f"{kind}.pth")
    out = inputs.root / f"converted_{kind}.pth"
    done = _run(["nnunet-te", "convert-weights", str(checkpoint), "-d", "991", "-c", "3d_fullres", "-o", str(out)],
                dataset.env, inputs.work, dataset.watched)
    _expect_error(done, str(checkpoint), BAD_CHECKPOINTS[kind], verb="convert-weights")
    assert not out.exists()


def test_convert_weights_reads_numpy1_files_and_trusted_pickles_only_when_asked(inputs, dataset):
    from test_nnunet_weights import numpy1_checkpoint

    from nnunet_te.networks.weights import network_for_configuration

    plans, dataset_json = (json.loads((dataset.tree.preprocessed / name).read_text())
                           for name in ("nnUNetPlans.json", "dataset.json"))
    weights = network_for_configuration(plans, "3d_fullres", dataset_json, seed=4)[0].state_dict()
    numpy1 = numpy1_checkpoint(inputs.root / "numpy1.pth", weights)
    convert = ["nnunet-te", "convert-weights", "-d", "991", "-c", "3d_fullres"]
    done = _run([*convert, str(numpy1), "-o", str(inputs.root / "numpy1_converted.pth")],
                dataset.env, inputs.work, dataset.watched)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    # a file holding another Python object (here an argparse.Namespace): refused, then read on request
    import argparse

    torch.save({"network_weights": weights, "args": argparse.Namespace(fold=0)}, inputs.root / "namespace.pth")
    out = inputs.root / "namespace_converted.pth"
    refused = _run([*convert, str(inputs.root / "namespace.pth"), "-o", str(out)], dataset.env, inputs.work,
                   dataset.watched)
    _expect_error(refused, "argparse.Namespace", "--trust-pickle", verb="convert-weights")
    assert not out.exists()
    trusted = _run([*convert, str(inputs.root / "namespace.pth"), "-o", str(out), "--trust-pickle"],
                   dataset.env, inputs.work, dataset.watched)
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert set(torch.load(out, weights_only=True)["network_weights"]) == set(weights)


def test_rank_reads_numpy1_files_and_unpickles_only_the_entries_the_user_trusts(inputs, dataset):
    """A zoo of a numpy-1.x nnU-Net file, a trusted pickle (argparse.Namespace) marked
    'trust_pickle: true' and the payload file: without --trust-pickle the mark is refused before
    anything is read; with it the marked file is unpickled, the payload (not marked) is still
    refused by weights_only and its code never runs (``_run`` checks)."""
    import argparse

    from test_nnunet_weights import numpy1_checkpoint

    from nnunet_te.networks.weights import network_for_configuration

    plans, dataset_json = (json.loads((dataset.tree.preprocessed / name).read_text())
                           for name in ("nnUNetPlans.json", "dataset.json"))
    weights = network_for_configuration(plans, "3d_fullres", dataset_json, seed=4)[0].state_dict()
    folder = inputs.root / "trusted_zoo"
    folder.mkdir()
    numpy1_checkpoint(folder / "numpy1.pth", weights)
    torch.save({"network_weights": weights, "args": argparse.Namespace(fold=0)}, folder / "namespace.pth")
    zoo = folder / "zoo.yaml"
    zoo.write_text("candidates:\n  - {name: numpy1, checkpoint: numpy1.pth}\n"
                   "  - {name: lab, checkpoint: namespace.pth, trust_pickle: true}\n"
                   f"  - {{name: payload, checkpoint: {inputs.files / 'evil.pth'}}}\n")
    rank = ["nnunet-te", "rank", "-d", "991", "-c", "3d_fullres", "--zoo", str(zoo), "--cases", "2",
            "--points", "256", "--consistency-rates", "-device", "cpu"]
    watched = [*dataset.watched, folder]
    refused = _run([*rank, "-o", str(dataset.results / "untrusted")], dataset.env, inputs.work, watched)
    _expect_error(refused, "candidate 'lab'", "--trust-pickle", verb="rank")
    assert not (dataset.results / "untrusted").exists()
    done = _run([*rank, "-o", str(dataset.results / "trusted"), "--trust-pickle"], dataset.env, inputs.work,
                watched)
    assert done.returncode == 0, done.stderr[-3000:]
    ranking = json.loads((dataset.results / "trusted" / "ranking.json").read_text())
    status = {entry["name"]: entry for entry in ranking["zoo"]}
    assert {name for name, entry in status.items() if entry["status"] == "scored"} == {"numpy1", "lab"}
    assert "weights_only=True" in status["payload"]["error"] and "GLOBAL" in status["payload"]["error"]
    assert [status[name]["trust_pickle"] for name in ("numpy1", "lab", "payload")] == [False, True, False]


@pytest.mark.parametrize("kind", ["empty", "evil_torch"])
def test_riskmap_refuses_bad_checkpoints(inputs, dataset, kind):
    checkpoint = inputs.files / _FILE.get(kind, f"{kind}.pth")
    done = _run(["nnunet-te", "riskmap", "-d", "991", "-c", "3d_fullres", "--weights", str(checkpoint),
                 "-device", "cpu"], dataset.env, inputs.work, dataset.watched)
    _expect_error(done, str(checkpoint), BAD_CHECKPOINTS[kind], verb="riskmap")


def test_rank_names_every_candidate_when_none_loads(inputs, dataset):
    done = _run(["nnunet-te", "rank", "-d", "991", "-c", "3d_fullres", "--zoo", str(inputs.files / "none_loads.yaml"),
                 "-o", str(dataset.results / "none_loads"), "--cases", "2", "-device", "cpu"],
                dataset.env, inputs.work, dataset.watched)
    _expect_error(done, "no candidate of the zoo could be used", verb="rank")
    for kind in ("empty", "truncated", "text", "evil", "nan", "list"):
        assert f"candidate '{kind}_candidate': " in done.stderr, done.stderr
    for fragment in ("empty file", "truncated", "holds text", "weights_only=True", "NaN or inf", "holds a list"):
        assert fragment in done.stderr, done.stderr


@pytest.mark.parametrize("zoo, fragments", [
    ("os_system.yaml", ["candidate 'innocent'", "'os.system' refused, nothing was imported"]),
])  # the other zoo-file cases: test_rank_cls_refuses_bad_zoo_files (the same reader)
def test_rank_refuses_bad_zoo_files(inputs, dataset, zoo, fragments):
    done = _run(["nnunet-te", "rank", "-d", "991", "-c", "3d_fullres", "--zoo", str(inputs.files / zoo),
                 "-o", str(dataset.results / f"rank_{zoo}"), "-device", "cpu"],
                dataset.env, inputs.work, dataset.watched)
    _expect_error(done, *fragments, verb="rank")


@pytest.mark.parametrize("verb", ["rank", "convert-weights"])
def test_dataset_not_preprocessed(inputs, dataset, tmp_path, verb):
    (tmp_path / "preprocessed").mkdir()
    env = {**dataset.env, "nnUNet_preprocessed": str(tmp_path / "preprocessed")}
    command = (["rank", "-d", "991", "-c", "3d_fullres", "--zoo", str(inputs.files / "valid.yaml")]
               if verb == "rank" else
               ["convert-weights", str(inputs.files / "good.pth"), "-d", "991", "-c", "3d_fullres",
                "-o", str(tmp_path / "out.pth")])
    done = _run(["nnunet-te", *command], env, inputs.work, [*dataset.watched, tmp_path / "preprocessed"])
    _expect_error(done, "nnUNetv2_plan_and_preprocess", verb=verb)


# ---- nnUNetv2_train: refused at trainer construction, before nnU-Net's loader or data loading ----
@pytest.mark.slow
@pytest.mark.parametrize("case", ["evil_pretrained_weights", "bad_option"])
def test_nnunet_train_refuses_bad_input_at_construction(inputs, dataset, case):
    env = {**dataset.env, "nnUNet_compile": "f"}
    command = ["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", "RiskWeightedTrainer_k5s0_cpu", "-device", "cpu"]
    if case == "evil_pretrained_weights":
        command += ["-pretrained_weights", str(inputs.files / "evil.pth")]
        fragments = ["RiskWeightedTrainer_k5s0_cpu: error: -pretrained_weights", "evil.pth",
                     "weights_only=True"]
    else:
        env["nnUNet_te_beta"] = "-1"
        fragments = ["RiskWeightedTrainer_k5s0_cpu: error:", "nnUNet_te_beta"]
    done = _run(command, env, inputs.work, dataset.watched, timeout=600)
    _expect_error(done, *fragments)
    assert "Using splits" not in done.stdout + done.stderr  # stopped before nnU-Net read the split / data
