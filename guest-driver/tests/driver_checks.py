#!/usr/bin/env python3
"""Manual checks of freehint.ko as a virtio-balloon driver (not part of
tests/all; the migration scenarios live in tests/vm/run). Each check boots a
TCG guest with QEMU 11.1 (tests/vm/qemu), drives a root shell on the serial
port and QMP, and prints what it saw. Build first:

    guest-driver/tests/mkinitrd.sh
    guest-driver/tests/driver_checks.py CHECK [ARGS]

Checks:
  balloon           inflate to 768 MiB and back, guest-stats, rmmod
  hint MODE [MEM] [MIB]   MODE freehint|stock|none: dirty then free MIB,
                    migrate to exec:cat, print query-migrate figures, the free
                    page vq state and the driver's round line
  unload            stock driver first (freehint must not bind), rmmod while
                    inflating, sysfs unbind/bind, OOM deflation
  churn [N]         N migrations while a guest loop insmods/rmmods freehint
  pingpong [N]      N real migrations between QEMUs on 127.0.0.1 with a
                    checksummed file kept and a churn loop
  vfio MEM [SRV-ARGS]  against freehint-vfio-user (FREEHINT_VFIO_USER=binary):
                    inflate/deflate, stats, two hint rounds (bitmap if offered)
  poison            init_on_free=1: poison_val 0 reported, hinting on
"""
import json, os, socket, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vmctl import VM, DIR, REPO

K = os.environ.get("FREEHINT_BZIMAGE", f"{DIR}/bzImage")
I = os.environ.get("FREEHINT_INITRD", f"{DIR}/initrd.gz")
BALLOON = ["-object", "iothread,id=io0", "-device",
           "virtio-balloon-pci,id=bal,free-page-hint=on,iothread=io0,deflate-on-oom=on"]


def actual_mib(vm):
    return vm.qmp("query-balloon")["return"]["actual"] >> 20


def migrate(vm, uri):
    vm.qmp("migrate-set-parameters", **{"max-bandwidth": 10 * 1024 ** 3})
    vm.qmp("migrate", uri=uri)
    while True:
        r = vm.qmp("query-migrate")["return"]
        if r.get("status") in ("completed", "failed", "cancelled"):
            return r
        time.sleep(0.1)


def check_balloon():
    vm = VM(K, I, mem="1G", extra=BALLOON, name="balloon")
    try:
        vm.wait_for("@@READY"); time.sleep(0.5)
        out, _ = vm.sh("insmod /lib/freehint/freehint.ko; dmesg | grep 'virtio-balloon bound'"); print(out[-1])
        for target in (768, 1024):
            vm.qmp("balloon", value=target << 20)
            for _ in range(60):
                if actual_mib(vm) == target: break
                time.sleep(0.5)
            print("target", target, "MiB -> actual", actual_mib(vm), "MiB")
        vm.qmp("qom-set", path="/machine/peripheral/bal", property="guest-stats-polling-interval", value=2)
        time.sleep(5)
        st = vm.qmp("qom-get", path="/machine/peripheral/bal", property="guest-stats")["return"]["stats"]
        print("guest-stats", {k: v for k, v in st.items() if v != 2 ** 64 - 1})
        out, rc = vm.sh("rmmod freehint; dmesg | tail -1"); print(out[-1], "rc", rc)
    finally:
        vm.close()


def check_hint(mode, mem="4G", dirty=300):
    vm = VM(K, I, mem=mem, append="init_on_alloc=1", extra=BALLOON, name="hint-" + mode)
    try:
        vm.wait_for("@@READY"); time.sleep(0.5)
        if mode != "none":
            vm.sh("insmod /lib/freehint/%s.ko" % ("freehint" if mode == "freehint" else "virtio_balloon"))
        vm.sh(f"dd if=/dev/zero bs=1M count={dirty} 2>/dev/null | tr '\\0' 'x' > /tmp/x; rm /tmp/x", timeout=600)
        r = migrate(vm, "exec:cat > /dev/null")
        ram = r.get("ram", {})
        print(json.dumps({"driver": mode, "mem": mem, "dirty_freed_mib": int(dirty), "status": r["status"],
                          "total_ms": r.get("total-time"), "downtime_ms": r.get("downtime"),
                          "mb_sent": round(ram.get("transferred", 0) / 1e6, 1),
                          "normal_pages": ram.get("normal"), "zero_pages": ram.get("duplicate")}))
        q = vm.qmp("x-query-virtio-queue-status", path="/machine/peripheral/bal/virtio-backend", queue=3)["return"]
        print("free page vq (index 3): last-avail-idx", q.get("last-avail-idx"), "used-idx", q.get("used-idx"))
        vm.qmp("cont"); time.sleep(2)
        out, _ = vm.sh("dmesg | grep 'round 0x' | tail -1"); print(out[-1] if out else "")
    finally:
        vm.close()


