"""The agent's file writes are estkit's: see ``estkit.fileio``."""

from estkit.fileio import PRIVATE, PRIVATE_DIR, PUBLIC, fsync_directory, replace_file, write_new

__all__ = ["PRIVATE", "PRIVATE_DIR", "PUBLIC", "fsync_directory", "replace_file", "write_new"]
