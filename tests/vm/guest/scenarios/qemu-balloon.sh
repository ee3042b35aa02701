#!/bin/sh
# Guest half of `qemu-balloon` (host half:
# tests/vm/harness/src/scenarios/qemu_balloon/): freehint.ko as a full
# virtio-balloon driver against QEMU's own virtio-balloon-pci.
#
# The host drives: this script prints `@@BALLOON ready`, then reads one
# command per console line and answers each with one
# `@@RESULT {"name":"<command>",...}` line. The host makes the verdicts; `ok`
# here only says the command itself ran.
#
#   bind          insmod freehint.ko; the balloon's driver, its negotiated
#                 feature string (sysfs `features`, bit 0 first) and the
#                 driver's "virtio-balloon bound" line
#   meminfo TAG   MemTotal, MemFree, MemAvailable and the pages on per-CPU
#                 lists (free but not in MemFree; /proc/zoneinfo), KiB
#   oom MIB       maps MIB MiB of stamped pages and keeps them (`fhwork
#                 dirty-keep`), verifies them, exits; reports fhwork's exit
#                 status and verdict and how many processes the kernel killed
#                 meanwhile (its "Killed process" lines)
#   rmmod [MIB]   rmmod freehint; module gone, balloon unbound, the driver's
#                 "virtio-balloon removed" figures. With MIB: first prints
#                 `@@BALLOON armed` and polls MemFree (shell builtins only)
#                 until it fell by MIB MiB (the host has started an
#                 inflation), at most 60 s, then unloads at once
#   insmod        insmod freehint.ko again; the balloon's driver
#   rebind        sysfs unbind then bind of the balloon on driver freehint
#   hintlog       the number of the driver's "hint round" lines, the end=
#                 word of each (in order) and the last line
#   quit          leaves the loop (exit 0)
#
# Kernel messages on the console stay at level 8 (splats must be seen);
# the driver's own lines are read back with dmesg.

ko=/lib/freehint/freehint.ko

# JSON-safe text (no quotes, backslashes or control characters), one line.
clean() { tr -d '"\\' | tr '\t\r' '  ' | head -1; }

# The balloon (virtio device id 5): sets bdev to its sysfs directory.
find_balloon() {
  bdev=
  for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = 0x0005 ] && bdev=$d
  done
}

# The name of the balloon's driver, empty if none (runs in a subshell:
# finds the device itself).
bound_driver() {
  find_balloon
  [ -n "$bdev" ] && [ -e "$bdev/driver" ] && basename "$(readlink "$bdev/driver")"
}

# The last kernel log line containing $1 (cleaned).
last_log() { dmesg | grep -F "$1" | tail -1 | sed 's/^\[[^]]*\] //' | clean; }

# Counts kernel log lines containing $1.
count_log() { dmesg | grep -cF "$1"; }

meminfo_kb() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }

# KiB on the per-CPU page lists (free, but not in MemFree): the "count:"
# of every CPU's pageset in /proc/zoneinfo.
pcp_kb() { awk '$1 == "count:" { s += $2 } END { print s * 4 }' /proc/zoneinfo; }

cmd_bind() {
  out=$(insmod "$ko" 2>&1)
  rc=$?
  drv=$(bound_driver)
  find_balloon
  feats=$(cat "$bdev/features" 2>/dev/null)
  line=$(last_log "virtio-balloon bound")
  ok=false
  [ "$rc" = 0 ] && ok=true
  echo "@@RESULT {\"name\":\"bind\",\"ok\":$ok,\"insmod_rc\":$rc,\"driver\":\"$drv\",\"device\":\"$(basename "${bdev:-none}")\",\"features\":\"$feats\",\"log\":\"$line\",\"error\":\"$(echo "$out" | clean)\"}"
}

cmd_meminfo() {
  echo "@@RESULT {\"name\":\"meminfo\",\"ok\":true,\"tag\":\"$1\",\"mem_total_kb\":$(meminfo_kb MemTotal),\"mem_free_kb\":$(meminfo_kb MemFree),\"mem_available_kb\":$(meminfo_kb MemAvailable),\"pcp_kb\":$(pcp_kb)}"
}

