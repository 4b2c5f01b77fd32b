"""The `testnet` command line: parse, load config, call one function per command, map errors.

`main()` is the only place that catches `HeteroTestnetError`: it prints one line,
`error: <message> (hint: <fix>)`, on stderr and exits 2 for bad input, 1 for a failed run, 130 for
Ctrl-C. Tracebacks are shown only with `--debug` (or HETERO_TESTNET_DEBUG=1). Flag parsers shared by
the commands live in `cli/options.py`; what the values mean is checked in `run/plan.py`.
"""

from __future__ import annotations

import os
import sys

import typer

from hetero_testnet.errors import HeteroTestnetError

app = typer.Typer(
    name="testnet",
    help="Heterogeneous (MatFormer-tier) distributed training on a local testnet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        from hetero_testnet import __version__
        try:
            torch_version = version("torch")
        except PackageNotFoundError:
            torch_version = "not installed"
        typer.echo(f"hetero-testnet {__version__} (torch {torch_version}, python {sys.version.split()[0]})")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version (and torch's) and exit.")) -> None:
    """Heterogeneous (MatFormer-tier) distributed training on a local testnet."""


def _register_subcommands() -> None:
    """Each command group lives in its own module; imported here so `--help` lists them all."""
    from hetero_testnet.cli import data as cli_data
    from hetero_testnet.cli import experiment as cli_experiment
    from hetero_testnet.cli import export as cli_export
    from hetero_testnet.cli import metrics as cli_metrics
    from hetero_testnet.cli import run as cli_run
    from hetero_testnet.cli import single as cli_single
    from hetero_testnet.cli import watch as cli_watch
    cli_run.register(app)
    cli_watch.register(app)
    cli_single.register(app)
    cli_export.register(app)
    cli_metrics.register(app)
    app.add_typer(cli_data.data_app, name="data")
    cli_experiment.register(app)


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("HETERO_TESTNET_DEBUG") == "1"


def main() -> None:
    argv = sys.argv[1:]
    debug = _debug_requested(argv)
    if "--debug" in argv:
        sys.argv.remove("--debug")
    try:
        _register_subcommands()
        code = app(standalone_mode=False)  # click returns a typer.Exit's code instead of raising
        sys.exit(code if isinstance(code, int) else 0)
    except HeteroTestnetError as e:
        if debug:
            raise
        _fail(str(e), e.hint, e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", None, 130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - usage errors arrive here too
        # Usage errors come from click or, in newer Typer, its vendored copy: match them by shape.
        if type(e).__name__ == "Abort":
            _fail("interrupted", None, 130)
        message, code = getattr(e, "format_message", None), getattr(e, "exit_code", None)
        if callable(message) and isinstance(code, int):
            ctx = getattr(e, "ctx", None)
            command = getattr(ctx, "command_path", None) or "testnet"
            _fail(message(), f"{command} -h shows the usage", code)
        if debug:
            raise
        _fail(f"internal error: {type(e).__name__}: {e}", "rerun with --debug for the traceback", 1)


def _fail(message: str, hint: str | None, code: int) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"error: {first_line}" + (f" (hint: {hint})" if hint else ""), file=sys.stderr)
    sys.exit(code)
