"""Stage 3 on its own: a run's checkpoint -> consolidated Hugging Face model (and adapter)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.recipe import load_recipe
from launcher.rundir import latest_checkpoint


class ExportError(FileNotFoundError):
    """A run directory or checkpoint that cannot be exported (bad input: exit code 2)."""


def find_checkpoint(run_dir: Path, name: str | None) -> Path:
    """The named checkpoint, else the one the run exported, else the newest."""
    checkpoints = run_dir / "checkpoints"
    if name is not None:
        path = checkpoints / name
        if not path.is_dir():
            have = sorted(p.name for p in checkpoints.glob("checkpoint_*"))
            raise ExportError(
                f"--checkpoint {name}: not in {checkpoints} (have: {', '.join(have) or 'none'})"
            )
        return path
    summary = run_dir / "summary.json"
    if summary.exists():
        used = json.loads(summary.read_text()).get("export", {}).get("checkpoint")
        if used and Path(used).is_dir():
            return Path(used)
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise ExportError(f"{run_dir}: no checkpoint under {checkpoints}")
    return latest


def export_checkpoint(
    recipe, checkpoint_dir: Path, out: Path, tokenizer, merge: bool
) -> dict[str, Any]:
    """Consolidate one checkpoint (any strategy) and write out/model (+ out/adapter)."""
    from launcher.finetune import export_model
    from launcher.strategies import consolidate, read_strategy_file

    strategy = read_strategy_file(checkpoint_dir).get("strategy", recipe.strategy.name)
    state_dict = consolidate(strategy, checkpoint_dir)
    info = export_model(recipe, state_dict, out, tokenizer, merge)
    return {"checkpoint": str(checkpoint_dir), **(info or {})}


def export_run(
    run_dir: Path, out: Path, checkpoint: str | None, merge: bool | None
) -> dict[str, Any]:
    """Export one checkpoint of a run directory into `out`."""
    from launcher.models import load_tokenizer

    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.exists():
        raise ExportError(f"{run_dir}: not a run directory (no recipe.yaml)")
    recipe = load_recipe(recipe_file)
    path = find_checkpoint(run_dir, checkpoint)
    do_merge = recipe.checkpoint.export.merge_lora if merge is None else merge
    return export_checkpoint(recipe, path, out, load_tokenizer(recipe.model), do_merge)
