//! The file system the guest talks to: `PassthroughFs`, confined and optionally read-only.
//!
//! `ConfinedFs` is a whitelist in front of `fuse-backend-rs`'s passthrough file system. Each
//! request it forwards is one that `PassthroughFs` answers with descriptor-relative system calls
//! on inodes the guest already reached; every check the passthrough code leaves to its VFS layer
//! (or does not make at all) is made here first:
//! - names: one path component, not empty, no `/`; creating calls also refuse `.` and `..`
//!   (`PassthroughFs` only checks these itself when it owns the root import, and never for
//!   LOOKUP, which must accept `.` and `..`);
//! - `..` at the root is the root, by node id and by device and inode number;
//! - read-only: every changing request fails with `EROFS` before it reaches the host;
//! - no character or block devices are created;
//! - what is not forwarded answers `ENOSYS`: DAX mappings (there is no cache window), ioctls,
//!   extended attributes, POSIX locks, bmap, poll;
//! - READ and WRITE pass `PassthroughFs` the flags the handle was opened with, never the
//!   guest's: given other flags it `fcntl(F_SETFL)`s them onto the host descriptor, and when
//!   that fails (`O_DIRECT` on a directory, `O_NOATIME` on a file the VMM does not own) it
//!   closes the handle's descriptor while the handle still holds it. The number is then reused
//!   by the next file the VMM opens, and the guest's handle reads, writes or closes that file
//!   (found by the `virtio_fs` fuzz target; docs/fuzzing.md).
//!
//! The configuration of `PassthroughFs` is part of the confinement: [`passthrough_config`]
//! keeps open-by-handle (`inode_file_handles`) off, so every inode is an `O_PATH` descriptor
//! reached by a lookup and never something `open_by_handle_at` resolved without path checks.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, OpenOptions, SetattrValid, ZeroCopyReader,
    ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

use super::FsError;

type Inode = u64;
type Handle = u64;

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The passthrough configuration the device uses for `shared_dir` (already canonical).
///
/// Everything that widens what a guest can reach stays off: file handles (open-by-handle),
/// extended attributes, DAX, `no_open` (which hands out inode descriptors for I/O).
pub fn passthrough_config(shared_dir: &Path) -> Config {
    Config {
        root_dir: shared_dir.to_string_lossy().into_owned(),
        // Import the root on INIT, and check names itself as well (belt and braces with ours).
        do_import: true,
        inode_file_handles: false,
        xattr: false,
        no_open: false,
        no_opendir: false,
        writeback: false,
        killpriv_v2: false,
        dax_file_size: None,
        cache_policy: CachePolicy::Auto,
        // Node ids made of the host's inode numbers: the server then forgets an inode
        // entirely when the guest does, instead of keeping every (device, inode) pair it ever
        // saw. An id cannot be reused while the guest holds it: the server's descriptor keeps
        // the host inode alive.
        use_host_ino: true,
        ..Config::default()
    }
}

/// `PassthroughFs` with the checks the threat model in `fs/mod.rs` asks for.
pub struct ConfinedFs {
    inner: PassthroughFs,
    read_only: bool,
    root_dev: u64,
    root_ino: u64,
    /// The open flags `PassthroughFs` keeps for each handle it handed out (see `read`).
    handle_flags: Mutex<HashMap<Handle, u32>>,
    /// Between FUSE_INIT and FUSE_DESTROY: the guest has the share mounted.
    mounted: AtomicBool,
    /// Each regular file's [`Stamp`] when the guest last opened it (see `open`).
    stamps: Mutex<HashMap<Inode, Stamp>>,
    /// The inodes the guest holds and how many lookups of each (what its FORGETs take back):
    /// each is a descriptor in this process, so at most [`MAX_INODES`].
    held: Mutex<HashMap<Inode, u64>>,
    /// [`MAX_INODES`] and [`MAX_HANDLES`] (smaller in tests).
    max_inodes: usize,
    max_handles: usize,
}

