"""The batch verbs: eval, generate, score and export over a model or a run directory."""

from __future__ import annotations

import json

import click

from launcher.cli.common import BadInput
from launcher.errors import EXIT_BAD_INPUT, exit_code_for

# ----------------------------------------------------------- batch jobs: eval / generate / score


def batch_call(call, *args, **kwargs):
    """Run a batch-stage function; a bad model, data file or option is exit 2."""
    from launcher.batch import BatchInputError
    from launcher.models import ModelLoadError

    try:
        return call(*args, **kwargs)
    except (BatchInputError, ModelLoadError) as exc:
        raise BadInput(str(exc)) from None


def batch_pool_options(default_batch_size: int):
    """--batch-size, --num-actors, --address and --quiet, shared by the batch verbs."""

    def decorate(fn):
        for option in reversed(
            [
                click.option(
                    "--batch-size", default=default_batch_size, show_default=True, type=int
                ),
                click.option(
                    "--num-actors",
                    type=int,
                    default=None,
                    help="Model replicas (default: one per GPU, else one CPU actor).",
                ),
                click.option(
                    "--address",
                    "ray_address",
                    default=None,
                    metavar="ADDR",
                    help="Ray cluster to run on (ray://head:10001 or auto; default: local Ray).",
                ),
                click.option("--quiet", "-q", is_flag=True, help="No progress display."),
            ]
        ):
            fn = option(fn)
        return fn

    return decorate


def pool_from_flags(batch_size: int, num_actors: int | None, ray_address: str | None, quiet: bool):
    from launcher.batch import PoolOptions

    return PoolOptions(
        batch_size=batch_size, num_actors=num_actors, address=ray_address, progress=not quiet
    )


task_option = click.option(
    "--task",
    type=click.Choice(["causal_lm", "classification"]),
    default=None,
    help="Model task when the model directory does not say.",
)


@click.command(name="eval")
@click.argument("model_or_run")
@click.option("--data", required=True, help="Data file (.jsonl/.json/.csv/.tsv/.parquet/.txt).")
@click.option(
    "--metrics",
    multiple=True,
    default=("loss",),
    show_default=True,
    help="loss, perplexity, exact_match (causal LM); loss, accuracy, precision, recall, f1 "
    "(classification). Repeat or separate with commas.",
)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write JSON to FILE.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--label-field", default="label", show_default=True)
@click.option("--prompt-field", default="prompt", show_default=True)
@click.option("--reference-field", default="completion", show_default=True)
@task_option
@batch_pool_options(32)
def eval_cmd(model_or_run: str, data: str, metrics: tuple[str, ...], out: str | None, **flags):
    """Evaluate MODEL_OR_RUN (run directory, model directory or hub id) on --data.

    \b
    Example:
      ftlaunch eval runs/quickstart-20250101-120000 --data test.jsonl --metrics accuracy,f1
    Prints the metrics as JSON; classification also writes the confusion matrix PNG beside --out.
    """
    from pathlib import Path

    from launcher import batch

    pool = pool_from_flags(
        *(flags.pop(k) for k in ("batch_size", "num_actors", "ray_address", "quiet"))
    )
    names = [m.strip() for item in metrics for m in item.split(",") if m.strip()]
    result = batch_call(batch.evaluate, model_or_run, data, names, pool=pool, **flags)
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")
        if "confusion_matrix" in result:
            batch.plot_confusion(result, Path(out).with_suffix(".png"))
    click.echo(text)


