// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//! vm-memory's [`ByteValued`] for the plain-data wire types (crate feature
//! `vm-memory`, on by default). It lives apart from [`balloon`](crate::balloon)
//! because the guest module includes that file with `#[path]` and has no
//! vm-memory; this is the crate's only `unsafe`.
#![allow(unsafe_code)]

use vm_memory::ByteValued;

use crate::balloon::ConfigSpace;

// SAFETY: `ConfigSpace` is `#[repr(C)]` with four `u32` fields and nothing
// else, so it has no padding (its size is asserted to be 16 bytes next to
// its definition), holds no references, and every bit pattern of its 16
// bytes is a valid value.
unsafe impl ByteValued for ConfigSpace {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balloon::CONFIG_SIZE;

    #[test]
    fn byte_image_of_the_le_form_is_the_wire_image() {
        let cfg = ConfigSpace {
            num_pages: 0x0403_0201,
            actual: 0x0807_0605,
            free_page_hint_cmd_id: 0x8000_0001,
            poison_val: 0xaa,
        };
        let le = cfg.to_le();
        assert_eq!(le.as_slice(), &cfg.to_bytes()[..]);
        assert_eq!(le.as_slice().len(), CONFIG_SIZE);
        let mut image = ConfigSpace::default();
        image.as_mut_slice().copy_from_slice(&cfg.to_bytes());
        assert_eq!(image.from_le(), cfg);
    }
}
