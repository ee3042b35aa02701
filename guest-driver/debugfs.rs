// SPDX-License-Identifier: GPL-2.0

//! The diagnostic interface in `/sys/kernel/debug/freehint/`:
//!
//! | file     | read                                         | write                        |
//! |----------|----------------------------------------------|------------------------------|
//! | `build`  | number of builds so far                      | anything: build the bitmap now |
//! | `bitmap` | the bitmap, raw little-endian u64 words      | –                            |
//! | `layout` | `first_pfn nr_pages first_bit` per line      | a table in the same form (host layout), or `iomem` |
//! | `stats`  | one JSON object (figures of the last build)  | –                            |
//! | `budget` | free-list entries per lock hold              | a new budget (1..=65536)     |
//! | `pcp`    | `1` if per-CPU page lists are walked too     | `1` or `0`                   |
//!
//! What a file shows and what a write does is [`show`] and [`store`]; the
//! files themselves come from the kernel's debugfs abstraction where it has
//! one and from a C shim where it does not:
//!
//! - 7.3 (`freehint_kernel_7_3`): `kernel::debugfs`: a `Scope` owns the
//!   builder and the directory, and removes the directory (waiting for
//!   file operations in flight) before it drops the builder;
//! - 6.12 (no debugfs abstraction): the file operations live in helpers.c
//!   and forward to [`freehint_rust_read`] and [`freehint_rust_write`] with
//!   the `FileCtx` the file was created with. `debugfs_remove_recursive`
//!   waits for operations in flight, so removing the directory first makes
//!   it safe to free the contexts and the builder afterwards (the field
//!   order of [`Diag`]).

use core::fmt;
use kernel::alloc::flags::GFP_KERNEL;
use kernel::c_str;
use kernel::prelude::*;
use kernel::sync::Mutex;

use crate::builder::{self, Builder};

/// Largest write accepted (a layout table of 32 ranges fits easily).
const MAX_WRITE: usize = 4096;

/// Which file a context belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileKind {
    Build,
    Bitmap,
    Layout,
    Stats,
    Budget,
    Pcp,
}

const FILES: [(FileKind, &CStr, u16); 6] = [
    (FileKind::Build, c_str!("build"), 0o600),
    (FileKind::Bitmap, c_str!("bitmap"), 0o400),
    (FileKind::Layout, c_str!("layout"), 0o600),
    (FileKind::Stats, c_str!("stats"), 0o400),
    (FileKind::Budget, c_str!("budget"), 0o600),
    (FileKind::Pcp, c_str!("pcp"), 0o600),
];

/// The text a read of a `kind` file returns (every kind but the binary
/// `bitmap`, whose bytes are [`Builder::bitmap_bytes`]).
fn show(kind: FileKind, builder: &Builder, out: &mut impl fmt::Write) -> fmt::Result {
    match kind {
        FileKind::Build => writeln!(out, "{}", builder.builds()),
        FileKind::Layout => builder.write_layout(out),
        FileKind::Stats => builder.write_stats(out),
        FileKind::Budget => builder.write_budget(out),
        FileKind::Pcp => builder.write_pcp(out),
        FileKind::Bitmap => Err(fmt::Error),
    }
}

/// What a write of `input` to a `kind` file does.
fn store(kind: FileKind, builder: &mut Builder, input: &[u8]) -> Result {
    match kind {
        FileKind::Build => {
            builder.build();
            Ok(())
        }
        FileKind::Layout => builder::parse_layout(input).and_then(|l| builder.set_layout(l)),
        FileKind::Budget => core::str::from_utf8(input)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .ok_or(EINVAL)
            .and_then(|b| builder.set_budget(b)),
        FileKind::Pcp => match core::str::from_utf8(input).map(str::trim) {
            Ok("1") => {
                builder.set_pcp(true);
                Ok(())
            }
            Ok("0") => {
                builder.set_pcp(false);
                Ok(())
            }
            _ => Err(EINVAL),
        },
        FileKind::Bitmap | FileKind::Stats => Err(EPERM),
    }
}