@click.command(name="generate")
@click.argument("model_or_run")
@click.option(
    "--prompts", required=True, help=".jsonl with a `prompt` field, or .txt (one per line)."
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help=".jsonl or .parquet")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--num-return-sequences", type=int, default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--prompt-template", default=None, help="e.g. '### Instruction:\\n{prompt}\\n### Response:\\n'"
)
@click.option(
    "--chat/--no-chat",
    default=None,
    help="Render rows with the model's chat template (a `messages` conversation or the `prompt` "
    "as a user message) and stop at end of turn. Default: on when rows have `messages` or "
    "MODEL_OR_RUN is a run trained on chat data (an instruction run's prompts are rendered "
    "with its prompt template).",
)
@batch_pool_options(16)
def generate_cmd(model_or_run: str, prompts: str, out: str, prompt_template: str | None, **flags):
    """Generate text for every prompt with MODEL_OR_RUN; write one row per output to --out.

    \b
    Example:
      ftlaunch generate runs/gpt2-medium-alpaca-20250101-120000 --prompts prompts.jsonl --out gen.jsonl
    """
    from launcher import batch

    pool = pool_from_flags(
        *(flags.pop(k) for k in ("batch_size", "num_actors", "ray_address", "quiet"))
    )
    chat = flags.pop("chat")
    path = batch_call(
        batch.generate, model_or_run, prompts, out, flags, prompt_template, pool=pool, chat=chat
    )
    click.echo(f"wrote {path}", err=True)


@click.command(name="score")
@click.argument("model_or_run")
@click.option("--data", required=True, help="Data file (.jsonl/.json/.csv/.tsv/.parquet/.txt).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help=".jsonl or .parquet")
@click.option("--text-field", default="text", show_default=True)
@click.option("--prompt-field", default="prompt", show_default=True)
@click.option("--completion-field", default="completion", show_default=True)
@click.option(
    "--token-logprobs", is_flag=True, help="Causal LM: also write every token's log-prob."
)
@click.option(
    "--chat/--no-chat",
    default=None,
    help="Render rows with the model's chat template (a `messages` conversation, or the prompt "
    "as a user message answered by the completion) and score the last assistant turn with its "
    "end-of-turn token. Default: on when rows have `messages`.",
)
@task_option
@batch_pool_options(32)
def score_cmd(model_or_run: str, data: str, out: str, **flags):
    """Score every row of --data: label probabilities (classification) or log-likelihood.

    \b
    Example:
      ftlaunch score runs/sentiment-20250101-120000 --data reviews.jsonl --out scored.parquet
      ftlaunch score runs/chat-20250101-120000 --data chats.jsonl --out scored.jsonl
    """
    from launcher import batch

    pool = pool_from_flags(
        *(flags.pop(k) for k in ("batch_size", "num_actors", "ray_address", "quiet"))
    )
    path = batch_call(batch.score, model_or_run, data, out, pool=pool, **flags)
    click.echo(f"wrote {path}", err=True)


@click.command(name="export")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option(
    "--checkpoint",
    default=None,
    help="Checkpoint directory name under RUN/checkpoints (default: the one the run exported, else the latest).",
)
@click.option(
    "--merge-lora/--no-merge-lora",
    default=None,
    help="lora/ia3: also write the merged model (default: the recipe's checkpoint.export.merge_lora).",
)
@click.option(
    "--verbose", "-v", is_flag=True, help="Show the libraries' own logs and progress bars."
)
def export_cmd(
    run: str, out: str, checkpoint: str | None, merge_lora: bool | None, verbose: bool
) -> None:
    """Consolidate a checkpoint of RUN into a Hugging Face model in OUT/model (and OUT/adapter).

    \b
    Example:
      ftlaunch export runs/quickstart-20260101-120000 --out exported --checkpoint checkpoint_000020
    """
    from pathlib import Path

    from launcher.export import export_run
    from launcher.raysession import quiet_libraries, quiet_transformers

    quiet_libraries(verbose)
    quiet_transformers(verbose)
    try:
        info = export_run(Path(run), Path(out), checkpoint, merge_lora)
    except Exception as exc:
        if exit_code_for(exc) == EXIT_BAD_INPUT:
            raise BadInput(str(exc)) from None
        raise
    click.echo(f"exported {info['checkpoint']} to {info['model_dir']}")
    if info.get("adapter_dir"):
        click.echo(f"adapter: {info['adapter_dir']}")
    if info.get("note"):
        click.echo(info["note"])
