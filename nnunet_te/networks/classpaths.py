"""Dotted class paths read from input files (zoo ``architecture.class``, nnU-Net plans), resolved
without running code the file chose.

A zoo file or a checkpoint's plans are shared like configs, so what they name is checked before
anything is imported:

- The path's top-level package must be one of :data:`ALLOWED_PACKAGES` (torchvision, timm,
  monai, dynamic_network_architectures, nnunet_te), or a package the user allowed on the command
  line (``--allow-module mypkg``) or in the environment (``NNUNET_TE_ALLOW_MODULES=mypkg,other``,
  the way for ``nnUNetv2_train``). An input file cannot allow a package itself; standard-library
  modules cannot be allowed at all. Anything else is refused before import.
- The imported object must be a ``torch.nn.Module`` subclass, or, where a factory is accepted
  (zoo entries), a function defined in one of :data:`FACTORY_MODULES` (``torchvision.models.resnet18``,
  ``timm.create_model``, ``nnunet_te.networks.unets.build_unet``, ...) or in an allowed user
  package; the caller checks that the factory returned an ``nn.Module``.
- Keyword arguments that make a constructor read a file or a remote model (``checkpoint_path``,
  ``pretrained_cfg``, ``*path*``, ``*file*``, ``*url*``, a timm ``hf-hub:`` / ``local-dir:`` model
  name, timm's ``pretrained=True``, torchvision's ``weights=...``) are refused: a zoo entry's
  ``checkpoint`` is the only file it reads, and that one is read with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Iterable, Mapping

from torch import nn

from nnunet_te.errors import UserError

#: Top-level packages whose classes input files may name.
ALLOWED_PACKAGES = ("torchvision", "timm", "monai", "dynamic_network_architectures", "nnunet_te")
#: Modules whose functions are accepted as network factories (by where the function is defined).
FACTORY_MODULES = ("torchvision.models", "timm.models", "monai.networks.nets",
                   "dynamic_network_architectures.architectures", "nnunet_te.networks")
#: Environment variable listing the user's own packages (comma-separated), as ``--allow-module``.
ENVIRONMENT = "NNUNET_TE_ALLOW_MODULES"
#: Keyword-argument names (substrings) that would make a constructor read a file or a download.
FILE_KWARGS = ("path", "file", "url", "checkpoint", "pretrained_cfg")
#: Keyword arguments that download pre-trained weights when set (timm ``pretrained``, torchvision
#: ``weights`` / ``weights_backbone``).
DOWNLOAD_KWARGS = ("pretrained", "weights", "weights_backbone")
_REMOTE_MODEL_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:", "http:", "https:")


def _stdlib(name: str) -> bool:
    return name in sys.stdlib_module_names or name in sys.builtin_module_names


def user_packages() -> tuple[str, ...]:
    """The packages the user allowed (``NNUNET_TE_ALLOW_MODULES``, extended by ``--allow-module``)."""
    names = tuple(n.strip() for n in os.environ.get(ENVIRONMENT, "").split(",") if n.strip())
    for name in names:
        if _stdlib(name.split(".")[0]) or not name.isidentifier():
            raise UserError(f"{ENVIRONMENT} / --allow-module: {name!r} cannot be allowed: give the top-level "
                            "package of your own network code (standard-library modules are never allowed)")
    return names


def allow_modules(names: Iterable[str]) -> None:
    """Allow the user's own packages for this process and the processes it starts (``--allow-module``)."""
    names = [n for n in names if n]
    if names:
        os.environ[ENVIRONMENT] = ",".join([*user_packages(), *names])
        user_packages()  # validates the new names


def _remedy(top: str) -> str:
    if _stdlib(top):
        return f"{top!r} is Python's standard library, not a network package"
    return (f"if {top!r} is your own network code, allow it with --allow-module {top} "
            f"(or {ENVIRONMENT}={top} for nnUNetv2_train)")


