"""Built-in class names and templates (checked against pinned hashes) and class-name / template files."""
import hashlib
import json

import pytest
import yaml

from cliptrain.evaluation.prompts import BUILTIN_CLASSNAMES, BUILTIN_TEMPLATES, load_classnames, load_templates


def digest(lines):
    return hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest()


def test_imagenet_classnames_are_openais_list():
    names = load_classnames("imagenet1k")
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet paper"
    assert names[21] == "kite (bird of prey)" and names[517] == "construction crane" and names[134] == "crane bird"
    # OpenAI's list repeats two names; open_clip renames one pair of them.
    assert names[657] == names[744] == "missile" and names[836] == names[837] == "sunglasses"
    assert len(set(names)) == 998
    assert digest(names) == "8800e39242cbed4c6889376e20a49cfdaf4f84a773a6686d15c3b39972ef94c4"
    openclip = load_classnames("imagenet1k-openclip")
    assert [i for i, (a, b) in enumerate(zip(names, openclip)) if a != b] == [836, 837]
    assert openclip[836:838] == ["sunglass", "sunglasses / dark glasses / shades"]


def test_openai_templates():
    full = load_templates("openai-imagenet")
    assert len(full) == len(set(full)) == 80 and all(t.count("{}") == 1 for t in full)
    assert full[0] == "a bad photo of a {}." and full[-1] == "a tattoo of the {}."
    assert digest(full) == "717aaf1055595d318aa456669c0de6675d883ccebfa70ca12ff890b7aab710cb"
    short = load_templates("openai-imagenet-short")
    assert short == ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                     "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
    assert set(short) <= set(full)
    assert load_templates("photo") == ["a photo of a {}."]
    assert len(load_classnames("shapes")) == 48 and len(load_templates("shapes")) == 6
    assert set(BUILTIN_CLASSNAMES) == {"imagenet1k", "imagenet1k-openclip", "shapes"}
    assert set(BUILTIN_TEMPLATES) == {"openai-imagenet", "openai-imagenet-short", "photo", "shapes"}


def test_files_in_every_format(tmp_path):
    names, templates = ["cat", "red car"], ["a photo of a {}.", "{}"]
    (tmp_path / "list.json").write_text(json.dumps(names))
    (tmp_path / "both.json").write_text(json.dumps({"classnames": names, "templates": templates}))
    (tmp_path / "both.yaml").write_text(yaml.safe_dump({"classnames": names, "templates": templates}))
    (tmp_path / "list.yml").write_text(yaml.safe_dump(templates))
    (tmp_path / "names.txt").write_text("cat\n\n  red car  \n")
    (tmp_path / "tpl.txt").write_text("a photo of a {}.\n{}\n")
    for f in ("list.json", "both.json", "both.yaml", "names.txt"):
        assert load_classnames(tmp_path / f) == names, f
    for f in ("both.json", "both.yaml", "list.yml", "tpl.txt"):
        assert load_templates(str(tmp_path / f)) == templates, f


def test_file_errors_name_the_fix(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"templates": ["{}"]}))
    with pytest.raises(ValueError, match="no 'classnames' list; the file's keys are templates"):
        load_classnames(tmp_path / "t.json")
    (tmp_path / "bad.txt").write_text("a photo\n")
    with pytest.raises(ValueError, match="exactly one {} placeholder"):
        load_templates(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="unknown template set 'openai'.*openai-imagenet"):
        load_templates("openai")
    with pytest.raises(FileNotFoundError):
        load_classnames(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("[1,")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_classnames(tmp_path / "broken.json")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no classnames found"):
        load_classnames(tmp_path / "empty.txt")
