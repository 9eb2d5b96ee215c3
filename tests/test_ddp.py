"""RiskWeightedTrainer under DDP, on CPU: 2 processes with gloo, the trainer's own network, loss and
``train_step`` on the plans of a real preprocessed dataset, with deep supervision.

DDP reduces gradients in buckets and, by default, stops with an unused-parameter error when a
parameter took no part in the loss; nnU-Net guards against it by giving the lowest deep-supervision
output weight 1e-6 instead of 0 under DDP. The loss follows that guard (``ddp=is_ddp``): every
step runs, every parameter gets a gradient, and the gradients are equal on both ranks although
each rank sees its own batch. Without the guard the same run stops (the check can fail).
"""

import json
import os
import tempfile
from pathlib import Path

import pytest

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


def _run(hippocampus_nnunet, tmp_path: Path, guard: bool) -> list[dict]:
    import torch.multiprocessing as mp

    env = {k: hippocampus_nnunet.env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by nnunetv2.paths at import in the spawned processes
    try:
        init_file = Path(tempfile.mkdtemp(dir=tmp_path)) / "rendezvous"
        mp.spawn(_train_on_rank, args=(2, str(init_file), str(hippocampus_nnunet.preprocessed), str(tmp_path),
                                       guard), nprocs=2, join=True)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_risk_weighted_trainer_steps_under_ddp_with_equal_gradients(hippocampus_nnunet, tmp_path):
    records = _run(hippocampus_nnunet, tmp_path, guard=True)
    for record in records:
        assert record["error"] == ""
        assert record["n_without_grad"] == 0
        assert record["grad_norm"] > 0
        assert record["max_grad_difference"] <= 1e-6 * max(1.0, record["grad_norm"])
    assert records[0]["weights_sum"] == records[1]["weights_sum"]


def test_without_the_guard_ddp_stops_on_the_unused_lowest_output(hippocampus_nnunet, tmp_path):
    records = _run(hippocampus_nnunet, tmp_path, guard=False)
    assert all("reduction" in r["error"] or "unused" in r["error"].lower() for r in records), records
