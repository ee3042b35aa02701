#!/bin/sh
# Guest half of `distro-hint` (host half:
# tests/vm/harness/src/scenarios/distro_hint.rs), on Debian's own kernel.
#
# First the stock driver: the distribution's virtio_balloon.ko binds the
# balloon; freehint.ko then loads but binds nothing (the device is taken, as
# on a system that did not blacklist virtio_balloon); both unload and the
# balloon is left without a driver. One line:
#   @@RESULT {"name":"stock","ok":...,"kernel":"<uname -r>",...}
# (ok: each of those steps did what it says). Then it becomes the
# qemu-balloon script (same arguments), which loads freehint.ko on the
# host's `bind` command and answers the host's commands.

kernel=$(uname -r)
clean() { tr -d '"\\' | tr '\t\r' '  ' | head -1; }

bound_driver() {
  for d in /sys/bus/virtio/devices/*; do
    if [ "$(cat "$d/device" 2>/dev/null)" = 0x0005 ]; then
      [ -e "$d/driver" ] && basename "$(readlink "$d/driver")"
      return 0
    fi
  done
}

ok=true
err=
step() { # step WHAT CMD...: runs CMD, on failure ok=false and err=WHAT: output
  what=$1
  shift
  if ! out=$("$@" 2>&1); then
    ok=false
    [ -n "$err" ] || err="$what failed: $(echo "$out" | clean)"
  fi
}

step insmod insmod /lib/freehint/virtio_balloon.ko
stock=$(bound_driver)
[ "$stock" = virtio_balloon ] || { ok=false; err=${err:-"virtio_balloon did not bind (driver: $stock)"}; }
step insmod insmod /lib/freehint/freehint.ko
with_stock=$(bound_driver)
[ "$with_stock" = virtio_balloon ] || { ok=false; err=${err:-"the balloon moved to $with_stock"}; }
loaded=false
grep -q '^freehint ' /proc/modules && loaded=true
[ "$loaded" = true ] || ok=false
tainted=$(cat /proc/sys/kernel/tainted)
step rmmod rmmod freehint
step rmmod rmmod virtio_balloon
left=$(bound_driver)
[ -z "$left" ] || { ok=false; err=${err:-"still bound to $left"}; }
sig=$(dmesg | grep -F 'freehint: module verification failed' | tail -1 | sed 's/^\[[^]]*\] //' | clean)
echo "@@RESULT {\"name\":\"stock\",\"ok\":$ok,\"kernel\":\"$kernel\",\"stock_bound\":\"$stock\",\"freehint_loaded_beside\":$loaded,\"bound_with_both\":\"$with_stock\",\"bound_after_unload\":\"$left\",\"tainted\":$tainted,\"signature_log\":\"$sig\",\"error\":\"$err\"}"

exec sh /scenarios/qemu-balloon.sh "$@"
