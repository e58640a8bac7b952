#!/bin/bash
# Peak RSS (VmHWM) of `send --once` and `verify` of a large sparse raw image with 9 MiB
# written, against a local receiver on loopback: a first sync, a run with nothing
# changed, one after a few writes, then verify (bench/RESULTS.md, "chunked manifests").
#
# usage: bench/probes/sparse_raw_memory.sh SIZE PORT [WORKDIR]
#   SIZE: as truncate takes it (1T, 4T), or 16T for the largest file ext4 holds
#   REPLICATOR (environment): the command to run, `replicator` by default; to measure
#   another tree with the same venv, set PYTHONPATH to a folder holding `replicator/`
#   whose cli, engine, journal and transport are that tree's.
# Needs qemu-io and /usr/bin/time. Prints one line per step; removes WORKDIR after.
set -u
size=$1 port=$2
W=${3:-$(mktemp -d /tmp/sparse-raw-memory.XXXXXX)}
R=${REPLICATOR:-replicator}
mkdir -p "$W/r" "$W/rs"
if [ "$size" = 16T ]; then
  truncate -s $((16 * 2**40 - 4096)) "$W/disk.raw"
else
  truncate -s "$size" "$W/disk.raw"
fi
bytes=$(stat -c %s "$W/disk.raw")
qemu-io -f raw -c "write -P 0x11 0 3M" -c "write -P 0x22 $((bytes / 3 / 65536 * 65536)) 3M" \
  -c "write -P 0x33 $((bytes - 4 * 1048576)) 3M" "$W/disk.raw" >/dev/null
$R receive --listen "127.0.0.1:$port" --dir "$W/r" --state-dir "$W/rs" --insecure \
  >"$W/recv.log" 2>&1 &
rpid=$!
sleep 2
run() {  # label, command...
  local label=$1
  shift
  /usr/bin/time -v "$@" >"$W/$label.out" 2>"$W/$label.time"
  echo "$size $label rc=$? $(grep -E 'Maximum resident|Elapsed' "$W/$label.time" |
    sed 's/^\s*//' | tr '\n' ' ')"
}
send=($R send --to "127.0.0.1:$port" --job j --state-dir "$W/s" --insecure --once "$W/disk.raw")
run first "${send[@]}"
run nochange "${send[@]}"
qemu-io -f raw -c "write -P 0x44 1M 256k" -c "write -P 0x55 $((bytes / 2 / 65536 * 65536)) 192k" \
  -c "write -P 0x66 $((bytes - 1048576)) 64k" "$W/disk.raw" >/dev/null
run writes "${send[@]}"
run verify $R verify --to "127.0.0.1:$port" --job j --state-dir "$W/s" --insecure "$W/disk.raw"
tail -1 "$W/verify.out"
echo "receiver $(grep VmHWM /proc/$rpid/status)"
kill "$rpid"
wait "$rpid" 2>/dev/null
rm -rf "$W"
