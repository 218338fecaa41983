"""reslab: residual networks and their variants — built faithfully, trained with each paper's
recipe, and taken apart by the experiments that explain them."""
from reslab.models.registry import create_model, list_models, register_model

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "register_model", "__version__"]
