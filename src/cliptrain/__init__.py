"""cliptrain: train and evaluate CLIP-family image-text models."""
from cliptrain.hub import load_for_harness
from cliptrain.models import CLIP, ModelOutput, create_model, list_models

__version__ = "0.1.0"
__all__ = ["CLIP", "ModelOutput", "create_model", "list_models", "load", "load_for_harness", "__version__"]


def load(path, device="cpu", name=None, tokenizer=None):
    """``(model, preprocess, tokenizer)`` of a checkpoint directory or any importable format (open_clip,
    OpenAI CLIP, Hugging Face CLIP / SigLIP); see :func:`cliptrain.inference.load`."""
    from cliptrain.inference import load as _load
    return _load(path, device, name, tokenizer)
