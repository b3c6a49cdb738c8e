"""Make the first `import gradio` skip work it does only for gradio's own developers.

gradio's ComponentMeta calls `create_or_modify_pyi` for every component class as it is
defined: it reads and parses the class's source file and its shipped `.pyi` stub, renders
the stub again, and rewrites it when it differs. The installed wheel already ships the
stubs, so on each start this costs seconds of CPU for nothing (more than half of gradio's
import on a 2-core machine) and can only ever write into site-packages. Installed before
gradio is imported, the hook below replaces that function with a no-op as soon as
`gradio.component_meta` has run, then removes itself. It imports nothing from gradio; if a
gradio version lacks the function, nothing changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

TARGET = "gradio.component_meta"


def _no_pyi(*_args: object, **_kwargs: object) -> None:
    """Stands in for gradio's stub writer: the installed stubs are left as shipped."""


class _SkipPyiFinder(importlib.abc.MetaPathFinder):
    """Finds `gradio.component_meta` the normal way and patches it right after it executes."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None):
        if fullname != TARGET:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one module, once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            if hasattr(module, "create_or_modify_pyi"):
                module.create_or_modify_pyi = _no_pyi

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def skip_pyi_regeneration() -> bool:
    """Install the hook if gradio is not imported yet; returns whether it was installed."""
    if TARGET in sys.modules or any(isinstance(f, _SkipPyiFinder) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _SkipPyiFinder())
    return True
