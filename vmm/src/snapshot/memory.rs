//! The snapshot's memory file: guest RAM with only the pages the guest touched written.
//!
//! ```text
//! offset      what
//! 0           header page: magic "HULLMEM\0", format version (u32 LE), the snapshot's id
//!             (16 bytes, also in the state file), guest RAM size (u64 LE); zeros after
//! 4096        each RAM region in guest-address order, back to back
//! ```
//!
//! Pages the guest never touched (not present in `/proc/self/pagemap`, nor swapped) and pages
//! of zeros are holes, so the file takes the disk of the touched memory only. A restore maps
//! each region `MAP_PRIVATE` from the file: VMs restored from one file share its pages in the
//! page cache until one writes a page, which it then gets a copy of; the file is never written.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::mmap::{GuestRegionMmap, MmapRegion};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// The first bytes of a memory file.
pub const MAGIC: &[u8; 8] = b"HULLMEM\0";
/// The layout of the memory file.
pub const FORMAT_VERSION: u32 = 1;
/// Where the first region starts.
pub const DATA_OFFSET: u64 = 4096;
const PAGE: usize = 4096;
/// Pagemap: the page is present in RAM / swapped out.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
/// Pages looked up in one pagemap read.
const PAGEMAP_BATCH: usize = 4096;

/// Why a memory file cannot be written or mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot write snapshot memory file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read snapshot memory file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read /proc/self/pagemap")]
    Pagemap(#[source] std::io::Error),
    #[error("{}: not a hull snapshot memory file", path.display())]
    Magic { path: PathBuf },
    #[error("{}: memory format version {found}, this hull-vmm reads version {FORMAT_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("{}: belongs to another snapshot than its state file", path.display())]
    Mismatch { path: PathBuf },
    #[error("{}: {len} bytes, the snapshot needs {expected} ({ram} of guest RAM)", path.display())]
    Size {
        path: PathBuf,
        len: u64,
        expected: u64,
        ram: u64,
    },
    #[error("{}: cannot map guest memory at {guest_addr:#x}: {reason}", path.display())]
    Map {
        path: PathBuf,
        guest_addr: u64,
        reason: String,
    },
}

/// What writing the memory file did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// Guest RAM, in bytes.
    pub ram: u64,
    /// Bytes written (touched pages that are not all zeros).
    pub written: u64,
}

fn header(id: &[u8; 16], ram: u64) -> Vec<u8> {
    let mut page = vec![0u8; DATA_OFFSET as usize];
    page[..8].copy_from_slice(MAGIC);
    page[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    page[12..28].copy_from_slice(id);
    page[28..36].copy_from_slice(&ram.to_le_bytes());
    page
}

/// Guest RAM's size: the sum of its regions.
pub fn ram_size(memory: &GuestMemoryMmap) -> u64 {
    memory.iter().map(|r| r.len()).sum()
}

/// Which of `pages` pages from `addr` (page-aligned, in this process) hold data: present or
/// swapped out.
fn touched_pages(pagemap: &File, addr: usize, pages: usize) -> Result<Vec<bool>, MemoryFileError> {
    let mut out = Vec::with_capacity(pages);
    let mut buf = vec![0u8; PAGEMAP_BATCH * 8];
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(PAGEMAP_BATCH);
        let offset = ((addr / PAGE + done) * 8) as u64;
        pagemap
            .read_exact_at(&mut buf[..n * 8], offset)
            .map_err(MemoryFileError::Pagemap)?;
        out.extend(buf[..n * 8].chunks_exact(8).map(|e| {
            let entry = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            entry & (PM_PRESENT | PM_SWAPPED) != 0
        }));
        done += n;
    }
    Ok(out)
}

