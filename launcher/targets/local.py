"""Target local: start an embedded Ray (or join RAY_ADDRESS) and run the driver in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.recipe import Recipe


def run_local(
    recipe: Recipe, *, resume: Path | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Run the driver here; returns the run summary."""
    from launcher.job import run

    return run(recipe, resume=resume, verbose=verbose)
