"""Thin HTTP adapters: EST routes, authentication, the one place errors become statuses."""
