#!/bin/sh
# Guest half of the migration scenarios (qemu-hint, qemu-migrate,
# qemu-pingpong, bench-*, demo); the host half is
# tests/vm/harness/src/migrate.rs.
#
# Arguments (key=value): driver=none|stock|freehint, workload=idle|dirty-keep|
# dirty-free, pre_mib=N (dirtied before migrating: kept or freed),
# churn_mib=N (integrity working set during migration), pace_us=N.
# Optional (qemu-lockdep; off by default, the others never pass them):
# lockdep=1 prints `@@RESULT {"name":"lockdep",...}` before the driver loads:
# ok only if /proc/lockdep exists and /proc/lockdep_stats says debug_locks 1
# (lockdep compiled in and not switched off by an earlier report);
# rmmod_at_end=N (N >= 1 cycles): after fhwork exits, starts `fhtool churn`
# (churn_mib) in the background; then, per cycle (from the second one on,
# after loading the driver again): prints `@@RMMOD waiting N` and waits for a
# line on the console; the host then starts a migration, whose hint request
# arrives as a config interrupt of the balloon: as soon as /proc/interrupts
# shows it (or after 20 s), `rmmod freehint` runs, so it lands on a hint
# round while the churn runs; prints `@@RESULT {"name":"rmmod_cycle",...}`
# (ok: rmmod exit 0, module gone from /proc/modules, balloon left without a
# driver; `hint_irq`: the interrupt was seen) and waits for a console line
# (the host has ended its migration). At the end it stops the churn and
# prints `@@RESULT {"name":"rmmod",...}` (ok: every cycle ok, churn ok, and
# with lockdep=1 debug_locks still 1). With lockdep=1 and kmemleak in the
# kernel, kmemleak's suspects are cleared before the driver loads, and after
# the cycles `@@RESULT {"name":"kmemleak",...}` lists the new ones (ok: none).
#
# Loads the driver, then runs fhwork (tests/guest-workload) in the
# foreground with the console as stdin: it prints `@@FHWORK ready` when its
# memory is in place, and for every line the host types on the console
# (after each migration, on the destination) it verifies every live page and
# prints `@@RESULT {"name":"integrity",...}`; the line `stop` ends it.
driver=none workload=idle pre_mib=300 churn_mib=32 pace_us=200
lockdep=0 rmmod_at_end=0
kml=/sys/kernel/debug/kmemleak
for a in "$@"; do
  case $a in
    driver=*) driver=${a#driver=} ;;
    workload=*) workload=${a#workload=} ;;
    pre_mib=*) pre_mib=${a#pre_mib=} ;;
    churn_mib=*) churn_mib=${a#churn_mib=} ;;
    pace_us=*) pace_us=${a#pace_us=} ;;
    lockdep=*) lockdep=${a#lockdep=} ;;
    rmmod_at_end=*) rmmod_at_end=${a#rmmod_at_end=} ;;
    *) echo "qemu-migrate: unknown argument $a" ;;
  esac
done

fail() { echo "@@RESULT {\"name\":\"$1\",\"ok\":false,\"error\":\"$2\"}"; exit 1; }

# debug_locks from /proc/lockdep_stats (empty without lockdep).
debug_locks() {
  sed -n 's/^ *debug_locks: *\([0-9][0-9]*\).*/\1/p' /proc/lockdep_stats 2>/dev/null
}

# The balloon (virtio device id 5): prints the name of its driver, if any.
balloon_driver() {
  d=/sys/bus/virtio/devices/$(balloon_name)
  [ -e "$d/driver" ] && basename "$(readlink "$d/driver")"
}

# The balloon's virtio device name (virtioN).
balloon_name() {
  for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = 0x0005 ] && basename "$d"
  done
}

# Sets irqs to the balloon's config interrupts so far (MSI-X vector
# "virtioN-config", or the shared INTx line "virtioN"); shell builtins only,
# so it can poll quickly.
balloon_config_irqs() {
  irqs=0
  while read -r line; do
    case $line in
      *" $bname-config" | *" $bname")
        # shellcheck disable=SC2086 # split the counters on purpose
        set -- $line
        shift
        for c in "$@"; do
          case $c in
            '' | *[!0-9]*) break ;;
            *) irqs=$((irqs + c)) ;;
          esac
        done
        ;;
    esac
  done </proc/interrupts
}

if [ "$lockdep" = 1 ]; then
  pl=false
  [ -e /proc/lockdep ] && pl=true
  dl=$(debug_locks)
  ok=false
  [ "$pl" = true ] && [ "$dl" = 1 ] && ok=true
  echo "@@RESULT {\"name\":\"lockdep\",\"ok\":$ok,\"proc_lockdep\":$pl,\"debug_locks\":${dl:-null}}"
  # Leak baseline: whatever kmemleak suspects before the driver loads is
  # reported now and cleared, so the check after the unload cycles lists
  # only what leaked during the test (the debug flavour has kmemleak with
  # scanning on demand only).
  if [ -e "$kml" ]; then
    echo scan >"$kml"
    echo clear >"$kml"
  fi
