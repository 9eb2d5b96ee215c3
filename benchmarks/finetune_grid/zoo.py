"""The benchmark's model zoo: every member is the plan's network (:mod:`benchmarks.finetune_grid.plan`; the
CPU plan's for all targets, or nnU-Net's own per target), made from the real data in ``<shared>/data``
by project code, deterministic and cached by content (the architecture is part of the key).
``shared`` is passed in (``--shared``; :func:`default_shared`: ``$NNUNET_TE_SHARED``, else
``shared/`` beside the repository checkout this benchmark runs from).

Members (:data:`MEMBERS`):

- ``random_s{0,1}``: nnU-Net's initialisation with two seeds;
- ``ssl_masked``, ``ssl_denoising``: self-supervised (:func:`nnunet_te.networks.unets.pretrain_self_supervised`,
  SimMIM-like masked-image reconstruction, denoising) on a pool of unlabeled real 2D images of four
  modalities (ISBI 2012 ssTEM train + unlabeled test, the 5 EPFL test slices, MNI152 T1 axial
  slices, the stardist fluorescence image);
- ``sup_*``: supervised (nnU-Net's Dice + cross-entropy loss) on a real source task: ISBI 2012
  membranes, JSRT lungs, MSD hippocampus slices, EPFL mitochondria of the 5 EPFL test slices;
- version 2 adds members that differ as real zoos do: ``ssl_masked_long`` (the same objective
  8 x longer, to the pretext loss's plateau), ``ssl_genesis`` and ``ssl_contrastive`` (Models
  Genesis restoration and SimCLR, :mod:`benchmarks.finetune_grid.pretext`), ``ssl_mri`` (brain MRI
  only: MNI152 T1 slices of all three axes), ``sup_mni_tissue`` (MNI152 grey / white matter),
  ``sup_nuclei`` (fluorescence nuclei), and ``sup_isbi_random_labels``, expected to transfer
  badly: ISBI 2012 images each paired with another image's membranes, labels a network can only
  memorise (Zhang et al. 2017, "Understanding deep learning requires rethinking generalization",
  https://arxiv.org/abs/1611.03530; Maennel et al. 2020, "What do neural networks learn when
  trained with random labels?", https://arxiv.org/abs/2006.10455, find such pre-training can
  slow down later training); its twin ``sup_isbi_membranes`` has the true labels.

A 3D plan (``cpu3d``) holds the members whose sources are volumes (:data:`VOLUME_SOURCES`: ``ssl_mri``
on the MNI152 T1 volume, ``sup_mni_tissue``, ``sup_hippocampus`` on the 40 source cases) and the random
ones, pre-trained on 48^3 crops with batch :data:`BATCH_SIZE_3D`.

A member whose pre-training images include one of a target's test images is left out of that
target; the benchmark decides this by content (:mod:`benchmarks.finetune_grid.overlap` on
:func:`pretraining_images`), not by dataset names. The EPFL targets are the 27 EPFL training
slices and the pools use the 5 test slices, so ``sup_epfl_mitochondrion`` (the same task on other
images of the same tissue) stays in; ``sup_jsrt_lungs`` and ``sup_hippocampus`` saw their
targets' test images and are left out there.

Each member is stored in ``<zoo root>/<name>-<key>/`` as ``nnunet.pth`` (an nnU-Net-style
checkpoint: the whole network under ``network_weights``, the segmentation head only for
supervised members) and ``nnssl.pth`` (encoder-only with an ``nnssl_adaptation_plan``), plus
``member.json`` (spec, key, seconds, loss curve). The key is a sha256 over the member spec, the
architecture, the bytes of the source files and :data:`ZOO_VERSION`: the same inputs give the same
folder, which is reused. Everything is seeded; training runs on ``device`` in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.finetune_grid.plan import CPU_PLAN, BenchPlan, build_network
from benchmarks.finetune_grid.pretext import genesis_corrupt, pretrain_contrastive
from nnunet_te.features.extract import zscore
from nnunet_te.networks.unets import pretrain_self_supervised

#: Bump when the way members are made changes, so cached members are rebuilt.
ZOO_VERSION = 2  # 2: images z-scored as a whole (version 1 z-scored each row: zscore's axis 0 is channels)
#: Edge of the pre-training crops (rounded up to the architecture's total stride): 2D, 2D
#: hippocampus slices (about 35 x 50), 3D (1 mm MRI: a hippocampus case is about 36 x 51 x 35).
CROP, HIPPOCAMPUS_CROP, CROP_3D = 128, 48, 48
#: Batch of every 3D member's pre-training (8 crops of 48^3 cost a CPU several seconds an iteration).
BATCH_SIZE_3D = 2
#: Sources made of volumes: the members a 3D plan's zoo can hold (besides the random ones).
VOLUME_SOURCES = ("pool_mri", "mni_tissue", "msd_hippocampus")
#: The environment variable naming the folder that holds ``data/`` (as for the tests).
SHARED_VARIABLE = "NNUNET_TE_SHARED"


def default_shared(environ=os.environ) -> Path:
    """``$NNUNET_TE_SHARED``, else ``shared/`` beside the repository checkout: this benchmark is
    not installed, it runs from ``<checkout>/benchmarks/finetune_grid``."""
    return Path(environ.get(SHARED_VARIABLE) or Path(__file__).resolve().parents[3] / "shared")


@dataclass(frozen=True)
class Member:
    """How one zoo member is made. ``source``: SSL pool or supervised task (see module doc)."""

    name: str
    kind: str  # random | ssl | supervised
    seed: int
    source: str = ""
    objective: str = ""
    iterations: int = 0
    batch_size: int = 8
    notes: str = ""


MEMBERS: tuple[Member, ...] = (
    Member("random_s0", "random", 0, notes="nnU-Net initialisation, seed 0"),
    Member("random_s1", "random", 1, notes="nnU-Net initialisation, seed 1"),
    Member("ssl_masked", "ssl", 0, "pool_all", "masked", 250, notes="SimMIM-like, 4 modalities"),
    Member("ssl_denoising", "ssl", 0, "pool_all", "denoising", 250, notes="denoising, 4 modalities"),
    Member("sup_isbi_membranes", "supervised", 0, "isbi_membranes", iterations=250,
           notes="ISBI 2012 ssTEM membranes, 30 slices"),
    Member("sup_jsrt_lungs", "supervised", 0, "jsrt_lungs", iterations=250, notes="JSRT chest X-ray lungs, 247 images"),
    Member("sup_hippocampus", "supervised", 0, "msd_hippocampus", iterations=250,
           notes="MSD hippocampus MRI slices (2 classes), 40 cases"),
    Member("sup_epfl_mitochondrion", "supervised", 0, "epfl_test_mitochondrion", iterations=250,
           notes="EPFL mitochondria, the 5 EPFL test slices"),
    # version 2: longer pre-training, other objectives and domains, a member expected to transfer badly
    Member("ssl_masked_long", "ssl", 0, "pool_all", "masked", 2000, notes="SimMIM-like, 4 modalities, 8x longer"),
    Member("ssl_genesis", "ssl", 0, "pool_all", "genesis", 1000, notes="Models Genesis restoration, 4 modalities"),
    Member("ssl_contrastive", "ssl", 0, "pool_all", "contrastive", 1000, notes="SimCLR, 4 modalities, encoder only"),
    Member("ssl_mri", "ssl", 0, "pool_mri", "masked", 1000, notes="SimMIM-like, MNI152 T1 slices of 3 axes only"),
    Member("sup_mni_tissue", "supervised", 0, "mni_tissue", iterations=500,
           notes="MNI152 T1 grey / white matter (3 classes), slices of 3 axes"),
    Member("sup_nuclei", "supervised", 0, "nuclei", iterations=250, notes="fluorescence nuclei (stardist), 512 x 512"),
    Member("sup_isbi_random_labels", "supervised", 0, "isbi_random_labels", iterations=250,
           notes="ISBI 2012 images, each with another image's membranes (expected to transfer badly)"),
)


#: Imaging domain and structure of each supervised source and of each benchmark target (the
#: ``nnunet_te.source`` its dataset.json records): the "closest source task" pick of the report.
TASKS = {
    "isbi_membranes": ("EM", "membranes"), "epfl_test_mitochondrion": ("EM", "mitochondria"),
    "jsrt_lungs": ("X-ray", "lungs"), "msd_hippocampus": ("MRI", "hippocampus"),
    "mni_tissue": ("MRI", "brain tissue"), "nuclei": ("fluorescence", "nuclei"),
    "epfl_em_mitochondrion": ("EM", "mitochondria"), "epfl_em_mitochondrial_boundaries": ("EM", "mitochondria"),
    "epfl_em_membranes": ("EM", "membranes"), "epfl_em_vesicles": ("EM", "vesicles"), "epfl_em_PSD": ("EM", "synapses"),
}


def task_closeness(member: Member, target_source: str) -> int:
    """2: the member's source task has the target's domain and structure; 1: its domain only;
    0: neither, a random or self-supervised member, or a target of unknown task."""
    theirs, ours = TASKS.get(member.source) if member.kind == "supervised" else None, TASKS.get(target_source)
    if theirs is None or ours is None:
        return 0
    return 2 if theirs == ours else int(theirs[0] == ours[0])


@dataclass
class BuiltMember:
    member: Member
    folder: Path
    nnunet: Path
    nnssl: Path
    record: dict = field(repr=False)


# ---- real source data ------------------------------------------------------------------------------
def _npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"zoo source data missing: {path} (pass --shared, or set {SHARED_VARIABLE}, to the "
                                "folder holding data/)")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _source_files(source: str, d: Path) -> list[Path]:
    """Files a source reads from the data folder ``d`` (their bytes enter the cache key)."""
    files = {
        "pool_em": [d / "isbi2012_em/train_256.npz", *sorted((d / "isbi2012_em/test_unlabeled").glob("*.png")),
                    d / "epfl_em/epfl_test_256x192.npz"],
        "isbi_membranes": [d / "isbi2012_em/train_256.npz"],
        "jsrt_lungs": [d / "jsrt_scr/jsrt_lungs_256.npz"],
        "msd_hippocampus": [p for c in _hippocampus_cases(d) for p in
                            (d / f"msd_hippocampus/imagesTr/{c}.nii.gz", d / f"msd_hippocampus/labelsTr/{c}.nii.gz")],
        "epfl_test_mitochondrion": [d / "epfl_em/epfl_test_256x192.npz"],
    }
    mni = [d / f"mni152/mni_icbm152_{m}_tal_nlin_sym_09a_converted.nii.gz" for m in ("t1", "gm", "wm")]
    files["pool_all"] = files["pool_em"] + [mni[0], d / "stardist_nuclei/img2d.tif"]
    files.update(pool_mri=mni[:1], mni_tissue=mni, nuclei=[d / "stardist_nuclei/img2d.tif", d / "stardist_nuclei/mask2d.tif"],
                 isbi_random_labels=files["isbi_membranes"])
    if source not in files:
        raise ValueError(f"unknown zoo source {source!r}; choose from {sorted(files)}")
    missing = [str(p) for p in files[source] if not p.is_file()]
    if missing or not files[source]:
        raise FileNotFoundError(f"zoo source {source!r}: data missing: {missing[:3] or 'no files'}")
    return files[source]


def _hippocampus_cases(d: Path, n: int = 40) -> list[str]:
    folder = d / "msd_hippocampus/labelsTr"
    return sorted(p.name.removesuffix(".nii.gz") for p in folder.glob("hippocampus_*.nii.gz"))[:n]


def _standardised(image: np.ndarray) -> np.ndarray:
    """The whole image (2D or 3D, no channel axis) z-scored as one channel."""
    return zscore(np.asarray(image, dtype=np.float64)[None])[0]


def _mni(d: Path, map_name: str) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(d / f"mni152/mni_icbm152_{map_name}_tal_nlin_sym_09a_converted.nii.gz")))


def _mni_slices(volume: np.ndarray, step: int = 6) -> list[np.ndarray]:
    """Every ``step``-th slice along each of the 3 axes, within the central 60 % (the brain)."""
    out = []
    for axis, size in enumerate(volume.shape):
        out += [np.take(volume, i, axis=axis) for i in range(int(0.2 * size), int(0.8 * size), step)]
    return out


def _unlabeled_images(source: str, d: Path) -> list[np.ndarray]:
    """2D float images (z-scored per image, as nnU-Net normalises these modalities)."""
    from skimage import io

    if source == "pool_mri":
        return [_standardised(i) for i in _mni_slices(_mni(d, "t1"))]
    images = list(_npz(d / "isbi2012_em/train_256.npz")["images"])
    for path in sorted((d / "isbi2012_em/test_unlabeled").glob("*.png")):
        full = io.imread(path).astype(np.float64)
        full = full[..., 0] if full.ndim == 3 else full
        images.append(full.reshape(full.shape[0] // 2, 2, full.shape[1] // 2, 2).mean(axis=(1, 3)))  # 512 -> 256
    images += list(_npz(d / "epfl_em/epfl_test_256x192.npz")["images"])
    if source == "pool_all":
        t1 = _mni(d, "t1")
        images += [t1[z] for z in range(40, 150, 6)]  # axial slices through the brain
        images.append(io.imread(d / "stardist_nuclei/img2d.tif"))
    return [_standardised(i) for i in images]


def _labelled_images(source: str, d: Path) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """(z-scored images, integer label maps, number of classes) of a supervised source."""
    if source == "isbi_membranes":
        z = _npz(d / "isbi2012_em/train_256.npz")
        images, labels, n = z["images"], z["membrane"] > 0, 2
    elif source == "jsrt_lungs":
        z = _npz(d / "jsrt_scr/jsrt_lungs_256.npz")
        images, labels, n = z["images"], z["masks_binary"].any(axis=1), 2
    elif source == "isbi_random_labels":
        # each image paired with the membranes of another (a seeded derangement): labels that say
        # nothing about the image, which a network can only memorise
        z = _npz(d / "isbi2012_em/train_256.npz")
        n = len(z["images"])
        other = (np.arange(n) + np.random.default_rng(0).integers(1, n, size=n)) % n
        images, labels, n = z["images"], z["membrane"][other] > 0, 2
    elif source == "mni_tissue":
        images, labels, n = _mni_slices(_mni(d, "t1")), _mni_slices(_mni_tissue(d)), 3
    elif source == "nuclei":
        from skimage import io

        images, labels, n = [io.imread(d / "stardist_nuclei/img2d.tif")], [io.imread(d / "stardist_nuclei/mask2d.tif") > 0], 2
    elif source == "epfl_test_mitochondrion":
        z = _npz(d / "epfl_em/epfl_test_256x192.npz")
        images, labels, n = z["images"], z["masks"][:, list(z["targets"]).index("mitochondrion")] > 0, 2
    elif source == "msd_hippocampus":
        images, labels, n = [], [], 3
        for image, label in _hippocampus_volumes(d):
            for z in np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1)):
                images.append(image[z])
                labels.append(label[z])
        return images, [np.asarray(y, dtype=np.int64) for y in labels], n
    else:
        raise ValueError(f"unknown supervised source {source!r}")
    return ([_standardised(i) for i in images],
            [np.asarray(y, dtype=np.int64) for y in labels], n)


def _mni_tissue(d: Path) -> np.ndarray:
    """MNI152 tissue labels: 1 grey matter, 2 white matter (probability maps above one half)."""
    gm, wm = _mni(d, "gm").astype(np.int16), _mni(d, "wm").astype(np.int16)
    return np.where((gm > 127) & (gm >= wm), 1, np.where(wm > 127, 2, 0))


def _hippocampus_volumes(d: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image z-scored per volume, as nnU-Net's ZScore on MRI; labels) of the source's cases."""
    import SimpleITK as sitk

    def read(kind: str, case: str) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(d / f"msd_hippocampus/{kind}/{case}.nii.gz")))

    return [(_standardised(read("imagesTr", c)), read("labelsTr", c)) for c in _hippocampus_cases(d)]


