"""RiskWeightedTrainer under DDP, on CPU: 2 processes with gloo, the trainer's own network, loss and
``train_step`` on the plans of a real preprocessed dataset, with deep supervision.

DDP reduces gradients in buckets and, by default, stops with an unused-parameter error when a
parameter took no part in the loss; nnU-Net guards against it by giving the lowest deep-supervision
output weight 1e-6 instead of 0 under DDP. The loss follows that guard (``ddp=is_ddp``): every
step runs, every parameter gets a gradient, and the gradients are equal on both ranks although
each rank sees its own batch. Without the guard the same run stops (the check can fail).

A whole few-shot ``run_training`` under DDP: rank 0 alone computes the risk maps and writes the
split and the options; both ranks train on the same split and maps and end with equal weights.
"""

import json
import os
import tempfile
from pathlib import Path

import pytest
from conftest import NNUNET_FOLDERS

pytestmark = pytest.mark.slow

STEPS = 3


def _train_on_rank(rank: int, world: int, init_file: str, preprocessed: str, out: str, guard: bool) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    from nnunet_te.training.trainers import RiskWeightedTrainer

    plans = {**json.loads((Path(preprocessed) / "nnUNetPlans.json").read_text()), "continue_training": False}
    dataset_json = json.loads((Path(preprocessed) / "dataset.json").read_text())
    trainer = RiskWeightedTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    assert trainer.is_ddp
    trainer.num_input_channels = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager,
                                                              dataset_json)
    trainer.device = torch.device("cpu")  # nnU-Net assumes one GPU per rank under DDP
    torch.manual_seed(0)  # the same initial network on both ranks, as DDP's broadcast ensures anyway
    network = trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, trainer.enable_deep_supervision)
    trainer.network = DistributedDataParallel(network)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    trainer.loss.loss.ddp = guard

    patch = tuple(trainer.configuration_manager.patch_size)
    scales = trainer._get_deep_supervision_scales()
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    error = ""
    try:
        for _ in range(STEPS):
            image = torch.randn((2, trainer.num_input_channels, *patch), generator=generator)
            risk = torch.rand((2, 1, *patch), generator=generator)
            labels = torch.randint(0, trainer.label_manager.num_segmentation_heads, (2, 1, *patch),
                                   generator=generator).float()
            targets = [torch.nn.functional.interpolate(labels, scale_factor=tuple(s), mode="nearest")
                       for s in scales]
            trainer.train_step({"data": torch.cat([image, risk], 1), "target": targets})
    except RuntimeError as err:
        error = str(err).splitlines()[0]
    grads = [p.grad for p in network.parameters()]
    record = {"error": error, "n_parameters": len(grads), "n_without_grad": sum(g is None for g in grads)}
    if not error:
        flat = torch.cat([g.flatten() for g in grads])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        record["max_grad_difference"] = float((gathered[0] - gathered[1]).abs().max())
        record["grad_norm"] = float(flat.norm())
        weights = torch.cat([p.detach().flatten() for p in network.parameters()])
        record["weights_sum"] = float(np.float64(weights.double().sum()))
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _spawn(tree, tmp_path: Path, target, *args) -> list[dict]:
    """Run ``target(rank, 2, rendezvous, preprocessed, tmp_path, *args)`` on 2 processes; the records
    they wrote to ``tmp_path/rank{0,1}.json``."""
    import torch.multiprocessing as mp

    env = {k: tree.env[k] for k in NNUNET_FOLDERS}
    env.update(nnUNet_n_proc_DA="0", nnUNet_compile="f")  # data augmentation in the training process
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by nnunetv2.paths at import in the spawned processes
    try:
        init_file = Path(tempfile.mkdtemp(dir=tmp_path)) / "rendezvous"
        mp.spawn(target, args=(2, str(init_file), str(tree.preprocessed), str(tmp_path), *args),
                 nprocs=2, join=True)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_risk_weighted_trainer_steps_under_ddp_with_equal_gradients(hippocampus_nnunet, tmp_path):
    records = _spawn(hippocampus_nnunet, tmp_path, _train_on_rank, True)
    for record in records:
        assert record["error"] == ""
        assert record["n_without_grad"] == 0
        assert record["grad_norm"] > 0
        assert record["max_grad_difference"] <= 1e-6 * max(1.0, record["grad_norm"])
    assert records[0]["weights_sum"] == records[1]["weights_sum"]


def test_without_the_guard_ddp_stops_on_the_unused_lowest_output(hippocampus_nnunet, tmp_path):
    records = _spawn(hippocampus_nnunet, tmp_path, _train_on_rank, False)
    assert all("reduction" in r["error"] or "unused" in r["error"].lower() for r in records), records


