"""The inference API: ``model, preprocess, tokenizer = cliptrain.load(PATH)``.

PATH is a cliptrain checkpoint directory or anything `cliptrain.checkpoint.convert.import_pretrained`
reads (open_clip / OpenAI files, open_clip and Hugging Face CLIP / SigLIP directories, hub ids).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cliptrain.models.clip import CLIP, ModelOutput
from cliptrain.data.transforms import ImageTransform, image_transform

__all__ = ["load", "InferenceModel", "DEFAULT_TEMPLATES"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class InferenceModel(nn.Module):
    """A CLIP model with its tokenizer and preprocessing: encode PIL images or strings directly, and
    classify images zero-shot."""

    def __init__(self, model: CLIP, preprocess: ImageTransform, tokenizer: Any):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    @property
    def cfg(self):
        """The architecture config."""
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.model.logit_scale.device

    def _pixels(self, images) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.preprocess(im) for im in images])
        return images.to(self.device)

    def _tokens(self, texts) -> torch.Tensor:
        if not isinstance(texts, torch.Tensor):
            if self.tokenizer is None:
                raise ValueError("this model was loaded without a tokenizer; pass token ids, or load it with "
                                 "cliptrain.load(path, tokenizer=MERGES_OR_TOKENIZER_FILE)")
            texts = self.tokenizer(texts)
        return texts.to(self.device)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor | Image.Image | Sequence[Image.Image],
                     normalize: bool = True) -> torch.Tensor:
        """Image features [B, D] of preprocessed pixels [B, 3, S, S] or PIL images."""
        return self.model.encode_image(self._pixels(images), normalize=normalize)

    @torch.no_grad()
    def encode_text(self, texts: torch.Tensor | str | Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Text features [B, D] of token ids [B, L] or strings."""
        return self.model.encode_text(self._tokens(texts), normalize=normalize)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> ModelOutput:
        """The wrapped model's forward."""
        return self.model(images, texts)

    @torch.no_grad()
    def zero_shot(self, images, class_names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Class probabilities [B, C] of images (PIL or pixels): softmax over classes for CLIP models,
        independent sigmoids for models with a logit bias (SigLIP). Each class is the mean embedding of its
        names in the templates (default: "a photo of a {}.")."""
        from cliptrain.evaluation.zeroshot import build_classifier, predict_proba

        classifier = build_classifier(lambda t: self.model.encode_text(t.to(self.device)), self._tokens,
                                      list(class_names), list(templates or DEFAULT_TEMPLATES))
        features = F.normalize(self.encode_image(images).float(), dim=-1)
        bias = self.model.logit_bias
        scoring = "sigmoid" if bias is not None else "softmax"
        return predict_proba(features, classifier, scoring, float(self.model.logit_scale.exp()),
                             float(bias) if bias is not None else 0.0)


def load(path: str | Path, device: torch.device | str = "cpu", name: str | None = None,
         tokenizer: str | Path | None = None) -> tuple[InferenceModel, ImageTransform, Any]:
    """``(model, preprocess, tokenizer)`` of a checkpoint or any importable format, the model in eval mode.

    `name` gives the architecture of a bare state-dict file (e.g. ViT-B-32-quickgelu); `tokenizer` a CLIP
    merges file or tokenizer.json for weights that come without one. `preprocess(PIL image)` is the model's
    evaluation transform; `tokenizer(list of str)` gives the [N, L] ids.
    """
    from cliptrain.checkpoint.convert import import_pretrained

    imported = import_pretrained(path, name, tokenizer)
    if not imported.activation_known:
        print(f"note: {path} does not record its activation; assuming {imported.config.activation} "
              "(pass name='ViT-B-32-quickgelu' etc. for QuickGELU weights)")
    model = imported.model().to(device)
    p = imported.preprocess
    transform = image_transform(p.image_size, False, p.mean, p.std, p.interpolation, resize_mode=p.resize_mode)
    return InferenceModel(model, transform, imported.tokenizer).eval(), transform, imported.tokenizer