def _volumes(source: str, d: Path) -> tuple[list[np.ndarray], list[np.ndarray] | None, int]:
    """(volumes z-scored as a whole, integer label volumes or None, classes) of a volume source:
    what a 3D plan's member is pre-trained on."""
    if source not in VOLUME_SOURCES:
        raise ValueError(f"zoo source {source!r} has no volumes; 3D members come from {VOLUME_SOURCES}")
    if source == "msd_hippocampus":
        cases = _hippocampus_volumes(d)
        return [i for i, _ in cases], [np.asarray(y, dtype=np.int64) for _, y in cases], 3
    t1 = _standardised(_mni(d, "t1"))
    return ([t1], None, 1) if source == "pool_mri" else ([t1], [_mni_tissue(d).astype(np.int64)], 3)


def pretraining_images(member: Member, shared: str | os.PathLike, dim: int) -> list[np.ndarray]:
    """The images (``dim`` = 2) or volumes (3) ``member`` is pre-trained on, read from
    ``<shared>/data`` (none for a random initialisation): what the content check compares with
    the targets' test images."""
    data = Path(shared) / "data"
    if member.kind == "random":
        return []
    if dim == 3:
        return _volumes(member.source, data)[0]
    if member.kind == "ssl":
        return _unlabeled_images(member.source, data)
    return _labelled_images(member.source, data)[0]


