#!/usr/bin/env python3
"""Manual migration probes behind figures in docs/benchmarks.md (not part of
tests/all). A 4 GiB TCG guest (QEMU 11.1, tests/vm/qemu) with QEMU's
virtio-balloon (free-page-hint=on), init_on_alloc=1, dirties 300 MiB in
tmpfs and frees it, then migrates to `exec:cat > /dev/null`. One JSON line
per run. Build the initramfs first:

    guest-driver/tests/mkinitrd.sh
    guest-driver/tests/migration_probes.py floor [DRIVER...]
    guest-driver/tests/migration_probes.py downtime [REPS]

floor     DRIVER in none|stock|freehint (default freehint): once at full
          speed from the start ("prompt"), once held at 1 byte/s for 2 s
          while the hint round runs ("held"); equal bytes mean the race
          between the round and QEMU's first pass costs nothing.
downtime  none, stock, freehint with an 8 MiB rewrite loop running, at
          QEMU's default downtime-limit (300 ms) and at 30 ms.
"""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vmctl import VM, DIR

K = os.environ.get("FREEHINT_BZIMAGE", f"{DIR}/bzImage")
I = os.environ.get("FREEHINT_INITRD", f"{DIR}/initrd.gz")
BALLOON = ["-object", "iothread,id=io0", "-device",
           "virtio-balloon-pci,id=bal,free-page-hint=on,iothread=io0"]
MODULE = {"stock": "virtio_balloon", "freehint": "freehint"}
FAST = 10 * 1024 ** 3


def prepare(name, driver, churn=False):
    vm = VM(K, I, mem="4G", append="init_on_alloc=1", extra=BALLOON, name=name)
    vm.wait_for("@@READY")
    time.sleep(0.5)
    if driver in MODULE:
        vm.sh(f"insmod /lib/freehint/{MODULE[driver]}.ko")
    vm.sh("dd if=/dev/zero bs=1M count=300 2>/dev/null | tr '\\0' 'x' > /tmp/x; rm /tmp/x", timeout=600)
    if churn:
        vm.p.stdin.write(b"(while true; do dd if=/dev/zero of=/tmp/c bs=1M count=8 2>/dev/null; usleep 20000; done) &\n")
        vm.p.stdin.flush()
    time.sleep(1)
    return vm


def finish(vm):
    while True:
        r = vm.qmp("query-migrate")["return"]
        if r.get("status") in ("completed", "failed", "cancelled"):
            return r
        time.sleep(0.05)


def figures(r):
    ram = r.get("ram", {})
    return {"status": r["status"], "total_ms": r.get("total-time"), "downtime_ms": r.get("downtime"),
            "mb_sent": round(ram.get("transferred", 0) / 1e6, 1), "normal_pages": ram.get("normal"),
            "zero_pages": ram.get("duplicate"), "dirty_syncs": ram.get("dirty-sync-count")}


def floor(driver, mode):
    vm = prepare(f"floor-{driver}-{mode}", driver)
    try:
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": 1 if mode == "held" else FAST})
        vm.qmp("migrate", uri="exec:cat > /dev/null")
        if mode == "held":
            time.sleep(2)
            vm.qmp("migrate-set-parameters", **{"max-bandwidth": FAST})
        print(json.dumps({"probe": "floor", "driver": driver, "mode": mode, **figures(finish(vm))}), flush=True)
    finally:
        vm.close()


def downtime(driver, limit):
    vm = prepare(f"downtime-{driver}-{limit}", driver, churn=True)
    try:
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": FAST, "downtime-limit": limit})
        vm.qmp("migrate", uri="exec:cat > /dev/null")
        print(json.dumps({"probe": "downtime", "driver": driver, "downtime_limit_ms": limit,
                          **figures(finish(vm))}), flush=True)
    finally:
        vm.close()


def main(argv):
    if argv[:1] == ["floor"]:
        for driver in argv[1:] or ["freehint"]:
            for mode in ("prompt", "held"):
                floor(driver, mode)
    elif argv[:1] == ["downtime"]:
        reps = int(argv[1]) if len(argv) > 1 else 2
        for limit in (300, 30):
            for driver in ("none", "stock", "freehint"):
                for _ in range(reps):
                    downtime(driver, limit)
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
