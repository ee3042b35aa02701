// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! The virtio-balloon ABI (virtio 1.2 §5.5, Linux
//! `include/uapi/linux/virtio_balloon.h` of 6.12) plus this project's
//! [`VIRTIO_BALLOON_F_FREE_PAGE_BITMAP`] feature bit.
//!
//! This file is self-contained (only `core`). All multi-byte fields are
//! little-endian (virtio 1.x).

use core::fmt;

/// Virtio device id of the balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;

/// Feature bit: host must be told before the guest reuses deflated pages.
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
/// Feature bit: a statistics virtqueue is present.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Feature bit: guest deflates the balloon on out-of-memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit: free page hinting virtqueue (standard protocol).
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
/// Feature bit: guest uses page poisoning; `poison_val` is valid.
pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
/// Feature bit: free page reporting virtqueue.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// Feature bit (freehint extension, see docs/protocol.md): free page hints
/// are answered as a bitmap over a device-supplied layout. Only valid
/// together with [`VIRTIO_BALLOON_F_FREE_PAGE_HINT`]. Bit 23 is the top of
/// the device-specific range 0–23, far from upstream's sequential allocation.
pub const VIRTIO_BALLOON_F_FREE_PAGE_BITMAP: u32 = 23;
/// Transport feature bit: the driver may use indirect descriptor tables
/// (`VIRTQ_DESC_F_INDIRECT`); without it a driver must not.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Transport feature bit: virtio 1.x device.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Feature mask for a feature bit number (`1 << bit`, 0 for bits ≥ 64).
#[inline]
pub const fn feature(bit: u32) -> u64 {
    if bit < 64 {
        1u64 << bit
    } else {
        0
    }
}

/// Whether `features` has feature bit `bit`.
#[inline]
pub const fn has_feature(features: u64, bit: u32) -> bool {
    features & feature(bit) != 0
}

/// Whether the bitmap hint protocol is in use for these negotiated features
/// (needs both [`VIRTIO_BALLOON_F_FREE_PAGE_HINT`] and
/// [`VIRTIO_BALLOON_F_FREE_PAGE_BITMAP`]).
#[inline]
pub const fn bitmap_hints(features: u64) -> bool {
    has_feature(features, VIRTIO_BALLOON_F_FREE_PAGE_HINT)
        && has_feature(features, VIRTIO_BALLOON_F_FREE_PAGE_BITMAP)
}

/// Size of a pfn in the inflate/deflate interface (4 KiB pages, le32 pfns).
pub const VIRTIO_BALLOON_PFN_SHIFT: u32 = 12;

/// Config offset of `num_pages` (le32, device writes: pages the host wants).
pub const CONFIG_NUM_PAGES: usize = 0;
/// Config offset of `actual` (le32, driver writes: pages in the balloon).
pub const CONFIG_ACTUAL: usize = 4;
/// Config offset of `free_page_hint_cmd_id` (le32, device writes).
pub const CONFIG_FREE_PAGE_HINT_CMD_ID: usize = 8;
/// Config offset of `poison_val` (le32, driver writes with PAGE_POISON).
pub const CONFIG_POISON_VAL: usize = 12;
/// Size of the balloon config space.
pub const CONFIG_SIZE: usize = 16;

/// Command id: stop hinting (driver → device as the end marker; device →
/// driver in config to abort a round).
pub const FREE_PAGE_HINT_CMD_ID_STOP: u32 = 0;
/// Command id: the device no longer needs hinted pages (device → driver).
pub const FREE_PAGE_HINT_CMD_ID_DONE: u32 = 1;
/// First command id the device hands out (as QEMU does).
pub const FREE_PAGE_HINT_CMD_ID_MIN: u32 = 0x8000_0000;

