"""The NBD server: sockets, TLS, the handshake driver and request dispatch."""
