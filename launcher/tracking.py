"""Experiment trackers: TensorBoard, MLflow, Weights & Biases.

Fed by the driver from rank 0's reports, so a job is one tracked run however many workers
or nodes it has. The resolved recipe is logged as the run's parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.recipe import Recipe, resolved_dict


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists become strings."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The loggable numbers of a report (step is the x axis, not a series)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "step" and v == v
    }


class TensorBoardTracker:
    def __init__(self, recipe: Recipe, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        params = flatten(resolved_dict(recipe))
        self.writer.add_text("recipe", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in numeric(metrics).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class MlflowTracker:
    def __init__(self, recipe: Recipe, run_dir: Path):
        import mlflow

        cfg = recipe.tracking.mlflow
        uri = cfg.tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = cfg.experiment or recipe.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        for key, value in flatten(resolved_dict(recipe)).items():
            self.client.log_param(self.run_id, key, str(value)[:6000])

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in numeric(metrics).items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    def __init__(self, recipe: Recipe, run_dir: Path):
        import wandb

        cfg = recipe.tracking.wandb
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            name=run_dir.name,
            dir=str(run_dir),
            config=resolved_dict(recipe),
            reinit="finish_previous",
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(numeric(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Fan a report out to every configured tracker."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_tracker(recipe: Recipe, run_dir: Path) -> Trackers | None:
    """The trackers the recipe asks for, or None."""
    cfg = recipe.tracking
    trackers: list = []
    if cfg.tensorboard:
        trackers.append(TensorBoardTracker(recipe, run_dir))
    if cfg.mlflow is not None:
        trackers.append(MlflowTracker(recipe, run_dir))
    if cfg.wandb is not None:
        trackers.append(WandbTracker(recipe, run_dir))
    return Trackers(trackers) if trackers else None
