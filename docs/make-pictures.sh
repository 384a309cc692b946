#!/bin/bash
# The README's pictures of a disk: what mkfs.ext4 and then a file copy touch on
# an empty 256 MiB disk. Needs root (a loop mount), nbdfuse and Pillow.
#
#   sudo docs/make-pictures.sh            # writes docs/heatmap-mkfs.png, docs/map-mkfs.png
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
pynbd=(python3 -m pynbd)
work=$(mktemp -d)
server="" fuse="" loop=""
cleanup() {
  mountpoint -q "$work/mnt" && umount "$work/mnt"
  [ -n "$loop" ] && losetup -d "$loop"
  mountpoint -q "$work/disk.raw" && umount "$work/disk.raw"
  [ -n "$fuse" ] && wait "$fuse" 2>/dev/null
  [ -n "$server" ] && kill "$server" && wait "$server" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

uri="nbd+unix:///?socket=$work/sock"
"${pynbd[@]}" serve -f -U "$work/sock" --filter=log memory 256M logfile="$work/disk.log" &
server=$!
until [ -S "$work/sock" ]; do sleep 0.1; done
touch "$work/disk.raw"
nbdfuse "$work/disk.raw" "$uri" &
fuse=$!
until [ "$(stat -c %s "$work/disk.raw")" -gt 0 ]; do sleep 0.1; done

mkfs.ext4 -q -F "$work/disk.raw"
mkdir "$work/mnt"
loop=$(losetup -f --show "$work/disk.raw")
mount "$loop" "$work/mnt"
cp -r /usr/share/doc/python3* /usr/share/doc/libnbd* "$work/mnt/"
umount "$work/mnt"
losetup -d "$loop"
loop=""

"${pynbd[@]}" info --map --png docs/map-mkfs.png "$uri"
"${pynbd[@]}" heatmap --time=requests "$work/disk.log" docs/heatmap-mkfs.png
