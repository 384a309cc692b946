"""``pynbd serve``: nbdkit's command line.

    pynbd serve [OPTIONS] PLUGIN [[KEY=]VALUE ...] [OPTIONS]

Options may stand before or after the plugin and its parameters; ``--``
ends them. Run ``pynbd serve --help`` for the list, ``pynbd serve PLUGIN
--help`` for a plugin's manual.
"""

from __future__ import annotations

import argparse
import ctypes
import grp
import importlib.util
import logging
import logging.handlers
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
from typing import Any

from .. import __version__
from ..backend import ConfigError
from ..backend.debugflags import set_debug_flag
from ..backend.linux import mlockall
from ..backend.plugin import Filter, Plugin
from ..backend.registry import builtin_names, find_filter, find_plugin
from ..backend.stack import Stack
from ..control.server import CommandTable, ControlSocket
from ..proto.constants import FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, NBD_DEFAULT_PORT
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


_ALL_GLOBAL_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES


def _mask(text: str) -> int:
    """--mask-handshake: an integer (0x.. and 0.. accepted), masked to the flags pynbd has."""
    try:
        return int(text, 0) & _ALL_GLOBAL_FLAGS
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer mask, got {text!r}") from None


def build_parser(options: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``options`` (if given) receives every option string."""
    p = argparse.ArgumentParser(prog=PROG, add_help=False,
                                usage="%(prog)s [OPTIONS] PLUGIN [[KEY=]VALUE ...]")

    def a(*names: str, **kwargs: Any) -> None:
        p.add_argument(*names, **kwargs)
        if options is not None:
            options.extend(n for n in names if n.startswith("-"))
    a("-p", "--port", type=int, help="TCP port to listen on (default 10809)")
    a("-i", "--ipaddr", "--ip-addr", help="listen only on this address")
    a("-4", "--ipv4-only", action="store_true", help="listen on IPv4 only")
    a("-6", "--ipv6-only", action="store_true", help="listen on IPv6 only")
    a("--vsock", action="store_true", help="AF_VSOCK (refused: pynbd does not listen on it)")
    a("-o", "--oldstyle", "--old-style", action="store_true",
      help="oldstyle protocol (refused: pynbd speaks newstyle only)")
    a("-U", "--unix", metavar="PATH", help="listen on a Unix socket ('-' for a private one)")
    a("-s", "--single", "--stdin", action="store_true", help="serve one client on stdin/stdout")
    a("-r", "--readonly", "--read-only", action="store_true", help="serve read-only")
    a("-e", "--exportname", "--export-name", "--export", help="the export name to serve and put in $uri")
    a("-f", "--foreground", "--no-fork", action="store_true", help="do not fork into the background")
    a("-P", "--pidfile", "--pid-file", help="write the server's process ID here")
    a("-u", "--user", help="after listening, run as this user (name or number)")
    a("-g", "--group", help="after listening, run as this group (name or number)")
    a("-D", "--debug", action="append", default=[], metavar="NAME.FLAG=N",
      help="set a plugin's, filter's or the server's debug flag (nbdkit-plugin(3), Debug Flags)")
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
    a("--mask-handshake", type=_mask, default=_ALL_GLOBAL_FLAGS, metavar="MASK",
      help="handshake flags offered: 1 fixed newstyle, 2 no zeroes (default 3)")
    a("--no-sr", action="store_true", help="refuse structured replies (and so block status)")
    a("--no-meta-contexts", action="store_true", help="refuse meta contexts (and so block status)")
    a("--print-uri", action="store_true", help="print the URI clients connect to")
    a("--swap", action="store_true", help="lock the server in memory (mlockall), to serve swap space")
    a("--selinux-label", metavar="LABEL", help="SELinux label of the listening socket")
    a("-n", "--newstyle", "--new-style", action="store_true",
      help="newstyle protocol (the only one; accepted for nbdkit)")
    a("--version", "-V", action="store_true", help="print the version and exit")
    a("--long-options", action="store_true", help="list the long options and exit")
    a("--short-options", action="store_true", help="list the short options and exit")
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
    if args.long_options or args.short_options:
        print(list_options(long=args.long_options))
        return 0
    if args.oldstyle:
        raise ConfigError("the oldstyle protocol is not supported (newstyle only)")
    if args.vsock:
        raise ConfigError("--vsock is not supported: pynbd listens on TCP and Unix sockets")
    for spec in args.debug:
        set_debug_flag(spec)
    if args.dump_plugin and args.single:
        raise ConfigError("--dump-plugin cannot be used with -s")
    if not args.words:
        if args.version:
            print(f"pynbd {__version__}")
            return 0
        if args.help:
            print(general_help())
            return 0
        raise ConfigError("no plugin named; try 'pynbd serve --help'")
    plugin_name, plugin_args = args.words[0], args.words[1:]
    if args.help or args.version:
        plugin_cls = find_plugin(plugin_name)
        if args.help:
            print(plugin_help(plugin_cls, [find_filter(f) for f in args.filter]))
        else:
            print(f"{plugin_cls.name} {plugin_cls.version or __version__}")
        return 0
    if args.dump_plugin:
        print_dump_plugin(plugin_name, plugin_args, args.filter)
        return 0
    if args.single and _script_on_stdin(plugin_name, plugin_args):
        raise ConfigError("an inline script read from standard input is incompatible with -s")
    if args.swap:
        _lock_memory()
    _setup_logging(args)  # before configuring: -v shows what plugins say then (-D data.AST=1)
    stack = Stack.from_args(plugin_name, plugin_args, args.filter)
    if args.exit_with_parent:
        _exit_with_parent()
    config = SessionConfig(stack=stack, dispatch=plan_for(stack, args.threads),
                           readonly=args.readonly, tls=args.tls, exportname=args.exportname,
                           description=args.description, handshake_timeout=args.timeout or None,
                           keepalive=args.keepalive, global_flags=args.mask_handshake,
                           structured_replies=not args.no_sr, meta_contexts=not args.no_meta_contexts)
    if args.tls != "off":
        if args.tls_psk:
            config.ssl_context = psk_context(args.tls_psk)
        elif args.tls_certificates:
            config.ssl_context = server_context(args.tls_certificates, args.tls_verify_peer)
        else:
            raise ConfigError("--tls needs --tls-certificates=DIR or --tls-psk=FILE")
    if args.single:
        return _serve_single(config, stack, args)
    stack.get_ready()  # before listening: a refusal leaves no socket behind
    _selinux_label(args.selinux_label)
    listener = _make_listener(args)
    _change_user(args.user, args.group)
    if args.print_uri:
        print(listener.uri(args.exportname or "", tls=args.tls == "require"), flush=True)
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


def _serve_single(config: SessionConfig, stack: Stack, args: argparse.Namespace) -> int:
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
    _change_user(args.user, args.group)
    _bind_control(server, args.control)
    stack.after_fork()
    if server.control is not None:
        server.control.start()
    server.serve_one(sock)
    return 0


def _script_on_stdin(plugin_name: str, plugin_args: list[str]) -> bool:
    """Whether the plugin reads its script from standard input (``sh -``), which -s needs."""
    plugin_cls = find_plugin(plugin_name)
    magic = plugin_cls.magic_param
    return magic == "script" and any(arg in ("-", f"{magic}=-") for arg in plugin_args)


def _lock_memory() -> None:
    """--swap: mlockall, so that serving swap space never waits on swapping the server."""
    try:
        mlockall()
    except OSError as exc:
        raise ConfigError(f"--swap: mlockall: {exc.strerror}") from None


def _selinux_label(label: str | None) -> None:
    """--selinux-label: the label of sockets created from now on (where SELinux is enabled)."""
    if label is None:
        return
    if not os.path.exists("/sys/fs/selinux/enforce"):
        log.warning("--selinux-label=%s ignored: SELinux is not enabled on this system", label)
        return
    try:
        with open(f"/proc/{threading.get_native_id()}/attr/sockcreate", "w") as f:
            f.write(label)
    except OSError as exc:
        raise ConfigError(f"--selinux-label={label}: {exc.strerror}") from None


def _change_user(user: str | None, group: str | None) -> None:
    """-u/-g: drop to this user and group once the sockets are bound, as nbdkit does."""
    try:
        if group is not None:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
            if os.getuid() == 0:
                os.setgroups([gid])
            os.setgid(gid)
        if user is not None:
            uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
            os.setuid(uid)
    except KeyError as exc:
        raise ConfigError(f"-u/-g: no such user or group: {exc.args[0]}") from None
    except OSError as exc:
        raise ConfigError(f"-u/-g: cannot change to {user or ''}:{group or ''}: {exc.strerror}") from None


def _make_listener(args: argparse.Namespace) -> Listener:
    inherited = Listener.systemd()
    if inherited is not None:
        return inherited
    if args.unix:
        return Listener.unix(args.unix)
    address = args.ipaddr or ("0.0.0.0" if args.ipv4_only else "::" if args.ipv6_only else None)
    return Listener.tcp(address, args.port if args.port is not None else NBD_DEFAULT_PORT)


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
    sections = [parser.format_help()]
    for kind, label in ((Plugin, "Plugins"), (Filter, "Filters")):
        names = builtin_names(kind)
        width = max(map(len, names)) + 2
        sections.append(f"{label}:\n" + "\n".join(f"  {n:<{width}}{_summary(kind, n)}" for n in names))
    sections.append(f"Default plugin for a demo: {DEFAULT_PLUGIN} (pynbd serve memory 1G).\n"
                    "'pynbd serve PLUGIN --help' prints that plugin's manual.")
    return "\n\n".join(sections)


def _summary(kind: type, name: str) -> str:
    """The first line of a plugin's or filter's manual, without its name."""
    try:
        layer = find_plugin(name) if kind is Plugin else find_filter(name)
    except ConfigError as exc:
        return f"(cannot be loaded here: {exc})"
    module = sys.modules.get(layer.__module__)
    doc = (module.__doc__ if module is not None and module.__doc__ else layer.__doc__) or ""
    first = doc.strip().partition("\n")[0]
    return first.split(": ", 1)[1] if first.startswith(f"{name}: ") else first


def list_options(long: bool) -> str:
    """--long-options / --short-options: one option a line, as nbdkit prints them."""
    names: list[str] = []
    build_parser(names)
    return "\n".join(sorted(n for n in names if n.startswith("--") == long))


def plugin_help(plugin_cls: type[Plugin], filter_classes: list[type[Filter]]) -> str:
    sections = []
    for layer in [plugin_cls, *filter_classes]:
        module = sys.modules.get(layer.__module__)
        doc = (module.__doc__ if module is not None and module.__doc__ else layer.__doc__) or ""
        params = "\n".join("  " + p.describe() for p in layer.params) or "  (none)"
        sections.append(f"{doc.strip()}\n\nParameters of {layer.name}:\n{params}")
    return "\n\n".join(sections)


_HOOKS = ("config_complete", "get_ready", "after_fork", "list_exports", "default_export",
          "list_meta_contexts", "unload", "dump_plugin")


def print_dump_plugin(plugin_name: str, plugin_args: list[str], filter_names: list[str]) -> None:
    """nbdkit's ``--dump-plugin``: ``key=value`` lines about a plugin, then its own.

    The plugin is configured first (a script plugin's ``dump_plugin`` then runs
    its script); one that cannot be configured without parameters is not.
    """
    plugin_cls = find_plugin(plugin_name)
    filters = [find_filter(f) for f in filter_names]
    try:
        plugin = Stack.from_args(plugin_name, plugin_args, filter_names).plugin
    except ConfigError:
        if plugin_args:
            raise
        plugin = plugin_cls.__new__(plugin_cls)
    layers: list[type[Plugin] | type[Filter]] = [*filters, plugin_cls]
    model = min(layer.thread_model for layer in layers)
    module = sys.modules.get(plugin_cls.__module__)
    lines = [f"path={getattr(module, '__file__', None) or plugin_name}", f"name={plugin_cls.name}",
             f"version={plugin_cls.version or __version__}", "api_version=2",
             f"max_thread_model={plugin_cls.thread_model.name.lower()}",
             f"thread_model={model.name.lower()}", "errno_is_preserved=1"]
    if plugin_cls.magic_param:
        lines.append(f"magic_config_key={plugin_cls.magic_param}")
    lines += [f"has_{hook}=1" for hook in _HOOKS
              if getattr(plugin_cls, hook, None) is not getattr(Plugin, hook, None)]
    lines.append(f"has_thread_model={int(plugin_cls.get_thread_model is not Plugin.get_thread_model)}")
    lines.append("max_known_status=2")
    for layer in layers:
        for param in layer.params:
            lines.append(f"{layer.name}.{param.name}={param.type}")
    print("\n".join(lines), flush=True)
    for line in plugin.dump_plugin():  # a script's own lines may be printed as it runs
        print(line)


def dump_config() -> str:
    """nbdkit's ``--dump-config`` keys, with pynbd's values."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bindir = os.path.dirname(shutil.which("pynbd") or sys.executable)
    major, minor = (__version__.split(".") + ["0", "0"])[:2]
    values = {"binary": shutil.which("pynbd") or sys.argv[0], "bindir": bindir,
              "exit_with_parent": "yes", "filterdir": os.path.join(package, "filters"),
              "host_cpu": platform.machine(), "host_os": f"{sys.platform}-gnu",
              "libdir": sysconfig.get_path("purelib"), "mandir": "", "name": "pynbd",
              "plugindir": os.path.join(package, "plugins"),
              "python": sys.version.split()[0], "root_tls_certificates_dir": "/etc/pki/pynbd",
              "sbindir": bindir, "selinux": "yes" if os.path.exists("/sys/fs/selinux") else "no",
              "sysconfdir": "/etc", "tls": "yes", "version": __version__,
              "version_major": major, "version_minor": minor,
              "zstd": "yes" if importlib.util.find_spec("zstandard") else "no"}
    return "\n".join(f"{key}={value}" for key, value in sorted(values.items()))