def check_path(path: object, what: str, *, extra_packages: tuple[str, ...] = ()) -> str:
    """Refuse ``path`` (without importing anything) unless it is a dotted path into an allowed
    package; return it. ``what`` names the entry in the message."""
    if not isinstance(path, str) or "." not in path or not all(p.isidentifier() for p in path.split(".")):
        raise UserError(f"{what}: {path!r} is not a dotted class path such as monai.networks.nets.BasicUNet")
    top = path.split(".")[0]
    allowed = (*ALLOWED_PACKAGES, *extra_packages, *user_packages())
    if top not in allowed:
        raise UserError(f"{what}: {path!r} refused, nothing was imported: input files may name only classes "
                        f"from {', '.join((*ALLOWED_PACKAGES, *extra_packages))}; {_remedy(top)}")
    return path


def _defined_in(obj: object, prefixes: Iterable[str]) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def resolve(path: object, what: str, *, factories: bool = False, extra_packages: tuple[str, ...] = ()):
    """Import and return the ``nn.Module`` subclass (or, with ``factories``, the network factory
    function) that ``path`` names, after :func:`check_path`. Raises UserError naming ``what``;
    ImportError / AttributeError (from an allowed package) are re-raised as they are."""
    check_path(path, what, extra_packages=extra_packages)
    module_name, _, attribute = path.rpartition(".")
    obj = getattr(importlib.import_module(module_name), attribute)
    if inspect.isclass(obj) and issubclass(obj, nn.Module):
        return obj
    users = user_packages()
    if factories and inspect.isfunction(obj) and _defined_in(obj, (*FACTORY_MODULES, *users)):
        return obj
    kind = "function" if callable(obj) else type(obj).__name__
    expected = ("an nn.Module subclass or a network factory function of " + ", ".join(FACTORY_MODULES)
                if factories else "an nn.Module subclass")
    raise UserError(f"{what}: {path!r} is a {kind} defined in {getattr(obj, '__module__', '?')}, not {expected}; "
                    "it was not called")


def check_kwargs(kwargs: Mapping, what: str) -> None:
    """Refuse constructor arguments that would read a file or download a model (module docstring)."""
    for key, value in kwargs.items():
        if any(s in str(key).lower() for s in FILE_KWARGS):
            raise UserError(f"{what}: keyword argument {key!r} refused: it would make the constructor read a "
                            "file or a download; give the weights as the entry's 'checkpoint' (read with "
                            "weights_only=True)")
        if key in DOWNLOAD_KWARGS and value not in (None, False):
            raise UserError(f"{what}: {key}={value!r} refused: it would make the constructor download weights "
                            "(timm pretrained, torchvision weights); give them as the entry's 'checkpoint'")
        if key == "model_name" and isinstance(value, str) and value.lower().startswith(_REMOTE_MODEL_PREFIXES):
            raise UserError(f"{what}: model_name {value!r} refused: it names a remote or local model whose files "
                            "the constructor would read; give the weights as the entry's 'checkpoint'")


def check_plans_classes(class_name: object, kwargs: Mapping, requires_import: Iterable[str], what: str) -> None:
    """Check the class paths of an nnU-Net plans configuration (``network_class_name`` and the
    ``_kw_requires_import`` values of ``arch_kwargs``, e.g. ``torch.nn.modules.conv.Conv3d``, which
    may also come from ``torch``) before nnU-Net's ``get_network_from_plans`` imports them with
    ``pydoc.locate``. Raises UserError naming ``what`` and the entry."""
    entries = [("network_class_name", class_name, ())]
    entries += [(f"arch_kwargs.{key}", kwargs.get(key), ("torch",)) for key in requires_import
                if kwargs.get(key) is not None]
    for name, path, extra in entries:
        try:
            resolve(path, f"{what}: {name}", extra_packages=extra)
        except (ImportError, AttributeError) as err:
            raise UserError(f"{what}: {name} {path!r} cannot be imported ({err})") from err
