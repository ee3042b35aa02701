//! Raw client byte streams: `serve()` on a real socket, fed framed
//! messages whose fields are fuzzed, from a client thread.

use super::{QueueModel, Session};
use crate::files::{eventfd, pipe};
use crate::input::{gen_addr, gen_offset, gen_region, gen_region_offset, gen_size, Cursor};
use crate::{HDR_NO_REPLY, MAX_RAW_SESSIONS, NUM_QUEUES, RAW_ALLOC_CAP};
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
};

impl Session {
    // --- raw client byte streams through serve() --------------------------

    pub(crate) fn raw_session(&mut self, c: &mut Cursor) {
        if self.raw_sessions >= MAX_RAW_SESSIONS {
            return;
        }
        self.raw_sessions += 1;
        let n = 1 + usize::from(c.u8() % 12);
        let mut msgs = Vec::with_capacity(n);
        for _ in 0..n {
            msgs.push(self.raw_message(c));
        }
        if c.u8() % 8 == 0 {
            // A partial header at the end.
            let k = 1 + usize::from(c.u8() % 15);
            msgs.push((c.bytes(k), Vec::new()));
        }
        let stats = self.dev.stats();
        let path = socket_path();
        let stop = AtomicBool::new(false);
        let before_panics = RAW_PANICS.load(Ordering::SeqCst);
        let result = std::thread::scope(|s| {
            let client = s.spawn(|| raw_client(&path, msgs, &stop));
            IN_RAW_SESSION.store(true, Ordering::SeqCst);
            let r = freehint_vfio_user::serve(&path, &mut self.dev, false, false);
            IN_RAW_SESSION.store(false, Ordering::SeqCst);
            stop.store(true, Ordering::SeqCst);
            client.join().unwrap();
            r
        });
        let panicked = RAW_PANICS.load(Ordering::SeqCst) > before_panics;
        assert!(result.is_ok(), "serve: {result:?}");
        assert!(!path.exists(), "serve left its socket file");
        let after = self.dev.stats();
        assert_eq!(after.clients, stats.clients + 1);
        assert_eq!(
            after.panicked_sessions,
            stats.panicked_sessions + u64::from(panicked),
            "a panic of the vfio_user crate ends the session and is counted"
        );
        assert!(
            self.dev.dma_ranges().is_empty(),
            "the client's memory is dropped"
        );
        assert_eq!(self.dev.transport().status(), 0, "the device is reset");
        self.queues = [QueueModel::default(); NUM_QUEUES];
    }

    /// One framed message: exactly the bytes the vfio_user crate reads for
    /// it (so that the stream stays in step), with its fds.
    pub(crate) fn raw_message(&mut self, c: &mut Cursor) -> (Vec<u8>, Vec<File>) {
        let command = c.pick(&[
            1u16, 1, 2, 2, 3, 4, 5, 7, 8, 8, 9, 9, 10, 10, 13, 0, 6, 11, 14, 0xffff,
        ]);
        let flags = match c.u8() % 8 {
            0..=4 => 0,
            5 | 6 => HDR_NO_REPLY,
            _ => c.u32(),
        };
        let no_reply = flags & HDR_NO_REPLY != 0;
        let id = c.u16();
        let mut body = Vec::new();
        let mut fds = Vec::new();
        // VERSION: message_size says how much data follows; the other
        // commands' sizes are fixed (the crate ignores the field).
        let mut size: Option<u32> = None;
        match command {
            1 if !no_reply => {
                let data: Vec<u8> = match c.u8() % 6 {
                    0 | 1 => {
                        let mut j = format!(
                            "{{\"capabilities\":{{\"max_msg_fds\":{},\"max_data_xfer_size\":{}}}}}",
                            c.u8(),
                            c.u32()
                        )
                        .into_bytes();
                        j.push(0);
                        j
                    }
                    2 => {
                        let mut v: Vec<u8> = c.short_bytes(64).into_iter().map(|b| b | 1).collect();
                        v.push(0);
                        v
                    }
                    3 => c.short_bytes(64), // no NUL: the crate panics
                    4 => {
                        // message_size below the VERSION struct: the crate panics.
                        size = Some(u32::from(c.u8() % 20));
                        Vec::new()
                    }
                    _ => vec![b'{', 0, b'}', 0],
                };
                body.extend_from_slice(&c.u16().to_le_bytes()); // major
                body.extend_from_slice(&c.u16().to_le_bytes()); // minor
                if size.is_none() {
                    size = Some(20 + data.len().min(RAW_ALLOC_CAP as usize) as u32);
                    body.extend_from_slice(&data);
                }
            }
            2 => {
                let fl = c.pick(&[3u32, 3, 1, 2, 0, 0x1003]);
                let sel = c.u8();
                let addr = gen_addr(c);
                let sz = gen_size(c);
                let off = gen_offset(c, addr);
                body.extend_from_slice(&32u32.to_le_bytes());
                body.extend_from_slice(&fl.to_le_bytes());
                body.extend_from_slice(&off.to_le_bytes());
                body.extend_from_slice(&addr.to_le_bytes());
                body.extend_from_slice(&sz.to_le_bytes());
                let nfds = match sel % 8 {
                    0..=5 => 1,
                    6 => 0,
                    _ => 2,
                };
                for k in 0..nfds {
                    let which = usize::from(sel >> 4) % 3;
                    if k == 0 && sel & 8 == 0 {
                        let f = self.file(which);
                        if fl & 2 != 0 {
                            f.mark_writable(off, sz);
                        }
                        fds.push(f.file.try_clone().unwrap());
                    } else {
                        fds.push(pipe());
                    }
                }
            }
            3 => {
                let fl = c.pick(&[0u32, 0, 4, 2, 6]);
                body.extend_from_slice(&24u32.to_le_bytes());
                body.extend_from_slice(&fl.to_le_bytes());
                body.extend_from_slice(&gen_addr(c).to_le_bytes());
                body.extend_from_slice(&gen_size(c).to_le_bytes());
            }
            4 | 7 if !no_reply => {
                body.extend(c.bytes(16));
            }
            5 if !no_reply => {
                body.extend(c.bytes(8)); // argsz, flags
                body.extend_from_slice(&u32::from(c.u8() % 10).to_le_bytes()); // index
                body.extend(c.bytes(20));
            }
            8 => {
                let index = c.pick(&[2u32, 2, 0, 1, 3, 4, 5]);
                let fl = c.pick(&[
                    VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
                    VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_NONE,
                    VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_NONE,
                    VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_DATA_NONE,
                    VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_BOOL,
                ]);
                let start = u32::from(c.u8() % 8);
                let count = u32::from(c.u8() % 8);
                body.extend_from_slice(&20u32.to_le_bytes());
                body.extend_from_slice(&fl.to_le_bytes());
                body.extend_from_slice(&index.to_le_bytes());
                body.extend_from_slice(&start.to_le_bytes());
                body.extend_from_slice(&count.to_le_bytes());
                let kinds = c.u8();
                for k in 0..count.min(4) {
                    fds.push(match (kinds >> (2 * k)) & 3 {
                        0 | 1 => eventfd(false),
                        2 => eventfd(true),
                        _ => pipe(),
                    });
                }
            }
            9 | 10 if !(command == 9 && no_reply) => {
                let region = gen_region(c);
                let off = gen_region_offset(c, region);
                let count = match c.u8() % 4 {
                    0 | 1 => 1u32 << (c.u8() % 4),
                    2 => u32::from(c.u16()) % (RAW_ALLOC_CAP + 1),
                    _ => 256,
                };
                body.extend_from_slice(&off.to_le_bytes());
                body.extend_from_slice(&region.to_le_bytes());
                body.extend_from_slice(&count.to_le_bytes());
                if command == 10 && region < 9 {
                    let mut data = c.bytes(usize::min(count as usize, 8));
                    data.resize(count as usize, 0);
                    body.extend(data);
                }
            }
            _ => {}
        }
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&id.to_le_bytes());
        msg.extend_from_slice(&command.to_le_bytes());
        let size = size.unwrap_or(16 + body.len() as u32);
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes());
        msg.extend(body);
        (msg, fds)
    }
}

