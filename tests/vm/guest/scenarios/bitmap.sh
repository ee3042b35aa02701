#!/bin/sh
# Scenario "bitmap": freehint.ko's free-page bitmap in a
# real guest. Loads the module, then checks
#   bits        one bit per RAM page, the PCI hole folded out (6 GiB guests)
#   kpageflags  agreement with /proc/kpageflags KPF_BUDDY on a quiet guest
#   false-free  none of N MiB we hold is marked free
#   host-layout a layout given from outside is validated and used
#   stats       walk time, longest lock hold, memset baseline
# and unloads it. Arguments (words key=value, or fh.args= on the kernel
# command line, comma separated): machine=pc|q35 mib=N (default: RAM/4).
# Prints @@RESULT lines; the last is the summary.
PATH=/bin:/sbin:/usr/bin:/usr/sbin
MOD=/lib/freehint/freehint.ko

args="$*"
[ -n "$args" ] || args=$(sed -n 's/.*fh\.args=\([^ ]*\).*/\1/p' /proc/cmdline)
machine= mib=
for kv in $(echo "$args" | tr ',' ' '); do
  case $kv in
    machine=*) machine=${kv#machine=} ;;
    mib=*) mib=${kv#mib=} ;;
  esac
done

ok=true
field() { # field KEY TEXT: a number field of a result line
  echo "$2" | sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p" | head -n1
}
check() { # check CMD...: runs a check, prints its result lines, records failure
  out=$("$@" 2>&1)
  rc=$?
  echo "$out"
  [ $rc -eq 0 ] || ok=false
}

grep -q ' /sys/kernel/debug ' /proc/mounts || mount -t debugfs debugfs /sys/kernel/debug
dmesg -c >/dev/null 2>&1

if insmod "$MOD"; then
  echo '@@RESULT {"name":"insmod","ok":true}'
else
  echo '@@RESULT {"name":"insmod","ok":false}'
  echo '@@RESULT {"name":"summary","scenario":"bitmap","ok":false,"error":"insmod failed"}'
  exit 1
fi

check fhtool kpageflags
check fhtool bits ${machine:+--machine "$machine"}
check fhtool false-free ${mib:+--mib "$mib"}
ff=$(field false_free "$out")
check fhtool host-layout
check fhtool stats
walk_us=$(field walk_us "$out")
hold_us=$(field max_lock_hold_us "$out")
memset_us=$(field memset_us "$out")

if rmmod freehint; then
  echo '@@RESULT {"name":"rmmod","ok":true}'
else
  echo '@@RESULT {"name":"rmmod","ok":false}'
  ok=false
fi

splats=$(dmesg | grep -cE 'WARNING:|BUG:|Oops|Call Trace|general protection|UBSAN|rust_panic|panicked')
if [ "$splats" -eq 0 ]; then s=true; else s=false; ok=false; dmesg | tail -n 60; fi
echo "@@RESULT {\"name\":\"dmesg\",\"ok\":$s,\"splats\":$splats}"

mem_mib=$(( $(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo) / 1024 ))
walk_ms=$(echo "${walk_us:-0}" | awk '{printf "%.3f", $1 / 1000}')
echo "@@RESULT {\"name\":\"summary\",\"scenario\":\"bitmap\",\"ok\":$ok,\"false_free\":${ff:-null},\"walk_ms\":$walk_ms,\"max_lock_hold_us\":${hold_us:-null},\"memset_us\":${memset_us:-null},\"mem_mib\":$mem_mib,\"machine\":\"${machine:-unknown}\"}"
$ok
