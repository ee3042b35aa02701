// SPDX-License-Identifier: GPL-2.0

//! [`Virtqueue`], [`VqHandle`], [`DmaBuf`], [`Chain`] and [`Queue`]: a
//! virtqueue and the driver memory it lends to the device.

use core::mem::ManuallyDrop;
use core::ptr::NonNull;
use kernel::ffi::{c_uint, c_ulong};
use kernel::prelude::*;
use kernel::types::Opaque;

use super::device::Device;
use super::ffi::virtqueue;
use super::{
    freehint_vq_add_bufs, freehint_vq_num_free, freehint_vq_wait_buf, virtqueue_get_buf,
    virtqueue_get_vring_size, virtqueue_kick, RawBuf,
};
use crate::layout::Pfn;

/// A virtqueue.
///
/// # Invariants
///
/// A `&Virtqueue` is only made from a live `struct virtqueue` whose device
/// has not deleted its queues.
#[repr(transparent)]
pub(crate) struct Virtqueue(Opaque<virtqueue>);

impl Virtqueue {
    fn as_raw(&self) -> *mut virtqueue {
        self.0.get()
    }

    /// Ring size.
    fn size(&self) -> u32 {
        // SAFETY: the queue is live (type invariant).
        unsafe { virtqueue_get_vring_size(self.as_raw()) }
    }

    /// Free descriptors.
    fn num_free(&self) -> u32 {
        // SAFETY: the queue is live (type invariant).
        unsafe { freehint_vq_num_free(self.as_raw()) }
    }

    /// Notifies the device of new buffers.
    fn kick(&self) {
        // SAFETY: the queue is live (type invariant); callers serialise
        // operations on it (`Queue` methods take `&mut`).
        unsafe { virtqueue_kick(self.as_raw()) };
    }

    /// Takes one used buffer back; its used length, `None` if there is none.
    fn get_buf(&self) -> Option<u32> {
        let mut len = 0;
        // SAFETY: as `kick`.
        let token = unsafe { virtqueue_get_buf(self.as_raw(), &mut len) };
        (!token.is_null()).then_some(len)
    }

    /// Sleeps on `dev`'s wait queue until the device returns a buffer, at
    /// most `ms` milliseconds (`u32::MAX`: no limit); its used length,
    /// `None` on timeout.
    fn wait_buf(&self, dev: &Device, ms: u32) -> Option<u32> {
        let mut len = 0;
        // SAFETY: as `kick`; the wait queue belongs to the queue's device,
        // whose callbacks wake it.
        let token =
            unsafe { freehint_vq_wait_buf(dev.objects().acked(), self.as_raw(), &mut len, ms) };
        (!token.is_null()).then_some(len)
    }
}

/// A virtqueue of a bound device, not yet tied to its buffers.
///
/// # Invariants
///
/// `vq` was created by `find_vqs` of `dev` and is valid until `dev`'s
/// `reset_and_del_vqs`; `dev` is valid as long as the driver state that
/// holds this handle (invariant of [`Bound`]).
pub(crate) struct VqHandle {
    pub(super) vq: NonNull<Virtqueue>,
    pub(super) dev: NonNull<Device>,
}

// SAFETY: the handle is only used through a `Queue`, whose methods take
// `&mut self`: operations on one queue are serialised, from any CPU.
unsafe impl Send for VqHandle {}

/// Driver memory lent to a device: kmalloc'd (linear-mapped, so the ring's
/// address translation works), written by the driver only while not lent.
pub(crate) struct DmaBuf(KVec<u8>);

impl DmaBuf {
    /// A zeroed buffer of `len` bytes.
    pub(crate) fn new(len: usize) -> Result<Self> {
        Ok(Self(KVec::from_elem(0u8, len, GFP_KERNEL)?))
    }

    /// The bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes, to write (a [`Queue`] hands out `&mut` only while the
    /// device holds none of its buffers).
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// One buffer of a [`Chain`].
#[derive(Clone, Copy)]
enum Seg<'a> {
    /// The first `len` bytes of a buffer.
    Mem(&'a DmaBuf, usize),
    /// Guest memory the driver does not own: `pages` pages from `pfn`.
    Free { pfn: Pfn, pages: u64 },
}

/// A buffer chain for [`Queue::add`]: device-readable buffers first, then
/// device-writable ones (at most two in all).
pub(crate) struct Chain<'a> {
    segs: [Option<Seg<'a>>; 2],
    out: usize,
    inb: usize,
    /// Too long, or readable after writable: `add` refuses it.
    bad: bool,
}

impl<'a> Chain<'a> {
    fn push(mut self, seg: Seg<'a>, writable: bool) -> Self {
        let n = self.out + self.inb;
        match self.segs.get_mut(n) {
            Some(slot) if !self.bad && (writable || self.inb == 0) => {
                *slot = Some(seg);
                if writable {
                    self.inb += 1;
                } else {
                    self.out += 1;
                }
            }
            _ => self.bad = true,
        }
        self
    }

