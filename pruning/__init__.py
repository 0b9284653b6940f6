"""The offline module: fine-tuning, compression stages, evaluation and the CLI."""