cmd_oom() {
  killed0=$(count_log "Killed process")
  out=$(echo stop | fhwork dirty-keep --mib "$1" 2>&1)
  rc=$?
  killed1=$(count_log "Killed process")
  verdict=$(echo "$out" | grep -F '"name":"integrity"' | tail -1 | sed 's/.*@@RESULT //')
  ready=$(echo "$out" | grep -F '@@FHWORK ready' | tail -1 | sed 's/.*@@FHWORK ready //')
  echo "@@RESULT {\"name\":\"oom\",\"ok\":true,\"mib\":$1,\"fhwork_rc\":$rc,\"killed\":$((killed1 - killed0)),\"verdict\":${verdict:-null},\"ready\":${ready:-null},\"mem_free_kb_after\":$(meminfo_kb MemFree)}"
}

# Sets free to MemFree (KiB), builtins only.
mem_free() {
  while read -r k v _; do
    [ "$k" = MemFree: ] && { free=$v; return; }
  done </proc/meminfo
}

cmd_rmmod() {
  removed0=$(count_log "virtio-balloon removed")
  fell=null
  if [ -n "$1" ]; then
    mem_free
    base=$free
    read -r t0 _ </proc/uptime
    echo "@@BALLOON armed"
    while :; do
      mem_free
      [ $((base - free)) -ge $(($1 * 1024)) ] && break
      read -r now _ </proc/uptime
      [ "${now%.*}" -ge $((${t0%.*} + 60)) ] && break
    done
    fell=$(((base - free) / 1024))
  fi
  out=$(rmmod freehint 2>&1)
  rc=$?
  gone=true
  grep -q '^freehint ' /proc/modules && gone=false
  drv=$(bound_driver)
  removed=$(($(count_log "virtio-balloon removed") - removed0))
  line=$(last_log "virtio-balloon removed")
  returned=$(echo "$line" | sed -n 's/.*removed: \([0-9][0-9]*\) pages returned.*/\1/p')
  echo "@@RESULT {\"name\":\"rmmod\",\"ok\":true,\"rmmod_rc\":$rc,\"free_fell_mib\":$fell,\"unloaded\":$gone,\"driver\":\"$drv\",\"removed_lines\":$removed,\"pages_returned\":${returned:-null},\"log\":\"$line\",\"error\":\"$(echo "$out" | clean)\"}"
}

cmd_insmod() {
  out=$(insmod "$ko" 2>&1)
  rc=$?
  echo "@@RESULT {\"name\":\"insmod\",\"ok\":true,\"insmod_rc\":$rc,\"driver\":\"$(bound_driver)\",\"error\":\"$(echo "$out" | clean)\"}"
}

cmd_rebind() {
  find_balloon
  dev=$(basename "${bdev:-none}")
  d=/sys/bus/virtio/drivers/freehint
  bound0=$(count_log "virtio-balloon bound")
  echo "$dev" >"$d/unbind" 2>/dev/null
  urc=$?
  after_unbind=$(bound_driver)
  echo "$dev" >"$d/bind" 2>/dev/null
  brc=$?
  after_bind=$(bound_driver)
  bound=$(($(count_log "virtio-balloon bound") - bound0))
  echo "@@RESULT {\"name\":\"rebind\",\"ok\":true,\"device\":\"$dev\",\"unbind_rc\":$urc,\"driver_after_unbind\":\"$after_unbind\",\"bind_rc\":$brc,\"driver_after_bind\":\"$after_bind\",\"bound_lines\":$bound}"
}

cmd_hintlog() {
  line=$(last_log "hint round 0x")
  rounds=$(count_log "hint round 0x")
  ends=$(dmesg | grep -F "hint round 0x" | sed -n 's/.*end=\([a-z-]*\).*/\1/p' | tr '\n' ' ')
  echo "@@RESULT {\"name\":\"hintlog\",\"ok\":true,\"rounds\":$rounds,\"ends\":\"$ends\",\"log\":\"$line\"}"
}

echo "@@BALLOON ready"
while read -r cmd arg </dev/console; do
  case $cmd in
    bind) cmd_bind ;;
    meminfo) cmd_meminfo "$arg" ;;
    oom) cmd_oom "$arg" ;;
    rmmod) cmd_rmmod "$arg" ;;
    insmod) cmd_insmod ;;
    rebind) cmd_rebind ;;
    hintlog) cmd_hintlog ;;
    quit) break ;;
    '') ;;
    *) echo "@@RESULT {\"name\":\"$(echo "$cmd" | clean)\",\"ok\":false,\"error\":\"unknown command\"}" ;;
  esac
done
exit 0
