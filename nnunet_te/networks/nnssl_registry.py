"""nnssl registry names as nnU-Net plans architectures.

nnssl names a network by a registry name (``ResEncL``) instead of a class path, and nnU-Net's own
nnssl tooling (its master branch's ``nnUNetv2_preprocess_like_nnssl``) writes plans whose
configuration architecture is ``{"network_class_name": "ResEncL", "arch_kwargs": null}``.
nnU-Net 2.8.1's ``get_network_from_plans`` imports class paths only, so such a name is resolved
here to nnU-Net's plans form (class path, kwargs with class paths as strings,
``_kw_requires_import``). This module imports no other module of the package:
:mod:`nnunet_te.networks.weights` resolves plans with it, and :mod:`nnunet_te.networks.nnssl`
imports ``weights``.
"""

from __future__ import annotations

import json

from torch import nn

from nnunet_te.errors import UserError

#: ``ResidualEncoderUNet`` arguments of nnssl's ``ResEncL`` (input and output channels apart).
RESENC_L = {"n_stages": 6, "features_per_stage": (32, 64, 128, 256, 320, 320), "conv_op": nn.Conv3d,
            "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
            "n_blocks_per_stage": (1, 3, 4, 6, 6, 6), "n_conv_per_stage_decoder": (1, 1, 1, 1, 1),
            "conv_bias": True, "norm_op": nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}}
RESENC_L_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
#: nnU-Net's class path keys of U-Net arch_kwargs (imported by ``get_network_from_plans``).
_REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def resenc_l_architecture() -> dict:
    """:data:`RESENC_L` as nnU-Net writes an architecture in a plans file (JSON types, class paths)."""
    kwargs = {key: _class_path(value) if isinstance(value, type) else value for key, value in RESENC_L.items()}
    kwargs = json.loads(json.dumps({**kwargs, "dropout_op": None, "dropout_op_kwargs": None}))  # tuples -> lists
    return {"network_class_name": RESENC_L_CLASS, "arch_kwargs": kwargs, "_kw_requires_import": list(_REQUIRES_IMPORT)}


#: Registry names a plans file may give as ``network_class_name``, with their plans form.
PLANS_ARCHITECTURES = {"ResEncL": resenc_l_architecture}


def is_registry_name(network_class_name: object) -> bool:
    """A plain name (``ResEncL``), not a dotted class path: nnssl's registry form."""
    return isinstance(network_class_name, str) and "." not in network_class_name


def registry_architecture(name: str, what: str = "plans architecture") -> dict:
    """The plans form of registry name ``name``; UserError naming the known ones for another."""
    if name not in PLANS_ARCHITECTURES:
        raise UserError(f"{what}: network_class_name {name!r} is neither a dotted class path nor a known nnssl "
                        f"registry name ({', '.join(PLANS_ARCHITECTURES)}; PrimusS/B/M/L for nnU-Net's Primus "
                        f"trainers); give nnU-Net's class path (e.g. {RESENC_L_CLASS}) with its arch_kwargs")
    return PLANS_ARCHITECTURES[name]()