def _few_shot_run_on_rank(rank: int, world: int, init_file: str, preprocessed: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from torch.nn.parallel import DistributedDataParallel

    import nnunet_te.training.trainers as trainers

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    writes = []  # what this rank wrote or computed through the trainer's own code
    real_save_json, real_compute, real_save = trainers.save_json, trainers.compute_dataset_risk_maps, torch.save
    trainers.save_json = lambda obj, path, **kw: (writes.append(Path(path).name), real_save_json(obj, path, **kw))
    trainers.compute_dataset_risk_maps = lambda *a, **kw: (writes.append("risk maps"), real_compute(*a, **kw))[1]
    torch.save = lambda obj, path, *a, **kw: (writes.append(Path(path).name), real_save(obj, path, *a, **kw))

    plans = {**json.loads((Path(preprocessed) / "nnUNetPlans.json").read_text()), "continue_training": False}
    dataset_json = json.loads((Path(preprocessed) / "dataset.json").read_text())
    trainer = trainers.RiskWeightedTrainer_k2s0_cpu(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    trainer.device = torch.device("cpu")  # nnU-Net assumes one GPU per rank under DDP
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 2, 1
    # nnUNetTrainer.initialize, except DDP's device_ids (nnU-Net assumes one GPU per rank)
    trainer._set_batch_size_and_oversample()
    trainer.num_input_channels = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager,
                                                              dataset_json)
    torch.manual_seed(0)
    trainer.network = DistributedDataParallel(trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, trainer.enable_deep_supervision))
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    trainer.was_initialized = True
    trainer.run_training()

    weights = torch.cat([p.detach().flatten() for p in trainer.network.parameters()]).double()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "writes": writes, "epochs": trainer.current_epoch, "risk_folder": str(trainer.risk_folder),
        "train_cases": trainer.do_split()[0], "weights_sum": float(weights.sum()),
        "n_maps": len(list(Path(trainer.risk_folder).glob("*.npy")))}))
    dist.destroy_process_group()


def test_few_shot_risk_weighted_run_under_ddp_writes_once_and_trains_the_same(hippocampus_nnunet, tmp_path):
    from conftest import copy_nnunet_tree

    tree = copy_nnunet_tree(hippocampus_nnunet, tmp_path / "tree")
    zero, one = _spawn(tree, tmp_path, _few_shot_run_on_rank)
    assert one["writes"] == [], one["writes"]  # rank 1 neither computes maps nor writes records
    assert {"risk maps", "few_shot_split.json", "risk_options.json"} <= set(zero["writes"])
    assert zero["epochs"] == one["epochs"] == 1
    assert zero["risk_folder"] == one["risk_folder"] and zero["train_cases"] == one["train_cases"]
    assert len(zero["train_cases"]) == 2
    split = json.loads(next(tree.results.glob("Dataset991_*/RiskWeightedTrainer_k2s0_cpu__*/fold_0/"
                                              "few_shot_split.json")).read_text())
    assert zero["n_maps"] == len(split["train"]) + len(split["val"])
    assert zero["weights_sum"] == one["weights_sum"]  # DDP kept the ranks in step


def _batch_dice_loss_on_rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from nnunet_te.risk.loss import risk_weighted_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    logits, target, weights = _batch_dice_inputs()
    half = slice(2 * rank, 2 * rank + 2)  # each rank its half of one global batch
    loss = risk_weighted_loss(logits[half], target[half], weights[half], batch_dice=True, ddp=True)
    Path(out, f"loss{rank}.json").write_text(json.dumps(float(loss)))
    dist.destroy_process_group()


def _batch_dice_inputs():
    import torch

    generator = torch.Generator().manual_seed(7)
    return (torch.randn((4, 3, 6, 5, 4), generator=generator),
            torch.randint(0, 3, (4, 1, 6, 5, 4), generator=generator),
            1 + torch.rand((4, 1, 6, 5, 4), generator=generator))


def test_batch_dice_under_ddp_pools_the_counts_of_every_rank(tmp_path):
    import torch.multiprocessing as mp

    from nnunet_te.risk.loss import risk_weighted_loss

    mp.spawn(_batch_dice_loss_on_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"loss{r}.json").read_text()) for r in range(2)]
    # each rank: its own cross-entropy minus the Dice of the global batch; their mean is the loss
    # of one process holding the whole batch (pooling each rank's counts alone would differ)
    whole = float(risk_weighted_loss(*_batch_dice_inputs(), batch_dice=True))
    assert abs(sum(ranks) / 2 - whole) < 1e-6
    halves = [float(risk_weighted_loss(*(t[2 * r:2 * r + 2] for t in _batch_dice_inputs()), batch_dice=True))
              for r in range(2)]
    assert abs(sum(halves) / 2 - whole) > 1e-4  # the check can fail
