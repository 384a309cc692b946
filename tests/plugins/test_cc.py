"""The cc plugin: nbdkit C plugins compiled at load (files and ./plugin.c scripts), and
nbdkit's own .so plugins, against qemu-img, nbdcopy, nbdsh and Debian's nbdkit cc."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys

import pytest

from nbdtest import SERVE, nbdsh, run, served, wait_for

HERE = os.path.join(os.path.dirname(__file__), "cc")
RAMDISK = os.path.join(HERE, "ramdisk.c")
FEATURES = os.path.join(HERE, "features.c")
VERSION1 = os.path.join(HERE, "version1.c")
INCLUDE = os.path.join(os.path.dirname(__file__), "..", "..", "src", "pynbd", "plugins", "cc_include")
DEBIAN_PLUGINS = "/usr/lib/x86_64-linux-gnu/nbdkit/plugins"
MiB = 1 << 20

# A client's view of errors: the errno of a failed request, or "ok".
ERRNO_OF = """
import nbd
def errno_of(call):
    try:
        call()
        return "ok"
    except nbd.Error as e:
        return e.errnum
"""


def env_with_pynbd() -> dict[str, str]:
    """PATH with the directory of this interpreter first, so a script's ``exec pynbd`` finds it."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    return env


def serve_run(*args: str, command: str, check: bool = True, env: dict[str, str] | None = None):
    return run([*SERVE, "-U", "-", *args, "--run", command], check=check, timeout=120,
               env=env)


def refused(*args: str) -> tuple[str, str]:
    """A configuration pynbd refuses: (its last stderr line, all of stderr)."""
    result = serve_run(*args, command="true", check=False)
    stderr = result.stderr.decode()
    assert result.returncode == 1, result
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("pynbd: error: ") and "Traceback" not in stderr, stderr
    return last, stderr


def c_file(tmp_path, text: str, name: str = "plugin.c") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- the RAM disk script
def test_script_ramdisk_with_nbdcopy_and_qemu_img(tmp_path):
    """./ramdisk.c (100 MiB) filled by nbdcopy and compared by qemu-img; holes where
    nothing was written."""
    image = tmp_path / "source.img"
    with open(image, "wb") as f:
        f.truncate(100 * MiB)
        for where in (0, 37 * MiB, 99 * MiB):
            f.seek(where)
            f.write(os.urandom(MiB))
    # Started from a shell, as a user does: without a #! line, the shell runs the file itself.
    result = run(["sh", "-c", 'exec "$@"', "sh", RAMDISK, "-U", "-", "--run",
                  f"nbdcopy --destination-is-zero {image} \"$uri\" && "
                  f"qemu-img compare -f raw -F raw {image} \"$uri\" && nbdinfo --map \"$uri\""],
                 env=env_with_pynbd())
    lines = [line.split() for line in result.stdout.decode().splitlines()
             if line.split()[0].isdigit()]
    assert [int(n) for n in lines[0][:3]] == [0, MiB, 0]
    data = [(int(o), int(n)) for o, n, kind, *_ in lines if kind == "0"]
    assert data == [(0, MiB), (37 * MiB, MiB), (99 * MiB, MiB)]
    assert b"Images are identical" in result.stdout


def test_run_with_size_parameter_and_qemu_img(tmp_path):
    copy = tmp_path / "copy.img"
    result = serve_run("cc", RAMDISK, "size=8M", command=(
        "qemu-io -f raw -c 'write -P 0x5a 1M 64k' \"$uri\" >/dev/null && "
        f"qemu-img convert -f raw -O raw \"$uri\" {copy} && "
        "qemu-img info --output=json \"$uri\""))
    data = copy.read_bytes()
    assert data[MiB:MiB + 65536] == b"\x5a" * 65536 and data.count(0) == len(data) - 65536
    assert '"virtual-size": 8388608' in result.stdout.decode()


