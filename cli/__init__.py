"""The `vlm-adapters` command line (typer)."""