def _crop(image: np.ndarray, size: tuple[int, ...], rng: np.random.Generator, label: np.ndarray | None = None):
    """A random crop of shape ``size`` (zero-padded where the image is smaller), randomly flipped
    along each axis (as nnU-Net's mirroring)."""
    pad = [(0, max(0, c - s)) for s, c in zip(image.shape, size)]
    image = np.pad(image, pad)
    label = np.pad(label, pad) if label is not None else None
    window = tuple(slice(start, start + c) for start, c in
                   zip((int(rng.integers(0, s - c + 1)) for s, c in zip(image.shape, size)), size))
    image, label = image[window], label[window] if label is not None else None
    for axis in range(image.ndim):
        if rng.random() < 0.5:
            image = np.flip(image, axis)
            label = np.flip(label, axis) if label is not None else None
    return np.ascontiguousarray(image), (np.ascontiguousarray(label) if label is not None else None)


def pretrain_supervised(network: torch.nn.Module, images: list[np.ndarray], labels: list[np.ndarray], *,
                        crop: tuple[int, ...], iterations: int, seed: int, batch_size: int = 8, lr: float = 1e-3,
                        device: str = "cpu") -> list[float]:
    """Train ``network`` (no deep supervision) on random crops with nnU-Net's Dice + CE loss;
    return the loss per iteration. Seeded crops and flips (``seed``)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr)
    network.to(device).train()
    losses = []
    for _ in tqdm(range(iterations), desc="pre-train (supervised)", leave=False):
        pairs = [_crop(images[i], crop, rng, labels[i]) for i in rng.integers(len(images), size=batch_size)]
        x = torch.as_tensor(np.stack([p[0] for p in pairs])[:, None], dtype=torch.float32, device=device)
        y = torch.as_tensor(np.stack([p[1] for p in pairs])[:, None], dtype=torch.long, device=device)
        loss = loss_fn(network(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    network.eval()
    return losses


# ---- building, saving, caching ---------------------------------------------------------------------
def member_key(member: Member, shared: str | os.PathLike, architecture: dict) -> str:
    """sha256 over what the member's weights depend on (see the module docstring); the source
    files are read from ``<shared>/data`` (their bytes count, not their location)."""
    from nnunet_te.io.files import file_sha256

    digest = hashlib.sha256(json.dumps([ZOO_VERSION, asdict(member), architecture], sort_keys=True,
                                       default=list).encode())
    if member.kind != "random":
        for path in _source_files(member.source, Path(shared) / "data"):
            digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def pretraining_key(member: Member, shared: str | os.PathLike, dim: int) -> str:
    """sha256 over what the member's pre-training images (``dim`` = 2) or volumes (3) depend on."""
    return member_key(replace(member, iterations=0, batch_size=0), shared, {"images": dim})


