"""The package version, in a module of its own: lower layers (the lockfile, the server's
/info) read it without importing the public API above them."""

__version__ = "0.1.0"
