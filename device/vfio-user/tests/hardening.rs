//! A hostile client and a hostile driver against the real server binary,
//! over its real sockets: read-only DMA maps, reset/activate storms, a
//! driver that keeps re-posting buffers, interrupt fds that are not
//! eventfds or cannot take a write, socket permissions and dump paths, and
//! a malformed VERSION message.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{guest_memory, memfd, RawClient, ServerProc, DMA_READ, DMA_WRITE, RAM};
use freehint_device::test_utils::{DriverQueue, RawDesc};
use freehint_vfio_user::virtio_pci::{common as regs, status};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `VIRTIO_BALLOON_F_STATS_VQ`.
const STATS_VQ: u32 = 1 << 1;
/// Generous bound for the server to answer while a hostile driver runs.
const LIVENESS: Duration = Duration::from_secs(10);

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(60), "never: {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// A read-only DMA_MAP must never become memory the device writes: the
/// device would kill the server with its first used-ring write.
#[test]
fn read_only_dma_map_is_never_written() {
    let mut srv = ServerProc::start("ro-map", &[]);
    let ram = memfd(RAM);
    let mem = guest_memory(&ram);
    let mut c = RawClient::ready(&srv.socket);
    c.dma_map(DMA_READ, 0, 0, RAM, ram.as_raw_fd())
        .expect("a read-only map is accepted (and left out)");
    let mut q = DriverQueue::new(&mem, 0x80_0000, 64);
    let st = c.bring_up(0, &[(0, &q)]);
    let pfns = 0xD0_0000;
    mem.write_obj(100u32, GuestAddress(pfns)).unwrap();
    q.add_chain(&mem, &[(pfns, 4, false)]).unwrap();
    c.kick(0);
    let after = match c.try_rd(0, regs::DEVICE_STATUS, 1) {
        Ok(v) => v,
        Err(e) => panic!(
            "no answer ({e}); server exit: {:?}",
            srv.wait_exit(Duration::from_secs(5))
        ),
    };
    assert!(srv.alive());
    assert!(
        q.take_used(&mem).is_empty(),
        "the device wrote a read-only ring"
    );
    assert_ne!(
        u64::from(st) & after & u64::from(status::DEVICE_NEEDS_RESET),
        0,
        "without writable memory the device cannot run (status {st:#x}, then {after:#x})"
    );
}

/// Every activation with statistics polling starts a poller; a reset must
/// end it at once, however long its interval.
#[test]
fn reset_activate_cycles_leave_at_most_one_stats_thread() {
    let srv = ServerProc::start("poller", &["--stats-interval", "3600"]);
    let ram = memfd(RAM);
    let mem = guest_memory(&ram);
    let mut c = RawClient::ready(&srv.socket);
    c.dma_map(DMA_READ | DMA_WRITE, 0, 0, RAM, ram.as_raw_fd())
        .unwrap();
    let q = DriverQueue::new(&mem, 0x80_0000, 64);
    for cycle in 0..300 {
        // bring_up starts with a reset (status 0).
        assert_eq!(c.bring_up(STATS_VQ, &[(0, &q)]), 0xf, "cycle {cycle}");
    }
    let pollers = srv.threads_named("balloon-stats");
    assert!(pollers <= 1, "{pollers} stats threads after 300 cycles");
    c.wr(0, regs::DEVICE_STATUS, 1, 0);
    wait_until("the last poller ends after a reset", || {
        srv.threads_named("balloon-stats") == 0
    });
}

/// The rings a re-posting driver touches.
#[derive(Clone, Copy)]
struct Rings {
    avail: u64,
    used: u64,
    size: u16,
}

/// A driver that keeps its queue full: whenever the device uses buffers it
/// posts as many again (descriptor 0 every time), until `stop` or `cap`.
/// Returns how many buffers it posted in all.
fn repost(mem: GuestMemoryMmap, q: Rings, stop: Arc<AtomicBool>, cap: Duration) -> u64 {
    let (avail_idx, used_idx) = (GuestAddress(q.avail + 2), GuestAddress(q.used + 2));
    let mut avail = 0u16;
    let mut posted = 0u64;
    let t0 = Instant::now();
    while !stop.load(Ordering::Acquire) && t0.elapsed() < cap {
        let used: u16 = mem.read_obj(used_idx).unwrap();
        let want = used.wrapping_add(q.size);
        if want != avail {
            posted += u64::from(want.wrapping_sub(avail));
            avail = want;
            mem.write_obj(avail, avail_idx).unwrap();
        }
        thread::sleep(Duration::from_micros(200));
    }
    posted
}

