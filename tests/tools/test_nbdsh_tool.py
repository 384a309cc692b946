"""pynbd sh: the nbdsh command line with a pynbd handle."""

from nbdtest import PYNBD, nbdsh, run, served

SH = [*PYNBD, "sh"]


def test_commands_run_in_order_and_match_libnbd():
    with served("memory", "1M", server="nbdkit") as srv:
        out = run([*SH, "-u", srv.uri, "-c", "h.pwrite(b'pynbd', 10)",
                   "-c", "print(h.pread(8, 8))", "-c", "print(h.get_size())"]).stdout
        assert out == b"b'\\x00\\x00pynbd\\x00'\n1048576\n"
        assert nbdsh(srv.uri, "print(h.pread(8, 8).hex())") == "000070796e626400\n"


def test_base_allocation_and_libnbd_style_callback():
    code = ("h.block_status(h.get_size(), 0, lambda ctx, off, e, err: print(ctx, off, e))")
    with served("memory", "1M") as srv:
        out = run([*SH, "--base-allocation", "--connect", srv.uri, "-c", code]).stdout
    assert out == b"base:allocation 0 [1048576, 3]\n"


def test_opt_mode_and_nbd_module():
    code = "print(h.opt_list()); h.opt_go(); print(h.get_size(), nbd.CMD_FLAG_FUA)"
    with served("memory", "2M") as srv:
        out = run([*SH, "--opt-mode", "-u", srv.uri, "-c", code]).stdout
    assert out == b"[('', '')]\n2097152 1\n"


def test_interactive_prompt_reads_stdin():
    with served("memory", "1M") as srv:
        result = run([*SH, "-u", srv.uri], input=b"print(h.get_size() * 2)\n")
    assert b"2097152" in result.stdout


def test_captive_server_and_stdin_script():
    out = run([*SH, "-c", "-", "--", "[", "nbdkit", "memory", "3M", "]"],
              input=b"print(h.get_size())\n").stdout
    assert out == b"3145728\n"


def test_errors_are_one_line():
    result = run([*SH, "-u", "nbd://127.0.0.1:1/", "-c", "pass"], check=False)
    assert result.returncode == 1 and result.stderr.count(b"\n") == 1
    with served("memory", "1M") as srv:
        result = run([*SH, "-u", srv.uri, "-c", "h.pread(1, 1 << 30)"], check=False)
    assert result.returncode == 1 and b"beyond the end" in result.stderr
