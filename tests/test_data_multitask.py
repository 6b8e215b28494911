"""Multi-task training from a weighted mix of sources.

Covered elsewhere, not repeated here:
- the mix samples each source in proportion to its weight within a tolerance:
  tests/test_data.py::test_mix_proportions_within_tolerance and
  tests/test_data.py::test_weighted_mix_follows_weights_and_keeps_source;
- a job on a two-source mix reports eval_<source>_loss for each validation
  source: tests/test_objectives_fgm.py::test_fgm_ddp_job_on_a_two_source_mix.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from launcher.batch.jobs import metric_slug, source_metrics


@pytest.mark.parametrize(
    "name,slug",
    [
        ("stories", "stories"),
        ("Code-Alpaca", "code_alpaca"),
        ("hf sst2/train", "hf_sst2_train"),
        ("--", "source"),
    ],
)
def test_source_names_become_metric_name_parts(name, slug):
    assert metric_slug(name) == slug


def test_no_per_source_metrics_without_several_sources(tmp_path):
    recipe = SimpleNamespace(model=SimpleNamespace(task="causal_lm"), evaluate=None)
    one_source = SimpleNamespace(datasets={"validation": object()}, sources=["only"])
    assert source_metrics(recipe, one_source, tmp_path) == {}
    no_validation = SimpleNamespace(datasets={}, sources=["a", "b"])
    assert source_metrics(recipe, no_validation, tmp_path) == {}