fn metric(srv: &ServerProc, name: &str) -> u64 {
    let reply: serde_json::Value = serde_json::from_str(&srv.ctl("metrics")).expect("JSON");
    reply["metrics"][name].as_u64().expect("metric present")
}

/// A driver that keeps the deflate queue full: one notify must not keep
/// the serve loop from answering a BAR read and a DMA_MAP, and all the
/// posted work is done in the end without another notify.
#[test]
fn reposting_driver_cannot_stall_the_serve_loop() {
    const PFNS: u32 = 4096;
    let srv = ServerProc::start("repost", &[]);
    let ram = memfd(RAM);
    let mem = guest_memory(&ram);
    let mut c = RawClient::ready(&srv.socket);
    c.dma_map(DMA_READ | DMA_WRITE, 0, 0, RAM, ram.as_raw_fd())
        .unwrap();
    let q = DriverQueue::new(&mem, 0x80_0000, 256);
    // Descriptor 0: all 4096 pfns of RAM; every avail slot names it (zeroed).
    let buf = 0xC0_0000;
    let pfns: Vec<u8> = (0..PFNS).flat_map(u32::to_le_bytes).collect();
    mem.write_slice(&pfns, GuestAddress(buf)).unwrap();
    let desc = RawDesc {
        addr: buf,
        len: PFNS * 4,
        flags: 0,
        next: 0,
    };
    q.write_desc(&mem, 0, desc);
    assert_eq!(c.bring_up(0, &[(1, &q)]), 0xf);

    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let rings = Rings {
            avail: q.avail,
            used: q.used,
            size: q.size,
        };
        let (mem, stop) = (guest_memory(&ram), Arc::clone(&stop));
        thread::spawn(move || repost(mem, rings, stop, Duration::from_secs(45)))
    };
    wait_until("the guest posts", || {
        mem.read_obj::<u16>(GuestAddress(q.avail + 2)).unwrap() != 0
    });
    c.kick(1);
    // The device has gone through the ring once and the guest refilled it.
    wait_until("the device uses more than a ring's worth", || {
        mem.read_obj::<u16>(GuestAddress(q.used + 2)).unwrap() > q.size + 8
    });
    let t0 = Instant::now();
    let read = c.try_rd(0, regs::DEVICE_STATUS, 1);
    let extra = memfd(1 << 20);
    let map = read
        .is_ok()
        .then(|| c.dma_map(DMA_READ | DMA_WRITE, 0, 1 << 32, 1 << 20, extra.as_raw_fd()));
    let waited = t0.elapsed();
    stop.store(true, Ordering::Release);
    let posted = guest.join().unwrap();
    assert_eq!(read.expect("BAR read answered"), 0xf);
    assert!(matches!(map, Some(Ok(_))), "DMA_MAP answered: {map:?}");
    assert!(waited < LIVENESS, "the serve loop was held for {waited:?}");
    assert!(posted > u64::from(q.size), "the guest re-posted ({posted})");
    // Everything posted is processed, with no further notify.
    let avail: u16 = mem.read_obj(GuestAddress(q.avail + 2)).unwrap();
    wait_until("the device catches up", || {
        mem.read_obj::<u16>(GuestAddress(q.used + 2)).unwrap() == avail
    });
    assert_eq!(metric(&srv, "deflate_pages"), posted * u64::from(PFNS));
}

/// A pipe whose buffer is full.
fn full_pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two fds pipe2 writes.
    assert_eq!(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) },
        0
    );
    // SAFETY: both fds are fresh and owned by nobody else.
    let (r, mut w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    while w.write(&[0u8; 4096]).is_ok() {}
    // SAFETY: F_SETFL on an fd we own; the server gets a blocking pipe.
    assert_eq!(unsafe { libc::fcntl(fds[1], libc::F_SETFL, 0) }, 0);
    (r, w)
}

/// DRIVER_OK without guest memory fails activation, which raises a config
/// interrupt (DEVICE_NEEDS_RESET): the interrupt must not block the server.
fn raise_config_interrupt(c: &mut RawClient) {
    let scratch = guest_memory(&memfd(RAM));
    let q = DriverQueue::new(&scratch, 0x80_0000, 64);
    let st = c.bring_up(0, &[(0, &q)]);
    assert_ne!(st & status::DEVICE_NEEDS_RESET, 0, "status {st:#x}");
    assert_eq!(c.rd(VFIO_PCI_CONFIG_REGION_INDEX, 0, 4), 0x1045_1af4);
}