/// The command id after `prev`: `prev + 1`, wrapping back to
/// [`FREE_PAGE_HINT_CMD_ID_MIN`] (never STOP or DONE).
///
/// ```
/// use freehint_protocol::balloon::*;
/// assert_eq!(next_cmd_id(FREE_PAGE_HINT_CMD_ID_STOP), FREE_PAGE_HINT_CMD_ID_MIN);
/// assert_eq!(next_cmd_id(0x8000_0000), 0x8000_0001);
/// assert_eq!(next_cmd_id(u32::MAX), FREE_PAGE_HINT_CMD_ID_MIN);
/// ```
#[inline]
pub const fn next_cmd_id(prev: u32) -> u32 {
    if prev < FREE_PAGE_HINT_CMD_ID_MIN || prev == u32::MAX {
        FREE_PAGE_HINT_CMD_ID_MIN
    } else {
        prev + 1
    }
}

/// The balloon config space (`struct virtio_balloon_config`), laid out as in
/// memory: four 32-bit fields, no padding, [`CONFIG_SIZE`] bytes.
///
/// The fields hold values in the host's byte order. The wire (virtio 1.x)
/// is little-endian: [`Self::to_bytes`]/[`Self::from_bytes`] convert, and
/// [`Self::to_le`]/[`Self::from_le`] give an image whose raw bytes are the
/// wire bytes on any host. With the crate feature `vm-memory` the type is
/// vm-memory's `ByteValued`, so a device reads and writes that image as a
/// byte slice.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConfigSpace {
    /// Pages the host wants the guest to give up.
    pub num_pages: u32,
    /// Pages the guest has in the balloon.
    pub actual: u32,
    /// Current free page hint command id.
    pub free_page_hint_cmd_id: u32,
    /// Page poison value (with PAGE_POISON).
    pub poison_val: u32,
}

// The layout the offsets above describe: no padding, nothing after.
const _: () = assert!(core::mem::size_of::<ConfigSpace>() == CONFIG_SIZE);

impl ConfigSpace {
    /// Little-endian wire image of the config space.
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[CONFIG_NUM_PAGES..CONFIG_NUM_PAGES + 4].copy_from_slice(&self.num_pages.to_le_bytes());
        b[CONFIG_ACTUAL..CONFIG_ACTUAL + 4].copy_from_slice(&self.actual.to_le_bytes());
        b[CONFIG_FREE_PAGE_HINT_CMD_ID..CONFIG_FREE_PAGE_HINT_CMD_ID + 4]
            .copy_from_slice(&self.free_page_hint_cmd_id.to_le_bytes());
        b[CONFIG_POISON_VAL..CONFIG_POISON_VAL + 4].copy_from_slice(&self.poison_val.to_le_bytes());
        b
    }

    /// Decodes a little-endian config space image.
    pub fn from_bytes(b: &[u8; CONFIG_SIZE]) -> Self {
        let f = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        Self {
            num_pages: f(CONFIG_NUM_PAGES),
            actual: f(CONFIG_ACTUAL),
            free_page_hint_cmd_id: f(CONFIG_FREE_PAGE_HINT_CMD_ID),
            poison_val: f(CONFIG_POISON_VAL),
        }
    }

    /// The same config with every field stored little-endian, so that its
    /// in-memory bytes are the wire image (a no-op on little-endian hosts).
    pub const fn to_le(self) -> Self {
        Self {
            num_pages: self.num_pages.to_le(),
            actual: self.actual.to_le(),
            free_page_hint_cmd_id: self.free_page_hint_cmd_id.to_le(),
            poison_val: self.poison_val.to_le(),
        }
    }

    /// The inverse of [`Self::to_le`]: a config whose in-memory bytes were
    /// the wire image, with its fields back in the host's byte order.
    pub const fn from_le(self) -> Self {
        Self {
            num_pages: u32::from_le(self.num_pages),
            actual: u32::from_le(self.actual),
            free_page_hint_cmd_id: u32::from_le(self.free_page_hint_cmd_id),
            poison_val: u32::from_le(self.poison_val),
        }
    }
}