/// Writes `memory` (anonymous, this process's) to a new file `path` with the snapshot's `id`.
pub fn dump(
    memory: &GuestMemoryMmap,
    path: &Path,
    id: &[u8; 16],
) -> Result<DumpStats, MemoryFileError> {
    let werr = |source| MemoryFileError::Write {
        path: path.to_owned(),
        source,
    };
    let ram = ram_size(memory);
    let file = File::create(path).map_err(werr)?;
    file.set_len(DATA_OFFSET + ram).map_err(werr)?;
    let pagemap = File::open("/proc/self/pagemap").map_err(MemoryFileError::Pagemap)?;
    let mut stats = DumpStats { ram, written: 0 };
    let mut file_offset = DATA_OFFSET;
    for region in memory.iter() {
        let host = memory
            .get_host_address(region.start_addr())
            .expect("a region's start is in guest memory") as usize;
        let len = region.len() as usize;
        let pages = len / PAGE;
        let touched = touched_pages(&pagemap, host, pages)?;
        let mut data = [0u8; PAGE];
        for (page, _) in touched.iter().enumerate().filter(|(_, t)| **t) {
            // Through vm-memory's volatile copy: a device could still write guest memory.
            region
                .read_slice(&mut data, MemoryRegionAddress((page * PAGE) as u64))
                .map_err(|e| werr(std::io::Error::other(e.to_string())))?;
            if data.iter().all(|&b| b == 0) {
                continue;
            }
            file.write_all_at(&data, file_offset + (page * PAGE) as u64)
                .map_err(werr)?;
            stats.written += PAGE as u64;
        }
        file_offset += len as u64;
    }
    file.write_all_at(&header(id, ram), 0).map_err(werr)?;
    file.sync_all().map_err(werr)?;
    Ok(stats)
}

/// Opens the memory file `path` of snapshot `id` and checks its header against guest RAM laid
/// out as `ranges`.
fn open_checked(
    path: &Path,
    id: &[u8; 16],
    ranges: &[(GuestAddress, usize)],
) -> Result<File, MemoryFileError> {
    let rerr = |source| MemoryFileError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(rerr)?;
    let mut head = [0u8; 36];
    let len = file.seek(SeekFrom::End(0)).map_err(rerr)?;
    file.seek(SeekFrom::Start(0)).map_err(rerr)?;
    if len < head.len() as u64 {
        return Err(MemoryFileError::Magic {
            path: path.to_owned(),
        });
    }
    file.read_exact(&mut head).map_err(rerr)?;
    if &head[..8] != MAGIC {
        return Err(MemoryFileError::Magic {
            path: path.to_owned(),
        });
    }
    let found = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if found != FORMAT_VERSION {
        return Err(MemoryFileError::Version {
            path: path.to_owned(),
            found,
        });
    }
    if &head[12..28] != id {
        return Err(MemoryFileError::Mismatch {
            path: path.to_owned(),
        });
    }
    let ram: u64 = ranges.iter().map(|(_, size)| *size as u64).sum();
    let stored_ram = u64::from_le_bytes(head[28..36].try_into().expect("8 bytes"));
    let expected = DATA_OFFSET + ram;
    if stored_ram != ram || len != expected {
        return Err(MemoryFileError::Size {
            path: path.to_owned(),
            len,
            expected,
            ram,
        });
    }
    Ok(file)
}

/// Maps the memory file `path` of snapshot `id` as guest RAM laid out as `ranges`, each
/// region `MAP_PRIVATE`.
pub fn map(
    path: &Path,
    id: &[u8; 16],
    ranges: &[(GuestAddress, usize)],
) -> Result<GuestMemoryMmap, MemoryFileError> {
    let rerr = |source| MemoryFileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = open_checked(path, id, ranges)?;
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = DATA_OFFSET;
    for &(guest_addr, size) in ranges {
        let map_err = |reason: String| MemoryFileError::Map {
            path: path.to_owned(),
            guest_addr: guest_addr.raw_value(),
            reason,
        };
        let fd = file.try_clone().map_err(rerr)?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(fd, offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, guest_addr)
            .ok_or_else(|| map_err("the region wraps the address space".into()))?;
        regions.push(region);
        offset += size as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryFileError::Map {
        path: path.to_owned(),
        guest_addr: 0,
        reason: e.to_string(),
    })
}

