"""Link torch, torchvision and everything they depend on from this interpreter's environment
into another site-packages folder (for the core-only install check: a second 5 GB copy of the
CUDA build is not needed to check what *our* package declares).

Usage: python scripts/link_torch.py TARGET_SITE_PACKAGES
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path


def closure(names: list[str]) -> set[str]:
    """The distributions ``names`` need, transitively, extras included (markers evaluated for
    this machine)."""
    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    seen: set[tuple[str, str]] = set()
    found: set[str] = set()
    todo = [(norm(n), "") for n in names]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        found.add(name)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo.append((norm(req.name), ""))
                todo.extend((norm(req.name), e) for e in req.extras)
    return found


def main() -> int:
    target = Path(sys.argv[1])
    n = 0
    for name in sorted(closure(["torch", "torchvision"])):
        dist = md.distribution(name)
        root = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src, dst = root / top, target / top
            if src.exists() and not dst.exists() and top != "__pycache__":
                dst.symlink_to(src)
                n += 1
    print(f"[core] linked {n} entries of torch and torchvision's dependency closure into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