fi

case $driver in
  none) ;;
  stock | freehint)
    mod=virtio_balloon
    [ "$driver" = freehint ] && mod=freehint
    ko=/lib/freehint/$mod.ko
    [ -f "$ko" ] || fail driver "$ko missing from the initramfs"
    out=$(insmod "$ko" 2>&1) || fail driver "insmod $mod: $(echo "$out" | tr -d '"\\' | head -1)"
    # The driver must have bound to QEMU's balloon (virtio device id 5).
    bound=$(balloon_driver)
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
rc=$?
case $rmmod_at_end in
  '' | 0 | *[!0-9]*) exit $rc ;;
esac

# Unload the driver while memory churns and a hint round runs (see above).
stop=/tmp/rmmod-churn.stop
rm -f "$stop"
fhtool churn --seconds 600 --max-mib "$churn_mib" --stop-file "$stop" >/tmp/rmmod-churn.out 2>&1 &
churn=$!
bname=$(balloon_name)
ok=true
fails=0
cycle=0
while [ "$cycle" -lt "$rmmod_at_end" ]; do
  cycle=$((cycle + 1))
  if [ "$cycle" -gt 1 ]; then
    out=$(insmod "$ko" 2>&1) || echo "insmod: $out"
  fi
  balloon_config_irqs
  irqs_before=$irqs
  echo "@@RMMOD waiting $cycle"
  read -r _go </dev/console
  read -r w0 _ </proc/uptime
  hint_irq=false
  while :; do
    balloon_config_irqs
    [ "$irqs" != "$irqs_before" ] && { hint_irq=true; break; }
    read -r now _ </proc/uptime
    [ "${now%.*}" -ge $((${w0%.*} + 20)) ] && break
  done
  read -r t0 _ </proc/uptime
  out=$(rmmod freehint 2>&1)
  rmrc=$?
  read -r t1 _ </proc/uptime
  gone=true
  grep -q '^freehint ' /proc/modules && gone=false
  left=$(balloon_driver)
  unbound=true
  [ -z "$left" ] || unbound=false
  cok=false
  [ "$rmrc" = 0 ] && [ "$gone" = true ] && [ "$unbound" = true ] && cok=true
  [ "$cok" = true ] || { ok=false; fails=$((fails + 1)); }
  ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", (b - a) * 1000 }')
  wait_ms=$(awk -v a="$w0" -v b="$t0" 'BEGIN { printf "%d", (b - a) * 1000 }')
  err=$(echo "$out" | tr -d '"\\' | head -1)
  echo "@@RESULT {\"name\":\"rmmod_cycle\",\"ok\":$cok,\"cycle\":$cycle,\"rmmod_rc\":$rmrc,\"unloaded\":$gone,\"unbound\":$unbound,\"hint_irq\":$hint_irq,\"irq_wait_ms\":${wait_ms:-null},\"rmmod_at_s\":$t0,\"rmmod_ms\":${ms:-null},\"error\":\"$err\"}"
  # The host ends the migration it started before the next cycle.
  read -r _next </dev/console
done
touch "$stop"
wait "$churn"
crc=$?
cat /tmp/rmmod-churn.out
[ "$crc" = 0 ] || ok=false
dl=$(debug_locks)
[ "$lockdep" = 1 ] && [ "$dl" != 1 ] && ok=false
echo "@@RESULT {\"name\":\"rmmod\",\"ok\":$ok,\"cycles\":$cycle,\"failed_cycles\":$fails,\"churn_rc\":$crc,\"debug_locks\":${dl:-null}}"
# Leaks since the baseline: kmemleak reports an object once it has been
# unreferenced for 5 s, so wait, scan twice, and list what it suspects.
if [ "$lockdep" = 1 ]; then
  kok=false leaks=null first=
  if [ -e "$kml" ]; then
    sleep 6
    echo scan >"$kml"
    echo scan >"$kml"
    cat "$kml" >/tmp/kmemleak.txt
    leaks=$(grep -c '^unreferenced object' /tmp/kmemleak.txt)
    first=$(grep -A12 -m1 '^unreferenced object' /tmp/kmemleak.txt | tr -d '"\\' | tr '\n' '|' | cut -c1-600)
    [ "$leaks" = 0 ] && kok=true
    [ "$leaks" = 0 ] || cat /tmp/kmemleak.txt
  fi
  echo "@@RESULT {\"name\":\"kmemleak\",\"ok\":$kok,\"available\":$([ -e "$kml" ] && echo true || echo false),\"leaks\":$leaks,\"first\":\"$first\"}"
  [ "$kok" = true ] || ok=false
fi
[ "$ok" = true ] || rc=1
exit $rc
