"""The `ftlaunch` command: parsing and printing only; the work lives in the stage modules."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import NoReturn

import click

from launcher import __version__
from launcher.cli.batch_verbs import eval_cmd, export_cmd, generate_cmd, score_cmd
from launcher.cli.common import BadInput, load_or_exit, set_option
from launcher.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    JobFailedError,
    exit_code_for,
)
from launcher.recipe import (
    Recipe,
    RecipeError,
    dump_recipe,
    json_schema,
    resolved_dict,
)


def exit_for_job_error(exc: Exception, verbose: bool) -> NoReturn:
    """A failure of a job run here: bad input exits 2 with its message, anything else exits 1
    with one line (the traceback only with --verbose). Called inside the `except` block."""
    if exit_code_for(exc) == EXIT_BAD_INPUT:
        raise BadInput(str(exc)) from None
    if verbose:
        raise exc
    click.echo(f"error: {exc}", err=True)
    raise click.exceptions.Exit(EXIT_FAILED) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ftlaunch")
def cli() -> None:
    """Fine-tune a model on Ray from one YAML recipe, then evaluate and sample it.

    \b
    ftlaunch validate recipes/quickstart.yaml
    ftlaunch submit recipes/quickstart.yaml
    """


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--quiet", "-q", is_flag=True, help="Print nothing when the recipe is valid.")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["yaml", "json"]),
    default="yaml",
    show_default=True,
    help="How the resolved recipe is printed.",
)
@click.option(
    "--smoke", is_flag=True, help="Check the recipe as `submit --smoke` runs it (tiny model)."
)
def validate(
    recipe: str, overrides: tuple[str, ...], quiet: bool, output_format: str, smoke: bool
) -> None:
    """Check RECIPE and print it fully resolved (defaults filled in, overrides applied).

    \b
    Example:
      ftlaunch validate recipes/quickstart.yaml --set train.lr=3e-5
    Exit code 0 when valid; 2 with every problem (file:line:col, field, allowed values).
    """
    resolved = check_recipe(recipe, overrides)
    if smoke:
        resolved = smoke_or_exit(resolved, build=False)
    if quiet:
        return
    if output_format == "json":
        click.echo(json.dumps(resolved_dict(resolved), indent=2, ensure_ascii=False))
    else:
        click.echo(dump_recipe(resolved), nl=False)


def check_recipe(path: str, overrides: Sequence[str]) -> Recipe:
    """Load a recipe for `validate`, which answers 0 or 2 whatever the file holds.

    Input that defeats the loader itself (nesting deeper than the interpreter's stack, memory)
    is still bad input; anything else unexpected is reported as such, without a traceback.
    """
    try:
        return load_or_exit(path, overrides)
    except (RecursionError, MemoryError) as exc:
        raise BadInput(
            f"{path}: recipe too deeply nested or too large ({type(exc).__name__})"
        ) from None
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(
            f"{path}: could not check this recipe ({type(exc).__name__}: {exc}); "
            "this is a bug in ftlaunch's recipe checks, please report it with the file"
        ) from None


def smoke_or_exit(resolved: Recipe, *, build: bool) -> Recipe:
    """The smoke version of a recipe (launcher.dev.smoke); with build, its model and data written."""
    from launcher.dev.smoke import smoke_plan, smoke_workdir

    try:
        plan = smoke_plan(resolved, smoke_workdir())
    except RecipeError as exc:
        raise BadInput(f"--smoke: {exc.render()}") from None
    return plan.materialize() if build else plan.recipe


@cli.command()
@click.option("--indent", default=2, show_default=True, help="JSON indentation.")
def schema(indent: int) -> None:
    """Print the JSON Schema (Draft 2020-12) of recipes, for editor completion.

    \b
    Example:
      ftlaunch schema > recipe.schema.json
    """
    click.echo(json.dumps(json_schema(), indent=indent))


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's own logs.")
def prepare(recipe: str, overrides: tuple[str, ...], verbose: bool) -> None:
    """Tokenize RECIPE's data once into the prepared-dataset cache; later submits reuse it.

    \b
    Example:
      ftlaunch prepare recipes/gpt2-medium.yaml
    """
    from launcher.job import prepare as prepare_cache

    resolved = load_or_exit(recipe, list(overrides))
    try:
        entry = prepare_cache(resolved, verbose=verbose)
    except Exception as exc:
        exit_for_job_error(exc, verbose)
    state = "reused (already prepared)" if entry["reused"] else "written"
    click.echo(f"prepared data: {entry['path']}")
    click.echo(f"  fingerprint: {entry['fingerprint']} ({state})")
    click.echo(f"  size: {entry['bytes'] / 2**20:,.1f} MiB")
    for split, facts in entry["splits"].items():
        click.echo(f"  {split}: {facts['rows']:,} rows, {facts['tokens']:,} tokens")


def print_final(summary: dict) -> None:
    """The end of a run: where it is, how it went, what to try next."""
    from launcher.summary import final_report

    for line in final_report(summary):
        click.echo(line)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option(
    "--target",
    type=click.Choice(["local", "ray", "kuberay"]),
    default=None,
    help="Where the driver starts (default: cluster.target, or ray when --address is given).",
)
@click.option(
    "--address", default=None, help="Ray dashboard address for target ray, e.g. http://head:8265."
)
@click.option(
    "--resume",
    type=click.Path(file_okay=False),
    default=None,
    help="Continue a run directory from its latest checkpoint (local).",
)
@click.option(
    "--dry-run", is_flag=True, help="Print what would run (resolved recipe, or manifests) and stop."
)
@click.option(
    "--follow/--no-follow", default=True, help="Target ray: stream the job's logs until it ends."
)
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's own logs.")
@click.option(
    "--smoke",
    is_flag=True,
    help="Run here with a tiny model of the same family, generated data, 4 steps on 2 CPU workers.",
)
def submit(
    recipe: str,
    overrides: tuple[str, ...],
    target: str | None,
    address: str | None,
    resume: str | None,
    dry_run: bool,
    follow: bool,
    verbose: bool,
    smoke: bool,
) -> None:
    """Run RECIPE: embedded Ray here, an existing Ray cluster, or Kubernetes via KubeRay.

    \b
    Examples:
      ftlaunch submit recipes/quickstart.yaml
      ftlaunch submit recipes/gpt2-medium.yaml --address http://head:8265
      ftlaunch submit recipes/gpt2-medium.yaml --target kuberay --dry-run
      ftlaunch submit recipes/gpt2-medium.yaml --smoke     # tiny model, 4 steps, CPU
    """
    from pathlib import Path

    extra = list(overrides)
    if address:
        extra += ["cluster.target=ray", f"cluster.address={address}"]
    elif target:
        extra.append(f"cluster.target={target}")
    resolved = load_or_exit(recipe, extra)
    if smoke:
        if address or target not in (None, "local"):
            raise BadInput("--smoke runs on this machine (target local); drop --address/--target")
        resolved = smoke_or_exit(resolved, build=not dry_run)
    chosen = resolved.cluster.target
    if resume and chosen != "local":
        raise BadInput(
            "--resume works with target local; on a cluster resubmit with the run's storage path"
        )
    if dry_run and chosen == "local":
        click.echo(dump_recipe(resolved), nl=False)
        return
    if chosen == "local":
        from launcher.targets.local import run_local

        try:
            summary = run_local(resolved, resume=Path(resume) if resume else None, verbose=verbose)
        except Exception as exc:
            exit_for_job_error(exc, verbose)
        print_final(summary)
        return
    submit_remote(resolved, recipe, chosen, dry_run=dry_run, follow=follow)


def submit_remote(resolved, recipe_path: str, target: str, *, dry_run: bool, follow: bool) -> None:
    """Targets ray and kuberay: hand the resolved recipe to the cluster target."""
    from launcher.targets import TargetError

    try:
        if target == "ray":
            submit_ray(resolved, dry_run=dry_run, follow=follow)
        else:
            submit_kuberay(resolved, dry_run=dry_run)
    except TargetError as exc:
        raise BadInput(str(exc)) from None
    except JobFailedError as exc:
        click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(EXIT_FAILED) from None


def echo_output(chunk: str) -> None:
    """A piece of a job's output, as it arrives."""
    click.echo(chunk, nl=False)


def submit_ray(resolved: Recipe, *, dry_run: bool, follow: bool) -> None:
    """`submit --target ray`: print what would be sent, or submit and follow the job."""
    import yaml

    from launcher.targets import ray_jobs

    if dry_run:
        click.echo(
            yaml.safe_dump(ray_jobs.describe_submission(resolved), sort_keys=False), nl=False
        )
        return
    submission = ray_jobs.submit_to_ray(resolved, dump_recipe(resolved))
    for note in submission.notes:
        click.echo(note)
    click.echo(f"submitted {submission.job_id} to {submission.cluster.address}")
    if follow:
        ray_jobs.follow_to_end(submission.cluster, submission.job_id, echo_output)


def submit_kuberay(resolved: Recipe, *, dry_run: bool) -> None:
    """`submit --target kuberay`: print the manifests, or create the RayJob."""
    from launcher.targets import kuberay

    notes = kuberay.render_notes(resolved) if dry_run else []
    result = kuberay.submit_to_kuberay(resolved, dry_run)
    for note in notes:
        click.echo(note, err=True)
    if dry_run:
        click.echo(result, nl=False)
        return
    ns = resolved.cluster.namespace
    click.echo(f"created RayJob {result} in namespace {ns}")
    click.echo(f"  ftlaunch status {result} --target kuberay --namespace {ns}")


# ------------------------------------------------------------------ cluster jobs and render

address_option = click.option(
    "--address",
    default=None,
    metavar="URL",
    help="Ray dashboard address, e.g. http://head:8265 (default: RAY_ADDRESS).",
)


def cluster_call(call, *args, **kwargs):
    """Run a cluster-target function; its TargetError is bad input (exit 2)."""
    from launcher.targets import TargetError

    try:
        return call(*args, **kwargs)
    except TargetError as exc:
        raise BadInput(str(exc)) from None


@cli.command()
@click.argument("job_id")
@address_option
@click.option(
    "--target",
    type=click.Choice(["ray", "kuberay"]),
    default="ray",
    show_default=True,
    help="kuberay: JOB_ID is a RayJob name; read its jobStatus / jobDeploymentStatus.",
)
@click.option("--namespace", default="default", show_default=True, help="kuberay: namespace.")
@click.option("--json", "as_json", is_flag=True, help="Print the job's details as JSON.")
def status(job_id: str, address: str | None, target: str, namespace: str, as_json: bool) -> None:
    """Print the status of JOB_ID on a Ray cluster (PENDING, RUNNING, SUCCEEDED, ...).

    \b
    Examples:
      ftlaunch status gpt2-medium-alpaca-20260101-120000 --address http://head:8265
      ftlaunch status gpt2-medium-alpaca --target kuberay --namespace ml
    """
    if target == "kuberay":
        from launcher.targets import kuberay

        fields = cluster_call(kuberay.kuberay_status, job_id, namespace)
        if as_json:
            click.echo(json.dumps(fields, indent=2))
            return
        reason = f"  {fields['reason']}: {fields['message']}" if fields["reason"] else ""
        click.echo(
            f"{job_id}: {fields['jobStatus'] or 'UNKNOWN'} "
            f"(deployment {fields['jobDeploymentStatus'] or 'unknown'}){reason}"
        )
        return
    from launcher.targets import ray_jobs

    info = cluster_call(ray_jobs.job_status, job_id, address)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    message = f"  {info['message']}" if info["message"] else ""
    click.echo(f"{info['submission_id']}: {info['status']}{message}")


@cli.command()
@click.argument("job_id")
@address_option
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
def logs(job_id: str, address: str | None, follow: bool) -> None:
    """Print the output of JOB_ID on a Ray cluster.

    \b
    Example:
      ftlaunch logs gpt2-medium-alpaca-20260101-120000 --follow
    """
    from launcher.targets import ray_jobs

    if follow:
        cluster_call(ray_jobs.job_logs, job_id, address, True, echo_output)
    else:
        click.echo(cluster_call(ray_jobs.job_logs, job_id, address), nl=False)


@cli.command()
@click.argument("job_id")
@address_option
def stop(job_id: str, address: str | None) -> None:
    """Stop JOB_ID on a Ray cluster and wait for it to end.

    \b
    Example:
      ftlaunch stop gpt2-medium-alpaca-20260101-120000
    """
    from launcher.targets import ray_jobs

    click.echo(f"{job_id}: {cluster_call(ray_jobs.stop_job, job_id, address)}")


@cli.command(name="list")
@address_option
def list_cmd(address: str | None) -> None:
    """List the jobs on a Ray cluster, oldest first.

    \b
    Example:
      ftlaunch list --address http://head:8265
    """
    from datetime import datetime

    from launcher.targets import ray_jobs

    rows = cluster_call(ray_jobs.list_jobs, address)
    click.echo(f"{'SUBMISSION ID':<44} {'STATUS':<10} {'STARTED':<19} RECIPE")
    for row in rows:
        started = row["start_time"]
        when = (
            datetime.fromtimestamp(started / 1000).strftime("%Y-%m-%d %H:%M:%S") if started else ""
        )
        click.echo(f"{row['submission_id']:<44} {row['status']:<10} {when:<19} {row['recipe']}")


@cli.group()
def render() -> None:
    """Render the manifests that run a recipe elsewhere (Kubernetes)."""


@render.command(name="kuberay")
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write to FILE."
)
def render_kuberay_cmd(recipe: str, overrides: tuple[str, ...], output: str | None) -> None:
    """Print a KubeRay RayJob + ConfigMap (the resolved recipe) for RECIPE as YAML.

    \b
    Example:
      ftlaunch render kuberay recipes/gpt2-medium.yaml | kubectl apply -f -
    """
    from pathlib import Path

    from launcher.targets import kuberay

    resolved = load_or_exit(recipe, overrides)
    text = cluster_call(kuberay.render_yaml, resolved)
    for note in kuberay.render_notes(resolved):
        click.echo(note, err=True)
    if output:
        Path(output).write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


for verb in (eval_cmd, generate_cmd, score_cmd, export_cmd):
    cli.add_command(verb)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: run the CLI and return its exit code."""
    try:
        # Without standalone mode click returns (not raises) the code of an explicit Exit.
        code = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="ftlaunch",
            standalone_mode=False,
        )
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_FAILED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code if exc.exit_code != 1 or isinstance(exc, BadInput) else EXIT_BAD_INPUT
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except RecipeError as exc:
        # A verb that loads a recipe without load_or_exit: still bad input, not a crash.
        click.echo(f"error: {exc.render()}", err=True)
        return EXIT_BAD_INPUT
    return code if isinstance(code, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
