#!/bin/bash
# Makes the protocol-4 state fixture: an NBD job's sender state folder and receiver folder,
# as replicator built from commit 017f4f2 (2026-12-02, protocol 4, journal records of format
# 1) left them when both were SIGKILLed, the sender holding records the receiver never got.
# Usage: make_fixture.sh OLD_REPLICATOR OUT_DIR PORT  (run as root: NBD, qemu-io)
set -e
OLDB=$1; OUT=$2; P=$3
W=$(mktemp -d); cd "$W"
python3 - <<'PY'
with open("disk.raw", "wb") as f:  # 128 KiB: 0x11 over the first 64 KiB, then zeros
    f.write(b"\x11" * 65536 + bytes(65536))
PY
$OLDB receive --listen 127.0.0.1:$P --dir rdir --insecure 2>/dev/null & R=$!; sleep 2
$OLDB send --to 127.0.0.1:$P --job vm1 --state-dir sstate --insecure --capture nbd \
    --nbd-socket "$W/nbd.sock" disk.raw 2>/dev/null & S=$!
for i in $(seq 1 100); do [ -S nbd.sock ] && break; sleep 0.2; done
nbd="nbd+unix:///disk.raw?socket=$W/nbd.sock"
qemu-io -f raw "$nbd" -c "write -P 0x21 4096 512" -c flush >/dev/null
qemu-io -f raw "$nbd" -c "write -P 0x22 98304 512" -c flush >/dev/null
sleep 2  # shipped and applied
kill -STOP $R  # the receiver hangs: what follows stays in the sender's journal
qemu-io -f raw "$nbd" -c "write -P 0x31 8192 512" -c flush >/dev/null
qemu-io -f raw "$nbd" -c "write -P 0x32 81920 512" -c flush >/dev/null
sleep 1
kill -9 $S $R; wait 2>/dev/null || true
rm -f nbd.sock sstate/control.sock rdir/.replicator/control.sock
mkdir -p "$OUT"; cp -a sstate rdir "$OUT"/; rm -rf "$OUT/rdir/vm1"  # the replica is made by the test
cp disk.raw "$W.source"; cp rdir/vm1/disk.raw "$W.replica"; echo "source $W.source replica $W.replica"