// ---------------------------------------------------------------------------
// Raw sessions: a client thread on a real socket

pub(crate) static IN_RAW_SESSION: AtomicBool = AtomicBool::new(false);
pub(crate) static RAW_PANICS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn socket_path() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("fz-vfio-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    });
    dir.join(format!("s{}", N.fetch_add(1, Ordering::Relaxed)))
}

pub(crate) fn send_with_fds(s: &UnixStream, buf: &[u8], fds: &[File]) -> bool {
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let payload = std::mem::size_of_val(raw.as_slice()) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
    let mut sent = 0usize;
    while sent < buf.len() {
        let rest = &buf[sent..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: msghdr is plain data; zeroed is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // The fds go with the first bytes only.
        if sent == 0 && !raw.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` bytes, enough for one
            // header with `raw.len()` fds.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    payload as usize,
                );
            }
        }
        // SAFETY: msg describes live buffers; MSG_NOSIGNAL: a closed peer
        // is an error, not SIGPIPE.
        let r = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r <= 0 {
            return false;
        }
        sent += r as usize;
    }
    true
}

pub(crate) fn raw_client(path: &Path, msgs: Vec<(Vec<u8>, Vec<File>)>, stop: &AtomicBool) {
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(_) if !stop.load(Ordering::SeqCst) => std::thread::yield_now(),
            Err(_) => return,
        }
    };
    std::thread::scope(|s| {
        let mut rd = stream.try_clone().unwrap();
        let reader = s.spawn(move || {
            let mut sink = [0u8; 4096];
            while matches!(rd.read(&mut sink), Ok(n) if n > 0) {}
        });
        for (buf, fds) in &msgs {
            if !send_with_fds(&stream, buf, fds) {
                break;
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        // Joined explicitly: the scope's own wait does not wait for the
        // thread's exit (its TLS destructors), which LeakSanitizer would
        // see as a leak.
        reader.join().unwrap();
    });
}

/// Lets a panic inside the vfio_user crate during a raw session unwind (the
/// server's catch_unwind is for it) and counts it; any other panic goes to
/// the hook installed before (libFuzzer's, which aborts).
pub(crate) fn install_panic_hook() {
    let fuzzer_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let upstream = info
            .location()
            .is_some_and(|l| l.file().contains("vfio_user-0."));
        if upstream && IN_RAW_SESSION.load(Ordering::SeqCst) {
            RAW_PANICS.fetch_add(1, Ordering::SeqCst);
            return;
        }
        fuzzer_hook(info);
    }));
}
