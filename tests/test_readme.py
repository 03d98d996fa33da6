"""The README stays true: its quick start and its config reference match the code."""
import re
from pathlib import Path

import yaml

from cliptrain.base.config import RunConfig, to_dict

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_reference_equals_the_defaults():
    text = README.read_text()
    block = re.search(r"<!-- config-reference: start -->\s*```yaml\n(.*?)```", text, re.S).group(1)
    assert yaml.safe_load(block) == to_dict(RunConfig())


def test_quick_start_is_the_two_commands_and_ci_runs_the_second():
    text = README.read_text()
    quick = re.search(r"## Quick start\s*```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["pip install -e . && cliptrain train", "pip install -e '.[test]' && pytest"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install -e '.[test]' && pytest" in ci
