//! Seeds, written when FREEHINT_FUZZ_SEEDS is set.

use crate::input::gen;
use crate::{op, NUM_QUEUES, W_SIZE};

/// Writes exactly the bytes the decoder reads for each operation.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    /// DMA_MAP (`flags_mode`: 0 read-write, 3 read-only) of fd
    /// `fd_sel` (0 RAM memfd, 4 second memfd, 5 one-page memfd, 6 none,
    /// 7 pipe) at `addr`+`size`, file offset = address.
    fn map(&mut self, flags_mode: u8, fd_sel: u8, addr: u64, size: u64) -> &mut Self {
        self.u8(op::DMA_MAP).u8(flags_mode).u8(fd_sel);
        self.u8(gen::ADDR_RAW).u64(addr);
        self.u8(gen::SIZE_RAW).u64(size);
        self.u8(gen::OFF_SAME)
    }

    /// A full negotiation, all queues enabled with 2^`size_exp` entries
    /// at the harness's ring layout, MSI-X or INTx.
    fn bring_up(&mut self, msix: bool, size_exp: u8) -> &mut Self {
        self.u8(op::BRING_UP).u8(0).u32(u32::MAX).u8(0x1f);
        self.u8(u8::from(msix));
        for _ in 0..NUM_QUEUES {
            self.u8(size_exp);
        }
        self
    }

    /// One device-readable buffer of 1, 2 or 4 pfns on queue `q`.
    fn post_pfns(&mut self, q: u8, pfns: &[u8], notify: bool) -> &mut Self {
        let len_idx = match pfns.len() {
            1 => 0,
            2 => 1,
            4 => 2,
            n => panic!("{n} pfns"),
        };
        self.u8(op::POST).u8(q).u8(0).u8(u8::from(notify));
        self.u8(0).u8(len_idx).u8(0).raw(pfns);
        self.u8(0)
    }

    /// The current hint command id (a 4-byte buffer) on queue `q`.
    fn post_cmd_id(&mut self, q: u8) -> &mut Self {
        self.u8(op::POST).u8(q).u8(0).u8(1);
        self.u8(0).u8(0).u8(2).u8(0)
    }

    /// A device-writable page (a free page hint) on queue `q`.
    fn post_page(&mut self, q: u8, page: u8) -> &mut Self {
        self.u8(op::POST).u8(q).u8(0).u8(1);
        self.u8(0x85).u8(page).u8(0)
    }

    fn notify(&mut self, q: u8) -> &mut Self {
        self.u8(op::NOTIFY).u8(q)
    }

    /// 1 stats request, 2 new hint round, 3 stop, 4 finish.
    fn host(&mut self, what: u8) -> &mut Self {
        self.u8(op::HOST).u8(what)
    }

    fn done(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

pub fn all() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mut e = Enc::default();

    // A clean driver: map RAM, bring up with MSI-X, inflate, deflate,
    // stats, a hint round (command id, then free pages), reset.
    e.map(0, 0, 0, W_SIZE).bring_up(true, 8);
    e.post_pfns(0, &[10, 11, 12, 13], true);
    e.post_pfns(1, &[10, 11], true);
    e.post_pfns(2, &[0, 0, 0, 0], true).host(1);
    e.host(2).post_cmd_id(3);
    for page in 0..8 {
        e.post_page(3, page);
    }
    e.host(4).u8(op::PENDING).u8(op::RESET);
    out.push(("clean-driver", e.done()));

    // INTx with a full eventfd; more buffers than one notify's budget.
    e.map(0, 0, 0, W_SIZE).bring_up(false, 8);
    // SET_IRQS INTx TRIGGER|EVENTFD 0..1, one full eventfd.
    e.u8(op::SET_IRQS).u8(3).raw(&[0, 0, 0, 0, 0, 0, 1, 0, 4]);
    for i in 0..150u8 {
        e.post_pfns(0, &[i % 60], false);
    }
    e.notify(0).u8(op::PENDING).u8(op::PENDING);
    out.push(("intx-storm", e.done()));

    // Read-only RAM: the device must never write it.
    e.map(3, 0, 0, W_SIZE).bring_up(true, 6);
    e.post_pfns(0, &[5, 6], true).post_pfns(3, &[1], true);
    out.push(("read-only-ram", e.done()));

    // Overlapping maps, partial unmaps, a map past EOF, a pipe, no fd,
    // UNMAP_ALL, and more maps than the table holds.
    e.map(0, 0, 0, W_SIZE)
        .map(0, 4, 0x4000, 0x8000)
        .map(3, 0, 0x10000, 0x3000);
    e.map(0, 7, 0x20000, 0x1000)
        .map(0, 5, 0, 0x2000)
        .map(0, 6, 0xc0000, 0x1000);
    e.u8(op::DMA_UNMAP)
        .u8(0)
        .u8(gen::ADDR_PAGE)
        .u8(3)
        .u8(gen::SIZE_PAGES)
        .u8(2);
    e.u8(op::DMA_UNMAP).u8(3).raw(&[0, 0, 0, 0]);
    e.u8(op::MAP_MANY).u16(0).u8(0xa5).u8(7).u8(0);
    out.push(("dma-table", e.done()));

    // Reads all over BAR0, BAR1, config space and an absent region,
    // then the PCI_CFG window onto device_status and the ISR.
    for region_sel in [0u8, 6, 9, 15] {
        for pt in 0..24u8 {
            e.u8(op::READ)
                .u8(region_sel)
                .u8(0)
                .u8(pt)
                .u8(4)
                .u8(0)
                .u8(pt % 4);
        }
    }
    e.u8(op::WINDOW).raw(&[0, 6, 0, 0]);
    e.u8(op::WINDOW).raw(&[0, 23, 0, 0]);
    out.push(("registers", e.done()));

    // A raw client: VERSION, DEVICE_GET_INFO, a config space read, a
    // status write, a DMA_MAP of the RAM memfd.
    e.map(0, 0, 0, W_SIZE);
    e.u8(op::RAW).u8(4);
    e.u8(0).u8(0).u16(1).u8(0).u8(1).u32(1 << 20).u16(0).u16(0);
    e.u8(5).u8(0).u16(2).raw(&[0; 16]);
    e.u8(10).u8(0).u16(3).u8(9).u8(0).u8(0).u8(4).u8(3);
    e.u8(12)
        .u8(0)
        .u16(4)
        .u8(0)
        .u8(0)
        .u8(6)
        .u8(4)
        .u8(0)
        .u8(0)
        .u8(1);
    e.u8(2).u8(0).u16(5).u8(0).u8(0);
    e.u8(gen::ADDR_PAGE)
        .u8(0)
        .u8(gen::SIZE_PAGES)
        .u8(15)
        .u8(gen::OFF_SAME);
    e.u8(1);
    out.push(("raw-client", e.done()));

    // Malformed VERSION messages: data without its NUL, then a
    // message_size below the VERSION struct (each panics the crate).
    e.u8(op::RAW).u8(1);
    e.u8(0)
        .u8(0)
        .u16(7)
        .u8(3)
        .u8(8)
        .raw(b"garbage!")
        .u16(0)
        .u16(0);
    e.u8(0).u8(0).u16(8).u8(4).u8(3).u16(0).u16(0);
    e.u8(1);
    e.u8(op::RAW).u8(0);
    e.u8(0).u8(0).u16(9).u8(4).u8(3).u16(0).u16(0);
    e.u8(1);
    out.push(("raw-bad-version", e.done()));
    out
}
