#!/usr/bin/env bash
# Manual driver checks (not part of tests/all): builds freehint.ko from this
# repository against the pipeline's kernel tree and packs a tiny initramfs
# whose /init gives a root shell on ttyS0 (driven by driver_checks.py).
#
#   guest-driver/tests/mkinitrd.sh [OUTDIR]     (default /tmp/freehint-driver-tests)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-/tmp/freehint-driver-tests}
# The pipeline's tree; if its inputs changed and it is being rebuilt, the
# newest finished tree in the cache (or set KDIR).
KDIR=${KDIR:-$("$REPO/tests/vm/build-image" --print-kdir normal 2>/dev/null ||
  ls -td "${FREEHINT_CACHE:-/var/cache/freehint}"/kernel-normal-*/ | head -1)}
KDIR=${KDIR%/}
BINDGEN=${BINDGEN:-$(ls -d /var/cache/freehint/bindgen-*/bin/bindgen | head -1)}
mkdir -p "$OUT"
rm -rf "$OUT/src" "$OUT/root"
mkdir -p "$OUT/src"
cp -r "$REPO/guest-driver" "$OUT/src/"
mkdir -p "$OUT/src/protocol" && cp -r "$REPO/protocol/src" "$OUT/src/protocol/"
make -s -C "$KDIR" M="$OUT/src/guest-driver" LLVM=1 RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc \
  BINDGEN="$BINDGEN" modules
R=$OUT/root
mkdir -p "$R"/{bin,proc,sys,dev,tmp,lib/freehint}
cp /bin/busybox "$R/bin/"
for a in sh mount insmod rmmod cat echo sleep usleep dmesg grep awk head tail ls tr dd md5sum kill sed sort uniq stty; do
  ln -sf busybox "$R/bin/$a"
done
cp "$OUT/src/guest-driver/freehint.ko" "$R/lib/freehint/"
cp "$KDIR/drivers/virtio/virtio_balloon.ko" "$R/lib/freehint/"
# The guest tools of tests/ (fhwork, fhtool) when the pipeline built them.
for t in fhwork fhtool; do
  b=$REPO/target/vm/cargo/x86_64-unknown-linux-gnu/release/$t
  [[ -x $b ]] && cp "$b" "$R/bin/"
done
cat >"$R/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug
mount -t tmpfs tmpfs /tmp
echo 8 >/proc/sys/kernel/printk
stty -echo </dev/ttyS0
echo "@@READY"
exec sh </dev/ttyS0 >/dev/ttyS0 2>&1
INIT
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc 2>/dev/null | gzip -1 >"$OUT/initrd.gz")
cp "$KDIR/arch/x86/boot/bzImage" "$OUT/bzImage"
echo "$OUT/initrd.gz $OUT/bzImage"
