#!/bin/sh
# Scenario "bench-bitmap": on an idle guest, `builds`
# bitmap builds (default 21); reports the median walk time, the longest
# single zone->lock hold and the time to memset the same bitmap, for
# docs/benchmarks.md. Arguments: builds=N (words, or fh.args= comma separated).
PATH=/bin:/sbin:/usr/bin:/usr/sbin
MOD=/lib/freehint/freehint.ko

args="$*"
[ -n "$args" ] || args=$(sed -n 's/.*fh\.args=\([^ ]*\).*/\1/p' /proc/cmdline)
builds=21
for kv in $(echo "$args" | tr ',' ' '); do
  case $kv in
    builds=*) builds=${kv#builds=} ;;
  esac
done

grep -q ' /sys/kernel/debug ' /proc/mounts || mount -t debugfs debugfs /sys/kernel/debug
if ! insmod "$MOD"; then
  echo '@@RESULT {"name":"insmod","ok":false}'
  echo '@@RESULT {"name":"summary","scenario":"bench-bitmap","ok":false,"error":"insmod failed"}'
  exit 1
fi
ok=true
out=$(fhtool bench --builds "$builds" 2>&1) || ok=false
echo "$out"
rmmod freehint || ok=false
line=$(echo "$out" | sed -n 's/^@@RESULT {"name":"bench-bitmap","ok":[a-z]*,\(.*\)}$/\1/p' | head -n1)
echo "@@RESULT {\"name\":\"summary\",\"scenario\":\"bench-bitmap\",\"ok\":$ok${line:+,$line}}"
$ok
