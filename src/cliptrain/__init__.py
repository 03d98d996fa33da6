"""cliptrain: train and evaluate CLIP-family image-text models.

The package is layered, each layer importing only those before it: base, text, models, objectives, data,
checkpoint, evaluation, training, app (docs/architecture.md). Old import paths keep working (base/moved.py).
"""
from cliptrain.base.moved import install as _install_moved_paths

_install_moved_paths()
from cliptrain.models import CLIP, ModelOutput, create_model, list_models

__version__ = "0.1.0"
__all__ = ["CLIP", "ModelOutput", "create_model", "list_models", "load", "load_for_harness", "__version__"]


def load_for_harness(path, device="cpu"):
    """``(model, transform, tokenizer)`` of a checkpoint directory for CLIP_benchmark-style harnesses; see
    :func:`cliptrain.app.harness.load_for_harness`."""
    from cliptrain.app.harness import load_for_harness as _load
    return _load(path, device)


def load(path, device="cpu", name=None, tokenizer=None):
    """``(model, preprocess, tokenizer)`` of a checkpoint directory or any importable format (open_clip,
    OpenAI CLIP, Hugging Face CLIP / SigLIP); see :func:`cliptrain.app.inference.load`."""
    from cliptrain.app.inference import load as _load
    return _load(path, device, name, tokenizer)