/// The builder behind the debugfs files, and the files.
#[cfg(not(freehint_kernel_7_3))]
pub(crate) use v6_12::Diag;
/// The builder behind the debugfs files, and the files.
#[cfg(freehint_kernel_7_3)]
pub(crate) use v7_3::Diag;

/// The files with 7.3's `kernel::debugfs`.
#[cfg(freehint_kernel_7_3)]
mod v7_3 {
    use super::*;
    use kernel::debugfs::{BinaryWriter, Scope};
    use kernel::fs::file;
    use kernel::uaccess::{UserSliceReader, UserSliceWriter};

    /// The `freehint` directory and the builder its files use; dropping it
    /// removes the directory first, then drops the builder.
    pub(crate) struct Diag {
        scope: Pin<KBox<Scope<Mutex<Builder>>>>,
    }

    impl Diag {
        /// Creates `/sys/kernel/debug/freehint/` with its files for `builder`.
        pub(crate) fn new(builder: Builder) -> Result<Self> {
            let scope = KBox::pin_init(
                Scope::dir(
                    kernel::new_mutex!(builder, "freehint::builder"),
                    c_str!("freehint"),
                    |b, dir| {
                        dir.read_write_callback_file(FILES[0].1, b, &read::<0>, &write::<0>);
                        dir.read_binary_file(FILES[1].1, b);
                        dir.read_write_callback_file(FILES[2].1, b, &read::<2>, &write::<2>);
                        dir.read_callback_file(FILES[3].1, b, &read::<3>);
                        dir.read_write_callback_file(FILES[4].1, b, &read::<4>, &write::<4>);
                        dir.read_write_callback_file(FILES[5].1, b, &read::<5>, &write::<5>);
                    },
                ),
                GFP_KERNEL,
            )?;
            Ok(Self { scope })
        }

        /// The builder.
        pub(crate) fn builder(&self) -> &Mutex<Builder> {
            &self.scope
        }
    }

    /// Read of text file `FILES[I]`.
    fn read<const I: usize>(b: &Mutex<Builder>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        show(FILES[I].0, &b.lock(), f)
    }

    /// Write to file `FILES[I]` (at most [`MAX_WRITE`] bytes).
    fn write<const I: usize>(b: &Mutex<Builder>, reader: &mut UserSliceReader) -> Result {
        if reader.len() > MAX_WRITE {
            return Err(E2BIG);
        }
        let mut input = KVec::from_elem(0u8, reader.len(), GFP_KERNEL)?;
        reader.read_slice(&mut input)?;
        store(FILES[I].0, &mut b.lock(), &input)
    }

    /// `bitmap`: the bitmap as raw little-endian words.
    impl BinaryWriter for Builder {
        fn write_to_slice(
            &self,
            writer: &mut UserSliceWriter,
            offset: &mut file::Offset,
        ) -> Result<usize> {
            writer.write_slice_file(self.bitmap_bytes(), offset)
        }
    }
}

/// The files with the C shim (6.12 has no debugfs abstraction).
#[cfg(not(freehint_kernel_7_3))]
mod v6_12 {
    use super::*;
    use core::ffi::c_void;
    use core::ptr::NonNull;
    use kernel::ffi::c_char;
    use kernel::uaccess::UserSlice;

    extern "C" {
        fn freehint_debugfs_dir(name: *const c_char) -> *mut c_void;
        fn freehint_debugfs_file(
            name: *const c_char,
            mode: u16,
            dir: *mut c_void,
            ctx: *mut c_void,
        ) -> *mut c_void;
        fn freehint_debugfs_remove(dir: *mut c_void);
        fn freehint_is_err_or_null(ptr: *const c_void) -> bool;
        fn simple_read_from_buffer(
            to: *mut c_void,
            count: usize,
            ppos: *mut i64,
            from: *const c_void,
            available: usize,
        ) -> isize;
    }

    /// The `freehint` directory, the file contexts and the builder they
    /// point to. Fields drop in declaration order: the directory first
    /// (removing it waits for file operations in flight), then the
    /// contexts, then the builder.
    pub(crate) struct Diag {
        _dir: Dir,
        _ctxs: FileCtxs,
        builder: Pin<KBox<Mutex<Builder>>>,
    }

