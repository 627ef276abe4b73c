"""Pure X.509 and EST wire formats. No sockets, files, clock or environment."""