/// Size of one `struct virtio_balloon_stat` (le16 tag + le64 value, packed).
pub const VIRTIO_BALLOON_STAT_SIZE: usize = 10;

/// Stat tag: amount of memory swapped in (bytes).
pub const VIRTIO_BALLOON_S_SWAP_IN: u16 = 0;
/// Stat tag: amount of memory swapped out (bytes).
pub const VIRTIO_BALLOON_S_SWAP_OUT: u16 = 1;
/// Stat tag: number of major faults.
pub const VIRTIO_BALLOON_S_MAJFLT: u16 = 2;
/// Stat tag: number of minor faults.
pub const VIRTIO_BALLOON_S_MINFLT: u16 = 3;
/// Stat tag: total amount of free memory (bytes).
pub const VIRTIO_BALLOON_S_MEMFREE: u16 = 4;
/// Stat tag: total amount of memory (bytes).
pub const VIRTIO_BALLOON_S_MEMTOT: u16 = 5;
/// Stat tag: available memory as in /proc (bytes).
pub const VIRTIO_BALLOON_S_AVAIL: u16 = 6;
/// Stat tag: disk caches (bytes).
pub const VIRTIO_BALLOON_S_CACHES: u16 = 7;
/// Stat tag: hugetlb page allocations.
pub const VIRTIO_BALLOON_S_HTLB_PGALLOC: u16 = 8;
/// Stat tag: hugetlb page allocation failures.
pub const VIRTIO_BALLOON_S_HTLB_PGFAIL: u16 = 9;
/// Stat tag: OOM killer invocations.
pub const VIRTIO_BALLOON_S_OOM_KILL: u16 = 10;
/// Stat tag: memory allocation stalls.
pub const VIRTIO_BALLOON_S_ALLOC_STALL: u16 = 11;
/// Stat tag: memory scanned asynchronously.
pub const VIRTIO_BALLOON_S_ASYNC_SCAN: u16 = 12;
/// Stat tag: memory scanned directly.
pub const VIRTIO_BALLOON_S_DIRECT_SCAN: u16 = 13;
/// Stat tag: memory reclaimed asynchronously.
pub const VIRTIO_BALLOON_S_ASYNC_RECLAIM: u16 = 14;
/// Stat tag: memory reclaimed directly.
pub const VIRTIO_BALLOON_S_DIRECT_RECLAIM: u16 = 15;
/// Number of stat tags known (Linux 6.12).
pub const VIRTIO_BALLOON_S_NR: usize = 16;

/// Names of the stat tags, indexed by tag, as Linux's
/// `VIRTIO_BALLOON_S_NAMES` (and QEMU's `guest-stats` keys use them too).
pub const VIRTIO_BALLOON_S_NAMES: [&str; VIRTIO_BALLOON_S_NR] = [
    "swap-in",
    "swap-out",
    "major-faults",
    "minor-faults",
    "free-memory",
    "total-memory",
    "available-memory",
    "disk-caches",
    "hugetlb-allocations",
    "hugetlb-failures",
    "oom-kills",
    "alloc-stalls",
    "async-scans",
    "direct-scans",
    "async-reclaims",
    "direct-reclaims",
];

/// Name of a stat tag, `None` for tags this crate does not know (a device
/// must ignore those, not fail).
#[inline]
pub fn stat_name(tag: u16) -> Option<&'static str> {
    VIRTIO_BALLOON_S_NAMES.get(usize::from(tag)).copied()
}

/// Decodes one `struct virtio_balloon_stat` (`le16 tag, le64 val`) from the
/// front of `bytes`; `None` if fewer than [`VIRTIO_BALLOON_STAT_SIZE`] bytes.
#[inline]
pub fn parse_stat(bytes: &[u8]) -> Option<(u16, u64)> {
    let b = bytes.get(..VIRTIO_BALLOON_STAT_SIZE)?;
    let tag = u16::from_le_bytes([b[0], b[1]]);
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[2..10]);
    Some((tag, u64::from_le_bytes(v)))
}

