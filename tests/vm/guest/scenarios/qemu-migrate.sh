#!/bin/sh
# Guest half of the migration scenarios (qemu-hint, qemu-migrate,
# qemu-pingpong, bench-*, demo); the host half is
# tests/vm/harness/src/migrate.rs.
#
# Arguments (key=value): driver=none|stock|freehint, workload=idle|dirty-keep|
# dirty-free, pre_mib=N (dirtied before migrating: kept or freed),
# churn_mib=N (integrity working set during migration), pace_us=N.
#
# Loads the driver, then runs fhwork (tests/guest-workload) in the
# foreground with the console as stdin: it prints `@@FHWORK ready` when its
# memory is in place, and for every line the host types on the console
# (after each migration, on the destination) it verifies every live page and
# prints `@@RESULT {"name":"integrity",...}`; the line `stop` ends it.
driver=none workload=idle pre_mib=300 churn_mib=32 pace_us=200
for a in "$@"; do
  case $a in
    driver=*) driver=${a#driver=} ;;
    workload=*) workload=${a#workload=} ;;
    pre_mib=*) pre_mib=${a#pre_mib=} ;;
    churn_mib=*) churn_mib=${a#churn_mib=} ;;
    pace_us=*) pace_us=${a#pace_us=} ;;
    *) echo "qemu-migrate: unknown argument $a" ;;
  esac
done

fail() { echo "@@RESULT {\"name\":\"$1\",\"ok\":false,\"error\":\"$2\"}"; exit 1; }

case $driver in
  none) ;;
  stock | freehint)
    mod=virtio_balloon
    [ "$driver" = freehint ] && mod=freehint
    ko=/lib/freehint/$mod.ko
    [ -f "$ko" ] || fail driver "$ko missing from the initramfs"
    out=$(insmod "$ko" 2>&1) || fail driver "insmod $mod: $(echo "$out" | tr -d '"\\' | head -1)"
    # The driver must have bound to QEMU's balloon (virtio device id 5).
    bound=
    for d in /sys/bus/virtio/devices/*; do
      [ "$(cat "$d/device" 2>/dev/null)" = 0x0005 ] || continue
      [ -e "$d/driver" ] && bound=$(basename "$(readlink "$d/driver")")
    done
    [ -n "$bound" ] || fail driver "no driver bound to the balloon after loading $mod"
    echo "@@RESULT {\"name\":\"driver\",\"ok\":true,\"driver\":\"$driver\",\"bound\":\"$bound\"}"
    ;;
  *) fail driver "unknown driver '$driver'" ;;
esac

case $workload in
  idle) set -- ;;
  dirty-keep) set -- --keep-mib "$pre_mib" ;;
  dirty-free) set -- --pre-free-mib "$pre_mib" ;;
  *) fail workload "unknown workload '$workload'" ;;
esac

fhwork run --mib "$churn_mib" --pace-us "$pace_us" "$@" </dev/console