    impl Diag {
        /// Creates `/sys/kernel/debug/freehint/` with its files for `builder`.
        pub(crate) fn new(builder: Builder) -> Result<Self> {
            let builder =
                KBox::pin_init(kernel::new_mutex!(builder, "freehint::builder"), GFP_KERNEL)?;
            let mut ctxs = alloc_ctxs()?;
            // SAFETY: `builder` is pinned and `ctxs` boxed; both are fields
            // declared after the directory, so they are dropped only after
            // it is removed.
            let dir = unsafe { Dir::create(&builder, &mut ctxs)? };
            Ok(Self {
                _dir: dir,
                _ctxs: ctxs,
                builder,
            })
        }

        /// The builder.
        pub(crate) fn builder(&self) -> &Mutex<Builder> {
            &self.builder
        }
    }

    /// What a debugfs file's operations need: its kind and the shared builder.
    ///
    /// # Invariants
    ///
    /// `builder` points to the pinned builder of a [`Diag`], which outlives
    /// the debugfs directory holding this file (its field order).
    pub(crate) struct FileCtx {
        kind: FileKind,
        builder: NonNull<Mutex<Builder>>,
    }

    /// The contexts of all files, allocated once.
    pub(crate) type FileCtxs = KBox<[FileCtx; FILES.len()]>;

    // SAFETY: a `FileCtx` is only read; the builder behind it is a `Mutex`,
    // which is `Sync` for a `Send` `Builder`.
    unsafe impl Send for FileCtx {}
    // SAFETY: as above.
    unsafe impl Sync for FileCtx {}

    /// The `freehint` debugfs directory; removed (with its files) on drop.
    ///
    /// # Invariants
    ///
    /// `dir` is a dentry returned by `debugfs_create_dir`, not yet removed.
    pub(crate) struct Dir {
        dir: NonNull<c_void>,
    }

    // SAFETY: a dentry pointer may be removed from any thread.
    unsafe impl Send for Dir {}
    // SAFETY: `Dir` has no `&self` methods that touch the dentry.
    unsafe impl Sync for Dir {}

    impl Dir {
        /// Creates `/sys/kernel/debug/freehint/` with its files for `builder`.
        ///
        /// # Safety
        ///
        /// `builder` must stay valid (pinned, not dropped) until the returned
        /// `Dir` is dropped, and so must `ctxs`.
        pub(crate) unsafe fn create(builder: &Mutex<Builder>, ctxs: &mut FileCtxs) -> Result<Self> {
            for (ctx, (kind, _, _)) in ctxs.iter_mut().zip(FILES.iter()) {
                ctx.kind = *kind;
                ctx.builder = NonNull::from(builder);
            }
            // SAFETY: the name is a NUL-terminated string.
            let dir = unsafe { freehint_debugfs_dir(c_str!("freehint").as_char_ptr()) };
            // SAFETY: checks a pointer value only.
            if unsafe { freehint_is_err_or_null(dir) } {
                pr_err!("freehint: cannot create the debugfs directory\n");
                return Err(ENODEV);
            }
            // INVARIANT: `dir` came from debugfs_create_dir.
            let dir = Dir {
                // SAFETY: not null (checked above).
                dir: unsafe { NonNull::new_unchecked(dir) },
            };
            for (ctx, (_, name, mode)) in ctxs.iter_mut().zip(FILES.iter()) {
                // SAFETY: `name` is NUL-terminated, `dir` is live; `ctx` stays
                // valid until `dir` is removed (the caller's guarantee).
                let f = unsafe {
                    freehint_debugfs_file(
                        name.as_char_ptr(),
                        *mode,
                        dir.dir.as_ptr(),
                        core::ptr::from_mut(ctx).cast(),
                    )
                };
                // SAFETY: checks a pointer value only.
                if unsafe { freehint_is_err_or_null(f) } {
                    pr_err!("freehint: cannot create a debugfs file\n");
                    return Err(ENODEV); // `dir` is removed by its Drop
                }
            }
            Ok(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            // SAFETY: by the type invariant `dir` is live; this waits for file
            // operations in flight, so no context is used after it returns.
            unsafe { freehint_debugfs_remove(self.dir.as_ptr()) };
        }
    }