/// Maps the memory file `path` of snapshot `id` over `memory`, region by region, in place
/// (`MAP_FIXED | MAP_PRIVATE`): the guest RAM of a VM made before its snapshot was known,
/// whose memory slots stay as they are (KVM follows the new mapping through its MMU notifier).
/// Nothing may have used `memory` yet: what was in it is gone.
pub fn map_over(
    path: &Path,
    id: &[u8; 16],
    memory: &GuestMemoryMmap,
) -> Result<(), MemoryFileError> {
    let ranges: Vec<(GuestAddress, usize)> = memory
        .iter()
        .map(|region| (region.start_addr(), region.len() as usize))
        .collect();
    let file = open_checked(path, id, &ranges)?;
    let mut offset = DATA_OFFSET;
    for (guest_addr, size) in ranges {
        let map_err = |reason: String| MemoryFileError::Map {
            path: path.to_owned(),
            guest_addr: guest_addr.raw_value(),
            reason,
        };
        let host = memory
            .get_host_address(guest_addr)
            .map_err(|e| map_err(e.to_string()))?;
        let file_offset =
            libc::off_t::try_from(offset).map_err(|_| map_err("offset out of range".into()))?;
        // SAFETY: `host..host + size` is exactly one region of `memory`, which owns that
        // mapping and unmaps it when dropped; MAP_FIXED replaces it in place with a private
        // mapping of the file of the same size, so the region stays valid memory of the same
        // extent. Nothing holds a reference into it (the caller's contract: no vCPU has run and
        // no device has touched the memory).
        let mapped = unsafe {
            libc::mmap(
                host.cast(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                file_offset,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error().to_string()));
        }
        offset += size as u64;
    }
    // The new mappings do not inherit the old ones' flags.
    crate::vstate::vm::exclude_from_core_dumps(memory).map_err(|e| MemoryFileError::Map {
        path: path.to_owned(),
        guest_addr: 0,
        reason: format!("keeping it out of core dumps: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hull-memfile-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const ID: [u8; 16] = *b"0123456789abcdef";

    #[test]
    fn touched_pages_round_trip_and_the_rest_are_holes() {
        let dir = dir("rt");
        let ranges = [(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 20)];
        let memory = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        memory
            .write_obj(0x1122_3344_u32, GuestAddress(0x5000))
            .unwrap();
        memory
            .write_obj(0x55_u8, GuestAddress((1 << 32) + 0xff_fff))
            .unwrap();
        // Touched, but zeros: not written.
        memory.write_obj(0u64, GuestAddress(0x9000)).unwrap();
        let path = dir.join("mem");
        let stats = dump(&memory, &path, &ID).unwrap();
        assert_eq!(
            stats,
            DumpStats {
                ram: 2 << 20,
                written: 2 * 4096
            }
        );
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), DATA_OFFSET + (2 << 20));
        // The header page and the two data pages, in 512-byte blocks (a sparse file system).
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 <= 64 << 10, "{} blocks", meta.blocks());

        let restored = map(&path, &ID, &ranges).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0x1122_3344
        );
        assert_eq!(
            restored
                .read_obj::<u8>(GuestAddress((1 << 32) + 0xff_fff))
                .unwrap(),
            0x55
        );
        assert_eq!(restored.read_obj::<u64>(GuestAddress(0x7000)).unwrap(), 0);
        // Private: a write to the restored memory never reaches the file.
        restored.write_obj(7u32, GuestAddress(0x5000)).unwrap();
        let again = map(&path, &ID, &ranges).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0x1122_3344
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_of_another_snapshot_size_or_kind_is_refused() {
        let dir = dir("bad");
        let ranges = [(GuestAddress(0), 64 << 10)];
        let memory = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        let path = dir.join("mem");
        dump(&memory, &path, &ID).unwrap();
        let err = |id: &[u8; 16], ranges: &[(GuestAddress, usize)]| {
            map(&path, id, ranges).unwrap_err().to_string()
        };
        assert!(err(b"another snapshot", &ranges).contains("belongs to another snapshot"));
        let bigger = [(GuestAddress(0), 128 << 10)];
        assert!(
            err(&ID, &bigger).contains("the snapshot needs"),
            "{}",
            err(&ID, &bigger)
        );
        // Truncated.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(DATA_OFFSET + 4096).unwrap();
        assert!(err(&ID, &ranges).contains("bytes, the snapshot needs"));
        std::fs::write(&path, b"not memory at all, not at all, no").unwrap();
        assert!(
            err(&ID, &ranges).contains("too short")
                || err(&ID, &ranges).contains("not a hull snapshot memory file")
        );
        std::fs::write(dir.join("x"), vec![0u8; 8192]).unwrap();
        assert!(map(&dir.join("x"), &ID, &ranges)
            .unwrap_err()
            .to_string()
            .contains("not a hull snapshot memory file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
