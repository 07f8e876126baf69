"""The `cegraph` command line, one module per command group."""
