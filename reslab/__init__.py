"""reslab: residual networks and their variants — built faithfully, trained with each paper's
recipe, and taken apart by the experiments that explain them."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# The public names are imported on first use (PEP 562), so that `import reslab` and the CLI start
# without torch: `reslab --version` and `reslab models` answer at once.
_LAZY = {"create_model": "reslab.models.registry", "list_models": "reslab.models.registry",
         "register_model": "reslab.models.registry", "fuse_bn": "reslab.models.fuse",
         "from_torchvision": "reslab.models.interop", "to_torchvision": "reslab.models.interop",
         "load_torchvision_weights": "reslab.models.interop"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reslab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = ["create_model", "list_models", "register_model", "fuse_bn", "from_torchvision", "to_torchvision",
           "load_torchvision_weights", "__version__"]
