"""``python -m pruning.cli``: the ``prunerec`` command line under the module name ``../shared/gpu/`` (setup.sh's
alias, README.md's commands) uses; the command line itself lives in :mod:`cli.main`."""

from cli.main import run_cli

if __name__ == "__main__":
    run_cli()
