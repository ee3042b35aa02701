#!/bin/sh
# Scenario "bench-vfio" guest half: loads the driver, dirties then frees
# 256 MiB, prints "@@VFIO ready" and waits while the host measures hint
# rounds. chan=ttyS1: wait for the host's line on /dev/ttyS1 (opened before
# the ready line); chan=none: sleep until the host ends the VM (QEMU's own
# device, measured through a migration).
# Arguments: driver=virtio_balloon|freehint chan=ttyS1|none
PATH=/bin:/sbin:/usr/bin:/usr/sbin
driver=virtio_balloon chan=ttyS1
for kv in "$@"; do
  case $kv in
    driver=*) driver=${kv#driver=} ;;
    chan=*) chan=${kv#chan=} ;;
  esac
done
insmod "/lib/freehint/$driver.ko" || { echo '@@RESULT {"name":"insmod","ok":false}'; exit 1; }
sleep 1
dd if=/dev/zero of=/tmp/fill bs=1M count=256 2>/dev/null
rm -f /tmp/fill
echo 3 >/proc/sys/vm/drop_caches 2>/dev/null
sleep 1
echo "@@RESULT {\"name\":\"bench-guest\",\"ok\":true,\"driver\":\"$driver\",\"mem_free_kb\":$(awk '/^MemFree:/ {print $2}' /proc/meminfo)}"
if [ "$chan" = none ]; then
  echo "@@VFIO ready"
  sleep 3600
else
  exec 3</dev/"$chan"
  echo "@@VFIO ready"
  read -r line <&3
fi
dmesg | grep -E 'freehint: (bitmap|hint) round' | tail -n 3
true
