// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! The statistics queue payload: an array of `struct virtio_balloon_stat`
//! (`le16 tag; le64 val`, packed, 10 bytes each).

use std::time::Instant;

use freehint_protocol::balloon::{
    parse_stat, stat_name, VIRTIO_BALLOON_STAT_SIZE, VIRTIO_BALLOON_S_NR,
};

/// The latest statistics the guest sent, one optional value per known tag
/// (indexed by tag; names from `VIRTIO_BALLOON_S_NAMES`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonStats {
    /// Values by tag; `None` if the guest did not send that tag.
    pub values: [Option<u64>; VIRTIO_BALLOON_S_NR],
    /// Entries with a tag this device does not know (ignored).
    pub unknown_tags: u32,
    /// Trailing bytes that did not form a whole entry.
    pub trailing_bytes: u32,
    /// When the buffer was received.
    pub received: Instant,
}

impl BalloonStats {
    /// Parses a stats buffer; never fails (unknown tags and a ragged tail are
    /// counted, not fatal).
    pub fn parse(bytes: &[u8]) -> Self {
        let mut s = Self {
            values: [None; VIRTIO_BALLOON_S_NR],
            unknown_tags: 0,
            trailing_bytes: (bytes.len() % VIRTIO_BALLOON_STAT_SIZE) as u32,
            received: Instant::now(),
        };
        for entry in bytes.chunks_exact(VIRTIO_BALLOON_STAT_SIZE) {
            let Some((tag, val)) = parse_stat(entry) else {
                continue;
            };
            match s.values.get_mut(usize::from(tag)) {
                Some(slot) => *slot = Some(val),
                None => s.unknown_tags = s.unknown_tags.saturating_add(1),
            }
        }
        s
    }

    /// Value of stat `tag`, if the guest sent it.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values.get(usize::from(tag)).copied().flatten()
    }

    /// `(name, value)` for every stat the guest sent.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.values
            .iter()
            .enumerate()
            .filter_map(|(t, v)| Some((stat_name(t as u16)?, (*v)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freehint_protocol::balloon::*;

    #[test]
    fn parses_all_known_tags_and_counts_unknown() {
        let mut buf = Vec::new();
        for tag in 0..VIRTIO_BALLOON_S_NR as u16 {
            buf.extend_from_slice(&encode_stat(tag, u64::from(tag) * 1000 + 1));
        }
        buf.extend_from_slice(&encode_stat(99, 5));
        buf.extend_from_slice(&[1, 2, 3]);
        let s = BalloonStats::parse(&buf);
        for tag in 0..VIRTIO_BALLOON_S_NR as u16 {
            assert_eq!(s.get(tag), Some(u64::from(tag) * 1000 + 1));
        }
        assert_eq!(s.get(VIRTIO_BALLOON_S_HTLB_PGFAIL), Some(9001));
        assert_eq!(s.unknown_tags, 1);
        assert_eq!(s.trailing_bytes, 3);
        assert_eq!(s.named().count(), VIRTIO_BALLOON_S_NR);
        assert_eq!(s.named().next(), Some(("swap-in", 1)));
    }

    #[test]
    fn empty_and_odd_buffers() {
        let s = BalloonStats::parse(&[]);
        assert_eq!(s.named().count(), 0);
        let s = BalloonStats::parse(&[0; 9]);
        assert_eq!((s.trailing_bytes, s.named().count()), (9, 0));
    }
}