/// What changes when a file's data may have changed: modification and change times, size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime: (i64, i64),
    ctime: (i64, i64),
    size: i64,
}

impl Stamp {
    fn of(st: &stat64) -> Self {
        Self {
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
            size: st.st_size,
        }
    }
}

/// The most files whose [`Stamp`] is kept; past it the record starts over (each file's next
/// open then drops its page cache once, as an open without the record would).
const MAX_STAMPS: usize = 65_536;
/// The set-user-ID and set-group-ID bits. The guest can never give them to a file in the
/// share, nor change a file that has them without their being cleared (`drop_privileges`):
/// a file the guest made could otherwise run as a privileged host user (its root is the
/// host's root in the share) for anyone on the host who can reach the bundle.
const SET_ID: u32 = libc::S_ISUID | libc::S_ISGID;

/// The most inodes the guest may hold at once (each holds a descriptor in hull-vmm; at most
/// three quarters of the process's descriptor limit); past it a lookup or a new file fails
/// with `ENFILE`, as a full system file table would.
pub const MAX_INODES: usize = 1 << 18;
/// The most files and directories the guest may have open at once (each holds a descriptor;
/// at most an eighth of the process's descriptor limit); past it an open fails with `ENFILE`.
pub const MAX_HANDLES: usize = 1 << 16;

impl ConfinedFs {
    /// Whether the guest has the share mounted (a FUSE session is open).
    pub fn is_mounted(&self) -> bool {
        self.mounted.load(Ordering::Acquire)
    }

    /// Sets up the file system for `shared_dir`, which must be a directory. Opens
    /// `/proc/self/fd` now, so this must run before the VMM leaves the host's mount namespace.
    pub fn new(shared_dir: &Path, read_only: bool) -> Result<Self, FsError> {
        let shared_err = |source| FsError::SharedDir {
            path: shared_dir.to_path_buf(),
            source,
        };
        // A canonical path: PassthroughFs opens the root with O_NOFOLLOW.
        let root: PathBuf = shared_dir.canonicalize().map_err(shared_err)?;
        let meta = std::fs::metadata(&root).map_err(shared_err)?;
        if !meta.is_dir() {
            return Err(shared_err(errno(libc::ENOTDIR)));
        }
        let inner = PassthroughFs::new(passthrough_config(&root)).map_err(|source| {
            FsError::Passthrough {
                path: root.clone(),
                source,
            }
        })?;
        use std::os::unix::fs::MetadataExt;
        // Each held inode and open handle is a descriptor: the caps stay inside what this
        // process may open (hull-vmm raises its limit to fit them where it can).
        let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .unwrap_or((1024, 1024));
        let descriptors = usize::try_from(soft).unwrap_or(usize::MAX);
        Ok(Self {
            inner,
            read_only,
            root_dev: meta.dev(),
            root_ino: meta.ino(),
            handle_flags: Mutex::new(HashMap::new()),
            mounted: AtomicBool::new(false),
            stamps: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            max_inodes: MAX_INODES.min(descriptors / 4 * 3),
            max_handles: MAX_HANDLES.min(descriptors / 8),
        })
    }

    /// The same with smaller caps on held inodes and open handles.
    #[cfg(test)]
    fn with_limits(mut self, inodes: usize, handles: usize) -> Self {
        self.max_inodes = inodes;
        self.max_handles = handles;
        self
    }

