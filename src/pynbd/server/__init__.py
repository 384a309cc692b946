"""The NBD server: sockets, TLS, the handshake driver and request dispatch.

The request path, from the socket to the plugin and back:

``server.Server`` accepts a client and starts a ``session.Session`` on a
thread of its own. The session wraps the socket in a ``channel.Channel`` (the
only object that touches it from then on) and drives the sans-IO handshake,
``proto.server_handshake.ServerHandshake``: bytes in, events out. When the
handshake asks ``OpenExport``, the session opens the stack through
``catalog.StackCatalog``; ``backend.Stack.open`` wraps every layer, the
plugin and each filter, in a checked ``backend.layer.Layer`` that asks its
size and capabilities once and checks every call made into it. Once the
client chose an export, the session builds the transmission phase: the pure
protocol core ``proto.server_transmission.ServerTransmission`` (parse,
check and answer requests under the negotiated terms), a
``runner.RequestRunner`` (one request: check it with the core, call the top
``Layer``, frame the reply with the core, send it) and a
``reader.RequestReader`` (receive requests in batches and hand each to
``execute``). Where ``execute`` runs is the one rule in ``dispatch.plan``:
on the reading thread, replies collected in a ``channel.ReplyBatch`` and
sent together, when every layer's requests are short; else on a
``dispatch.WorkerPool`` of ``-t`` threads that send their own replies.

Modules, each with one job:

    server.py    listeners, the accept loop, the server's lifetime
    session.py   one connection's life: handshake, transmission, close
    catalog.py   the stack seen by the handshake: list and open exports
    channel.py   the client's socket: exact receives, sendmsg, reply batching
    reader.py    receive requests in batches, parse, hand each on
    runner.py    run one request on the stack and send its reply
    dispatch.py  where requests run (the rule) and the worker pool
    tls.py       TLS contexts
    cli.py       ``pynbd serve``, nbdkit's command line
    embed.py     ``pynbd.serve(...)``: a server inside a program or a test
"""
