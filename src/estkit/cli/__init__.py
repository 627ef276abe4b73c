"""The ``estkit`` command: parses arguments and config, wires objects, prints results."""
