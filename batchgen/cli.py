"""The `batchgen` command: it parses arguments and calls functions of batchgen, nothing more.

Exit codes (what a scheduler can act on):
    run, validate   0 ok; 1 the job failed (error budget exceeded, workers could not start);
                    2 bad spec, unusable input, or an output location holding another job
    status          0 the job succeeded; 1 it failed or is not finished; 2 no job at that location
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from batchgen.errors import EXIT_BAD_JOB, EXIT_JOB_FAILED, EXIT_OK, BatchgenError

_SET_HELP = "Override a spec key, e.g. --set sampling.seed=7 (repeatable; values are read as TOML)."


class _Group(click.Group):
    """Turns batchgen's own errors into a one-line message and their exit code, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BatchgenError as error:
            click.echo(f"batchgen: error: {error}", err=True)
            ctx.exit(error.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run Llama-family models over tables of prompts, offline, on Ray.

    A job is one TOML spec (see jobs/ and the README's job spec reference).
    """


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else an embedded Ray).")
@click.option("--overwrite", is_flag=True, help="Delete what the output location holds before starting.")
@click.option(
    "--progress/--no-progress", default=None, help="Show the progress bar (default: when stderr is a terminal)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
def run(
    job: Path, overrides: tuple[str, ...], address: str | None, overwrite: bool, progress: bool | None, as_json: bool
) -> None:
    """Run the job in JOB to the end; a rerun resumes, skipping committed shards."""
    from batchgen.job import run_job
    from batchgen.spec import load_spec

    spec = load_spec(job, overrides)
    show = sys.stderr.isatty() if progress is None else progress
    summary = run_job(spec, address=address, overwrite=overwrite, progress=show)
    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.render())
    sys.exit(summary.exit_code)


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--skip-model-check", is_flag=True, help="Do not check that model.preset exists.")
def validate(job: Path, overrides: tuple[str, ...], skip_model_check: bool) -> None:
    """Check JOB's spec, input schema and output location without loading the model."""
    from batchgen.job import validate_job
    from batchgen.spec import load_spec

    validation = validate_job(load_spec(job, overrides), check_model=not skip_model_check)
    click.echo(validation.render())
    sys.exit(EXIT_OK)


@cli.command()
@click.argument("output")
@click.option(
    "-o", "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="An fsspec storage option for OUTPUT, e.g. -o 'client_kwargs={endpoint_url=\"http://host:9000\"}'.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(output: str, storage_options: tuple[str, ...], as_json: bool) -> None:
    """Show shards done / pending / failed, rows and tokens of the job output at OUTPUT.

    OUTPUT is the output URL, or a job spec (.toml), whose output.url and storage options are used.
    """
    from batchgen.overrides import parse_assignment
    from batchgen.status import read_status

    options: dict[str, Any] = {}
    if output.endswith(".toml") and Path(output).is_file():
        from batchgen.spec import load_spec

        spec = load_spec(output)
        output, options = spec.output.url, dict(spec.output.storage_options)
    for assignment in storage_options:
        path, value = parse_assignment(assignment, lambda _: None)
        options[".".join(path)] = value
    result = read_status(output, options)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.render())
    codes = {"succeeded": EXIT_OK, "empty": EXIT_BAD_JOB}
    sys.exit(codes.get(result.status, EXIT_JOB_FAILED))


@cli.command()
def presets() -> None:
    """List the built-in model presets, where each comes from and whether it loads offline here.

    Any local or fsspec checkpoint path, kaggle:// or hf:// handle works as well.
    """
    from model.checkpoints.availability import check_preset
    from model.checkpoints.presets import list_presets

    for preset in list_presets():
        # No network probe: a listing should not wait on hubs; `batchgen validate` asks them.
        found = check_preset(preset.name, probe_network=False)
        where = "offline" if found.offline else "needs download" if found.problem is None else "not available here"
        click.echo(f"{preset.name:28} {preset.params / 1e9:6.2f}B  {where:18}  {found.source}")
        click.echo(f"{'':28} {preset.description}")
        if found.problem is not None:
            click.echo(f"{'':28} why: {found.problem}")


from batchgen.bench.command import bench  # noqa: E402  (light: the benchmark loads when the command runs)

cli.add_command(bench)


def main() -> None:
    """The console script's entry point."""
    cli(prog_name="batchgen")


if __name__ == "__main__":
    main()