    /// A chain [`Queue::add`] refuses (`EINVAL`): for a caller that finds
    /// nothing to lend.
    pub(crate) fn empty() -> Self {
        Self {
            segs: [None; 2],
            out: 0,
            inb: 0,
            bad: false,
        }
    }

    /// A chain starting with the first `len` bytes of `buf`, device-readable.
    pub(crate) fn read(buf: &'a DmaBuf, len: usize) -> Self {
        Self::empty().push(Seg::Mem(buf, len), false)
    }

    /// A chain of the free guest range `[pfn, pfn + pages)`, device-writable
    /// (the standard hint: the device only records the range).
    pub(crate) fn free_range(pfn: Pfn, pages: u64) -> Self {
        Self::empty().push(Seg::Free { pfn, pages }, true)
    }

    /// Adds the first `len` bytes of `buf`, device-readable.
    pub(crate) fn then_read(self, buf: &'a DmaBuf, len: usize) -> Self {
        self.push(Seg::Mem(buf, len), false)
    }

    /// Adds all of `buf`, device-writable.
    pub(crate) fn then_write(self, buf: &'a DmaBuf) -> Self {
        self.push(Seg::Mem(buf, buf.bytes().len()), true)
    }
}

/// A virtqueue with the driver memory `B` it lends to the device.
///
/// `add` lends parts of `B`; the device holds them until it returns them
/// (`reclaim`, `wait_*`) or is reset. `bufs_mut` hands out `B` for writing
/// only while the device holds none of them.
///
/// # Invariants
///
/// - `in_flight` counts the chains the device holds (added, not returned);
/// - while `in_flight > 0`, `bufs` is only reachable through `&self`;
/// - the virtqueue is touched only while its device has not deleted its
///   queues (checked before every call).
pub(crate) struct Queue<B> {
    vq: VqHandle,
    bufs: ManuallyDrop<B>,
    in_flight: u32,
}

impl<B> Queue<B> {
    /// Ties a virtqueue to the memory it will lend.
    pub(crate) fn new(vq: VqHandle, bufs: B) -> Self {
        Self {
            vq,
            bufs: ManuallyDrop::new(bufs),
            in_flight: 0,
        }
    }

    /// The virtqueue, `None` once the device deleted it.
    fn vq(&self) -> Option<&Virtqueue> {
        // SAFETY: the device outlives the queue (invariant of `VqHandle`).
        let dev = unsafe { self.vq.dev.as_ref() };
        if dev.vqs_deleted() {
            return None;
        }
        // SAFETY: not deleted (checked above), so live (invariant of
        // `VqHandle`); `Virtqueue` is `repr(transparent)` over it.
        Some(unsafe { self.vq.vq.as_ref() })
    }

    /// The one call that lends memory to the device: adds the chain `pick`
    /// builds from `B` (or from memory that is never freed). Not kicked.
    pub(crate) fn add(&mut self, pick: impl for<'b> FnOnce(&'b B) -> Chain<'b>) -> Result
    where
        B: 'static,
    {
        let vq = self.vq().ok_or(ENODEV)?;
        let chain = pick(&self.bufs);
        let n = chain.out + chain.inb;
        if chain.bad || n == 0 || n > chain.segs.len() {
            return Err(EINVAL);
        }
        let mut raw: [RawBuf; 2] = [const {
            RawBuf {
                addr: core::ptr::null(),
                pfn: 0,
                len: 0,
            }
        }; 2];
        for (i, seg) in chain.segs.iter().enumerate().take(n) {
            raw[i] = match seg.ok_or(EINVAL)? {
                Seg::Mem(buf, len) => RawBuf {
                    addr: buf.0.as_ptr().cast(),
                    pfn: 0,
                    len: len.min(buf.0.len()) as c_ulong,
                },
                Seg::Free { pfn, pages } => RawBuf {
                    addr: core::ptr::null(),
                    pfn: c_ulong::try_from(pfn.raw()).map_err(|_| EINVAL)?,
                    len: pages
                        .checked_mul(kernel::page::PAGE_SIZE as u64)
                        .filter(|l| *l > 0 && *l <= u64::from(u32::MAX))
                        .ok_or(EINVAL)? as c_ulong,
                },
            };
        }
        // SAFETY: the virtqueue is live (checked in `vq()`) and `&mut self`
        // serialises operations on it. The buffer lifetime argument, made
        // once for every caller:
        // - `Seg::Mem` buffers are `DmaBuf`s (kmalloc memory) borrowed from
        //   `self.bufs` (the closure's `&'b B`) or from memory that outlives
        //   every `'b` (`B: 'static`, so `'b` may be `'static`), i.e. is
        //   never freed. From here the device may read or write them until
        //   it returns the chain or is reset; `bufs_mut` gives out no
        //   `&mut B` while `in_flight > 0`, and `Drop` leaks `B` if the
        //   queue is dropped with chains out and the device not reset. So
        //   the memory stays allocated and unwritten by the driver for as
        //   long as the device may use it.
        // - `Seg::Free` names guest memory the driver does not own: the
        //   device only records the range (QEMU completes it with length 0)
        //   and, as the host, could access any guest memory anyway, so
        //   lending it grants nothing. The C side checks `pfn_valid`.
        kernel::error::to_result(unsafe {
            freehint_vq_add_bufs(
                vq.as_raw(),
                raw.as_ptr(),
                chain.out as c_uint,
                chain.inb as c_uint,
            )
        })?;
        self.in_flight += 1;
        Ok(())
    }

