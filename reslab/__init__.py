"""reslab: residual networks and their variants — built faithfully, trained with each paper's
recipe, and taken apart by the experiments that explain them."""
from reslab.models.fuse import fuse_bn
from reslab.models.interop import from_torchvision, load_torchvision_weights, to_torchvision
from reslab.models.registry import create_model, list_models, register_model

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "register_model", "fuse_bn", "from_torchvision", "to_torchvision",
           "load_torchvision_weights", "__version__"]
