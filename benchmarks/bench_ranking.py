"""Time ranking a zoo of 8 candidates on a real 3D target against one nnU-Net training epoch.

Real MSD hippocampus cases (``nnunet-te data``, ``nnUNetv2_plan_and_preprocess -c 3d_fullres``),
a zoo of 8 small checkpoints in three formats (nnU-Net checkpoints of the plans' architecture
with different seeds, nnssl-style encoder-only checkpoints, MONAI BasicUNets), ranked with
``rank_zoo`` (every segmentation metric, sliding windows, no feature cache so extraction is
timed). One epoch of nnU-Net's default schedule (250 training + 50 validation iterations) is
estimated from measured nnUNetTrainer iterations on the same plan. Prints a table and writes it
to docs/performance.md. ``--workdir`` keeps the dataset for quick re-runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_section import write_section

DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
DATASET_ID = 989


def prepare_dataset(workdir: Path, n_cases: int) -> Path:
    """The preprocessed dataset folder under ``workdir`` (converted and planned on first use)."""
    os.environ.update({name: str(workdir / name) for name in
                       ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")},
                      nnUNet_n_proc_DA="0", nnUNet_compile="f")
    found = list((workdir / "nnUNet_preprocessed").glob(f"Dataset{DATASET_ID}_*/nnUNetPlans_3d_fullres"))
    if not found:
        bin_dir = Path(sys.executable).parent
        for command in (["nnunet-te", "data", "msd_hippocampus", "-d", str(DATASET_ID), "--cases",
                         str(n_cases), "--overwrite"],
                        ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"]):
            subprocess.run([str(bin_dir / command[0]), *command[1:]], check=True, capture_output=True,
                           env={**os.environ, "nnUNet_n_proc_DA": "2"})
    return next((workdir / "nnUNet_preprocessed").glob(f"Dataset{DATASET_ID}_*"))


def write_zoo(preprocessed: Path, folder: Path) -> Path:
    """8 checkpoints in three formats and the zoo file listing them."""
    import torch
    from monai.networks.nets import BasicUNet
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder.mkdir(parents=True, exist_ok=True)
    plans = PlansManager(json.loads((preprocessed / "nnUNetPlans.json").read_text()))
    configuration = plans.get_configuration("3d_fullres")
    entries = []
    for seed in range(4):
        torch.manual_seed(seed)
        network = nnUNetTrainer.build_network_architecture(plans, configuration, 1, 3, False)
        path = folder / f"nnunet_s{seed}.pth"
        torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer"}, path)
        entries.append({"name": f"nnunet_s{seed}", "checkpoint": str(path)})
    for seed in (10, 11):
        torch.manual_seed(seed)
        network = nnUNetTrainer.build_network_architecture(plans, configuration, 1, 3, False)
        path = folder / f"nnssl_s{seed}.pth"
        torch.save({"network_weights": {k: v for k, v in network.state_dict().items() if k.startswith("encoder.")},
                    "nnssl_adaptation_plan": {
                        "architecture_plans": {"arch_class_name": configuration.network_arch_class_name},
                        "pretrain_num_input_channels": 1, "key_to_encoder": "encoder.stages",
                        "key_to_stem": "encoder.stages.0", "keys_to_in_proj": list(network.keys_to_in_proj),
                        "recommended_downstream_patchsize": list(configuration.patch_size)}}, path)
        entries.append({"name": f"nnssl_s{seed}", "checkpoint": str(path)})
    architecture = {"class": "monai.networks.nets.BasicUNet", "kwargs": {"features": [16, 16, 32, 64, 128, 16]}}
    for seed in (20, 21):
        torch.manual_seed(seed)
        network = BasicUNet(spatial_dims=3, in_channels=1, out_channels=3, **architecture["kwargs"])
        path = folder / f"monai_s{seed}.pt"
        torch.save(network.state_dict(), path)
        entries.append({"name": f"monai_s{seed}", "checkpoint": str(path), "architecture": architecture})
    zoo = folder / "zoo.json"
    zoo.write_text(json.dumps({"candidates": entries}, indent=1))
    return zoo


def epoch_seconds(n_iterations: int) -> tuple[float, float]:
    """(median seconds per training iteration, estimated default epoch) of nnUNetTrainer."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, "nnUNetTrainer", device=torch.device("cpu"))
    trainer.on_train_start()
    times = []
    for _ in range(n_iterations + 1):
        start = time.perf_counter()
        trainer.train_step(next(trainer.dataloader_train))
        times.append(time.perf_counter() - start)
    per_iteration = statistics.median(times[1:])
    # nnU-Net's default epoch: 250 training iterations + 50 validation iterations (forward only,
    # counted at a third of a training iteration).
    return per_iteration, per_iteration * (trainer.num_iterations_per_epoch
                                           + trainer.num_val_iterations_per_epoch / 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20, help="bundled hippocampus cases")
    parser.add_argument("--iterations", type=int, default=6, help="training iterations timed for the epoch estimate")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--output", type=Path, default=DOCS)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ranking_"))
    preprocessed = prepare_dataset(workdir, args.cases)
    import torch

    from nnunet_te.ranking.rank import rank_zoo

    zoo = write_zoo(preprocessed, workdir / "zoo")
    out = workdir / f"ranking_{time.strftime('%Y%m%d_%H%M%S')}"
    loads = [os.getloadavg()[0]]
    start = time.perf_counter()
    result = rank_zoo(DATASET_ID, "3d_fullres", zoo, out_dir=out, cache_dir=out / "cache", device="cpu")
    total = time.perf_counter() - start
    timings = result.metadata["timings"]
    extraction = sum(t["extraction_seconds"] for t in timings.values())
    metrics = sum(t["metric_total_seconds"] for t in timings.values())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loads.append(os.getloadavg()[0])
    per_iteration, epoch = epoch_seconds(args.iterations)
    loads.append(os.getloadavg()[0])

    lines = [
        "## Ranking a zoo vs fine-tuning",
        "",
        f"`benchmarks/bench_ranking.py --cases {args.cases} --iterations {args.iterations}`: "
        f"{len(timings)} candidates (4 nnU-Net checkpoints, 2 nnssl encoder-only, 2 MONAI BasicUNet) on "
        f"{args.cases} real MSD hippocampus cases, 3d_fullres plan, every segmentation metric, no feature "
        "cache, CPU.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; 1-minute "
        f"load average at the start of the ranking, of the epoch timing and at the end: "
        f"{', '.join(f'{x:.1f}' for x in loads)} (above 2, other work shared the cores)",
        "",
        "| candidate | feature extraction (s) | metric compute (s) |",
        "|---|---|---|",
    ]
    for name, timing in timings.items():
        lines.append(f"| {name} | {timing['extraction_seconds']:.1f} | {timing['metric_total_seconds']:.1f} |")
    lines += [
        "",
        f"- whole ranking: {total:.0f} s (extraction {extraction:.0f} s, metrics {metrics:.0f} s: "
        f"metric compute = {100 * metrics / extraction:.0f}% of extraction; goal <= 20%)",
        f"- one default nnU-Net epoch of one candidate on the same plan: {epoch:.0f} s "
        f"({per_iteration:.2f} s per training iteration x 250, plus 50 validation iterations); "
        f"ranking / epoch = {total / epoch:.2f} (goal < 1)",
        f"- peak resident memory of the process: {peak_mb:.0f} MB",
        f"- extraction includes the consistency score's extra forward passes: "
        f"{len(result.metadata['consistency_rates'])} dropout rates x up to "
        f"{result.metadata['sampling']['consistency_windows_per_case']} windows in each of up to "
        f"{result.metadata['sampling']['consistency_cases']} cases",
    ]
    section = "\n".join(lines)
    print(section)
    write_section(args.output, "bench_ranking", section)


if __name__ == "__main__":
    main()
