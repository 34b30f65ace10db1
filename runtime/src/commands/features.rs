//! `hull features`: the runtime-spec "features" document (features.md, features-linux.md of
//! runtime-spec 1.1.0), stating what hull really does with a `config.json`.
//!
//! Everything in the container is the guest agent's doing, and what reaches it is what the host
//! lets through (`spec/oci.rs`), so the lists come from both: the mount options the agent's
//! `parse_options` turns into mount flags (every other option goes to the file system as data,
//! which the spec says not to list), the namespaces the host passes on (`time` is refused; a
//! `user` namespace is made in the guest, never joined by path), the capability table, and the
//! seccomp actions, operators and flags the host
//! accepts. The tests read the agent's source and run the host's checks, and fail when either
//! disagrees with this document.
//!
//! Not claimed: cgroup managers (hull applies `linux.resources` by sizing the VM, not with
//! cgroups), AppArmor and SELinux (the guest kernel has neither: a profile other than
//! `unconfined`, a `selinuxLabel` or a `mountLabel` is refused, as runc refuses them on a host
//! without them), Intel RDT. `architectures` of a seccomp profile is not read:
//! every filter admits x86-64 system calls only. `mountExtensions` is a runtime-spec 1.2
//! property, which a document whose `ociVersionMax` is 1.1.0 must not contain.
//!
//! Hooks run on the host (`hooks.rs`). `createContainer` and `startContainer`, which the spec
//! runs in the container's namespaces, would have to run inside the VM: `hull create` refuses
//! them, so they are not listed.

use serde_json::{json, Value};

/// Prints the features document.
pub fn run() -> anyhow::Result<i32> {
    super::print_json(&features());
    Ok(0)
}

/// The oldest `ociVersion` hull takes.
pub const OCI_VERSION_MIN: &str = "1.0.0";
/// The newest `ociVersion` hull knows.
pub const OCI_VERSION_MAX: &str = "1.1.0";

/// The hooks, in the order of a container's life.
const HOOKS: [&str; 4] = ["prestart", "createRuntime", "poststart", "poststop"];

/// The options the agent's `parse_options` turns into mount or propagation flags.
const MOUNT_OPTIONS: [&str; 30] = [
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "norelatime",
    "nosuid",
    "private",
    "rbind",
    "relatime",
    "remount",
    "ro",
    "rprivate",
    "rshared",
    "rslave",
    "runbindable",
    "rw",
    "shared",
    "slave",
    "strictatime",
    "suid",
    "sync",
    "unbindable",
];

const NAMESPACES: [&str; 7] = ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"];

/// `SCMP_ACT_NOTIFY` and `SCMP_ACT_TRACE` are refused by the host.
const SECCOMP_ACTIONS: [&str; 7] = [
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_LOG",
    "SCMP_ACT_TRAP",
];

const SECCOMP_OPERATORS: [&str; 7] = [
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_LE",
    "SCMP_CMP_LT",
    "SCMP_CMP_MASKED_EQ",
    "SCMP_CMP_NE",
];

const SECCOMP_ARCHS: [&str; 1] = ["SCMP_ARCH_X86_64"];

/// All honoured: `TSYNC` trivially, the container's init having one thread when it installs
/// the filter; the guest kernel (6.x) has `LOG` (4.14) and `SPEC_ALLOW` (4.17).
const SECCOMP_FLAGS: [&str; 3] = [
    "SECCOMP_FILTER_FLAG_LOG",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
    "SECCOMP_FILTER_FLAG_TSYNC",
];

/// The version of seccompiler (rust-vmm) that compiles the agent's filters, as runc names its
/// libseccomp.
const SECCOMPILER_VERSION: &str = "0.5.0";

