"""Pretrained weights load into a model of another image size (the position grid is interpolated, the class
token kept) or context length (the text positions truncated or extended), saying what changed."""
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resize

from cliptrain.checkpoint.convert import Preprocess, export_open_clip, import_pretrained, resolve_architecture
from cliptrain.checkpoint.convert.open_clip import state_dict_to_open_clip
from cliptrain.models.registry import build_model, get_model_config

# widths of 64: an OpenAI-layout file records no head count, which is read as width / 64
ARCH = {"embed_dim": 32, "vision": {"image_size": 224, "patch_size": 32, "width": 64, "layers": 1, "heads": 1},
        "text": {"vocab_size": 300, "context_length": 16, "width": 64, "layers": 1, "heads": 1}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 224 px ViT (7 x 7 patches) with random weights, as an open_clip directory and an OpenAI-style .pt."""
    torch.manual_seed(0)
    model = build_model(get_model_config("tiny", **ARCH), pretrained=False)
    with torch.no_grad():
        model.visual.positional_embedding.normal_()
        model.text.positional_embedding.normal_()
    out = tmp_path_factory.mktemp("pretrained")
    export_open_clip(model, None, Preprocess(224), out / "open_clip")
    torch.save(state_dict_to_open_clip(model.state_dict()), out / "openai.pt")
    return out


def hand_interpolated(positions: torch.Tensor, grid: int) -> torch.Tensor:
    """The class row, then the 7 x 7 grid resized as an image by torchvision (bicubic, antialiased)."""
    width = positions.shape[1]
    image = positions[1:].T.reshape(width, 7, 7)
    image = resize(image, [grid, grid], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return torch.cat([positions[:1], image.reshape(width, grid * grid).T])


@pytest.mark.parametrize("source", ["open_clip", "openai.pt"])
@pytest.mark.parametrize("size, grid", [(160, 5), (288, 9)])
def test_a_224_px_vit_loads_at_another_size(exported, source, size, grid):
    imported = import_pretrained(exported / source)
    assert imported.state_dict["visual.positional_embedding"].shape == (50, 64)
    cfg = resolve_architecture(imported, None, {"vision": {"image_size": size}}, say=lambda _: None)
    model = build_model(cfg, pretrained=False)
    said = []
    imported.load_into(model, said.append)
    assert said == [f"resized visual.positional_embedding from a 7x7 to a {grid}x{grid} patch grid (bicubic, "
                    f"class token kept)"]
    want = hand_interpolated(imported.state_dict["visual.positional_embedding"], grid)
    torch.testing.assert_close(model.visual.positional_embedding.detach(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.visual.proj, imported.state_dict["visual.proj"])  # everything else as it was
    with torch.no_grad():
        features = model.eval().encode_image(torch.randn(2, 3, size, size))
    assert features.shape == (2, 32) and torch.isfinite(features).all()


@pytest.mark.parametrize("context, said", [
    (10, "truncated text.positional_embedding from 16 to 10 positions (the first 10 kept)"),
    (24, "extended text.positional_embedding from 16 to 24 positions (the 16 trained ones kept, 8 new ones "
         "freshly initialised)")])
def test_another_context_length_truncates_or_extends_the_text_positions(exported, context, said):
    imported = import_pretrained(exported / "open_clip")
    cfg = resolve_architecture(imported, None, {"text": {"context_length": context}}, say=lambda _: None)
    torch.manual_seed(1)
    model = build_model(cfg, pretrained=False)
    fresh = model.text.positional_embedding.detach().clone()
    messages = []
    imported.load_into(model, messages.append)
    assert messages == [said]
    got, trained = model.text.positional_embedding.detach(), imported.state_dict["text.positional_embedding"]
    kept = min(context, 16)
    assert torch.equal(got[:kept], trained[:kept]) and torch.equal(got[kept:], fresh[kept:])
    with torch.no_grad():
        features = model.eval().encode_text(torch.randint(3, 300, (2, context)))
    assert torch.isfinite(features).all()


def test_another_patch_size_is_refused_with_the_fix(exported):
    imported = import_pretrained(exported / "open_clip")
    cfg = resolve_architecture(imported, None, {"vision": {"patch_size": 16}}, say=lambda _: None)
    with pytest.raises(ValueError, match=r"visual.patch_embed.weight: file \(64, 3, 32, 32\), model \(64, 3, 16, 16\)"
                                         r".*a different patch size cannot be loaded: keep the weights' "
                                         r"vision.patch_size"):
        imported.load_into(build_model(cfg, pretrained=False), lambda _: None)
