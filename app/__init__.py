"""The `two-tower` command line and the end-to-end demo, on top of every stage."""
