"""Training objectives, one interface: `objective(ModelOutput) -> {name: loss}` (contrastive, sigmoid, tiled
exact variants, CoCa's caption loss, distillation); exchanges across ranks live here. Imports base and models."""
from __future__ import annotations

from torch import nn

from cliptrain.base.config import RunConfig
from cliptrain.objectives.caption import CaptionLoss, caption_mask, caption_token_losses
from cliptrain.objectives.contrastive import ContrastiveLoss, contrastive_loss
from cliptrain.objectives.distill import DistillLoss, distillation_loss
from cliptrain.objectives.local import exchanges_features, local_contrastive_loss
from cliptrain.objectives.sigmoid import SigmoidLoss, sigmoid_loss

__all__ = ["OBJECTIVES", "CaptionLoss", "ContrastiveLoss", "DistillLoss", "SigmoidLoss", "build_objective",
           "build_run_objective", "caption_mask", "caption_token_losses", "contrastive_loss", "distillation_loss",
           "exchanges_features", "local_contrastive_loss",
           "sigmoid_loss"]

OBJECTIVES = {"contrastive": ContrastiveLoss, "sigmoid": SigmoidLoss}


def build_objective(name: str = "contrastive", tile: int | None = None, local: bool = True) -> nn.Module:
    """The objective module for a config name; `tile` selects the memory-lean tiled implementation, `local`
    (across processes) each rank's own rows of the global logits instead of the whole matrix on every rank."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](tile, local)


def build_run_objective(cfg: RunConfig, model: nn.Module, distill: bool = False) -> nn.Module:
    """The objective of a run: `train.objective` (auto: sigmoid for a model with a logit bias, a SigLIP model),
    plus CoCa's captioning loss for a model with a `multimodal` section, plus distillation when `distill`."""
    name = cfg.train.objective
    if name == "auto":
        name = "sigmoid" if getattr(model, "logit_bias", None) is not None else "contrastive"
    objective = build_objective(name, cfg.train.loss_tile, cfg.train.local_loss)
    if getattr(model.cfg, "multimodal", None) is not None:
        text = model.cfg.text
        objective = CaptionLoss(objective, text.pad_token_id, text.eot_token_id, cfg.train.contrastive_weight,
                                cfg.train.caption_weight)
    if distill:
        objective = DistillLoss(objective, cfg.distill.weight)
    return objective