def check_unload():
    vm = VM(K, I, mem="1G", extra=BALLOON, name="unload")
    try:
        vm.wait_for("@@READY"); time.sleep(0.5)
        out, _ = vm.sh("insmod /lib/freehint/virtio_balloon.ko; insmod /lib/freehint/freehint.ko; "
                       "echo freehint bound: $(dmesg | grep -c 'virtio-balloon bound')")
        print(out[-1])
        vm.sh("rmmod freehint; rmmod virtio_balloon; insmod /lib/freehint/freehint.ko")
        vm.qmp("balloon", value=200 << 20); time.sleep(0.3)
        print("inflating: actual", actual_mib(vm), "MiB; rmmod now")
        out, _ = vm.sh("rmmod freehint; dmesg | tail -1"); print(out[-1], "| actual", actual_mib(vm), "MiB")
        vm.sh("insmod /lib/freehint/freehint.ko"); time.sleep(3)
        out, _ = vm.sh("d=$(ls /sys/bus/virtio/drivers/freehint/ | grep virtio); "
                       "echo $d > /sys/bus/virtio/drivers/freehint/unbind; echo $d > /sys/bus/virtio/drivers/freehint/bind; "
                       "dmesg | tail -2")
        print("\n".join(out[-2:]))
        vm.qmp("balloon", value=400 << 20)
        for _ in range(60):
            if actual_mib(vm) <= 400: break
            time.sleep(0.5)
        out, _ = vm.sh("mount -o remount,size=2G /tmp; dd if=/dev/zero of=/tmp/big bs=1M count=600 2>&1 | tail -1; "
                       "echo killed: $(dmesg | grep -ci 'killed process'); rm /tmp/big; rmmod freehint; dmesg | tail -1",
                       timeout=300)
        print("\n".join(out[-3:]))
    finally:
        vm.close()


def check_churn(n=20):
    vm = VM(K, I, mem="2G", append="init_on_alloc=1", extra=BALLOON, name="churn")
    try:
        vm.wait_for("@@READY"); time.sleep(0.5)
        vm.sh("echo 1 > /proc/sys/kernel/printk")
        vm.sh("{ (i=0; while true; do insmod /lib/freehint/freehint.ko; usleep $((i % 7 * 3000)); "
              "rmmod freehint; i=$((i+1)); done) >/dev/null 2>&1 & }")
        ok = 0
        for k in range(n):
            vm.qmp("balloon", value=(1024 + (k % 3) * 256) << 20)
            ok += migrate(vm, "exec:cat > /dev/null").get("status") == "completed"
            vm.qmp("cont"); time.sleep(0.3)
        print("migrations completed", ok, "of", n)
        out, _ = vm.sh("kill %1; sleep 1; rmmod freehint 2>/dev/null; "
                       "dmesg | grep -E 'WARNING|BUG|Oops|leak|circular' | head -3; "
                       "echo rounds $(dmesg | grep -c 'round 0x'); dmesg | grep 'round 0x' | sed 's/.*end=//' | sort | uniq -c; "
                       "echo bound $(dmesg | grep -c 'virtio-balloon bound') removed $(dmesg | grep -c 'virtio-balloon removed')",
                       timeout=120)
        print("\n".join(l for l in out if not l.startswith("/ #")))
    finally:
        vm.close()


