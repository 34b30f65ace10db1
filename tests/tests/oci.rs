//! End to end: fields of the OCI runtime spec that hull got wrong or ignored, each checked
//! against the spec's words in a real micro-VM through the `hull` binary: `rootfsPropagation`,
//! `process.oomScoreAdj` (the init's and exec'd processes'), the loopback interface of a new
//! network namespace, poststart and poststop hooks after a failing one; and, before any VM
//! starts, namespace paths that do not exist or are of another type and the AppArmor and
//! SELinux fields the guest cannot honour, refused naming the field and value, with nothing
//! left behind.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hull_tests::bundle::{json_string, Bundle};
use hull_tests::harness::{
    assert_container_gone, require_guest_artifacts, wait_for_text, workspace_bin, TempDir,
};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(300);
const ID: &str = "oci-ctr";

/// `hull --root ROOT ARGS`, under a deadline, stdin from /dev/null.
fn hull(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg(DEADLINE.as_secs().to_string())
        .arg(workspace_bin("hull"))
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null());
    cmd
}

fn ok(root: &Path, args: &[&str]) -> String {
    let out = hull(root, args).output().expect("run hull");
    assert!(
        out.status.success(),
        "hull {args:?}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The bundle's `config.json`, changed by `edit`.
fn edit_config(bundle: &Bundle, edit: impl FnOnce(&mut Value)) {
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.config()).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(bundle.config(), config.to_string()).unwrap();
}

fn assert_nothing_left(root: &Path) {
    assert_container_gone(root, ID);
}

/// `hull run` of `bundle` under a fresh root, to its end.
fn run(bundle: &Bundle) -> Output {
    let root = TempDir::new("oci-root");
    let bundle_dir = bundle.path().to_str().unwrap();
    let out = hull(root.path(), &["run", "--bundle", bundle_dir, ID])
        .output()
        .expect("run hull");
    assert_nothing_left(root.path());
    out
}

fn context(out: &Output) -> String {
    format!(
        "{:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The spec: "shared: the rootfs mount belongs to a new peer group"; "unbindable: the rootfs
/// mount is a private mount that cannot be bind-mounted"; "private: the rootfs mount doesn't
/// receive mount propagation events from the host"; "slave: the rootfs mount receives
/// propagation events from the host", and no mount of the host reaches a VM's mount tree, so
/// the root has no master and the kernel keeps it private. Before: `shared` made `create` fail
/// (`EINVAL`), and `unbindable` was not applied to the root.
#[test]
fn the_root_mount_has_the_spec_s_rootfs_propagation() {
    require_guest_artifacts();
    let script = r#"busybox awk '$5 == "/" { t = ""; for (i = 7; $i != "-"; i++) t = t $i " "; print "root:" t }' /proc/self/mountinfo; busybox mkdir -p /tmp/a /tmp/b && busybox mount --bind /tmp/a /tmp/b && echo bind-ok || echo bind-refused"#;
    // An unbindable mount "cannot be bind-mounted": nothing on the root can be bound.
    for (propagation, tag, bind) in [
        ("shared", "shared:", "bind-ok"),
        ("unbindable", "unbindable", "bind-refused"),
        ("slave", "", "bind-ok"),
        ("private", "", "bind-ok"),
    ] {
        let bundle = Bundle::builder().script(script).build();
        edit_config(&bundle, |config| {
            config["linux"]["rootfsPropagation"] = json!(propagation);
            // To bind-mount, below.
            config["process"]["capabilities"] = json!({
                "bounding": ["CAP_SYS_ADMIN"], "effective": ["CAP_SYS_ADMIN"],
                "permitted": ["CAP_SYS_ADMIN"]});
        });
        let out = run(&bundle);
        let context = context(&out);
        assert_eq!(out.status.code(), Some(0), "{propagation}: {context}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let root = stdout
            .lines()
            .find_map(|l| l.strip_prefix("root:"))
            .unwrap_or_else(|| panic!("{propagation}: no root line: {context}"))
            .trim();
        if tag.is_empty() {
            assert_eq!(root, "", "{propagation}: {context}");
        } else {
            assert!(
                root.starts_with(tag) && !root.contains(' '),
                "{propagation}: {context}"
            );
        }
        assert!(
            stdout.ends_with(&format!("{bind}\n")),
            "{propagation}: {context}"
        );
    }
}

/// `process.oomScoreAdj` "adjusts the oom-killer score in [pid]/oom_score_adj for the
/// process's [pid] in a proc pseudo-filesystem": the init's, and an exec'd process's (its own,
/// or the init's when it gives none). A new network namespace's `lo` is up, as in runc.
/// "If a poststart hook fails, the runtime MUST log a warning, but the remaining hooks and
/// lifecycle continue as if the hook had succeeded"; likewise poststop. `domainname` and
/// `linux.personality` (`LINUX32`: `uname -m` says i686), which were ignored.
#[test]
fn oom_score_adj_loopback_domainname_personality_and_the_hooks_after_a_failing_one() {
    require_guest_artifacts();
    let root = TempDir::new("oci-root");
    let r = root.path();
    let marker = |kind: &str| r.join(format!("{kind}-ran"));
    let hook_pair = |kind: &str| {
        let touch = format!("echo ran > {}", marker(kind).display());
        format!(
            r#"[{{"path": "/bin/sh", "args": ["sh", "-c", "echo {kind} fails >&2; exit 3"]}},
                {{"path": "/bin/sh", "args": ["sh", "-c", {}]}}]"#,
            json_string(&touch)
        )
    };
    let hooks = format!(
        r#"{{"poststart": {}, "poststop": {}}}"#,
        hook_pair("poststart"),
        hook_pair("poststop")
    );
    let bundle = Bundle::builder()
        .script(
            "cat /proc/self/oom_score_adj; busybox ip -o link show lo; \
             busybox nc 127.0.0.1 1 </dev/null; echo nc $?; \
             cat /proc/sys/kernel/domainname; busybox uname -m; echo end; exec sleep 1000",
        )
        .hooks(&hooks)
        .build();
    edit_config(&bundle, |config| {
        config["process"]["oomScoreAdj"] = json!(500);
        config["domainname"] = json!("example.org");
        config["linux"]["personality"] = json!({"domain": "LINUX32"});
    });

    let init_out = r.join("init.out");
    let status = hull(
        r,
        &["create", "--bundle", bundle.path().to_str().unwrap(), ID],
    )
    .stdout(File::create(&init_out).unwrap())
    .stderr(File::create(r.join("init.err")).unwrap())
    .status()
    .expect("hull create");
    assert!(status.success(), "create: {status:?}");
    let start = hull(r, &["start", ID]).output().unwrap();
    assert!(start.status.success(), "start: {}", context(&start));
    assert!(
        String::from_utf8_lossy(&start.stderr).contains("poststart fails"),
        "the failing poststart hook is reported: {}",
        context(&start)
    );
    assert!(
        marker("poststart").exists(),
        "the poststart hook after the failing one ran"
    );

    let text = wait_for_text(&init_out, "end\n", Duration::from_secs(120));
    let err = std::fs::read_to_string(r.join("init.err")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "500", "{text}\n{err}");
    assert!(lines[1].contains("<LOOPBACK,UP,LOWER_UP>"), "{text}\n{err}");
    assert_eq!(lines[2], "nc 1", "{text}\n{err}");
    assert_eq!(lines[3..5], ["example.org", "i686"], "{text}\n{err}");
    assert!(err.contains("Connection refused"), "{text}\n{err}");

    assert_eq!(
        ok(r, &["exec", ID, "cat", "/proc/self/oom_score_adj"]),
        "500\n",
        "an exec'd process without its own takes the init's"
    );
    let process = r.join("process.json");
    std::fs::write(
        &process,
        json!({"args": ["cat", "/proc/self/oom_score_adj"], "cwd": "/",
               "env": ["PATH=/bin"], "oomScoreAdj": -200})
        .to_string(),
    )
    .unwrap();
    let process_arg = format!("--process={}", process.display());
    assert_eq!(
        ok(r, &["exec", &process_arg, ID]),
        "-200\n",
        "an exec'd process's own, lowered"
    );

    ok(r, &["kill", ID, "KILL"]);
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let state: Value = serde_json::from_str(&ok(r, &["state", ID])).unwrap();
        if state["status"] == "stopped" {
            break;
        }
        assert!(Instant::now() < end, "never stopped: {state}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let delete = hull(r, &["delete", ID]).output().unwrap();
    assert!(delete.status.success(), "delete: {}", context(&delete));
    assert!(
        String::from_utf8_lossy(&delete.stderr).contains("poststop fails"),
        "{}",
        context(&delete)
    );
    assert!(
        marker("poststop").exists(),
        "the poststop hook after the failing one ran"
    );
    assert_nothing_left(r);
}

/// Refused before any VM starts, with the file, field, value and reason, exit 1, nothing left:
/// a namespace path that does not exist, or names a namespace of another type (runc refuses
/// both); an AppArmor profile, an SELinux process label or mount label (the guest kernel has
/// neither, and runc refuses them on a host without them).
#[test]
fn namespace_paths_and_fields_the_guest_cannot_honour_are_refused_naming_them() {
    let bundle = Bundle::builder().build();
    let config = bundle.config();
    let original = std::fs::read_to_string(&config).unwrap();
    // The `linux.namespaces` entry of `kind` gets `path`; its index, for the message.
    let with_path = |kind: &'static str, path: &'static str| {
        move |config: &mut Value| {
            let list = config["linux"]["namespaces"].as_array_mut().unwrap();
            let entry = list.iter_mut().find(|ns| ns["type"] == kind).unwrap();
            entry["path"] = json!(path);
        }
    };
    let index = |kind: &str| {
        let config: Value = serde_json::from_str(&original).unwrap();
        let list = config["linux"]["namespaces"].as_array().unwrap().clone();
        list.iter().position(|ns| ns["type"] == kind).unwrap()
    };
    let missing = format!(
        "field `linux.namespaces[{}].path` = \"/proc/hull-no-such-process/ns/net\": on the host: \
         No such file or directory",
        index("network")
    );
    let other_type = format!(
        "field `linux.namespaces[{}].path` = \"/proc/self/ns/ipc\": is a namespace of type ipc, \
         not cgroup",
        index("cgroup")
    );
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(with_path("network", "/proc/hull-no-such-process/ns/net")),
            &missing,
        ),
        (
            Box::new(with_path("cgroup", "/proc/self/ns/ipc")),
            &other_type,
        ),
        (
            Box::new(|config: &mut Value| {
                config["process"]["apparmorProfile"] = json!("docker-default");
            }),
            "field `process.apparmorProfile` = \"docker-default\": the guest kernel has no \
             AppArmor",
        ),
        (
            Box::new(|config: &mut Value| {
                config["process"]["selinuxLabel"] = json!("system_u:system_r:container_t:s0");
            }),
            "field `process.selinuxLabel` = \"system_u:system_r:container_t:s0\": the guest \
             kernel has no SELinux",
        ),
        (
            Box::new(|config: &mut Value| {
                config["linux"]["mountLabel"] = json!("system_u:object_r:container_file_t:s0");
            }),
            "field `linux.mountLabel` = \"system_u:object_r:container_file_t:s0\": the guest \
             kernel has no SELinux",
        ),
    ];
    for (edit, want) in cases {
        std::fs::write(&config, &original).unwrap();
        edit_config(&bundle, edit);
        let started = Instant::now();
        let out = run(&bundle);
        let context = context(&out);
        assert_eq!(out.status.code(), Some(1), "{context}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("{}: {want}", config.display())),
            "wanted {want:?}\n{context}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{context}");
    }
}

/// `linux.namespaces` with a `user` namespace, `linux.uidMappings` and `gidMappings`: made in
/// the guest, the container's root is the mapped id outside: in the guest, and through
/// virtio-fs on the host. The image is shifted to the mapped ids, as Podman shifts it for
/// `--userns`. They were refused.
#[test]
fn a_user_namespace_maps_the_container_s_root_to_the_mapped_id_on_the_host() {
    require_guest_artifacts();
    const OUTSIDE: u32 = 100_000;
    let bundle = Bundle::builder()
        .script(
            "id -u; cat /proc/self/uid_map /proc/self/gid_map; echo x > /tmp/by-root && \
             cat /tmp/by-root",
        )
        .build();
    edit_config(&bundle, |config| {
        let namespaces = config["linux"]["namespaces"].as_array_mut().unwrap();
        namespaces.push(json!({"type": "user"}));
        let map = json!([{"containerID": 0, "hostID": OUTSIDE, "size": 65536}]);
        config["linux"]["uidMappings"] = map.clone();
        config["linux"]["gidMappings"] = map;
    });
    let status = Command::new("chown")
        .args(["-R", "-h", &format!("{OUTSIDE}:{OUTSIDE}")])
        .arg(bundle.rootfs())
        .status()
        .expect("chown");
    assert!(status.success());
    let out = run(&bundle);
    let context = context(&out);
    assert_eq!(out.status.code(), Some(0), "{context}");
    let words: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        words,
        ["0", "0", "100000", "65536", "0", "100000", "65536", "x"],
        "{context}"
    );
    use std::os::unix::fs::MetadataExt;
    let made = std::fs::metadata(bundle.rootfs().join("tmp/by-root")).unwrap();
    assert_eq!((made.uid(), made.gid()), (OUTSIDE, OUTSIDE), "{context}");
}
