#!/usr/bin/env bash
# Server CPU time per request, a steadier measure than IOPS on a shared machine.
#
#   bench/cpu_per_request.sh randwrite 16 pynbd serve -f memory 1G
#   bench/cpu_per_request.sh randwrite 16 nbdkit -f memory 1G
#
# Starts the server on a private Unix socket, fills 256 MiB with random data,
# runs fio (nbd engine, 4 KiB, the given pattern and queue depth) for 3 s and
# prints IOPS and the server's and fio's CPU microseconds per request.
set -euo pipefail
rw=$1 depth=$2
shift 2
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
"$@" -U "$dir/sock" &
pid=$!
until [ -S "$dir/sock" ]; do sleep 0.05; done
uri="nbd+unix:///?socket=$dir/sock"
head -c 256M /dev/urandom > "$dir/fill"
nbdcopy "$dir/fill" "$uri"
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
before=$(ticks)
fio --name=cpu --ioengine=nbd --uri="$uri" --rw="$rw" --bs=4k --iodepth="$depth" --size=256M \
    --time_based --runtime=3 --output-format=json --output="$dir/fio.json" >/dev/null 2>&1
after=$(ticks)
python3 - "$dir/fio.json" "$before" "$after" "$(getconf CLK_TCK)" "$*" <<'PY'
import json, sys
path, before, after, hz, label = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
job = json.load(open(path))["jobs"][0]
n = job["read"]["total_ios"] + job["write"]["total_ios"]
iops = job["read"]["iops"] + job["write"]["iops"]
fio_cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["elapsed"]
print(f"{label}: {iops:9.0f} IOPS  server {(after - before) / hz * 1e6 / n:5.2f} µs/request"
      f"  fio {fio_cpu * 1e6 / n:5.2f} µs/request")
PY
