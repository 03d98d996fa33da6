"""CLIP-family models: configs as data, towers, and the two-tower model."""
from cliptrain.models.clip import CLIP, ModelOutput
from cliptrain.models.config import CLIPConfig, TextConfig, VisionConfig
from cliptrain.models.registry import create_model, get_model_config, list_models

__all__ = ["CLIP", "ModelOutput", "CLIPConfig", "TextConfig", "VisionConfig",
           "create_model", "get_model_config", "list_models"]