    /// Whether every change is refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(errno(libc::EROFS))
        } else {
            Ok(())
        }
    }

    fn handle_flags(&self) -> MutexGuard<'_, HashMap<Handle, u32>> {
        // A panic elsewhere leaves the map as consistent as any single insert or remove.
        self.handle_flags
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stamps(&self) -> MutexGuard<'_, HashMap<Inode, Stamp>> {
        // A panic elsewhere leaves the map as consistent as any single insert or remove.
        self.stamps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the guest may keep the page cache of `inode`, which it is opening: only if
    /// the file has not changed since it last opened it. Records the file's stamp either way.
    fn keep_cache(&self, ctx: &Context, inode: Inode, handle: Option<Handle>) -> bool {
        let Ok((st, _)) = self.inner.getattr(ctx, inode, handle) else {
            self.stamps().remove(&inode);
            return false;
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return false;
        }
        let stamp = Stamp::of(&st);
        let mut stamps = self.stamps();
        if stamps.len() >= MAX_STAMPS && !stamps.contains_key(&inode) {
            stamps.clear();
        }
        stamps.insert(inode, stamp) == Some(stamp)
    }

    fn held(&self) -> MutexGuard<'_, HashMap<Inode, u64>> {
        // A panic elsewhere leaves the map as consistent as any single insert or remove.
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many inodes the guest holds.
    pub fn held_inodes(&self) -> usize {
        self.held().len()
    }

    /// How many files and directories the guest has open.
    pub fn open_handles(&self) -> usize {
        self.handle_flags().len()
    }

    /// `ENFILE` if the guest holds as many inodes as it may: for a request that would make a
    /// new one.
    fn room_for_inode(&self) -> io::Result<()> {
        if self.held().len() >= self.max_inodes {
            return Err(errno(libc::ENFILE));
        }
        Ok(())
    }

    /// Records the lookup the guest takes with `entry`; a new inode past [`MAX_INODES`] is
    /// handed back to the server and refused with `ENFILE`.
    fn hold(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        if entry.inode == 0 || entry.inode == ROOT_ID {
            // A negative entry, or the root, which is never forgotten.
            return Ok(entry);
        }
        let mut held = self.held();
        if let Some(count) = held.get_mut(&entry.inode) {
            *count += 1;
            return Ok(entry);
        }
        if held.len() >= self.max_inodes {
            drop(held);
            self.inner.forget(ctx, entry.inode, 1);
            return Err(errno(libc::ENFILE));
        }
        held.insert(entry.inode, 1);
        Ok(entry)
    }

    /// The guest gave back `count` lookups of `inode`.
    fn release_lookups(&self, held: &mut HashMap<Inode, u64>, inode: Inode, count: u64) {
        if let Some(left) = held.get_mut(&inode) {
            *left = left.saturating_sub(count);
            if *left == 0 {
                held.remove(&inode);
            }
        }
    }

    /// Clears the set-user-ID and set-group-ID bits of `inode` if it is a regular file that
    /// has them: before the guest changes its contents (an open for writing, a truncation), so
    /// a privileged host program from the image never runs the guest's code.
    fn drop_privileges(&self, ctx: &Context, inode: Inode) -> io::Result<()> {
        let (mut st, _) = self.inner.getattr(ctx, inode, None)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_mode & SET_ID == 0 {
            return Ok(());
        }
        st.st_mode &= !SET_ID & 0o7777;
        self.inner
            .setattr(ctx, inode, st, None, SetattrValid::MODE)
            .map(drop)
    }

    /// `ENFILE` if the guest has as many files open as it may.
    fn room_for_handle(&self) -> io::Result<()> {
        if self.handle_flags().len() >= self.max_handles {
            return Err(errno(libc::ENFILE));
        }
        Ok(())
    }

    fn remember_handle(&self, handle: Option<Handle>, flags: u32) {
        if let Some(handle) = handle {
            self.handle_flags().insert(handle, flags);
        }
    }

    /// The flags `handle` was opened with: what READ and WRITE must pass on so that
    /// `PassthroughFs` leaves the descriptor's flags alone. `EBADF` for a handle never handed
    /// out (or released), as `PassthroughFs` would answer.
    fn opened_flags(&self, handle: Handle) -> io::Result<u32> {
        self.handle_flags()
            .get(&handle)
            .copied()
            .ok_or_else(|| errno(libc::EBADF))
    }

    /// Is `inode` the shared directory itself, under whatever node id?
    fn is_root(&self, ctx: &Context, inode: Inode) -> io::Result<bool> {
        if inode == ROOT_ID {
            return Ok(true);
        }
        let (st, _) = self.inner.getattr(ctx, inode, None)?;
        Ok(st.st_dev == self.root_dev && st.st_ino == self.root_ino)
    }
}

