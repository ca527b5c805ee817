"""The ``twopc`` command line: click commands that parse arguments, call and print."""
