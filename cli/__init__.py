"""The ``prunerec`` command line: one subcommand per stage (DESIGN.md §2).

Module-level imports stay light (typer only): every command imports what it runs, so that ``prunerec serve``
loads ``app``, ``llmrec`` and ``recdata`` and never the offline packages (``pruning``, ``bench``, peft).
"""