def test_magic_config_key_and_set_error():
    """A bare word is the plugin's magic_config_key; nbdkit_set_error's errno reaches the
    client and the plugin's message the log."""
    with served("cc", RAMDISK, "2M") as srv:
        out = nbdsh(srv.uri, ERRNO_OF + (
            "print(h.get_size())\n"
            "h.pwrite(b'fail', 0)\n"
            "print(errno_of(lambda: h.pread(512, 0)))\n"
            "h.pwrite(b'good', 0)\n"
            "print(h.pread(4, 0))\n"))
    assert out.split() == ["2097152", str(errno.ENOSPC), "bytearray(b'good')"]
    assert "the disk says fail" in srv.stderr()


# ---------------------------------------------------------------- callbacks and helpers
def test_exports_block_size_password_and_parse_int(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("sesame\n")
    with served("cc", FEATURES, "number=-7", f"password=+{secret}") as srv:
        listing = run(["nbdinfo", "--list", "--json", srv.uri]).stdout.decode()
        out = nbdsh(srv.uri.replace("/?", "/b?"), (
            "print(h.get_size(), h.get_block_size(nbd.SIZE_MINIMUM),"
            " h.get_block_size(nbd.SIZE_PREFERRED), h.get_block_size(nbd.SIZE_MAXIMUM))\n"
            "d, e = h.pread(512, 0), h.pread(512, 4096)\n"
            "print(bytes(d[:6]), bytes(e[:2]), bytes(d[8:10]))\n"))
        default = nbdsh(srv.uri, "print(bytes(h.pread(512, 4096)[:4]))\n")
    assert '"export-name": "a"' in listing and '"description": "the first"' in listing
    assert '"export-name": "b"' in listing and '"export-name": "dflt"' in listing
    assert out.split("\n")[:2] == [f"{MiB - 7} 512 4096 1048576", "b'sesame' b'b\\x00' b'\\x08\\t'"]
    assert default.strip() == "b'dflt'"


def test_peer_name_disconnect_and_shutdown():
    with served("cc", FEATURES) as srv:
        family = nbdsh(srv.uri, "print(h.pread(512, 8192)[0])\n")
        gone = nbdsh(srv.uri.replace("/?", "/bye?"), ERRNO_OF + (
            "h.pread(512, 0)\n"
            "print(errno_of(lambda: h.pread(512, 0)))\n"), check=False)
        still = nbdsh(srv.uri, "print(h.pread(512, 0)[3])\n")
        run(["nbdsh", "-u", srv.uri.replace("/?", "/shutdown?"), "-c", "h.pread(512, 0)"],
            check=False)
        wait_for(lambda: srv.proc.poll() is not None, message="the server did not shut down")
    assert family.strip() == str(socket.AF_UNIX)
    assert gone.strip() != "ok"  # the connection was dropped after the first read
    assert still.strip() == "3"


@pytest.mark.parametrize("options", [[], ["-t", "4"]], ids=["default", "t4"])
def test_parallel_plugin_runs_requests_at_once(options):
    """Each pread waits until four run at the same time: only a server running the
    PARALLEL plugin's requests in parallel (GIL released) answers them. By default
    too: the plugin waits on a condition variable, so its requests get a pool."""
    with served("cc", FEATURES, "barrier=4", options=options) as srv:
        out = nbdsh(srv.uri, (
            "bufs = [nbd.Buffer(512) for _ in range(4)]\n"
            "cookies = [h.aio_pread(b, i * 512) for i, b in enumerate(bufs)]\n"
            "while h.aio_in_flight() > 0:\n"
            "    h.poll(-1)\n"
            "print([b.to_bytearray()[1] for b in bufs])\n"))
    assert out.strip() == "[1, 1, 1, 1]"


@pytest.mark.parametrize("source, reason", [
    (RAMDISK, None), (FEATURES, "pthread_cond_timedwait"),
    (os.path.join(DEBIAN_PLUGINS, "nbdkit-memory-plugin.so"), None),
    (os.path.join(DEBIAN_PLUGINS, "nbdkit-file-plugin.so"), None),
    (os.path.join(DEBIAN_PLUGINS, "nbdkit-sh-plugin.so"), "fork"),
    (os.path.join(DEBIAN_PLUGINS, "nbdkit-nbd-plugin.so"), "libnbd.so"),
], ids=["ramdisk.c", "features.c", "memory.so", "file.so", "sh.so", "nbd.so"])
def test_requests_short_unless_the_plugin_imports_what_may_wait(tmp_path, source, reason):
    """A plugin that calls nothing that may wait has its requests run on the reading
    thread (short); one that polls, forks, waits on a condition or uses a network
    library gets the pool. Decided from the shared object's ELF imports."""
    from pynbd.plugins._cc_runtime import compile_c, waits
    if source.endswith(".c"):
        library = str(tmp_path / "plugin.so")
        compile_c(source, library, "cc", ["-O2", "-fPIC", "-shared"])
        source = library
    elif not os.path.exists(source):
        pytest.skip("Debian's nbdkit plugins are not installed")
    why = waits(source)
    assert why is None if reason is None else reason in why, why
    assert waits(RAMDISK) == f"its imports are unknown ({RAMDISK}: not an ELF file)"


def test_callback_failing_without_nbdkit_error_is_eio_and_logged():
    with served("cc", FEATURES, "fail=yes") as srv:
        out = nbdsh(srv.uri, ERRNO_OF + "print(errno_of(lambda: h.cache(4096, 0)))\n")
        again = nbdsh(srv.uri, "print(bytes(h.pread(512, 0)[16:18]))\n")  # the server goes on serving
    assert out.strip() == str(errno.EIO)
    assert again.strip() == "b'\\x10\\x11'"
    assert "cache failed without calling nbdkit_error" in srv.stderr()


def test_api_version_1_callbacks():
    """Version 1's layout: pread/pwrite without flags, zero with may_trim."""
    with served("cc", VERSION1) as srv:
        out = nbdsh(srv.uri, (
            "h.pwrite(b'x' * 1024, 0)\n"
            "h.zero(512, 512)\n"
            "print(h.pread(2, 0), h.pread(1, 600))\n"
            "h.zero(512, 512, nbd.CMD_FLAG_NO_HOLE)\n"
            "print(h.pread(1, 0))\n"))
    assert out.split() == ["bytearray(b'Tx')", "bytearray(b'\\x00')", "bytearray(b'Z')"]


@pytest.mark.parametrize("args, message", [
    (("size=junk",), "could not parse size string (junk)"),
    (("colour=red",), "unknown parameter 'colour'"),
])
def test_plugin_config_errors(args, message):
    last, _ = refused("cc", RAMDISK, *args)
    assert message in last


def test_realpath_and_absolute_path(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = subprocess.run([*SERVE, "-v", "-U", "-", "cc", FEATURES, "path=link", "--run", "true"],
                            cwd=str(tmp_path), capture_output=True, timeout=120, check=True)
    assert f"realpath={tmp_path}/real absolute={tmp_path}/link" in result.stderr.decode()
    last, _ = refused("cc", FEATURES, "path=/nonexistent/x")
    assert "realpath: /nonexistent/x: No such file or directory" in last


def test_parse_int_and_bool_errors():
    assert 'number: could not parse number: "12x"' in refused("cc", FEATURES, "number=12x")[0]
    assert "could not decipher boolean (maybe)" in refused("cc", FEATURES, "fail=maybe")[0]


# ---------------------------------------------------------------- against nbdkit
WORKLOAD = ERRNO_OF + (
    "h.pwrite(bytes(range(256)) * 4096, 3 * 1048576 + 512)\n"
    "h.zero(65536, 3 * 1048576 + 4096)\n"
    "print(h.get_size(), h.can_multi_conn(), h.can_trim(), h.can_fua(), h.can_cache())\n"
    "import hashlib\n"
    "print(hashlib.sha256(h.pread(4 * 1048576, 2 * 1048576)).hexdigest())\n"
    "h.pwrite(b'fail', 0)\n"
    "print(errno_of(lambda: h.pread(512, 0)))\n")


@pytest.mark.parametrize("header", ["pynbd", "nbdkit"])
def test_same_file_under_nbdkit_cc(tmp_path, header):
    """The C file (its first command edited) under Debian's nbdkit cc, built with pynbd's
    header or nbdkit's, answers exactly as under pynbd."""
    if header == "nbdkit" and not os.path.exists("/usr/include/nbdkit-plugin.h"):
        pytest.skip("nbdkit-plugin-dev is not installed")
    script = tmp_path / "ramdisk.c"
    with open(RAMDISK) as f:
        script.write_text(f.read().replace('exec pynbd serve cc "$0" "$@"', 'exec nbdkit cc "$0" "$@"'))
    extra = [f"EXTRA_CFLAGS=-I{os.path.abspath(INCLUDE)}"] if header == "pynbd" else []
    answers = {}
    for server in ("pynbd", "nbdkit"):
        with served("cc", str(script), "size=16M", *extra, server=server) as srv:
            answers[server] = nbdsh(srv.uri, WORKLOAD) + run(["nbdinfo", "--map", srv.uri]).stdout.decode()
    assert answers["pynbd"] == answers["nbdkit"]
    assert str(errno.ENOSPC) in answers["pynbd"].splitlines()
    assert "3145728     2097152    0  data" in answers["pynbd"]


FIELDS = ("_struct_size _api_version _thread_model name longname version description load unload "
          "config config_complete config_help open close get_size can_write can_flush "
          "is_rotational can_trim errno_is_preserved dump_plugin can_zero can_fua pread pwrite "
          "flush trim zero magic_config_key can_multi_conn can_extents extents can_cache cache "
          "thread_model can_fast_zero preconnect get_ready after_fork list_exports "
          "default_export export_description cleanup block_size").split()


@pytest.mark.parametrize("api", [1, 2])
def test_struct_layout_matches_nbdkit(tmp_path, api):
    """offsetof every field of struct nbdkit_plugin, and the constants, under pynbd's
    header and under nbdkit's: the same numbers."""
    if not os.path.exists("/usr/include/nbdkit-plugin.h"):
        pytest.skip("nbdkit-plugin-dev is not installed")
    source = tmp_path / "layout.c"
    source.write_text(
        f"#define NBDKIT_API_VERSION {api}\n#include <stddef.h>\n#include <stdio.h>\n"
        "#include <nbdkit-plugin.h>\nint main (void) {\n"
        + "".join(f'  printf ("{f} %zu\\n", offsetof (struct nbdkit_plugin, {f}));\n' for f in FIELDS)
        + '  printf ("size %zu %d %d %d %d\\n", sizeof (struct nbdkit_plugin), NBDKIT_FLAG_FAST_ZERO,'
          " NBDKIT_CACHE_NATIVE, NBDKIT_EXTENT_ZERO, NBDKIT_THREAD_MODEL_PARALLEL);\n  return 0;\n}\n")
    layouts = []
    for include in (os.path.abspath(INCLUDE), "/usr/include"):
        program = str(tmp_path / "layout")
        run(["cc", "-I", include, "-o", program, str(source)])
        layouts.append(run([program]).stdout.decode())
    assert layouts[0] == layouts[1]
    assert "block_size " in layouts[0]


def test_plugin_built_with_nbdkit_header_served_as_so(tmp_path):
    """A .so built against nbdkit's own header: pynbd serve ./ramdisk.so."""
    if not os.path.exists("/usr/include/nbdkit-plugin.h"):
        pytest.skip("nbdkit-plugin-dev is not installed")
    library = str(tmp_path / "ramdisk.so")
    run(["cc", "-O2", "-fPIC", "-shared", "-o", library, RAMDISK])
    with served(library, "size=4M") as srv:
        out = nbdsh(srv.uri, "h.pwrite(b'hello', 1000)\nprint(h.get_size(), h.pread(5, 1000))\n")
    assert out.split() == ["4194304", "bytearray(b'hello')"]


def test_debian_plugins_served_as_so():
    """nbdkit's own memory and pattern plugins, loaded from Debian's .so files."""
    pattern = os.path.join(DEBIAN_PLUGINS, "nbdkit-pattern-plugin.so")
    memory = os.path.join(DEBIAN_PLUGINS, "nbdkit-memory-plugin.so")
    if not os.path.exists(pattern):
        pytest.skip("Debian's nbdkit plugins are not installed")
    reads = "print(h.pread(64, 1048576 - 24).hex())\n"
    with served(pattern, "2M") as srv:
        ours = nbdsh(srv.uri, reads)
    with served("pattern", "2M", server="nbdkit") as srv:
        theirs = nbdsh(srv.uri, reads)
    assert ours == theirs
    with served(memory, "size=1M", "allocator=sparse") as srv:
        out = nbdsh(srv.uri, "h.pwrite(b'abc', 70000)\nprint(h.pread(3, 70000))\n")
        extents = run(["nbdinfo", "--map", srv.uri]).stdout.decode()
    assert out.strip() == "bytearray(b'abc')"
    assert "hole" in extents and "data" in extents
    help_text = run([*SERVE, memory, "--help"]).stdout.decode()
    assert "size=<SIZE>" in help_text


# ---------------------------------------------------------------- bad input
def test_file_that_does_not_compile(tmp_path):
    path = c_file(tmp_path, "#include <nbdkit-plugin.h>\nint broken (void) { return x; }\n")
    last, stderr = refused("cc", path)
    assert "compilation failed" in last
    assert "undeclared" in stderr  # the compiler's own message


def test_no_compiler(tmp_path):
    last, _ = refused("cc", RAMDISK, "CC=/nonexistent/cc")
    assert "the C compiler '/nonexistent/cc' is not installed" in last


def test_no_plugin_init(tmp_path):
    path = c_file(tmp_path, "int just_a_function (void) { return 0; }\n")
    assert "has no plugin_init" in refused("cc", path)[0]


def test_unknown_api_version(tmp_path):
    path = c_file(tmp_path, (
        "#include <nbdkit-plugin.h>\n"
        "static struct nbdkit_plugin p = { .name = \"future\" };\n"
        "struct nbdkit_plugin *plugin_init (void)\n"
        "{ p._struct_size = sizeof p; p._api_version = 3; return &p; }\n"))
    assert "API version 3; pynbd supports versions 1 and 2" in refused("cc", path)[0]


def test_missing_source():
    assert "no such file" in refused("cc", "/nonexistent/plugin.c")[0]
    assert "must be given" in refused("cc", "CC=cc")[0]


def test_source_from_stdin():
    with open(VERSION1, "rb") as f:
        source = f.read()
    result = run([*SERVE, "-U", "-", "cc", "-", "--run", "nbdinfo --size \"$uri\""], input=source)
    assert result.stdout.decode().strip() == "65536"


def test_compiler_flags(tmp_path):
    """CFLAGS replaces the defaults, EXTRA_CFLAGS adds to them (here a -D the file needs)."""
    path = c_file(tmp_path, open(VERSION1).read().replace("sizeof disk;", "DISK_SIZE;"))
    last, _ = refused("cc", path)
    assert "compilation failed" in last
    out = serve_run("cc", path, "EXTRA_CFLAGS=-DDISK_SIZE=4096", command="nbdinfo --size \"$uri\"")
    assert out.stdout.decode().strip() == "4096"
    out = serve_run("cc", path, "CFLAGS=-O0 -fPIC -shared -DDISK_SIZE=1024",
                    command="nbdinfo --size \"$uri\"")
    assert out.stdout.decode().strip() == "1024"
    assert shutil.which("cc")


PEER = r"""
#include <stdint.h>
#include <string.h>
#include <nbdkit-plugin.h>
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
static int64_t pid, uid;
static void *p_open (int readonly) {
  pid = nbdkit_peer_pid ();
  uid = nbdkit_peer_uid ();
  return NBDKIT_HANDLE_NOT_NEEDED;
}
static int64_t p_get_size (void *h) { return 512 * (pid + 1); }
static int p_pread (void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags) {
  memset (buf, 0, count);
  memcpy (buf, &uid, sizeof uid < count ? sizeof uid : count);
  return 0;
}
static struct nbdkit_plugin plugin = {
  .name = "peer", .open = p_open, .get_size = p_get_size, .pread = p_pread,
};
NBDKIT_REGISTER_PLUGIN (plugin)
"""


def test_peer_pid_and_uid_of_a_unix_client(tmp_path):
    with served("cc", c_file(tmp_path, PEER)) as srv:
        out = nbdsh(srv.uri, "import os, struct\n"
                             "print(h.get_size() // 512 - 1 == os.getpid(), "
                             "struct.unpack('<q', h.pread(8, 0))[0] == os.getuid())\n")
    assert out.split() == ["True", "True"]
