#!/usr/bin/env python3
"""Drive a TCG guest (root shell on its serial port, QEMU's stdio) and its QMP
socket, for the manual driver checks in driver_checks.py."""
import json, os, queue, socket, subprocess, sys, threading, time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DIR = os.environ.get("FREEHINT_DRIVER_TESTS", "/tmp/freehint-driver-tests")

class VM:
    def __init__(self, kernel, initrd, mem="1G", append="", extra=(), log=None, name="src", incoming=None):
        self.qmp_path = f"{DIR}/qmp-{name}.sock"
        if os.path.exists(self.qmp_path):
            os.unlink(self.qmp_path)
        log = log or f"{DIR}/serial-{name}.log"
        cmd = [os.path.join(REPO, "tests/vm/qemu"), "-accel", "tcg", "-M", "pc", "-m", mem, "-smp", "2",
               "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
               "-kernel", kernel, "-initrd", initrd,
               "-append", "console=ttyS0 panic=-1 " + append,
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra]
        if incoming:
            cmd += ["-incoming", incoming]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = queue.Queue()
        self.all = []
        self.logf = open(log, "w")
        threading.Thread(target=self._reader, daemon=True).start()
        for _ in range(100):
            if os.path.exists(self.qmp_path):
                break
            time.sleep(0.1)
        self.q = socket.socket(socket.AF_UNIX)
        self.q.connect(self.qmp_path)
        self.qf = self.q.makefile("rw")
        self.qf.readline()
        self.qmp("qmp_capabilities")

    def _reader(self):
        for raw in self.p.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.logf.write(line + "\n"); self.logf.flush()
            self.all.append(line)
            self.lines.put(line)

    def qmp(self, cmd, **args):
        self.qf.write(json.dumps({"execute": cmd, "arguments": args}) + "\n"); self.qf.flush()
        while True:
            r = json.loads(self.qf.readline())
            if "return" in r or "error" in r:
                return r

    def wait_for(self, needle, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if needle in line:
                return line
        raise TimeoutError(needle)

    def sh(self, cmd, timeout=120):
        tag = "@@END%d" % int(time.time() * 1000)
        self.p.stdin.write((cmd + f"; echo {tag} rc=$?\n").encode()); self.p.stdin.flush()
        out = []
        end = time.time() + timeout
        while time.time() < end:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if tag in line and "rc=" in line and not line.startswith(cmd[:10]) and ("echo " + tag) not in line:
                return out, line.split("rc=")[-1]
            out.append(line)
        raise TimeoutError(cmd)

    def close(self):
        try:
            self.qmp("quit")
        except Exception:
            pass
        try:
            self.p.wait(10)
        except Exception:
            self.p.kill()
