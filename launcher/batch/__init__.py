"""Stage 4: batch evaluation, generation and scoring with Ray Data.

One engine serves the three jobs. The driver reads the input in chunks (each row keeps its `id`,
or gets a `row_id`), validates every row where it can still name the file and line, and hands
the chunks to Ray Data (inputs). A pool of actors loads the model once each (source) and runs the
job on every batch (worker); the driver streams results to the output file as they arrive
(pool). The jobs themselves and the evaluation after training live in jobs.
"""

from launcher.batch.inputs import BatchInputError, read_prompts
from launcher.batch.jobs import (
    evaluate,
    evaluate_run,
    generate,
    generate_run,
    plot_confusion,
    score,
    write_eval,
)
from launcher.batch.pool import OutputWriter, PoolOptions
from launcher.batch.source import ModelSource, load_scoring_model, resolve_model
from launcher.batch.worker import (
    BatchWorker,
    GenerationOptions,
    apply_template,
    generate_texts,
    length_buckets,
)

__all__ = [
    "BatchInputError",
    "BatchWorker",
    "GenerationOptions",
    "ModelSource",
    "OutputWriter",
    "PoolOptions",
    "apply_template",
    "evaluate",
    "evaluate_run",
    "generate",
    "generate_run",
    "generate_texts",
    "length_buckets",
    "load_scoring_model",
    "plot_confusion",
    "read_prompts",
    "resolve_model",
    "score",
    "write_eval",
]
