"""The command line: ``main`` (parser; known errors -> one line, exit 2) and one module per command."""
