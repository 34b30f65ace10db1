//! Loading the guest: guest memory regions around the MMIO gap, the ELF `vmlinux` (64-bit
//! direct boot), the initramfs at the top of low memory, the command line and the zero page
//! with its e820 map.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::boot_params;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::{Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START,
    PAGE_SIZE, ZERO_PAGE_START,
};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// Errors while loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image cannot be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is not a loadable 64-bit ELF `vmlinux`.
    #[error("cannot load kernel {path}: {source} (hull boots an uncompressed ELF vmlinux)")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initramfs cannot be read.
    #[error("cannot read initramfs {path}")]
    ReadInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit in guest memory next to the kernel.
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest memory above the kernel; \
         give the VM more memory"
    )]
    InitramfsTooBig { path: PathBuf, size: u64 },
    /// Guest memory cannot hold a boot structure.
    #[error("cannot write {what} into guest memory")]
    WriteMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The kernel command line is too long or malformed.
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// The zero page could not be written.
    #[error("cannot write the zero page: {0}")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// Guest memory cannot be mapped.
    #[error("cannot allocate {size_mib} MiB of guest memory")]
    Memory {
        size_mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Guest RAM ranges for `size` bytes: below the MMIO gap, then from 4 GiB on.
pub fn memory_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - low) as usize));
    }
    ranges
}

/// Maps `size_mib` MiB of anonymous guest memory.
pub fn create_memory(size_mib: u64) -> Result<GuestMemoryMmap, BootError> {
    GuestMemoryMmap::from_ranges(&memory_ranges(size_mib << 20))
        .map_err(|source| BootError::Memory { size_mib, source })
}

/// Where the kernel landed and where the initramfs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The 64-bit entry point (`startup_64`).
    pub entry: GuestAddress,
    /// First byte after the kernel image, bss included.
    pub end: u64,
}

/// Loads the ELF `vmlinux` at `path` at its own physical addresses.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_owned(),
        source,
    })?;
    let result =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            BootError::LoadKernel {
                path: path.to_owned(),
                source,
            }
        })?;
    Ok(LoadedKernel {
        entry: result.kernel_load,
        end: result.kernel_end,
    })
}

/// Places an initramfs at the top of low memory, page aligned, above the kernel.
/// Returns its address and size.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let image = std::fs::read(path).map_err(|source| BootError::ReadInitramfs {
        path: path.to_owned(),
        source,
    })?;
    let size = image.len() as u64;
    let low_end = mem.last_addr().raw_value().min(MMIO_GAP_START - 1) + 1;
    let too_big = || BootError::InitramfsTooBig {
        path: path.to_owned(),
        size,
    };
    let addr = low_end.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_big());
    }
    mem.write_slice(&image, GuestAddress(addr))
        .map_err(|source| BootError::WriteMemory {
            what: "the initramfs",
            source,
        })?;
    Ok((GuestAddress(addr), size))
}

/// The e820 map: conventional memory below the EBDA, then every RAM range from 1 MiB up.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

/// Writes the command line and the zero page (`boot_params`) for a direct 64-bit boot.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    cmdline: &Cmdline,
    initramfs: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(
        |_| BootError::WriteMemory {
            what: "the kernel command line",
            source: vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(CMDLINE_START)),
        },
    )?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(BootError::Cmdline)?;

    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, (addr, size)) in e820_map(mem).into_iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].type_ = E820_RAM;
        params.e820_entries = i as u8 + 1;
    }
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)
}

/// An empty command line with the x86 kernel's capacity.
pub fn new_cmdline() -> Cmdline {
    Cmdline::new(CMDLINE_MAX_SIZE).expect("the capacity is a non-zero constant")
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn memory_skips_the_mmio_gap() {
        assert_eq!(memory_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let big = memory_ranges(4 << 30);
        assert_eq!(big[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(
            big[1],
            (GuestAddress(1 << 32), ((4 << 30) - MMIO_GAP_START) as usize)
        );
    }

    #[test]
    fn e820_reserves_the_ebda_and_the_gap() {
        let mem = GuestMemoryMmap::from_ranges(&memory_ranges(4 << 30)).unwrap();
        assert_eq!(
            e820_map(&mem),
            vec![
                (0, EBDA_START),
                (HIMEM_START, MMIO_GAP_START - HIMEM_START),
                (1 << 32, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn zero_page_carries_cmdline_initramfs_and_e820() {
        let mem = create_memory(64).unwrap();
        let mut cmdline = new_cmdline();
        cmdline.insert_str("console=ttyS0 reboot=k").unwrap();
        configure_system(&mem, &cmdline, Some((GuestAddress(0x300_0000), 4096))).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        // Copies: the header is packed.
        let (flag, magic, ptr, size) = (
            hdr.boot_flag,
            hdr.header,
            hdr.cmd_line_ptr,
            hdr.cmdline_size,
        );
        assert_eq!((flag, magic), (KERNEL_BOOT_FLAG_MAGIC, KERNEL_HDR_MAGIC));
        assert_eq!(
            (ptr, size as usize),
            (CMDLINE_START as u32, "console=ttyS0 reboot=k".len())
        );
        let (image, ramdisk_size) = (hdr.ramdisk_image, hdr.ramdisk_size);
        assert_eq!((image, ramdisk_size), (0x300_0000, 4096));
        assert_eq!(params.e820_entries, 2);
        let mut text = [0u8; 23];
        mem.read_slice(&mut text, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&text, b"console=ttyS0 reboot=k\0");
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_memory() {
        let mem = create_memory(32).unwrap();
        let mut file = tempfile();
        file.1.write_all(&[7u8; 5000]).unwrap();
        let (addr, size) = load_initramfs(&mem, &file.0, 0x100_0000).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert!(addr.raw_value() + size <= 32 << 20);
        assert!(addr.raw_value() + size + PAGE_SIZE > 32 << 20);
        let err = load_initramfs(&mem, &file.0, (32 << 20) - 100).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        std::fs::remove_file(&file.0).unwrap();
    }

    #[test]
    fn bad_kernels_name_the_file() {
        let mem = create_memory(32).unwrap();
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
        let mut file = tempfile();
        file.1
            .write_all(b"not an elf file at all, just text")
            .unwrap();
        let err = load_kernel(&mem, &file.0).unwrap_err();
        assert!(err.to_string().contains("ELF vmlinux"), "{err}");
        std::fs::remove_file(&file.0).unwrap();
    }

    fn tempfile() -> (PathBuf, File) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "hull-boot-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&path).unwrap();
        (path, file)
    }
}
