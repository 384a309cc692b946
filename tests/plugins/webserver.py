"""Web servers for the curl plugin's tests and benchmarks: nginx, and a misbehaving one.

    from webserver import nginx, test_ca, BadServer

    with nginx(docroot) as web:                 # HTTP and HTTPS on 127.0.0.1
        web.http("disk.img")                    # http://127.0.0.1:PORT/disk.img
        web.https("auth/disk.img")              # needs web.ca (cainfo=) and user/password
    with BadServer(size=4096, on_get="hang") as bad:
        bad.url                                 # HEAD answers; GET hangs, resets, fails…

``nginx`` runs Debian's nginx as the test's own process (no daemon, no
master) with a temporary configuration, certificates from a throwaway CA made
with openssl, and these locations under the document root:

    /NAME               the file, with byte ranges
    /auth/NAME          basic auth: user "alice", password "s3cret"
    /cookie/NAME        403 unless the cookie "session=ok" is sent
    /header/NAME        403 unless the header "X-Token: ok" is sent
    /redirect/NAME      302 to /NAME
    /norange/NAME       the file with byte ranges turned off (max_ranges 0)
    /missing            404; /forbidden 403; /broken 503

``BadServer`` is a small Python HTTP server whose HEAD gives a size and whose
GETs misbehave as asked: "hang" (never answer), "reset" (close the
connection), "503" (always), "flaky" (503 twice, then the right bytes),
"grow" (a Content-Range with another total size), "gate" (answer rightly,
but only once ``release`` is set; ``active`` and ``most`` count the GETs
waiting at once), "ok".
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nbdtest import wait_for
from pynbd.process import stop_process

USER, PASSWORD = "alice", "s3cret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ca(directory: str) -> tuple[str, str, str]:
    """A CA and a certificate for 127.0.0.1/localhost signed by it: (ca, cert, key) paths."""
    ca_key, ca = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.pem")
    key, csr, cert = (os.path.join(directory, n) for n in ("server.key", "server.csr", "server.pem"))
    ext = os.path.join(directory, "ext.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "2", "-subj", "/CN=pynbd test CA"],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ]
    for argv in steps:
        subprocess.run(argv, check=True, capture_output=True)
    return ca, cert, key


_CONFIG = """\
daemon off;
master_process {master};
worker_processes {workers};
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{http};
        listen 127.0.0.1:{https} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
        location / {{ }}
        location /auth/ {{
            alias {root}/;
            auth_basic "pynbd";
            auth_basic_user_file {tmp}/htpasswd;
        }}
        location /cookie/ {{
            alias {root}/;
            if ($cookie_session != "ok") {{ return 403; }}
        }}
        location /header/ {{
            alias {root}/;
            if ($http_x_token != "ok") {{ return 403; }}
        }}
        location /redirect/ {{ rewrite ^/redirect/(.*)$ /$1 redirect; }}
        location /norange/ {{ alias {root}/; max_ranges 0; }}
        location = /missing {{ return 404; }}
        location = /forbidden {{ return 403; }}
        location = /broken {{ return 503; }}
    }}
}}
"""


@dataclass
class Nginx:
    http_port: int
    https_port: int
    ca: str
    directory: str

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}/{path}"

    def https(self, path: str) -> str:
        return f"https://127.0.0.1:{self.https_port}/{path}"

    def error_log(self) -> str:
        with open(os.path.join(self.directory, "error.log")) as f:
            return f.read()


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def nginx(root: str, workers: int = 1) -> Iterator[Nginx]:
    """nginx serving ``root`` over HTTP and HTTPS on fresh ports of 127.0.0.1.

    One process (no master) unless ``workers`` > 1 (the benchmarks).
    """
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        raise RuntimeError("nginx is not installed (scripts/install-deps installs it)")
    tmp = tempfile.mkdtemp(prefix="pynbd-nginx")
    try:
        ca, cert, key = test_ca(tmp)
        with open(os.path.join(tmp, "htpasswd"), "w") as f:
            f.write(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        http, https = free_port(), free_port()
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(_CONFIG.format(tmp=tmp, http=http, https=https, cert=cert, key=key,
                                   root=os.path.abspath(root), master="on" if workers > 1 else "off",
                                   workers=workers))
        proc = subprocess.Popen(["/usr/sbin/nginx", "-p", tmp, "-c", conf, "-e", f"{tmp}/error.log"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"nginx exited with {proc.returncode}: {err}")
                return _accepts(http) and _accepts(https)

            wait_for(up, message="nginx is not listening")
            yield Nginx(http, https, ca, tmp)
        finally:
            stop_process(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BadServer:
    """An HTTP server on 127.0.0.1 that misbehaves on GET (see the module docstring)."""

    def __init__(self, size: int, on_get: str) -> None:
        self.size = size
        self.on_get = on_get
        self.gets = 0
        self.active = self.most = 0
        self.counting = threading.Lock()
        self.data = bytes(range(256)) * (size // 256 + 1)
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return None

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(server.size))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self) -> None:
                server.gets += 1
                behaviour = server.on_get
                if behaviour == "gate":
                    with server.counting:
                        server.active += 1
                        server.most = max(server.most, server.active)
                    server.release.wait(60)
                    with server.counting:
                        server.active -= 1
                if behaviour == "hang":
                    server.release.wait(60)
                    self.close_connection = True
                    return
                if behaviour == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    return
                if behaviour == "503" or (behaviour == "flaky" and server.gets <= 2):
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                first, last = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
                total = server.size * 2 if behaviour == "grow" else server.size
                body = server.data[first:last + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{total}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/disk.img"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> BadServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
