#!/bin/sh
# Scenario "bitmap-lockdep" (run on the debug kernel with
# PROVE_LOCKING, DEBUG_ATOMIC_SLEEP, DEBUG_LIST, DEBUG_VM): load freehint.ko,
# run `builds` bitmap builds (default 1000) while `fhtool churn` allocates and
# frees memory concurrently, unload, then require a clean dmesg (no lockdep
# report, warning or BUG) and, if kmemleak is enabled, no leak.
# A small walk budget (default 8 entries per lock hold) makes nearly every
# long list resume from a kept pfn, so that path runs thousands of
# times under churn; then `restart_builds` builds with a budget of 1 must
# restart lists from their head. Arguments: builds=N churn_mib=M budget=B
# restart_builds=R (words, or fh.args= comma separated).
PATH=/bin:/sbin:/usr/bin:/usr/sbin
MOD=/lib/freehint/freehint.ko

args="$*"
[ -n "$args" ] || args=$(sed -n 's/.*fh\.args=\([^ ]*\).*/\1/p' /proc/cmdline)
builds=1000 churn_mib=64 budget=8 restart_builds=1000
for kv in $(echo "$args" | tr ',' ' '); do
  case $kv in
    builds=*) builds=${kv#builds=} ;;
    churn_mib=*) churn_mib=${kv#churn_mib=} ;;
    budget=*) budget=${kv#budget=} ;;
    restart_builds=*) restart_builds=${kv#restart_builds=} ;;
  esac
done

ok=true
grep -q ' /sys/kernel/debug ' /proc/mounts || mount -t debugfs debugfs /sys/kernel/debug
dmesg -c >/dev/null 2>&1
lockdep=false
[ -e /proc/lockdep ] && lockdep=true

if insmod "$MOD"; then
  echo '@@RESULT {"name":"insmod","ok":true}'
else
  echo '@@RESULT {"name":"insmod","ok":false}'
  echo '@@RESULT {"name":"summary","scenario":"bitmap-lockdep","ok":false,"error":"insmod failed"}'
  exit 1
fi

echo "$budget" >/sys/kernel/debug/freehint/budget || ok=false

stop=/tmp/churn.stop
rm -f "$stop"
fhtool churn --seconds 3600 --max-mib "$churn_mib" --stop-file "$stop" >/tmp/churn.out 2>&1 &
churn=$!
fhtool builds --count "$builds" || ok=false
# The restart-from-head path: with one entry per hold every list resumes
# from its first block, and churn (per-CPU refills take blocks from the list
# heads) keeps taking that block away, so lists restart (and some are given
# up after MAX_RESTARTS). The builds must still succeed, the path must have
# run, and no page held by a process may be marked free.
echo 1 >/sys/kernel/debug/freehint/budget || ok=false
fhtool builds --count "$restart_builds" --min-restarts 1 || ok=false
fhtool false-free --mib 32 || ok=false
echo "$budget" >/sys/kernel/debug/freehint/budget || ok=false
touch "$stop"
wait "$churn" || ok=false
cat /tmp/churn.out

if rmmod freehint; then
  echo '@@RESULT {"name":"rmmod","ok":true}'
else
  echo '@@RESULT {"name":"rmmod","ok":false}'
  ok=false
fi

leaks=null
if [ -w /sys/kernel/debug/kmemleak ]; then
  echo scan >/sys/kernel/debug/kmemleak
  sleep 1
  echo scan >/sys/kernel/debug/kmemleak
  leaks=$(grep -c 'unreferenced object' /sys/kernel/debug/kmemleak)
  [ "$leaks" -eq 0 ] || { ok=false; head -n 40 /sys/kernel/debug/kmemleak; }
fi

splats=$(dmesg | grep -cE 'WARNING:|BUG:|Oops|Call Trace|possible circular locking|inconsistent lock state|possible recursive locking|sleeping function called from invalid context|lock held when returning|list_add corruption|list_del corruption|UBSAN|rust_panic|panicked')
if [ "$splats" -eq 0 ]; then s=true; else s=false; ok=false; dmesg | tail -n 80; fi
echo "@@RESULT {\"name\":\"dmesg\",\"ok\":$s,\"splats\":$splats,\"lockdep\":$lockdep,\"kmemleak_leaks\":$leaks}"
echo "@@RESULT {\"name\":\"summary\",\"scenario\":\"bitmap-lockdep\",\"ok\":$ok,\"builds\":$builds,\"splats\":$splats,\"lockdep\":$lockdep,\"kmemleak_leaks\":$leaks}"
$ok