    /// The buffers, to write: only while the device holds none of them
    /// (used ones are taken back first); `EBUSY` otherwise.
    pub(crate) fn bufs_mut(&mut self) -> Result<&mut B> {
        self.reclaim();
        if self.in_flight != 0 {
            return Err(EBUSY);
        }
        Ok(&mut self.bufs)
    }

    /// The buffers, to read what the device wrote: only while it holds none
    /// of them.
    pub(crate) fn bufs(&self) -> Option<&B> {
        (self.in_flight == 0).then_some(&*self.bufs)
    }

    /// Ring size (0 once the queue is deleted).
    pub(crate) fn ring_size(&self) -> u32 {
        self.vq().map_or(0, |vq| vq.size())
    }

    /// Free descriptors.
    pub(crate) fn free_slots(&self) -> u32 {
        self.vq().map_or(0, |vq| vq.num_free())
    }

    /// Chains the device holds.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Notifies the device.
    pub(crate) fn kick(&mut self) {
        if let Some(vq) = self.vq() {
            vq.kick();
        }
    }

    /// Takes back every used chain; returns how many.
    pub(crate) fn reclaim(&mut self) -> u32 {
        let Some(vq) = self.vq() else { return 0 };
        let mut n = 0;
        while vq.get_buf().is_some() {
            n += 1;
        }
        self.in_flight = self.in_flight.saturating_sub(n);
        n
    }

    /// Sleeps until the device returns one chain, at most `ms` milliseconds
    /// (`u32::MAX`: no limit), then takes back every other used one.
    /// Returns the used length of the first, `None` on timeout (or with
    /// nothing in flight).
    pub(crate) fn wait_one(&mut self, ms: u32) -> Option<u32> {
        if self.in_flight == 0 {
            return None;
        }
        // SAFETY: the device outlives the queue (invariant of `VqHandle`).
        let dev = unsafe { self.vq.dev.as_ref() };
        let len = self.vq()?.wait_buf(dev, ms)?;
        self.in_flight = self.in_flight.saturating_sub(1);
        self.reclaim();
        Some(len)
    }

    /// Waits at most `ms` for the device to return at least one chain,
    /// then takes back every used one. Returns how many came back.
    pub(crate) fn wait_used(&mut self, ms: u32) -> u32 {
        let n = self.reclaim();
        if n > 0 || self.in_flight == 0 {
            return n;
        }
        let before = self.in_flight;
        match self.wait_one(ms) {
            Some(_) => before - self.in_flight,
            None => 0,
        }
    }

    /// Lends a chain, kicks and sleeps until the device returned everything
    /// (as Linux's `tell_host`). Meant for a queue with no other chain out.
    pub(crate) fn send_and_wait(&mut self, pick: impl for<'b> FnOnce(&'b B) -> Chain<'b>) -> Result
    where
        B: 'static,
    {
        self.add(pick)?;
        self.kick();
        while self.in_flight > 0 {
            if self.wait_one(u32::MAX).is_none() && self.vq().is_none() {
                return Err(ENODEV);
            }
        }
        Ok(())
    }
}

impl<B> Drop for Queue<B> {
    fn drop(&mut self) {
        // SAFETY: the device outlives the queue (invariant of `VqHandle`).
        let dev = unsafe { self.vq.dev.as_ref() };
        if self.in_flight > 0 && !dev.vqs_deleted() {
            // The device may still use the memory: leak it.
            pr_warn!(
                "virtqueue dropped with {} chains out: buffers leaked\n",
                self.in_flight
            );
            return;
        }
        // SAFETY: dropped once, here; the device holds none of it (nothing
        // in flight, or the device was reset).
        unsafe { ManuallyDrop::drop(&mut self.bufs) };
    }
}
