"""Command-line entry points of the regpipe library (the ``regpipe-*`` console scripts)."""
