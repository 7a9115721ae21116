"""One module per CLI command; each defines `command`, a click command that calls the library."""
