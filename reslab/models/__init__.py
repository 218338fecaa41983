"""Model families. Importing this package registers every entry point."""
from reslab.models import dpn, fractalnet, merge_run, resnet_cifar, resnet_imagenet  # noqa: F401  (registration side effects)
from reslab.models.registry import create_model, default_input_size, list_models, register_model
from reslab.models.units import ResidualUnit
from reslab.models.complexity import count_flops, count_params, model_info
from reslab.models.fuse import fuse_bn
from reslab.models.interop import from_torchvision, load_torchvision_weights, to_torchvision

__all__ = ["create_model", "list_models", "register_model", "default_input_size", "ResidualUnit",
           "count_flops", "count_params", "model_info", "fuse_bn", "from_torchvision", "load_torchvision_weights",
           "to_torchvision"]