def _dim(architecture: dict) -> int:
    return len(architecture["arch_kwargs"]["kernel_sizes"][0])


def _crop_shape(architecture: dict, edge: int) -> tuple[int, ...]:
    """``edge`` per axis, rounded up to the architecture's total stride along it."""
    strides = np.prod(np.asarray(architecture["arch_kwargs"]["strides"]), axis=0)
    return tuple(int(s * np.ceil(edge / s)) for s in strides)


def _pretraining_crop(architecture: dict) -> tuple[int, ...]:
    """The crop an SSL member is pre-trained on (also its recommended downstream patch)."""
    return _crop_shape(architecture, CROP if _dim(architecture) == 2 else CROP_3D)


def _train_member(member: Member, data: Path, architecture: dict,
                  device: str) -> tuple[torch.nn.Module, list[float], int]:
    """The trained network, its loss curve and its number of output classes."""
    dim = _dim(architecture)
    if member.kind == "random":
        return build_network(architecture, 2, seed=member.seed), [], 2
    if member.kind == "ssl":
        rng = np.random.default_rng(member.seed)
        pool = _unlabeled_images(member.source, data) if dim == 2 else _volumes(member.source, data)[0]
        crop = _pretraining_crop(architecture)
        # 4 crops per image, at least 64 (a 3D pool may be one volume)
        crops = [_crop(pool[i], crop, rng)[0][None] for i in rng.integers(len(pool), size=max(64, 4 * len(pool)))]
        network = build_network(architecture, 1, seed=member.seed)  # one output channel: the reconstruction
        if member.objective == "contrastive":
            losses = pretrain_contrastive(network, crops, iterations=member.iterations, seed=member.seed,
                                          batch_size=member.batch_size, device=device)
        else:
            objective = genesis_corrupt if member.objective == "genesis" else member.objective
            losses = pretrain_self_supervised(network, crops, objective=objective, iterations=member.iterations,
                                              seed=member.seed, batch_size=member.batch_size, device=device)
        return network, losses, 1
    if member.kind == "supervised":
        images, labels, n_classes = (_labelled_images if dim == 2 else _volumes)(member.source, data)
        edge = CROP_3D if dim == 3 else HIPPOCAMPUS_CROP if member.source == "msd_hippocampus" else CROP
        network = build_network(architecture, n_classes, seed=member.seed)
        losses = pretrain_supervised(network, images, labels, crop=_crop_shape(architecture, edge),
                                     iterations=member.iterations, seed=member.seed, batch_size=member.batch_size,
                                     device=device)
        return network, losses, n_classes
    raise ValueError(f"member {member.name!r}: unknown kind {member.kind!r} (random, ssl, supervised)")


