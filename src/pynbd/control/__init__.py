"""The control plane: ``pynbd serve --control=PATH`` and its JSON-lines protocol.

    protocol.py  the line format as pure code (bytes in, events out), both sides
    server.py    the control socket's threads and the command table

Layers offer commands through ``pynbd.backend.Command``; ``pynbd ctl``
(``pynbd.tools.ctl``, whose docstring is the protocol's manual) calls them.
"""