/// Encodes one stat entry (the driver side; also used by tests).
#[inline]
pub fn encode_stat(tag: u16, val: u64) -> [u8; VIRTIO_BALLOON_STAT_SIZE] {
    let mut b = [0u8; VIRTIO_BALLOON_STAT_SIZE];
    b[..2].copy_from_slice(&tag.to_le_bytes());
    b[2..].copy_from_slice(&val.to_le_bytes());
    b
}

/// A balloon virtqueue by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueKind {
    /// inflateq: pfns the guest gives to the host.
    Inflate,
    /// deflateq: pfns the guest takes back.
    Deflate,
    /// statsq (with [`VIRTIO_BALLOON_F_STATS_VQ`]).
    Stats,
    /// free_page_vq (with [`VIRTIO_BALLOON_F_FREE_PAGE_HINT`]).
    FreePage,
    /// reporting_vq (with [`VIRTIO_BALLOON_F_REPORTING`]).
    Reporting,
}

impl fmt::Display for QueueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Inflate => "inflateq",
            Self::Deflate => "deflateq",
            Self::Stats => "statsq",
            Self::FreePage => "free_page_vq",
            Self::Reporting => "reporting_vq",
        })
    }
}

/// Most queues a balloon can have.
pub const MAX_QUEUES: usize = 5;

/// Compacted queue numbering: inflateq 0, deflateq 1, then statsq,
/// free_page_vq and reporting_vq in that order, each only if its feature is
/// present, and each taking the next free index (a queue whose feature is
/// absent takes no index: without STATS_VQ the free page vq is index 2).
/// This is what Linux's `virtio_balloon` and QEMU do.
///
/// Pass the *negotiated* features (what the driver acked). Linux acks every
/// one of these bits the device offers, so with Linux offered = negotiated.
///
/// ```
/// use freehint_protocol::balloon::*;
/// let q = QueueLayout::for_features(feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT));
/// assert_eq!(q.index_of(QueueKind::FreePage), Some(2));
/// assert_eq!(q.kind_of(2), Some(QueueKind::FreePage));
/// assert_eq!(q.num_queues(), 3);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    kinds: [QueueKind; MAX_QUEUES],
    len: u16,
}

impl QueueLayout {
    /// The numbering for these (negotiated) features.
    pub fn for_features(features: u64) -> Self {
        let mut kinds = [QueueKind::Inflate; MAX_QUEUES];
        kinds[1] = QueueKind::Deflate;
        let mut len = 2u16;
        for (bit, kind) in [
            (VIRTIO_BALLOON_F_STATS_VQ, QueueKind::Stats),
            (VIRTIO_BALLOON_F_FREE_PAGE_HINT, QueueKind::FreePage),
            (VIRTIO_BALLOON_F_REPORTING, QueueKind::Reporting),
        ] {
            if has_feature(features, bit) {
                kinds[usize::from(len)] = kind;
                len += 1;
            }
        }
        Self { kinds, len }
    }

    /// Queue index of `kind`, `None` if that queue does not exist.
    pub fn index_of(&self, kind: QueueKind) -> Option<u16> {
        self.kinds()
            .iter()
            .position(|&k| k == kind)
            .map(|i| i as u16)
    }

    /// Role of queue `index`, `None` if out of range.
    pub fn kind_of(&self, index: u16) -> Option<QueueKind> {
        self.kinds().get(usize::from(index)).copied()
    }

    /// Number of queues (2 to 5).
    pub fn num_queues(&self) -> usize {
        usize::from(self.len)
    }

    /// The queue roles in index order.
    pub fn kinds(&self) -> &[QueueKind] {
        &self.kinds[..usize::from(self.len)]
    }
}
