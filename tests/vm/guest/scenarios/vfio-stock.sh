#!/bin/sh
# Scenario "vfio-stock": the STOCK virtio_balloon driver against
# freehint-vfio-user (our device over vfio-user). Guest half:
#   bind      the driver binds 1af4:1045 and reaches DRIVER_OK (status 0xf)
#   (host)    inflate/deflate, stats, a standard hint round, dump of its set
#   dump      `fhtool vfio-round` holds MIB mlocked, then after the host's
#             round prints /proc/kpageflags free pages and the held pfns
# Arguments (key=value): hold=MIB (default 32), hostile=N (run the hostile
# driver `fhtool hostile` for N rounds first, scenario "vfio-hostile"),
# driver=virtio_balloon|freehint, mode=stock|freehint (what
# `fhtool vfio-round` dumps).
PATH=/bin:/sbin:/usr/bin:/usr/sbin
hold=32 hostile=0 driver=virtio_balloon mode=stock
for kv in "$@"; do
  case $kv in
    hold=*) hold=${kv#hold=} ;;
    hostile=*) hostile=${kv#hostile=} ;;
    driver=*) driver=${kv#driver=} ;;
    mode=*) mode=${kv#mode=} ;;
  esac
done
ok=true

balloon_dev() { # prints "status driver" of the balloon virtio device
  for v in /sys/bus/virtio/devices/*; do
    [ "$(cat "$v/device" 2>/dev/null)" = 0x0005 ] || continue
    echo "$(cat "$v/status") $(basename "$(readlink "$v/driver")" 2>/dev/null) $(cat "$v/features")"
    return
  done
}
bind_result() { # bind_result NAME: DRIVER_OK with $driver
  set -- "$1" $(balloon_dev)
  if [ "$2" = 0x0000000f ] && [ "$3" = "$driver" ]; then r=true; else r=false; ok=false; fi
  echo "@@RESULT {\"name\":\"$1\",\"ok\":$r,\"driver\":\"$driver\",\"status\":\"${2:-none}\",\"bound\":\"${3:-none}\",\"features\":\"${4:-}\"}"
}

pcidev=none
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor")" = 0x1af4 ] && pcidev="$(cat "$d/device") rev $(cat "$d/revision")"
done
if [ "$pcidev" = "0x1045 rev 0x01" ]; then r=true; else r=false; ok=false; fi
echo "@@RESULT {\"name\":\"pci\",\"ok\":$r,\"device\":\"$pcidev\"}"

insmod "/lib/freehint/$driver.ko" || ok=false
sleep 1
bind_result bind

if [ "$hostile" -gt 0 ]; then
  # Prints the result "hostile-driver".
  fhtool hostile --iterations "$hostile" || ok=false
  sleep 2
  bind_result rebind
fi

# Dirty then free 256 MiB: memory a balloon and a hint round can act on.
dd if=/dev/zero of=/tmp/fill bs=1M count=256 2>/dev/null
rm -f /tmp/fill
sync
echo 3 >/proc/sys/vm/drop_caches 2>/dev/null
sleep 1

fhtool vfio-round --mode "$mode" --hold "$hold" --tty /dev/ttyS1 || ok=false

dmesg | grep -E 'freehint|virtio_balloon' | tail -n 5
if [ "$driver" = freehint ]; then
  if rmmod freehint; then r=true; else r=false; ok=false; fi
  echo "@@RESULT {\"name\":\"rmmod\",\"ok\":$r}"
fi
$ok
