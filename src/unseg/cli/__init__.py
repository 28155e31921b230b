"""The ``unseg`` command line: argument parsing only; each command calls one library function."""
