#!/bin/sh
# A writable disk in ten lines of shell (nbdkit-sh-plugin conventions): pynbd serve sh ./disk.sh 64M
f="$tmpdir/disk"
case "$1" in
  magic_config_key) echo size ;;
  config) [ "$2" = size ] && truncate -s "$3" "$f" || { echo "EINVAL unknown key $2" >&2; exit 1; } ;;
  get_size) stat -c %s "$f" ;;
  can_write|can_flush|can_trim|can_zero) exit 0 ;;
  pread) dd if="$f" bs=64K skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
  pwrite) dd of="$f" bs=64K seek="$4" conv=notrunc oflag=seek_bytes status=none ;;
  trim|zero) fallocate -p -o "$4" -l "$3" "$f" ;;
  *) exit 2 ;;
esac
