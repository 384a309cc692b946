"""The NBD client library."""