const INTX_TRIGGER: u32 = VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD;

/// SET_IRQS with a pipe (full, so a write blocks) is refused, and the
/// interrupt that follows does not block the server.
#[test]
fn set_irqs_refuses_a_pipe() {
    let mut srv = ServerProc::start("pipe-irq", &[]);
    let mut c = RawClient::ready(&srv.socket);
    let (_r, w) = full_pipe();
    let reply = c.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, INTX_TRIGGER, 0, &[w.as_raw_fd()]);
    assert!(reply.is_err(), "a pipe is not an interrupt fd");
    raise_config_interrupt(&mut c);
    assert!(srv.alive());
}

/// An eventfd whose counter the client filled would block a plain write:
/// the server writes it non-blocking.
#[test]
fn a_full_eventfd_never_blocks_the_server() {
    let srv = ServerProc::start("full-eventfd", &[]);
    let mut c = RawClient::ready(&srv.socket);
    // SAFETY: eventfd has no memory-safety preconditions.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd owned by nobody else.
    let mut ev = unsafe { File::from_raw_fd(fd) };
    ev.write_all(&(u64::MAX - 1).to_ne_bytes()).unwrap();
    c.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, INTX_TRIGGER, 0, &[ev.as_raw_fd()])
        .expect("an eventfd is accepted");
    raise_config_interrupt(&mut c);
    assert!(srv.log_text().contains("DEVICE_NEEDS_RESET"));
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Both sockets are 0600 whatever the umask (the server runs with 022).
#[test]
fn sockets_are_created_0600() {
    let srv = ServerProc::start("modes", &[]);
    assert_eq!(mode(&srv.socket), 0o600, "vfio-user socket");
    assert_eq!(mode(&srv.control), 0o600, "control socket");
    // Still usable by its owner.
    let mut c = RawClient::ready(&srv.socket);
    assert_eq!(c.rd(VFIO_PCI_CONFIG_REGION_INDEX, 0, 4), 0x1045_1af4);
    assert!(srv.ctl("status").contains("\"ok\":true"));
}

/// `hint-dump` writes only a plain file name inside `--dump-dir`, and
/// nothing at all without it.
#[test]
fn hint_dump_is_confined_to_the_dump_dir() {
    let srv = ServerProc::start("dump-off", &["--ram-size", "16M"]);
    let victim = srv.dir.join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let reply = srv.ctl(&format!("hint-dump {}", victim.display()));
    assert!(reply.contains("\"ok\":false"), "{reply}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    let dir = srv.dir.clone();
    drop(srv);

    std::fs::create_dir_all(dir.join("dumps")).unwrap();
    std::fs::write(dir.join("victim"), b"keep").unwrap();
    let dumps = dir.join("dumps");
    let d = dumps.to_str().unwrap();
    let srv = ServerProc::start_in(dir.clone(), &["--ram-size", "16M", "--dump-dir", d]);
    let victim = dir.join("victim");
    std::os::unix::fs::symlink(&victim, dumps.join("link")).unwrap();
    let abs = victim.display().to_string();
    for name in [abs.as_str(), "../victim", "..", "link"] {
        let reply = srv.ctl(&format!("hint-dump {name}"));
        assert!(reply.contains("\"ok\":false"), "{name}: {reply}");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    let reply = srv.ctl("hint-dump set.bin");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    let set = dumps.join("set.bin");
    assert_eq!(std::fs::read(&set).unwrap().len(), 4096 / 8);
    assert_eq!(mode(&set), 0o600);
}

/// A VERSION message whose size is smaller than the message itself panics
/// the vfio-user library; with `--persist` the server must drop that client
/// and serve the next one.
#[test]
fn short_version_message_does_not_end_a_persistent_server() {
    let mut srv = ServerProc::start("short-version", &["--persist"]);
    let mut bad = RawClient::connect(&srv.socket);
    bad.bad_version(16, &[0, 0, 1, 0]);
    assert!(bad.closed(), "the server drops the bad client");
    let mut good = RawClient::ready(&srv.socket);
    assert_eq!(good.rd(VFIO_PCI_CONFIG_REGION_INDEX, 0, 4), 0x1045_1af4);
    drop(good);
    let mut vmm = vfio_user::Client::new(&srv.socket).expect("a well-behaved client");
    let mut id = [0u8; 4];
    vmm.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
        .unwrap();
    assert_eq!(u32::from_le_bytes(id), 0x1045_1af4);
    assert!(srv.alive());
}
