"""``pynbd serve``: nbdkit's command line.

    pynbd serve [OPTIONS] PLUGIN [[KEY=]VALUE ...] [OPTIONS]

Options may stand before or after the plugin and its parameters; ``--``
ends them. Run ``pynbd serve --help`` for the list, ``pynbd serve PLUGIN
--help`` for a plugin's manual.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import logging.handlers
import os
import signal
import socket
import subprocess
import sys
import threading

from .. import __version__
from ..backend import ConfigError
from ..backend.plugin import Filter, Plugin
from ..backend.registry import builtin_names, find_filter, find_plugin
from ..backend.stack import Stack
from ..control.server import CommandTable, ControlSocket
from ..proto.constants import NBD_DEFAULT_PORT
from .dispatch import plan_for
from .server import Listener, Server
from .session import DEFAULT_HANDSHAKE_TIMEOUT, SessionConfig
from .tls import psk_context, server_context

PROG = "pynbd serve"
DEFAULT_PLUGIN = "memory"
log = logging.getLogger("pynbd.server")


def _threads(text: str) -> int:
    """-t: a positive number of threads."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of threads, got {text!r}")
    return value


def _seconds(text: str) -> float:
    """--timeout: a number of seconds, 0 for none."""
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, add_help=False,
                                usage="%(prog)s [OPTIONS] PLUGIN [[KEY=]VALUE ...]")
    a = p.add_argument
    a("-p", "--port", type=int, help="TCP port to listen on (default 10809)")
    a("-i", "--ipaddr", help="listen only on this address")
    a("-U", "--unix", metavar="PATH", help="listen on a Unix socket ('-' for a private one)")
    a("-s", "--single", action="store_true", help="serve one client on stdin/stdout")
    a("-r", "--readonly", action="store_true", help="serve read-only")
    a("-e", "--exportname", help="the export name to serve and put in $uri")
    a("-f", "--foreground", action="store_true", help="do not fork into the background")
    a("-P", "--pidfile", help="write the server's process ID here")
    a("--exit-with-parent", action="store_true", help="exit when the parent process exits")
    a("-t", "--threads", type=_threads, default=None,
      help="requests of one connection run at once (see pynbd.server.dispatch; default: 1 where "
           "all layers' requests are short, else 16)")
    a("-v", "--verbose", action="store_true", help="debug messages")
    a("--log", choices=("stderr", "syslog", "null"), help="where messages go")
    a("--run", metavar="CMD", help="run CMD with $uri set, then exit with its status")
    a("--control", metavar="PATH", help="serve control commands on this Unix socket (pynbd ctl PATH help)")
    a("--filter", action="append", default=[], metavar="NAME", help="add a filter (first is outermost)")
    a("--tls", choices=("off", "on", "require"), default="off", help="TLS mode")
    a("--tls-certificates", metavar="DIR", help="directory of ca-cert.pem, server-cert.pem, server-key.pem")
    a("--tls-verify-peer", action="store_true", help="require a client certificate signed by the CA")
    a("--tls-psk", metavar="FILE", help="TLS with pre-shared keys (psktool's format; Python 3.13+)")
    a("--description", default="", help="export description sent to clients")
    a("--timeout", type=_seconds, default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="SECS",
      help=f"drop a client that has not finished the handshake after SECS seconds "
           f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g}; 0: never)")
    a("--keepalive", action="store_true", help="TCP keepalives: find clients that vanished")
    a("-n", "--newstyle", action="store_true", help="newstyle protocol (the only one; accepted for nbdkit)")
    a("--version", action="store_true", help="print the version and exit")
    a("--help", "-h", action="store_true", help="this help, or a plugin's manual")
    a("--dump-plugin", action="store_true", help="print the plugin's settings and exit")
    a("--dump-config", action="store_true", help="print the build configuration and exit")
    a("words", nargs="*", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        return _main(args)
    except ConfigError as exc:
        print(f"pynbd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _main(args: argparse.Namespace) -> int:
    if args.dump_config:
        print(dump_config())
        return 0
    if not args.words:
        if args.version:
            print(f"pynbd {__version__}")
            return 0
        if args.help:
            print(general_help())
            return 0
        raise ConfigError("no plugin named; try 'pynbd serve --help'")
    plugin_name, plugin_args = args.words[0], args.words[1:]
    if args.help or args.version or args.dump_plugin:
        plugin_cls = find_plugin(plugin_name)
        filter_classes = [find_filter(f) for f in args.filter]
        if args.help:
            print(plugin_help(plugin_cls, filter_classes))
        elif args.version:
            print(f"{plugin_cls.name} {plugin_cls.version or __version__}")
        else:
            print(dump_plugin(plugin_cls, filter_classes))
        return 0
    stack = Stack.from_args(plugin_name, plugin_args, args.filter)
    _setup_logging(args)
    if args.exit_with_parent:
        _exit_with_parent()
    config = SessionConfig(stack=stack, dispatch=plan_for(stack, args.threads),
                           readonly=args.readonly, tls=args.tls, exportname=args.exportname,
                           description=args.description, handshake_timeout=args.timeout or None,
                           keepalive=args.keepalive)
    if args.tls != "off":
        if args.tls_psk:
            config.ssl_context = psk_context(args.tls_psk)
        elif args.tls_certificates:
            config.ssl_context = server_context(args.tls_certificates, args.tls_verify_peer)
        else:
            raise ConfigError("--tls needs --tls-certificates=DIR or --tls-psk=FILE")
    if args.single:
        return _serve_single(config, stack, args.control)
    stack.get_ready()  # before listening: a refusal leaves no socket behind
    listener = _make_listener(args)
    server = Server(config, listener)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # from now on a signal cleans up
        signal.signal(sig, lambda *_: server.shutdown())
    _bind_control(server, args.control)
    pidfile = os.path.abspath(args.pidfile) if args.pidfile else ""  # before chdir("/")
    ready_fd = None
    if not (args.foreground or args.run or args.exit_with_parent or listener.activated):
        ready_fd = _daemonize()
    if args.pidfile:
        _write_pidfile(pidfile)
    stack.after_fork()
    if server.control is not None:
        server.control.start()
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    status = [0]
    if args.run:
        uri = listener.uri(args.exportname or "", tls=args.tls == "require")
        threading.Thread(target=_run_command, args=(args, listener, uri, server, status),
                         daemon=True).start()
    server.serve_forever()
    return status[0]


def _bind_control(server: Server, path: str | None) -> None:
    """--control=PATH: bind in the foreground, so that a refusal reaches the terminal."""
    if path is None:
        return
    try:
        server.control = ControlSocket.bind(path, CommandTable.for_stack(server.config.stack,
                                                                          server.connection_count))
    except ConfigError:
        server.listener.close()
        raise


def _serve_single(config: SessionConfig, stack: Stack, control: str | None) -> int:
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        raise ConfigError("cannot use socket activation with -s/--single")
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        raise ConfigError("--single needs a socket on standard input") from None
    if sock.type != socket.SOCK_STREAM:
        raise ConfigError("--single needs a stream socket on standard input")
    server = Server(config, Listener([]))
    stack.get_ready()
    _bind_control(server, control)
    stack.after_fork()
    if server.control is not None:
        server.control.start()
    server.serve_one(sock)
    return 0


def _make_listener(args: argparse.Namespace) -> Listener:
    inherited = Listener.systemd()
    if inherited is not None:
        return inherited
    if args.unix:
        return Listener.unix(args.unix)
    return Listener.tcp(args.ipaddr, args.port if args.port is not None else NBD_DEFAULT_PORT)


def _run_command(args: argparse.Namespace, listener: Listener, uri: str, server: Server,
                 status: list[int]) -> None:
    env = dict(os.environ, uri=uri, nbd=uri, exportname=args.exportname or "",
               port=str(listener.port or ""), unixsocket=listener.unix_path or "")
    if args.tls != "off":
        env["tls"] = "1" if args.tls == "on" else "2"
    try:
        status[0] = _exit_status(subprocess.call(["/bin/sh", "-c", args.run], env=env))
    finally:
        server.shutdown()


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def _setup_logging(args: argparse.Namespace) -> None:
    root = logging.getLogger("pynbd")
    root.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.log == "null":
        root.addHandler(logging.NullHandler())
        root.propagate = False
        return
    if args.log == "syslog" or (args.log is None and not (args.foreground or args.run
                                                           or args.verbose or args.single)):
        handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log") \
            if os.path.exists("/dev/log") else logging.StreamHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pynbd: %(message)s"))
    root.addHandler(handler)
    root.propagate = False


