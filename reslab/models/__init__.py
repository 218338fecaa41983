"""Model families. Importing this package registers every entry point."""
from reslab.models import resnet_cifar, resnet_imagenet  # noqa: F401  (registration side effects)
from reslab.models.registry import create_model, default_input_size, list_models, register_model
from reslab.models.units import ResidualUnit

__all__ = ["create_model", "list_models", "register_model", "default_input_size", "ResidualUnit"]
