"""The NBD protocol without I/O: constants, message codecs, handshake state machines.

Nothing in this package touches a socket; the server and the client drive it.
"""
