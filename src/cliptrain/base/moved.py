"""Import paths that moved in the layered layout (2026-12), kept working with a DeprecationWarning.

`import cliptrain.losses` (or `from cliptrain.tokenizer import Tokenizer`) still works and names the new path;
`python -m cliptrain.cli ...` runs the command line as before. The aliases are resolved by an import hook, so the
package root holds no stand-in modules.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old import path -> new one
MOVED: dict[str, str] = {
    "cliptrain.config": "cliptrain.base.config",
    "cliptrain.typed": "cliptrain.base.typed",
    "cliptrain.constants": "cliptrain.base.constants",
    "cliptrain.distributed": "cliptrain.base.distributed",
    "cliptrain.training.precision": "cliptrain.base.precision",
    "cliptrain.tokenizer": "cliptrain.text",
    "cliptrain.hf_tokenizer": "cliptrain.text.hf",
    "cliptrain.models.convert.text_tokenizers": "cliptrain.text.files",
    "cliptrain.losses": "cliptrain.objectives",
    "cliptrain.tiled_loss": "cliptrain.objectives.tiled",
    "cliptrain.transforms": "cliptrain.data.transforms",
    "cliptrain.training.checkpoint": "cliptrain.checkpoint.store",
    "cliptrain.training.remote": "cliptrain.checkpoint.remote",
    "cliptrain.models.convert": "cliptrain.checkpoint.convert",
    "cliptrain.models.convert.hf": "cliptrain.checkpoint.convert.hf",
    "cliptrain.models.convert.open_clip": "cliptrain.checkpoint.convert.open_clip",
    "cliptrain.logging": "cliptrain.training.metrics",
    "cliptrain.hub": "cliptrain.app.harness",
    "cliptrain.inference": "cliptrain.app.inference",
    "cliptrain.embed": "cliptrain.app.embed",
    "cliptrain.report": "cliptrain.app.report",
    "cliptrain.cli": "cliptrain.app.cli",
    "cliptrain.training.setup": "cliptrain.training.build",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path of MOVED and hands out the module at its new path (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=False)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the module at the new path is already executed

    def get_code(self, fullname):
        """`python -m OLD` (runpy): run the new module as __main__."""
        return compile(f"import runpy\nrunpy.run_module({MOVED[fullname]!r}, run_name='__main__', alter_sys=True)\n",
                       f"<{fullname} moved to {MOVED[fullname]}>", "exec")


def install() -> None:
    """Put the alias finder on sys.meta_path (once)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