/// A name LOOKUP may use: one component, not empty; `.` and `..` allowed.
fn check_lookup_name(name: &CStr) -> io::Result<()> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    Ok(())
}

/// A name a new directory entry may get: one component, not empty, not `.` or `..`.
fn check_new_name(name: &CStr) -> io::Result<()> {
    check_lookup_name(name)?;
    match name.to_bytes() {
        b"." | b".." => Err(errno(libc::EINVAL)),
        _ => Ok(()),
    }
}

/// Whether OPEN flags ask for anything but reading.
fn open_changes_file(flags: u32) -> bool {
    let flags = flags as i32;
    (flags & libc::O_ACCMODE) != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_CREAT) != 0
}

impl FileSystem for ConfinedFs {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // No DAX window, and nothing the passthrough configuration left off.
        let capable = capable
            - (FsOptions::PERFILE_DAX
                | FsOptions::WRITEBACK_CACHE
                | FsOptions::ZERO_MESSAGE_OPEN
                | FsOptions::ZERO_MESSAGE_OPENDIR
                | FsOptions::HANDLE_KILLPRIV_V2);
        let options = self.inner.init(capable)?;
        self.mounted.store(true, Ordering::Release);
        Ok(options)
    }

    fn destroy(&self) {
        self.mounted.store(false, Ordering::Release);
        self.inner.destroy();
        self.handle_flags().clear();
        self.stamps().clear();
        self.held().clear();
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        check_lookup_name(name)?;
        let entry = if name.to_bytes() == b".." && self.is_root(ctx, parent)? {
            self.inner.lookup(ctx, parent, c".")?
        } else {
            self.inner.lookup(ctx, parent, name)?
        };
        self.hold(ctx, entry)
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        // The guest dropped the inode and its page cache with it (or only some lookups: then
        // its next open drops the cache once more than it needs to).
        self.stamps().remove(&inode);
        self.release_lookups(&mut self.held(), inode, count);
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        {
            let mut stamps = self.stamps();
            let mut held = self.held();
            for &(inode, count) in &requests {
                stamps.remove(&inode);
                self.release_lookups(&mut held, inode, count);
            }
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.check_writable()?;
        let mut attr = attr;
        if valid.contains(SetattrValid::MODE) {
            let (st, _) = self.inner.getattr(ctx, inode, handle)?;
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                attr.st_mode &= !SET_ID;
            }
        }
        if valid.contains(SetattrValid::SIZE) {
            self.drop_privileges(ctx, inode)?;
        }
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        check_new_name(name)?;
        self.room_for_inode()?;
        // The target is only text: the host never follows it.
        let entry = self.inner.symlink(ctx, linkname, parent, name)?;
        self.hold(ctx, entry)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        check_new_name(name)?;
        match mode & libc::S_IFMT {
            libc::S_IFCHR | libc::S_IFBLK => return Err(errno(libc::EPERM)),
            _ => {}
        }
        self.room_for_inode()?;
        let entry = self
            .inner
            .mknod(ctx, inode, name, mode & !SET_ID, rdev, umask)?;
        self.hold(ctx, entry)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        check_new_name(name)?;
        self.room_for_inode()?;
        let entry = self.inner.mkdir(ctx, parent, name, mode, umask)?;
        self.hold(ctx, entry)
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        check_new_name(name)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        check_new_name(name)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        check_new_name(oldname)?;
        check_new_name(newname)?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        check_new_name(newname)?;
        // `inode` must be one the guest reached through lookups, so it lies inside (and is
        // held already: the new entry only adds a lookup).
        let entry = self.inner.link(ctx, inode, newparent, newname)?;
        self.hold(ctx, entry)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        if open_changes_file(flags) {
            self.check_writable()?;
            self.drop_privileges(ctx, inode)?;
        }
        self.room_for_handle()?;
        let (handle, mut options, passthrough) = self.inner.open(ctx, inode, flags, fuse_flags)?;
        self.remember_handle(handle, flags);
        // With the `Auto` cache policy the guest kernel drops a file's page cache on every
        // open, so each `execve` of a binary read it all again over FUSE (about 2 s of a
        // `/bin/true` on a PVM host). Kept if the file is unchanged, as the guest last saw it;
        // dropped, as before, if it changed since.
        if self.keep_cache(ctx, inode, handle) {
            options |= OpenOptions::KEEP_CACHE;
        }
        Ok((handle, options, passthrough))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        self.check_writable()?;
        check_new_name(name)?;
        self.room_for_inode()?;
        self.room_for_handle()?;
        let mut args = args;
        args.mode &= !SET_ID;
        let created = self.inner.create(ctx, parent, name, args)?;
        self.remember_handle(created.1, args.flags);
        if created.0.inode != 0 {
            *self.held().entry(created.0.inode).or_insert(0) += 1;
        }
        Ok(created)
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let flags = self.opened_flags(handle)?;
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        _flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.check_writable()?;
        // As in `read`: the guest's flags never reach the host descriptor.
        let flags = self.opened_flags(handle)?;
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        self.handle_flags().remove(&handle);
        Ok(())
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _name: &CStr,
        _value: &[u8],
        _flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        Err(errno(libc::ENOSYS))
    }

    fn removexattr(&self, _ctx: &Context, _inode: Inode, _name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        Err(errno(libc::ENOSYS))
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions)> {
        self.room_for_handle()?;
        let opened = self.inner.opendir(ctx, inode, flags)?;
        // What `PassthroughFs::opendir` keeps for the handle.
        self.remember_handle(opened.0, flags | libc::O_DIRECTORY as u32);
        Ok(opened)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        // Each entry is a lookup the guest takes. At the cap, the entry goes back to the
        // server; the listing ends here (as if the buffer were full) if entries were given,
        // so their lookups reach the guest, else it fails with ENFILE.
        let mut given = 0;
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |dir_entry, entry| {
                let node = entry.inode;
                let new = node != ROOT_ID && !self.held().contains_key(&node);
                if new && self.room_for_inode().is_err() {
                    self.inner.forget(ctx, node, 1);
                    return if given == 0 {
                        Err(errno(libc::ENFILE))
                    } else {
                        Ok(0)
                    };
                }
                let written = add_entry(dir_entry, entry)?;
                if written > 0 {
                    given += 1;
                    if node != ROOT_ID {
                        *self.held().entry(node).or_insert(0) += 1;
                    }
                }
                Ok(written)
            })
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)?;
        self.handle_flags().remove(&handle);
        Ok(())
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        if mask & (libc::W_OK as u32) != 0 {
            self.check_writable()?;
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_components() {
        assert!(check_lookup_name(c"a").is_ok());
        assert!(check_lookup_name(c".").is_ok());
        assert!(check_lookup_name(c"..").is_ok());
        for bad in [c"", c"a/b", c"/", c"../..", c"a/"] {
            assert!(check_lookup_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_new_name(c"...").is_ok());
        assert!(check_new_name(c".x").is_ok());
        for bad in [c"", c".", c"..", c"a/b"] {
            assert!(check_new_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn open_flags_that_change_files() {
        assert!(!open_changes_file(libc::O_RDONLY as u32));
        assert!(!open_changes_file(
            (libc::O_RDONLY | libc::O_DIRECTORY) as u32
        ));
        assert!(open_changes_file(libc::O_WRONLY as u32));
        assert!(open_changes_file(libc::O_RDWR as u32));
        assert!(open_changes_file((libc::O_RDONLY | libc::O_TRUNC) as u32));
        assert!(open_changes_file((libc::O_RDONLY | libc::O_CREAT) as u32));
    }

    /// A file's page cache is kept across opens while the file is unchanged; an open after it
    /// changed on the host, or after the guest forgot it, drops the cache.
    #[test]
    fn page_cache_is_kept_while_the_file_is_unchanged() {
        use super::super::test_utils::{FuseGuest, Sandbox};
        use fuse_backend_rs::abi::fuse_abi::ROOT_ID;

        let sandbox = Sandbox::new();
        let path = sandbox.share().join("bin");
        std::fs::write(&path, b"one").unwrap();
        let mut guest = FuseGuest::start_dir(&sandbox.config(false));
        guest.init();
        let node = guest.lookup(ROOT_ID, "bin").unwrap().nodeid;
        let keeps = |guest: &mut FuseGuest, node| {
            let (fh, flags) = guest.open_with_flags(node, libc::O_RDONLY).unwrap();
            guest.release(node, fh).unwrap();
            flags & OpenOptions::KEEP_CACHE.bits() != 0
        };
        assert!(!keeps(&mut guest, node), "the first open keeps nothing");
        assert!(keeps(&mut guest, node));
        assert!(keeps(&mut guest, node));

        // Same size, another modification time: changed on the host.
        std::fs::write(&path, b"two").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(std::time::SystemTime::UNIX_EPOCH)
            .unwrap();
        drop(file);
        assert!(
            !keeps(&mut guest, node),
            "a changed file's cache is dropped"
        );
        assert!(keeps(&mut guest, node));
        let fh = guest.open(node, libc::O_RDONLY).unwrap();
        assert_eq!(guest.read(node, fh, 0, 8).unwrap(), b"two");
        guest.release(node, fh).unwrap();

        guest.forget(node, 2);
        let node = guest.lookup(ROOT_ID, "bin").unwrap().nodeid;
        assert!(!keeps(&mut guest, node), "a forgotten inode starts over");
        assert!(keeps(&mut guest, node));
    }

    #[test]
    fn open_by_handle_stays_off() {
        let config = passthrough_config(Path::new("/srv/rootfs"));
        assert!(!config.inode_file_handles);
        assert!(!config.xattr);
        assert!(!config.no_open);
        assert_eq!(config.dax_file_size, None);
        assert_eq!(config.root_dir, "/srv/rootfs");
    }
}

#[cfg(test)]
mod limit_tests {
    use std::ffi::CString;

    use fuse_backend_rs::abi::fuse_abi::ROOT_ID;

    use super::super::test_utils::Sandbox;
    use super::*;

    fn open_descriptors() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    fn name(i: usize) -> CString {
        CString::new(format!("f{i}")).unwrap()
    }

    fn resident_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn a_hundred_thousand_lookups_without_forget_stay_bounded() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        // A guest that never forgets: 100,000 lookups over 5,000 host files, against the caps a
        // descriptor limit of 4,096 gives (3,072 inodes), or what this process's limit allows.
        const FILES: usize = 5_000;
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        if soft < 4_096 && hard > soft {
            setrlimit(Resource::RLIMIT_NOFILE, hard.min(4_096), hard).unwrap();
        }
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let cap = (soft as usize / 4 * 3).min(3_072);
        let sandbox = Sandbox::new();
        for i in 0..FILES {
            std::fs::File::create(sandbox.share().join(format!("f{i}"))).unwrap();
        }
        let fs = ConfinedFs::new(&sandbox.share(), false)
            .unwrap()
            .with_limits(cap, 512);
        fs.init(FsOptions::empty()).unwrap();
        let ctx = Context::default();
        let (fds_before, rss_before) = (open_descriptors(), resident_kib());
        let (mut found, mut refused) = (0, 0);
        for round in 0..100_000 {
            match fs.lookup(&ctx, ROOT_ID, &name(round % FILES)) {
                Ok(_) => found += 1,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENFILE), "lookup {round}");
                    refused += 1;
                }
            }
        }
        // Each of the first `cap` names found 20 times, the others refused 20 times.
        assert_eq!(
            (found, refused),
            (cap * 20, (FILES - cap) * 20),
            "cap {cap}"
        );
        assert_eq!(fs.held_inodes(), cap);
        let fds = open_descriptors().saturating_sub(fds_before);
        assert!(fds <= cap + 16, "{fds} more descriptors for a cap of {cap}");
        let grown = resident_kib().saturating_sub(rss_before);
        assert!(grown < 32 << 10, "{grown} KiB more resident");
    }

    #[test]
    fn held_inodes_and_open_handles_are_capped() {
        let sandbox = Sandbox::new();
        for i in 0..40 {
            std::fs::write(sandbox.share().join(format!("f{i}")), b"x").unwrap();
        }
        let fs = ConfinedFs::new(&sandbox.share(), false)
            .unwrap()
            .with_limits(20, 5);
        fs.init(FsOptions::empty()).unwrap();
        let ctx = Context::default();
        let before = open_descriptors();
        let mut nodes = Vec::new();
        for i in 0..20 {
            nodes.push(fs.lookup(&ctx, ROOT_ID, &name(i)).unwrap().inode);
        }
        // The guest holds 20 inodes: a new one is refused, one it holds is not.
        for i in 20..40 {
            let err = fs.lookup(&ctx, ROOT_ID, &name(i)).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ENFILE), "f{i}");
        }
        assert_eq!(fs.lookup(&ctx, ROOT_ID, &name(3)).unwrap().inode, nodes[3]);
        assert_eq!(fs.held_inodes(), 20);
        assert!(
            open_descriptors() <= before + 20,
            "{} descriptors for 20 inodes",
            open_descriptors() - before
        );
        let err = fs.mkdir(&ctx, ROOT_ID, c"dir", 0o755, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENFILE));
        assert!(!sandbox.share().join("dir").exists());

        // Forgetting both lookups of f3 makes room for one more.
        fs.forget(&ctx, nodes[3], 2);
        assert_eq!(fs.held_inodes(), 19);
        fs.lookup(&ctx, ROOT_ID, &name(30)).unwrap();
        assert_eq!(fs.held_inodes(), 20);

        // A directory listing with entries cannot pass the cap either.
        let (dir, _) = fs.opendir(&ctx, ROOT_ID, 0).unwrap();
        let dir = dir.unwrap();
        let err = fs
            .readdirplus(&ctx, ROOT_ID, dir, 4096, 0, &mut |_, _| Ok(1))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENFILE));
        assert_eq!(fs.held_inodes(), 20);
        fs.releasedir(&ctx, ROOT_ID, 0, dir).unwrap();

        // Five open files at most (f3 was forgotten above: these are held).
        let mut handles = Vec::new();
        for &node in &nodes[5..10] {
            let (handle, _, _) = fs.open(&ctx, node, libc::O_RDONLY as u32, 0).unwrap();
            handles.push(handle.unwrap());
        }
        let err = fs
            .open(&ctx, nodes[10], libc::O_RDONLY as u32, 0)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENFILE));
        assert_eq!(fs.open_handles(), 5);
        fs.release(&ctx, nodes[5], 0, handles[0], false, false, None)
            .unwrap();
        fs.open(&ctx, nodes[10], libc::O_RDONLY as u32, 0).unwrap();

        fs.destroy();
        assert_eq!((fs.held_inodes(), fs.open_handles()), (0, 0));
    }

    #[test]
    fn the_guest_can_never_make_or_change_a_set_id_file() {
        use std::os::unix::fs::PermissionsExt;
        let sandbox = Sandbox::new();
        let share = sandbox.share();
        let mode_of = |name: &str| {
            std::fs::symlink_metadata(share.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        let set_mode = |name: &str, mode: u32| {
            std::fs::set_permissions(share.join(name), std::fs::Permissions::from_mode(mode))
                .unwrap()
        };
        for name in ["from-image", "truncated"] {
            std::fs::write(share.join(name), b"#!/bin/sh\n").unwrap();
        }
        set_mode("from-image", 0o4755);
        set_mode("truncated", 0o6711);
        let fs = ConfinedFs::new(&share, false).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        let ctx = Context::default();

        // Made set-id: the bits are dropped.
        let args = CreateIn {
            flags: (libc::O_RDWR | libc::O_CREAT) as u32,
            mode: libc::S_IFREG | 0o4755,
            umask: 0,
            fuse_flags: 0,
        };
        fs.create(&ctx, ROOT_ID, c"made", args).unwrap();
        assert_eq!(mode_of("made"), 0o755);
        let node = |name: &CStr| fs.lookup(&ctx, ROOT_ID, name).unwrap().inode;
        let made = node(c"made");
        let (mut st, _) = fs.getattr(&ctx, made, None).unwrap();
        st.st_mode = libc::S_IFREG | 0o6755;
        fs.setattr(&ctx, made, st, None, SetattrValid::MODE)
            .unwrap();
        assert_eq!(mode_of("made"), 0o755);
        fs.mknod(&ctx, ROOT_ID, c"fifo", libc::S_IFIFO | 0o4644, 0, 0)
            .unwrap();
        assert_eq!(mode_of("fifo"), 0o644);

        // The image's set-id file keeps its bits while read, loses them once written.
        let image = node(c"from-image");
        let (fh, _, _) = fs.open(&ctx, image, libc::O_RDONLY as u32, 0).unwrap();
        fs.release(&ctx, image, 0, fh.unwrap(), false, false, None)
            .unwrap();
        assert_eq!(mode_of("from-image"), 0o4755);
        fs.open(&ctx, image, libc::O_WRONLY as u32, 0).unwrap();
        assert_eq!(mode_of("from-image"), 0o755);
        let truncated = node(c"truncated");
        let (mut st, _) = fs.getattr(&ctx, truncated, None).unwrap();
        st.st_size = 0;
        fs.setattr(&ctx, truncated, st, None, SetattrValid::SIZE)
            .unwrap();
        assert_eq!(mode_of("truncated"), 0o711);

        // A set-group-ID directory (new files take its group) is no privilege: kept.
        fs.mkdir(&ctx, ROOT_ID, c"dir", 0o2755, 0).unwrap();
        let dir = node(c"dir");
        let (mut st, _) = fs.getattr(&ctx, dir, None).unwrap();
        st.st_mode = libc::S_IFDIR | 0o2775;
        fs.setattr(&ctx, dir, st, None, SetattrValid::MODE).unwrap();
        assert_eq!(mode_of("dir"), 0o2775);
    }

    #[test]
    fn a_listing_at_the_cap_ends_where_the_cap_is() {
        let sandbox = Sandbox::new();
        for i in 0..10 {
            std::fs::write(sandbox.share().join(format!("f{i}")), b"x").unwrap();
        }
        let fs = ConfinedFs::new(&sandbox.share(), false)
            .unwrap()
            .with_limits(4, 5);
        fs.init(FsOptions::empty()).unwrap();
        let ctx = Context::default();
        let (dir, _) = fs.opendir(&ctx, ROOT_ID, 0).unwrap();
        let mut given = Vec::new();
        fs.readdirplus(&ctx, ROOT_ID, dir.unwrap(), 4096, 0, &mut |_, entry| {
            given.push(entry.inode);
            Ok(1)
        })
        .unwrap();
        // Four entries (each a lookup the guest now holds), then the listing stopped.
        assert_eq!(given.len(), 4);
        assert_eq!(fs.held_inodes(), 4);
        for inode in given {
            fs.forget(&ctx, inode, 1);
        }
        assert_eq!(fs.held_inodes(), 0);
    }
}
