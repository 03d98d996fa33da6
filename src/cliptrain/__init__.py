"""cliptrain: train and evaluate CLIP-family image-text models."""
from cliptrain.hub import load_for_harness
from cliptrain.models import CLIP, ModelOutput, create_model, list_models

__version__ = "0.1.0"
__all__ = ["CLIP", "ModelOutput", "create_model", "list_models", "load_for_harness", "__version__"]
