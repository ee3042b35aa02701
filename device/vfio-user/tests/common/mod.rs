//! Shared by the integration tests: the server binary as a child process
//! ([`ServerProc`]), a raw vfio-user client that can send what
//! `vfio_user::Client` cannot (read-only maps, posted writes, malformed
//! messages, any fd) ([`RawClient`]), memfd guest RAM and a driver bring-up.
#![allow(dead_code)]

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use freehint_device::test_utils::DriverQueue;
use freehint_vfio_user::pci::NOTIFY_CFG_OFFSET;
use freehint_vfio_user::virtio_pci::common;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Guest RAM of the tests.
pub const RAM: u64 = 16 << 20;
/// vfio-user commands.
pub const CMD_VERSION: u16 = 1;
/// DMA_MAP.
pub const CMD_DMA_MAP: u16 = 2;
/// SET_IRQS.
pub const CMD_SET_IRQS: u16 = 8;
/// REGION_READ.
pub const CMD_REGION_READ: u16 = 9;
/// REGION_WRITE.
pub const CMD_REGION_WRITE: u16 = 10;
/// DMA_MAP flag: the device may read.
pub const DMA_READ: u32 = 1;
/// DMA_MAP flag: the device may write.
pub const DMA_WRITE: u32 = 2;
const FLAG_REPLY: u32 = 1;
const FLAG_NO_REPLY: u32 = 1 << 4;
const FLAG_ERROR: u32 = 1 << 5;
const HEADER: usize = 16;
/// Liveness bound for any single reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// A memfd of `size` bytes.
pub fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a valid C string; the fd is owned here.
    let fd = unsafe { libc::memfd_create(c"vfio-user-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: fresh fd owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// The "guest" view of the memfd (RAM bytes from gpa 0).
pub fn guest_memory(f: &File) -> GuestMemoryMmap {
    let region = MmapRegion::build(
        Some(FileOffset::new(f.try_clone().unwrap(), 0)),
        RAM as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .unwrap();
    let r = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
    GuestMemoryMmap::from_regions(vec![r]).unwrap()
}

/// The server binary as a child process, with its files in a private
/// directory. Killed on drop.
pub struct ServerProc {
    child: Child,
    /// Directory of the sockets, the log and anything else of this test.
    pub dir: PathBuf,
    /// The vfio-user socket.
    pub socket: PathBuf,
    /// The control socket.
    pub control: PathBuf,
    /// The server's stderr.
    pub log: PathBuf,
}

impl ServerProc {
    /// Starts the server with `--socket`, `--control` and `args`; waits for
    /// both sockets.
    pub fn start(tag: &str, args: &[&str]) -> ServerProc {
        let dir = std::env::temp_dir().join(format!("fh-vfio-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self::start_in(dir, args)
    }

    /// Like [`Self::start`] in an existing directory.
    pub fn start_in(dir: PathBuf, args: &[&str]) -> ServerProc {
        let socket = dir.join("vfio.sock");
        let control = dir.join("ctl.sock");
        let log = dir.join("server.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_freehint-vfio-user"));
        // SAFETY: umask is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                // The usual umask: the server must not depend on it.
                libc::umask(0o022);
                Ok(())
            })
        };
        let child = cmd
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .arg("--force")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start the server binary");
        let mut s = ServerProc {
            child,
            dir,
            socket,
            control,
            log,
        };
        let t0 = Instant::now();
        while !(s.socket.exists() && s.control.exists()) {
            assert!(s.alive(), "server exited at start:\n{}", s.log_text());
            assert!(t0.elapsed() < REPLY_TIMEOUT, "server never listened");
            thread::sleep(Duration::from_millis(10));
        }
        s
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to end; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One control command; the reply line.
    pub fn ctl(&self, cmd: &str) -> String {
        let mut s = UnixStream::connect(&self.control).expect("control socket");
        s.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
        writeln!(s, "{cmd}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line
    }

    /// Threads of the server process named `name`.
    pub fn threads_named(&self, name: &str) -> usize {
        let dir = format!("/proc/{}/task", self.pid());
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter(|t| {
                        std::fs::read_to_string(t.path().join("comm"))
                            .is_ok_and(|c| c.trim_end() == name)
                    })
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("server log:\n{}", self.log_text());
        }
    }
}

/// A vfio-user client speaking the wire format directly.
pub struct RawClient {
    s: UnixStream,
    id: u16,
}

/// A reply: the payload after the header, or the error the server set.
pub type Reply = Result<Vec<u8>, u32>;

impl RawClient {
    /// Connects (retrying while the server starts); no VERSION yet.
    pub fn connect(path: &Path) -> RawClient {
        let t0 = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
                    return RawClient { s, id: 0 };
                }
                Err(e) => assert!(t0.elapsed() < REPLY_TIMEOUT, "connect: {e}"),
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Connects and negotiates the version.
    pub fn ready(path: &Path) -> RawClient {
        let mut c = Self::connect(path);
        c.version();
        c
    }

    fn header(&mut self, cmd: u16, size: usize, flags: u32) -> Vec<u8> {
        self.id = self.id.wrapping_add(1);
        let mut m = Vec::with_capacity(size);
        m.extend_from_slice(&self.id.to_le_bytes());
        m.extend_from_slice(&cmd.to_le_bytes());
        m.extend_from_slice(&(size as u32).to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        m
    }

    /// Sends raw bytes (with `fds` attached).
    pub fn send(&mut self, msg: &[u8], fds: &[RawFd]) {
        if fds.is_empty() {
            self.s.write_all(msg).expect("send");
        } else {
            let n = self.s.send_with_fds(&[msg], fds).expect("send with fds");
            assert_eq!(n, msg.len());
        }
    }

    /// Reads one reply (an I/O error on timeout or a closed connection).
    pub fn reply(&mut self) -> io::Result<Reply> {
        let mut h = [0u8; HEADER];
        self.s.read_exact(&mut h)?;
        let size = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        let flags = u32::from_le_bytes(h[8..12].try_into().unwrap());
        let error = u32::from_le_bytes(h[12..16].try_into().unwrap());
        let mut rest = vec![0u8; size.saturating_sub(HEADER)];
        self.s.read_exact(&mut rest)?;
        assert_ne!(flags & FLAG_REPLY, 0, "not a reply: {h:?}");
        Ok(if flags & FLAG_ERROR != 0 {
            Err(error)
        } else {
            Ok(rest)
        })
    }

    /// VERSION with the default capabilities.
    pub fn version(&mut self) {
        let json = b"{\"capabilities\":{\"max_msg_fds\":16}}\0";
        let mut m = self.header(CMD_VERSION, HEADER + 4 + json.len(), 0);
        m.extend_from_slice(&0u16.to_le_bytes());
        m.extend_from_slice(&1u16.to_le_bytes());
        m.extend_from_slice(json);
        self.send(&m, &[]);
        self.reply()
            .expect("version reply")
            .expect("version accepted");
    }

    /// DMA_MAP with any flags.
    pub fn dma_map(
        &mut self,
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        fd: RawFd,
    ) -> Reply {
        let mut m = self.header(CMD_DMA_MAP, HEADER + 32, 0);
        m.extend_from_slice(&32u32.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&offset.to_le_bytes());
        m.extend_from_slice(&address.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        self.send(&m, &[fd]);
        self.reply().expect("DMA_MAP reply")
    }

    /// SET_IRQS with any fds.
    pub fn set_irqs(&mut self, index: u32, flags: u32, start: u32, fds: &[RawFd]) -> Reply {
        let mut m = self.header(CMD_SET_IRQS, HEADER + 20, 0);
        for v in [20, flags, index, start, fds.len() as u32] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        self.send(&m, fds);
        self.reply().expect("SET_IRQS reply")
    }

    /// A REGION_READ (`data` empty, `count` bytes) or REGION_WRITE message.
    fn access(
        &mut self,
        cmd: u16,
        region: u32,
        off: u64,
        count: usize,
        data: &[u8],
        flags: u32,
    ) -> Vec<u8> {
        let mut m = self.header(cmd, HEADER + 16 + data.len(), flags);
        m.extend_from_slice(&off.to_le_bytes());
        m.extend_from_slice(&region.to_le_bytes());
        m.extend_from_slice(&(count as u32).to_le_bytes());
        m.extend_from_slice(data);
        m
    }

    /// REGION_READ of `len` bytes; an I/O error if no reply came in time.
    pub fn try_rd(&mut self, region: u32, off: u64, len: usize) -> io::Result<u64> {
        let m = self.access(CMD_REGION_READ, region, off, len, &[], 0);
        self.send(&m, &[]);
        let payload = self
            .reply()?
            .map_err(|e| io::Error::other(format!("read refused: {e}")))?;
        let mut w = [0u8; 8];
        w[..len].copy_from_slice(&payload[16..16 + len]);
        Ok(u64::from_le_bytes(w))
    }

    /// REGION_READ that must succeed.
    pub fn rd(&mut self, region: u32, off: u64, len: usize) -> u64 {
        self.try_rd(region, off, len).expect("region read")
    }

    /// REGION_WRITE; waits for the reply (an I/O error if none came in time).
    pub fn try_wr(&mut self, region: u32, off: u64, len: usize, v: u64) -> io::Result<Reply> {
        let m = self.access(
            CMD_REGION_WRITE,
            region,
            off,
            len,
            &v.to_le_bytes()[..len],
            0,
        );
        self.send(&m, &[]);
        self.reply()
    }

    /// REGION_WRITE that must succeed.
    pub fn wr(&mut self, region: u32, off: u64, len: usize, v: u64) {
        self.try_wr(region, off, len, v)
            .expect("region write reply")
            .expect("region write accepted");
    }

    /// A posted REGION_WRITE (no reply), as QEMU sends notifies.
    pub fn wr_posted(&mut self, region: u32, off: u64, len: usize, v: u64) {
        let data = &v.to_le_bytes()[..len];
        let m = self.access(CMD_REGION_WRITE, region, off, len, data, FLAG_NO_REPLY);
        self.send(&m, &[]);
    }

    /// Negotiates VERSION_1 plus `features` (low word), sets up and enables
    /// `queues` (index, driver queue) and writes DRIVER_OK. Returns the
    /// device status read back.
    pub fn bring_up(&mut self, features: u32, queues: &[(u16, &DriverQueue)]) -> u8 {
        self.wr(0, common::DEVICE_STATUS, 1, 0);
        self.wr(0, common::DEVICE_STATUS, 1, 1);
        self.wr(0, common::DEVICE_STATUS, 1, 3);
        self.wr(0, common::DRIVER_FEATURE_SELECT, 4, 0);
        self.wr(0, common::DRIVER_FEATURE, 4, u64::from(features));
        self.wr(0, common::DRIVER_FEATURE_SELECT, 4, 1);
        self.wr(0, common::DRIVER_FEATURE, 4, 1);
        self.wr(0, common::DEVICE_STATUS, 1, 0xb);
        for &(index, q) in queues {
            self.wr(0, common::QUEUE_SELECT, 2, u64::from(index));
            self.wr(0, common::QUEUE_SIZE, 2, u64::from(q.size));
            self.wr(0, common::QUEUE_DESC, 8, q.desc_table);
            self.wr(0, common::QUEUE_DRIVER, 8, q.avail);
            self.wr(0, common::QUEUE_DEVICE, 8, q.used);
            self.wr(0, common::QUEUE_ENABLE, 2, 1);
        }
        self.wr(0, common::DEVICE_STATUS, 1, 0xf);
        self.rd(0, common::DEVICE_STATUS, 1) as u8
    }

    /// Kicks queue `index` with a posted write.
    pub fn kick(&mut self, index: u16) {
        self.wr_posted(
            0,
            NOTIFY_CFG_OFFSET + 4 * u64::from(index),
            2,
            u64::from(index),
        );
    }

    /// Whether the server closed the connection (EOF within the timeout).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        }
    }

    /// Sends a VERSION message whose header says `message_size` bytes, with
    /// `body` after the header.
    pub fn bad_version(&mut self, message_size: usize, body: &[u8]) {
        let mut m = self.header(CMD_VERSION, message_size, 0);
        m.extend_from_slice(body);
        self.send(&m, &[]);
    }
}