/// The features document `hull features` prints.
pub fn features() -> Value {
    json!({
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": OCI_VERSION_MAX,
        "hooks": &HOOKS[..],
        "mountOptions": &MOUNT_OPTIONS[..],
        "linux": {
            "namespaces": &NAMESPACES[..],
            "capabilities": &hull_protocol::CAPABILITY_NAMES[..],
            "cgroup": {
                "v1": false,
                "v2": false,
                "systemd": false,
                "systemdUser": false,
                "rdma": false
            },
            "seccomp": {
                "enabled": true,
                "actions": &SECCOMP_ACTIONS[..],
                "operators": &SECCOMP_OPERATORS[..],
                "archs": &SECCOMP_ARCHS[..],
                "knownFlags": &SECCOMP_FLAGS[..],
                "supportedFlags": &SECCOMP_FLAGS[..]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false}
        },
        "annotations": {
            "io.github.rust-vmm.seccompiler.version": SECCOMPILER_VERSION
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const AGENT_SETUP: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../guest-agent/src/container/setup.rs"
    ));
    const CARGO_LOCK: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"));

    /// The double-quoted literals of `text`.
    fn literals(text: &str) -> Vec<&str> {
        text.split('"').skip(1).step_by(2).collect()
    }

    /// The part of `text` from `start` to the next `end`.
    fn section<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
        let from = text
            .find(start)
            .unwrap_or_else(|| panic!("{start:?} not found"));
        let rest = &text[from..];
        &rest[..rest
            .find(end)
            .unwrap_or_else(|| panic!("{end:?} not found"))]
    }

    fn strings(value: &Value) -> Vec<&str> {
        value
            .as_array()
            .unwrap_or_else(|| panic!("{value} is not an array"))
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect()
    }

    fn set<'a>(list: impl IntoIterator<Item = &'a str>) -> BTreeSet<&'a str> {
        list.into_iter().collect()
    }

    #[test]
    fn document_parses_with_a_sane_version_range() {
        let text = serde_json::to_string_pretty(&features()).unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        let version = |key: &str| -> Vec<u32> {
            doc[key]
                .as_str()
                .unwrap()
                .split('.')
                .map(|n| n.parse().unwrap())
                .collect()
        };
        let (min, max) = (version("ociVersionMin"), version("ociVersionMax"));
        assert_eq!(min.len(), 3);
        assert_eq!(max.len(), 3);
        assert_eq!(min[0], 1);
        assert!(min <= max, "{min:?} > {max:?}");
        // A 1.2 property must not appear in a document for 1.1.
        assert!(doc["linux"].get("mountExtensions").is_none());
        assert!(doc.get("potentiallyUnsafeConfigAnnotations").is_none());
        assert_eq!(doc["linux"]["seccomp"]["enabled"], true);
        assert_eq!(doc["linux"]["cgroup"]["v2"], false);
    }

    #[test]
    fn lists_are_unique_and_sets_are_sorted() {
        let doc = features();
        let linux = &doc["linux"];
        let seccomp = &linux["seccomp"];
        for list in [
            &doc["hooks"],
            &doc["mountOptions"],
            &linux["namespaces"],
            &linux["capabilities"],
            &seccomp["actions"],
            &seccomp["operators"],
            &seccomp["archs"],
            &seccomp["knownFlags"],
            &seccomp["supportedFlags"],
        ] {
            let items = strings(list);
            assert_eq!(set(items.iter().copied()).len(), items.len(), "{list}");
        }
        // Hooks in life-cycle order and capabilities in kernel order, as the spec's examples;
        // everything else sorted.
        for list in [
            &doc["mountOptions"],
            &linux["namespaces"],
            &seccomp["actions"],
            &seccomp["operators"],
            &seccomp["archs"],
            &seccomp["knownFlags"],
            &seccomp["supportedFlags"],
        ] {
            let items = strings(list);
            assert!(items.windows(2).all(|w| w[0] < w[1]), "not sorted: {list}");
        }
        assert!(set(strings(&seccomp["supportedFlags"]))
            .is_subset(&set(strings(&seccomp["knownFlags"]))));
        assert_eq!(
            strings(&doc["hooks"]),
            ["prestart", "createRuntime", "poststart", "poststop"]
        );
    }

    #[test]
    fn mount_options_are_the_ones_the_agent_makes_flags_of() {
        let body = section(AGENT_SETUP, "pub fn parse_options", "\n}\n");
        // Option names, not the "," that joins the data.
        let agent = set(literals(body)
            .into_iter()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase())));
        assert!(agent.contains("strictatime") && agent.contains("runbindable"));
        // The inner match spells the propagation types without their `r`; those are in the
        // document too, as options of their own.
        assert_eq!(set(strings(&features()["mountOptions"])), agent);
    }

    /// Whether the host's checks let `linux` (merged into a minimal spec) through to the agent.
    fn host_accepts(linux: Value) -> bool {
        let spec = json!({"process": {"args": ["sh"]}, "root": {"path": "rootfs"},
                          "linux": linux});
        let file = std::path::Path::new("/b/config.json");
        crate::spec::oci::read_spec(file, &spec)
            .and_then(|s| crate::spec::oci::container_spec(file, &s))
            .is_ok()
    }

    #[test]
    fn namespaces_are_the_ones_the_host_passes_on() {
        let features = features();
        let listed = set(strings(&features["linux"]["namespaces"]));
        for kind in [
            "cgroup", "ipc", "mount", "network", "pid", "uts", "user", "time",
        ] {
            // A user namespace comes with its mappings.
            let map = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
            let linux = if kind == "user" {
                json!({"namespaces": [{"type": kind}], "uidMappings": map, "gidMappings": map})
            } else {
                json!({"namespaces": [{"type": kind}]})
            };
            let accepted = host_accepts(linux);
            assert_eq!(accepted, listed.contains(kind), "namespace {kind}");
        }
    }

    #[test]
    fn seccomp_lists_are_what_the_host_accepts() {
        let features = features();
        let seccomp = &features["linux"]["seccomp"];
        let listed = set(strings(&seccomp["actions"]));
        for action in [
            "SCMP_ACT_ALLOW",
            "SCMP_ACT_ERRNO",
            "SCMP_ACT_KILL",
            "SCMP_ACT_KILL_PROCESS",
            "SCMP_ACT_KILL_THREAD",
            "SCMP_ACT_LOG",
            "SCMP_ACT_TRAP",
            "SCMP_ACT_NOTIFY",
            "SCMP_ACT_TRACE",
        ] {
            let rule = json!({"names": ["kill"], "action": action});
            let accepted = host_accepts(
                json!({"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]}}),
            );
            assert_eq!(accepted, listed.contains(action), "action {action}");
        }
        for op in strings(&seccomp["operators"]) {
            let rule = json!({"names": ["kill"], "action": "SCMP_ACT_ERRNO",
                              "args": [{"index": 1, "value": 9, "valueTwo": 9, "op": op}]});
            assert!(
                host_accepts(
                    json!({"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]}})
                ),
                "operator {op}"
            );
        }
        let listed = set(strings(&seccomp["knownFlags"]));
        for flag in [
            "SECCOMP_FILTER_FLAG_LOG",
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
            "SECCOMP_FILTER_FLAG_TSYNC",
            "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
        ] {
            let accepted = host_accepts(
                json!({"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "flags": [flag]}}),
            );
            assert_eq!(accepted, listed.contains(flag), "flag {flag}");
        }
    }

    #[test]
    fn seccompiler_version_is_the_locked_one() {
        let entry = section(CARGO_LOCK, "name = \"seccompiler\"\n", "\n\n");
        let version = literals(entry)[1];
        assert_eq!(
            features()["annotations"]["io.github.rust-vmm.seccompiler.version"],
            version
        );
    }
}
