"""Experiment trackers: TensorBoard, MLflow, Weights & Biases.

Fed by the driver from rank 0's reports, so a job is one tracked run however many workers
or nodes it has. The resolved recipe is logged as the run's parameters. A job resumed in the
same run directory continues the same MLflow and W&B run.

A tracker that fails while the job runs (a tracking server going away) is switched off with a
warning: losing a chart must not cost the training run.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from launcher.recipe import Recipe, resolved_dict

RUN_DIR_TAG = "ftlaunch.run_dir"
MLFLOW_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
MLFLOW_PARAM_CHARS = 6000  # and param values of at most 6000 characters


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


def run_id_for(run_dir: Path) -> str:
    """A stable tracker run id for a run directory: readable, and unique across storage paths."""
    digest = hashlib.sha1(str(Path(run_dir).absolute()).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_-]", "-", Path(run_dir).name)[:48]
    return f"{name}-{digest}"


class TensorBoardTracker:
    """Event files in <run>/tensorboard (`tensorboard --logdir runs`)."""

    name = "tensorboard"

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


def mlflow_uri(recipe: Recipe, run_dir: Path) -> str:
    """tracking.mlflow.tracking_uri, else a file store in <run>/mlruns."""
    cfg = recipe.tracking.mlflow
    uri = (cfg.tracking_uri if cfg else None) or (run_dir / "mlruns").absolute().as_uri()
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps its file store behind an opt-in; a store inside the run directory
        # travels with the run (and works on shared storage), which is why it is the default.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


class MlflowTracker:
    """One MLflow run per job, named after the run directory; params are the resolved recipe."""

    name = "mlflow"

    def __init__(self, recipe: Recipe, run_dir: Path):
        import mlflow

        cfg = recipe.tracking.mlflow
        self.client = mlflow.MlflowClient(tracking_uri=mlflow_uri(recipe, run_dir))
        name = cfg.experiment or recipe.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        self.run_id = self._resumed_run(experiment_id, run_dir)
        if self.run_id is None:
            self.run_id = self.client.create_run(
                experiment_id, run_name=run_dir.name, tags={RUN_DIR_TAG: str(run_dir)}
            ).info.run_id
            self._log_params(flatten(resolved_dict(recipe)))

    def _resumed_run(self, experiment_id: str, run_dir: Path) -> str | None:
        """The run an earlier attempt in this run directory created, marked running again."""
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'", max_results=1
        )
        if not found:
            return None
        run_id = found[0].info.run_id
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MLFLOW_PARAM_CHARS]) for k, v in params.items()]
        for start in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + MLFLOW_BATCH])

    def log(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, v, now, step) for k, v in numeric(metrics).items()]
        if values:
            self.client.log_batch(self.run_id, metrics=values)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """One W&B run per job; its id comes from the run directory, so a resume continues it."""

    name = "wandb"

    def __init__(self, recipe: Recipe, run_dir: Path):
        import wandb

        cfg = recipe.tracking.wandb
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            id=run_id_for(run_dir),
            resume="allow",
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
    """Fan a report out to every configured tracker; a failing one is switched off."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for tracker in list(self.trackers):
            try:
                tracker.log(metrics, step)
            except Exception as exc:
                self._drop(tracker, exc)

    def _drop(self, tracker, exc: Exception) -> None:
        self.trackers.remove(tracker)
        name = getattr(tracker, "name", type(tracker).__name__)
        print(
            f"warning: {name} tracking stopped ({type(exc).__name__}: {exc}); "
            "training goes on, metrics.jsonl keeps every report",
            file=sys.stderr,
        )

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:
                print(
                    f"warning: closing {getattr(tracker, 'name', tracker)}: {exc}", file=sys.stderr
                )


def open_tracker(recipe: Recipe, run_dir: Path) -> Trackers | None:
    """The trackers the recipe asks for, or None. Raises what a tracker's set-up raises (a
    tracking server that cannot be reached, W&B online without a login): before training."""
    cfg = recipe.tracking
    trackers: list = []
    if cfg.tensorboard:
        trackers.append(TensorBoardTracker(recipe, run_dir))
    if cfg.mlflow is not None:
        trackers.append(MlflowTracker(recipe, run_dir))
    if cfg.wandb is not None:
        trackers.append(WandbTracker(recipe, run_dir))
    return Trackers(trackers) if trackers else None