def _exit_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _write_pidfile(path: str) -> None:
    """Write our PID so that a reader never sees a partial file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"cannot write pidfile {path}: {exc.strerror}") from None


def _daemonize() -> int:
    """Fork into the background like nbdkit.

    The original process exits only when the daemon writes a byte to the
    returned pipe (it listens, its pidfile is written), with status 1 if
    the daemon died first.
    """
    ready_r, ready_w = os.pipe()
    if os.fork() > 0:
        os.close(ready_w)
        os._exit(0 if os.read(ready_r, 1) else 1)
    os.close(ready_r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.chdir("/")
    return ready_w


# ---------------------------------------------------------------- help texts

def general_help() -> str:
    parser = build_parser()
    plugins = ", ".join(builtin_names(Plugin))
    filters = ", ".join(builtin_names(Filter))
    return (f"{parser.format_help()}\nPlugins: {plugins}\nFilters: {filters}\n\n"
            f"Default plugin for a demo: {DEFAULT_PLUGIN} (pynbd serve memory 1G).\n"
            "'pynbd serve PLUGIN --help' prints that plugin's manual.")


def plugin_help(plugin_cls: type[Plugin], filter_classes: list[type[Filter]]) -> str:
    sections = []
    for layer in [plugin_cls, *filter_classes]:
        module = sys.modules.get(layer.__module__)
        doc = (module.__doc__ if module is not None and module.__doc__ else layer.__doc__) or ""
        params = "\n".join("  " + p.describe() for p in layer.params) or "  (none)"
        sections.append(f"{doc.strip()}\n\nParameters of {layer.name}:\n{params}")
    return "\n\n".join(sections)


def dump_plugin(plugin: type[Plugin], filters: list[type[Filter]]) -> str:
    """nbdkit-style ``key=value`` lines about a plugin (no parameters needed)."""
    layers: list[type[Plugin] | type[Filter]] = [*filters, plugin]
    model = min(layer.thread_model for layer in layers)
    lines = [f"name={plugin.name}", f"version={plugin.version or __version__}",
             "api_version=2", f"thread_model={model.name.lower()}"]
    if plugin.magic_param:
        lines.append(f"magic_config_key={plugin.magic_param}")
    for layer in layers:
        for param in layer.params:
            lines.append(f"{layer.name}.{param.name}={param.type}")
    return "\n".join(lines)


def dump_config() -> str:
    return "\n".join([f"binary={sys.argv[0]}", "name=pynbd", f"version={__version__}",
                      f"python={sys.version.split()[0]}", "tls=yes", "exit_with_parent=yes"])