def _save(network: torch.nn.Module, member: Member, folder: Path, plan: BenchPlan, architecture: dict,
          meta: dict) -> tuple[Path, Path]:
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    # Only a supervised head is a source segmentation head; an SSL reconstruction layer or a
    # random head would pose as one to LEEP and the risk maps.
    weights = state if member.kind == "supervised" else {k: v for k, v in state.items() if ".seg_layers." not in k}
    nnunet = {"network_weights": weights, "trainer_name": "benchmarks.finetune_grid.zoo",
              "current_epoch": member.iterations,
              "init_args": {"configuration": plan.configuration,
                            "plans": {"plans_name": plan.name,
                                      "configurations": {plan.configuration: {"architecture": architecture}}}},
              "nnunet_te_zoo": meta}
    encoder = {k: v for k, v in state.items() if k.startswith("encoder.")}
    nnssl = {"network_weights": encoder, "nnssl_adaptation_plan": {
        "architecture_plans": {"arch_class_name": architecture["network_class_name"].rsplit(".", 1)[-1],
                               "arch_kwargs": architecture["arch_kwargs"]},
        "pretrain_num_input_channels": 1, "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stages.0",
        "keys_to_in_proj": list(network.keys_to_in_proj),
        "recommended_downstream_patchsize": list(_pretraining_crop(architecture))}}
    paths = folder / "nnunet.pth", folder / "nnssl.pth"
    for obj, path in zip((nnunet, nnssl), paths):
        torch.save(obj, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return paths


def build_member(member: Member, root: str | os.PathLike, *, shared: str | os.PathLike, plan: BenchPlan,
                 architecture: dict, device: str = "cpu") -> BuiltMember:
    """Build (or reuse from ``root``) one member of ``plan`` with ``architecture`` (the plan's,
    or for nnU-Net's own plan one target's) from the data in ``<shared>/data``; see the module
    docstring for the layout."""
    key = member_key(member, shared, architecture)
    folder = Path(root) / f"{member.name}-{key[:12]}"
    record_path = folder / "member.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        return BuiltMember(member, folder, folder / "nnunet.pth", folder / "nnssl.pth", record)
    folder.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    started = time.perf_counter()
    network, losses, n_out = _train_member(member, Path(shared) / "data", architecture, device)
    seconds = time.perf_counter() - started
    record = {"member": asdict(member), "key": key, "seconds": seconds, "output_channels": n_out,
              "final_loss": float(np.mean(losses[-20:])) if losses else None, "losses": losses,
              "device": device, "torch_threads": threads, "zoo_version": ZOO_VERSION,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    nnunet, nnssl = _save(network, member, folder, plan, architecture,
                          {k: record[k] for k in ("member", "key", "seconds")})
    record_path.write_text(json.dumps(record, indent=1))  # written last: marks the member complete
    return BuiltMember(member, folder, nnunet, nnssl, record)


def select_members(names: list[str] | None, *, iterations: int | None = None,
                   plan: BenchPlan = CPU_PLAN) -> list[Member]:
    """Members of :data:`MEMBERS` by name (all of the plan's when ``names`` is empty: a 3D plan
    holds the random members and those of :data:`VOLUME_SOURCES`, pre-trained with batch
    :data:`BATCH_SIZE_3D`); ``iterations`` overrides the pre-training iterations of trained
    members (miniature runs). Unknown names, and 2D-only members in a 3D plan, raise."""
    by_name = {m.name: m for m in MEMBERS}
    unknown = [n for n in names or [] if n not in by_name]
    if unknown:
        raise ValueError(f"unknown zoo member(s) {unknown}; choose from {sorted(by_name)}")
    fits = {m.name for m in MEMBERS if plan.dim == 2 or m.kind == "random" or m.source in VOLUME_SOURCES}
    flat = [n for n in names or [] if n not in fits]
    if flat:
        raise ValueError(f"zoo member(s) {flat} are pre-trained on 2D images only; the {plan.key} plan is 3D: choose "
                         f"from {sorted(fits)}")
    chosen = [by_name[n] for n in names] if names else [m for m in MEMBERS if m.name in fits]
    if plan.dim == 3:
        chosen = [replace(m, batch_size=BATCH_SIZE_3D) for m in chosen]
    if iterations is not None:
        chosen = [replace(m, iterations=iterations) if m.kind != "random" else m for m in chosen]
    return chosen


def build_zoo(members: list[Member], root: str | os.PathLike, *, shared: str | os.PathLike, plan: BenchPlan,
              architecture: dict, device: str = "cpu") -> list[BuiltMember]:
    """Build every member (``plan``, ``architecture``: see :func:`build_member`) into ``root``
    (cached) from the data in ``<shared>/data`` and write ``root/zoo.yaml`` listing their
    nnU-Net-format checkpoints for ``nnunet-te rank``."""
    root = Path(root)
    for member in members:  # every source file checked before any training starts
        if member.kind != "random":
            _source_files(member.source, Path(shared) / "data")
    built = [build_member(m, root, shared=shared, plan=plan, architecture=architecture, device=device)
             for m in tqdm(members, desc="zoo")]
    import yaml

    (root / "zoo.yaml").write_text(yaml.safe_dump({"candidates": [
        {"name": b.member.name, "checkpoint": str(b.nnunet.relative_to(root)), "format": "nnunet",
         "notes": b.member.notes} for b in built]}, sort_keys=False))
    return built
