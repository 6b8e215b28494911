"""The `ftlaunch` command: parsing and printing only; the work lives in the stage modules."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import click

from launcher import __version__
from launcher.recipe import RecipeError, dump_recipe, json_schema, load_recipe

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(click.ClickException):
    """Bad input from the user: printed without a traceback, exit code 2."""

    exit_code = EXIT_BAD_INPUT

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def load_or_exit(path: str, overrides: Sequence[str]):
    """Load a recipe, turning every recipe problem into exit code 2 with its message."""
    try:
        return load_recipe(path, overrides)
    except RecipeError as exc:
        raise BadInput(exc.render()) from None


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe field, value parsed as YAML (e.g. --set train.lr=3e-5). Repeatable.",
)


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
def validate(recipe: str, overrides: tuple[str, ...], quiet: bool) -> None:
    """Check RECIPE and print it fully resolved (defaults filled in, overrides applied).

    \b
    Example:
      ftlaunch validate recipes/quickstart.yaml --set train.lr=3e-5
    Exit code 0 when valid; 2 with every problem (file:line:col, field, allowed values).
    """
    resolved = load_or_exit(recipe, overrides)
    if not quiet:
        click.echo(dump_recipe(resolved), nl=False)


@cli.command()
@click.option("--indent", default=2, show_default=True, help="JSON indentation.")
def schema(indent: int) -> None:
    """Print the JSON Schema (Draft 2020-12) of recipes, for editor completion.

    \b
    Example:
      ftlaunch schema > recipe.schema.json
    """
    click.echo(json.dumps(json_schema(), indent=indent))


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: run the CLI and return its exit code."""
    try:
        cli.main(
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
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