    /// Allocates the file contexts (filled in by [`Dir::create`]).
    pub(crate) fn alloc_ctxs() -> Result<FileCtxs> {
        let none = |kind| FileCtx {
            kind,
            builder: NonNull::dangling(),
        };
        Ok(KBox::new(
            [
                none(FileKind::Build),
                none(FileKind::Bitmap),
                none(FileKind::Layout),
                none(FileKind::Stats),
                none(FileKind::Budget),
                none(FileKind::Pcp),
            ],
            GFP_KERNEL,
        )?)
    }

    /// A growable text buffer for `fmt::Write`.
    struct Text(KVec<u8>);

    impl fmt::Write for Text {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0
                .extend_from_slice(s.as_bytes(), GFP_KERNEL)
                .map_err(|_| fmt::Error)
        }
    }

    /// Serves a read at `*ppos` from `data`.
    ///
    /// # Safety
    ///
    /// `buf` must be a user pointer valid for `count` bytes and `ppos` a valid
    /// file position, as handed to a `read` file operation.
    unsafe fn read_from(data: &[u8], buf: *mut c_char, count: usize, ppos: *mut i64) -> isize {
        // SAFETY: the caller's guarantee; `data` is a valid kernel buffer.
        unsafe {
            simple_read_from_buffer(buf.cast(), count, ppos, data.as_ptr().cast(), data.len())
        }
    }

    fn errno(e: Error) -> isize {
        // CAST: errnos are small negative numbers.
        e.to_errno() as isize
    }

    /// `read` file operation of every freehint debugfs file.
    ///
    /// # Safety
    ///
    /// Called only by helpers.c with the `ctx` the file was created with, and
    /// the arguments of a `read` file operation.
    #[no_mangle]
    pub(crate) unsafe extern "C" fn freehint_rust_read(
        ctx: *mut c_void,
        buf: *mut c_char,
        count: usize,
        ppos: *mut i64,
    ) -> isize {
        // SAFETY: `ctx` is a `FileCtx` that outlives the file (see `Dir::create`).
        let ctx = unsafe { &*ctx.cast::<FileCtx>() };
        // SAFETY: by the `FileCtx` invariant the builder is alive.
        let builder = unsafe { ctx.builder.as_ref() }.lock();
        if ctx.kind == FileKind::Bitmap {
            // SAFETY: forwarded read arguments (the caller's guarantee).
            return unsafe { read_from(builder.bitmap_bytes(), buf, count, ppos) };
        }
        let mut text = Text(KVec::new());
        if show(ctx.kind, &builder, &mut text).is_err() {
            return errno(ENOMEM);
        }
        // SAFETY: forwarded read arguments (the caller's guarantee).
        unsafe { read_from(&text.0, buf, count, ppos) }
    }

    /// `write` file operation of every freehint debugfs file.
    ///
    /// # Safety
    ///
    /// Called only by helpers.c with the `ctx` the file was created with, and
    /// the arguments of a `write` file operation.
    #[no_mangle]
    pub(crate) unsafe extern "C" fn freehint_rust_write(
        ctx: *mut c_void,
        buf: *const c_char,
        count: usize,
        _ppos: *mut i64,
    ) -> isize {
        // SAFETY: `ctx` is a `FileCtx` that outlives the file (see `Dir::create`).
        let ctx = unsafe { &*ctx.cast::<FileCtx>() };
        if count > MAX_WRITE {
            return errno(E2BIG);
        }
        let mut input = KVec::new();
        // CAST: a user pointer is an address (6.12's `UserPtr` is a `usize`).
        if let Err(e) = UserSlice::new(buf as usize, count).read_all(&mut input, GFP_KERNEL) {
            return errno(e);
        }
        // SAFETY: by the `FileCtx` invariant the builder is alive.
        let mut builder = unsafe { ctx.builder.as_ref() }.lock();
        match store(ctx.kind, &mut builder, &input) {
            // CAST: `count <= MAX_WRITE` fits.
            Ok(()) => count as isize,
            Err(e) => errno(e),
        }
    }
}
