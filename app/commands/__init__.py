"""One module per group of `two-tower` subcommands; each adds its parsers and runs its jobs."""
