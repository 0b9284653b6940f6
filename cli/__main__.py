"""``python -m cli``: the ``prunerec`` command line (as the console script, for images and `accelerate launch`)."""

from cli.main import run_cli

run_cli()
