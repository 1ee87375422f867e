"""Lazy package namespaces (PEP 562): ``from napari_cpgcn.pipeline import Predictor`` imports the
submodule that defines ``Predictor`` on first use, so a light submodule (``pipeline.config``)
never pulls in the heavy ones (pandas, torch) and ``napari-cpgcn --help`` stays instant."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose public names live in the submodules
    ``where`` maps them to (``{name: submodule}``)."""

    def __getattr__(name: str) -> Any:
        if name in where:
            module = importlib.import_module(f"{package}.{where[name]}")
            value = getattr(module, name)
            setattr(importlib.import_module(package), name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(where))

    return __getattr__, __dir__