def check_pingpong(n=6):
    def mk(name, incoming=None):
        return VM(K, I, mem="2G", append="init_on_alloc=1", extra=BALLOON, name=name, incoming=incoming)
    cur = mk("pp0")
    cur.wait_for("@@READY"); time.sleep(0.5)
    cur.sh("echo 1 > /proc/sys/kernel/printk; insmod /lib/freehint/freehint.ko; mount -o remount,size=1800M /tmp")
    cur.sh("dd if=/dev/zero bs=1M count=200 2>/dev/null | tr '\\0' 'k' > /tmp/keep; md5sum /tmp/keep > /tmp/keep.md5", timeout=600)
    cur.sh("{ (i=0; while true; do dd if=/dev/zero bs=1M count=300 2>/dev/null | tr '\\0' \"$((i%10))\" > /tmp/churn; "
           "md5sum /tmp/churn > /tmp/churn.sum; rm /tmp/churn; i=$((i+1)); done) >/dev/null 2>&1 & }")
    fails = 0
    for k in range(n):
        port = 47100 + k
        dst = mk(f"pp{k + 1}", incoming=f"tcp:127.0.0.1:{port}")
        time.sleep(1.0)
        r = migrate(cur, f"tcp:127.0.0.1:{port}")
        print(k, r["status"], r.get("total-time"), "ms", round(r.get("ram", {}).get("transferred", 0) / 1e6, 1), "MB", flush=True)
        cur.close()
        for _ in range(100):
            if dst.qmp("query-status")["return"]["status"] == "running": break
            time.sleep(0.1)
        cur = dst
        out, _ = cur.sh("md5sum -c /tmp/keep.md5 2>&1 | tail -1; dmesg | grep 'round 0x' | tail -1 | sed 's/.*MiB), //'", timeout=120)
        print("   ", out[-2:], flush=True)
        fails += not any("OK" in l for l in out)
    out, _ = cur.sh("kill %1; sleep 2; rmmod freehint; dmesg | grep -E 'WARNING|BUG|Oops' | head -3; md5sum -c /tmp/keep.md5", timeout=120)
    print("\n".join(out[-3:]))
    print("integrity failures", fails)
    cur.close()


def check_vfio(mem="1G", *srv_args):
    srv_bin = os.environ.get("FREEHINT_VFIO_USER", os.path.join(REPO, "target/debug/freehint-vfio-user"))
    sock, ctlp = f"{DIR}/fh.sock", f"{DIR}/fh.ctl"
    for f in (sock, ctlp):
        if os.path.exists(f): os.unlink(f)
    srv = subprocess.Popen([srv_bin, "--socket", sock, "--control", ctlp, "--ram-size", mem, "--machine", "pc", *srv_args],
                           stdout=open(f"{DIR}/vfio-user.log", "w"), stderr=subprocess.STDOUT)
    for _ in range(100):
        if os.path.exists(sock): break
        time.sleep(0.1)

    def ctl(cmd):
        s = socket.socket(socket.AF_UNIX); s.connect(ctlp)
        f = s.makefile("rw"); f.write(cmd + "\n"); f.flush(); r = f.readline().strip(); s.close(); return r
    vm = VM(K, I, mem=mem, append="init_on_alloc=1", name="vfio",
            extra=["-object", f"memory-backend-memfd,id=mem,size={mem},share=on", "-machine", "memory-backend=mem",
                   "-device", json.dumps({"driver": "vfio-user-pci", "socket": {"path": sock, "type": "unix"}})])
    try:
        vm.wait_for("@@READY", 300); time.sleep(0.5)
        out, _ = vm.sh("insmod /lib/freehint/freehint.ko; dmesg | grep 'virtio-balloon bound'"); print(out[-1])
        print("target 64 MiB:", ctl("target 16384")); time.sleep(3); print("status:", ctl("status"))
        print("target 0:", ctl("target 0")); time.sleep(3)
        print("stats:", ctl("stats"))
        for _ in range(2):
            print("hint-start:", ctl("hint-start")); time.sleep(3)
            print("hint-status:", ctl("hint-status"))
        out, _ = vm.sh("dmesg | grep 'round 0x' | tail -2"); print("\n".join(out[-2:]))
        out, _ = vm.sh("rmmod freehint; dmesg | tail -1"); print(out[-1])
    finally:
        vm.close(); srv.terminate()


def check_poison():
    vm = VM(K, I, mem="1G", append="init_on_free=1", extra=BALLOON, name="poison")
    try:
        vm.wait_for("@@READY"); time.sleep(0.5)
        out, _ = vm.sh("insmod /lib/freehint/freehint.ko; dmesg | grep 'virtio-balloon bound'"); print(out[-1])
        migrate(vm, "exec:cat > /dev/null"); vm.qmp("cont"); time.sleep(2)
        out, _ = vm.sh("dmesg | grep 'round 0x' | tail -1"); print(out[-1])
    finally:
        vm.close()


if __name__ == "__main__":
    checks = {"balloon": check_balloon, "hint": check_hint, "unload": check_unload, "churn": check_churn,
              "pingpong": check_pingpong, "vfio": check_vfio, "poison": check_poison}
    if len(sys.argv) < 2 or sys.argv[1] not in checks:
        print(__doc__); sys.exit(2)
    args = [int(a) if a.isdigit() else a for a in sys.argv[2:]]
    checks[sys.argv[1]](*args)
