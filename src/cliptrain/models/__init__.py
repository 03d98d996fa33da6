"""CLIP-family models: configs as data, towers, the two-tower model and CoCa (models/coca.py)."""
from cliptrain.models.clip import CLIP, ModelOutput
from cliptrain.models.config import CLIPConfig, MultimodalConfig, TextConfig, VisionConfig
from cliptrain.models.registry import build_model, create_model, get_model_config, list_models

__all__ = ["CLIP", "ModelOutput", "CLIPConfig", "MultimodalConfig", "TextConfig", "VisionConfig",
           "build_model", "create_model", "get_model_config", "list_models"]
