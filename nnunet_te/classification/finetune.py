"""Ground truth for classification rankings: fine-tune a backbone plus a linear head, test AUC.

Protocol (a CPU-sized version of Juodelyte et al.'s (docs/metrics.md, "Papers"), which fine-tunes every layer with SGD for up to 400
epochs and keeps the model of lowest validation loss): the adapter's penultimate features feed a
new linear layer; every parameter is trained with Adam (few epochs converge faster than with
SGD), cross-entropy, seeded shuffling; after each epoch the validation loss is measured and the
state of the lowest one is kept; its test AUC is the ground truth. Binary tasks: ROC AUC of the
positive-class probability; more classes: one-vs-rest macro AUC.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from nnunet_te.classification.adapters import ClassificationAdapter
from nnunet_te.classification.data import ImageSet


class FineTuneModel(nn.Module):
    """Backbone (adapter) -> penultimate features -> new linear head."""

    def __init__(self, adapter: ClassificationAdapter, n_features: int, n_classes: int):
        super().__init__()
        self.adapter = adapter
        self.head = nn.Linear(n_features, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.adapter(images)[0])


@dataclass
class FineTuneResult:
    test_auc: float
    val_auc: float
    val_loss: float
    best_epoch: int
    epochs: int
    seed: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC AUC: positive-class probability for 2 classes, one-vs-rest macro otherwise."""
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))


def _evaluate(model: nn.Module, data: ImageSet, batch_size: int, device) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(data.images[i:i + batch_size].to(device)).cpu()
                            for i in range(0, len(data.labels), batch_size)])
    labels = torch.as_tensor(data.labels)
    loss = float(F.cross_entropy(logits, labels))
    return loss, auc(data.labels, torch.softmax(logits.double(), 1).numpy())


def fine_tune(adapter: ClassificationAdapter, train: ImageSet, val: ImageSet, test: ImageSet, *,
              epochs: int, seed: int, lr: float = 1e-3, batch_size: int = 32, weight_decay: float = 1e-4,
              device: str | torch.device = "cpu", progress: bool = True) -> FineTuneResult:
    """Fine-tune ``adapter`` + a linear head on ``train``; return the test AUC of the epoch
    with the lowest validation loss (module docstring). ``adapter`` is trained in place.

    Every random choice (head initialisation, batch order) comes from ``seed``.
    Raises ValueError when a split has fewer than two classes (AUC undefined) or when the
    splits disagree on the number of classes.
    """
    for name, split in (("train", train), ("val", val), ("test", test)):
        if len(np.unique(split.labels)) < 2:
            raise ValueError(f"the {name} split has a single class: AUC is undefined")
    if not train.n_classes == val.n_classes == test.n_classes:
        raise ValueError(f"class counts differ: train {train.n_classes}, val {val.n_classes}, test {test.n_classes}")
    start = time.perf_counter()
    adapter = adapter.to(device)
    with torch.no_grad():
        adapter.eval()
        n_features = adapter(train.images[:2].to(device))[0].shape[1]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FineTuneModel(adapter, n_features, train.n_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    labels = torch.as_tensor(train.labels)
    best = (np.inf, np.nan, -1, None)
    for epoch in tqdm(range(epochs), desc="fine-tune", leave=False, disable=not progress):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(order), batch_size):
            index = order[i:i + batch_size]
            if len(index) < 2:  # BatchNorm cannot train on a single image
                continue
            loss = F.cross_entropy(model(train.images[index].to(device)), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_loss, val_auc = _evaluate(model, val, batch_size, device)
        if val_loss < best[0]:
            best = (val_loss, val_auc, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[3])
    _, test_auc = _evaluate(model, test, batch_size, device)
    return FineTuneResult(test_auc, best[1], best[0], best[2], epochs, seed, time.perf_counter() - start)
