#!/bin/sh
# An nbdkit-sh-plugin script exercising most methods; used by test_sh.py under pynbd and nbdkit.
# Reads return the handle (the export name) repeated. Offsets pick failures:
#   128K..256K: prints one byte too few   256K..512K: fails without an errno (EIO)
#   512K..768K: fails with ENOSPC         768K..:     hangs for 60 s (for timeout=)
case "$1" in
  thread_model) echo parallel ;;
  list_exports) printf 'INTERLEAVED\none\nfirst export\ntwo\nsecond export\n' ;;
  default_export) printf 'NAMES\none\ntwo\n' ;;
  open) echo "$3" ;;
  get_size) echo 1M ;;
  block_size) echo 512 4K 64K ;;
  can_write|can_flush|can_trim|can_extents|can_multi_conn|is_rotational) exit 0 ;;
  can_zero) exit 3 ;;
  can_fua|can_cache) echo native ;;
  pread)
    if [ "$4" -ge 786432 ]; then sleep 60; fi
    if [ "$4" -ge 524288 ]; then echo "ENOSPC region full" >&2; exit 1; fi
    if [ "$4" -ge 262144 ]; then echo "something broke" >&2; exit 1; fi
    n="$3"; if [ "$4" -ge 131072 ]; then n=$(($3 - 1)); fi
    yes "$2" | tr -d '\n' | head -c "$n" ;;
  pwrite) cat > /dev/null; echo "pwrite $3 $4 $5" >> "$tmpdir/log" ;;
  flush|trim|cache) echo "$1" >> "$tmpdir/log" ;;
  extents) printf '0 64K\n64K 64K hole,zero\n128K 896K 1\n' ;;
  *) exit 2 ;;
esac
