//! x86_64 specifics: the guest's physical memory map, the boot-time CPU state for the Linux
//! 64-bit boot protocol, the zero page, CPUID and MSRs.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod msr;
pub mod paging;
pub mod regs;
pub mod xsave;
