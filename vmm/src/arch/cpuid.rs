//! The CPUID the guest sees: KVM's supported set, with the topology made to match the VM
//! (APIC IDs, logical processor counts), the hypervisor bit set and the PMU hidden.
//!
//! On a PVM host `KVM_SET_CPUID2` is accepted but the guest still reads the host's CPUID
//! (see `host`), so there the kernel command line does the filtering that matters.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMETERS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Topology level types in leaf 0xb/0x1f ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Adjusts KVM's supported CPUID for vCPU `index` of a VM with `count` vCPUs, each a
/// single-threaded core of one package.
pub fn filter(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
    let (index, count) = (u32::from(index), u32::from(count.max(1)));
    // Bits needed to number `count` cores (x2APIC ID shift of the core level).
    let core_bits = u32::BITS - (count - 1).leading_zeros();
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (index << 24) | (count << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMETERS => {
                let level = (entry.eax >> 5) & 0x7;
                // Threads sharing this cache: one for per-core caches, all for the last level.
                let sharing = if level >= 3 { count - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            LEAF_PMU => {
                // No performance counters: a guest's perf events would be host state it
                // cannot own.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = index;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (LEVEL_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = count;
                        entry.ecx = (LEVEL_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0x0000_0000,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn topology_matches_the_vm() {
        let mut entries = vec![
            entry(LEAF_FEATURES, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
            entry(LEAF_PMU, 0),
            entry(0x8000_0001, 0),
        ];
        filter(&mut entries, 2, 3);
        assert_eq!(entries[0].ebx >> 24, 2, "initial APIC ID");
        assert_eq!((entries[0].ebx >> 16) & 0xff, 3, "logical processors");
        assert_eq!(entries[0].ebx & 0xffff, 0xffff, "CLFLUSH size kept");
        assert_ne!(entries[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(entries[0].edx & EDX_HTT, 0);
        assert_eq!(
            (entries[1].ebx, entries[1].ecx, entries[1].edx),
            (1, 0x100, 2)
        );
        assert_eq!(
            (entries[2].eax, entries[2].ebx, entries[2].ecx),
            (2, 3, 0x201)
        );
        assert_eq!((entries[3].ebx, entries[3].ecx), (0, 2));
        assert_eq!(
            entries[4].eax | entries[4].ebx | entries[4].ecx | entries[4].edx,
            0
        );
        assert_eq!(entries[5].eax, 0xffff_ffff, "other leaves untouched");
    }

    #[test]
    fn single_vcpu_has_no_htt_and_caches_are_private() {
        let mut cache = entry(LEAF_CACHE_PARAMETERS, 0);
        cache.eax = (3 << 5) | 0x1; // level 3 data cache
        let mut entries = vec![entry(LEAF_FEATURES, 0), cache];
        filter(&mut entries, 0, 1);
        assert_eq!(entries[0].edx & EDX_HTT, 0);
        assert_eq!(entries[1].eax, (3 << 5) | 0x1);
    }
}
