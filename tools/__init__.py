"""Command-line tools of the collection: ``python -m tools <command> --help``."""
