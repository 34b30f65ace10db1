//! Escape and read-only tests: a hostile guest drives the whole device (queues, worker,
//! `ConfinedFs`, `PassthroughFs`) against a share with a secret right beside it.
//!
//! These test `confine.rs` end to end; they live apart to keep that file readable.

use std::os::unix::fs::{symlink, MetadataExt};

use fuse_backend_rs::abi::fuse_abi::{MknodIn, Opcode, ReadIn, WriteIn, ROOT_ID};
use vm_memory::ByteValued;

use super::test_utils::{cstr, FuseGuest, Sandbox, SECRET};

fn is_symlink(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFLNK
}

#[test]
fn dotdot_at_the_root_is_the_root() {
    let sandbox = Sandbox::new();
    let mut guest = FuseGuest::start_dir(&sandbox.config(false));
    guest.init();
    assert_eq!(guest.lookup(ROOT_ID, "..").unwrap().nodeid, ROOT_ID);
    assert_eq!(guest.lookup(ROOT_ID, ".").unwrap().nodeid, ROOT_ID);
    let sub = guest.mkdir(ROOT_ID, "sub", 0o755).unwrap();
    let up = guest.lookup(sub.nodeid, "..").unwrap();
    assert_eq!(up.nodeid, ROOT_ID);
    assert_eq!(guest.lookup(up.nodeid, "..").unwrap().nodeid, ROOT_ID);
    // The secret beside the share is not there, and no multi-component name reaches it.
    assert_eq!(guest.lookup(ROOT_ID, "secret").unwrap_err(), libc::ENOENT);
    for name in ["../secret", "sub/../../secret", "/secret", "sub/.."] {
        assert_eq!(
            guest.lookup(ROOT_ID, name).unwrap_err(),
            libc::EINVAL,
            "{name}"
        );
    }
    assert_eq!(guest.lookup(ROOT_ID, "").unwrap_err(), libc::EINVAL);
    // However often the guest forgets the root, it stays the root.
    guest.forget(ROOT_ID, 1000);
    assert_eq!(guest.lookup(sub.nodeid, "..").unwrap().nodeid, ROOT_ID);
    assert_eq!(guest.lookup(ROOT_ID, "..").unwrap().nodeid, ROOT_ID);
    assert!(guest.getattr(ROOT_ID).is_ok());
    // The root's listing has no ".." to follow either.
    let dh = guest.opendir(ROOT_ID).unwrap();
    let names: Vec<String> = guest
        .readdirplus(ROOT_ID, dh)
        .unwrap()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(names, ["sub"]);
}

#[test]
fn symlinks_are_text_and_never_followed_on_the_host() {
    let sandbox = Sandbox::new();
    let share = sandbox.share();
    std::fs::create_dir(share.join("sub")).unwrap();
    symlink(sandbox.secret(), share.join("abs")).unwrap();
    symlink("/etc/hostname", share.join("etc")).unwrap();
    symlink("../secret", share.join("rel")).unwrap();
    symlink("../../../../../../..", share.join("sub/up")).unwrap();
    symlink(sandbox.secret().parent().unwrap(), share.join("outdir")).unwrap();
    let mut guest = FuseGuest::start_dir(&sandbox.config(false));
    guest.init();
    let sub = guest.lookup(ROOT_ID, "sub").unwrap().nodeid;
    let guest_made = guest
        .symlink(ROOT_ID, "made", &sandbox.secret().to_string_lossy())
        .unwrap();
    assert_eq!(
        guest.lookup(ROOT_ID, "made").unwrap().nodeid,
        guest_made.nodeid
    );

    let links = [
        (
            ROOT_ID,
            "abs",
            sandbox.secret().to_string_lossy().into_owned(),
        ),
        (ROOT_ID, "etc", "/etc/hostname".to_string()),
        (ROOT_ID, "rel", "../secret".to_string()),
        (sub, "up", "../../../../../../..".to_string()),
        (
            ROOT_ID,
            "made",
            sandbox.secret().to_string_lossy().into_owned(),
        ),
    ];
    for (parent, name, target) in links {
        let entry = guest.lookup(parent, name).unwrap();
        // The entry is the link itself, not what it points at.
        assert!(is_symlink(entry.attr.mode), "{name}");
        assert_ne!(entry.attr.size, SECRET.len() as u64, "{name}");
        assert_eq!(
            guest.readlink(entry.nodeid).unwrap(),
            target.as_bytes(),
            "{name}"
        );
        // Opening a link on the host is refused; nothing outside is opened.
        for flags in [
            libc::O_RDONLY,
            libc::O_RDWR,
            libc::O_RDONLY | libc::O_NOFOLLOW,
        ] {
            assert!(guest.open(entry.nodeid, flags).is_err(), "{name}");
        }
        // Nor can it be used as a directory to look further.
        assert_eq!(
            guest.lookup(entry.nodeid, "secret").unwrap_err(),
            libc::ENOTDIR
        );
        assert_eq!(guest.lookup(entry.nodeid, "..").unwrap_err(), libc::ENOTDIR);
    }
    // A link to the directory holding the secret is no way in either.
    let outdir = guest.lookup(ROOT_ID, "outdir").unwrap();
    assert!(is_symlink(outdir.attr.mode));
    assert!(guest.opendir(outdir.nodeid).is_err());
    assert!(guest.lookup(outdir.nodeid, "secret").is_err());
    assert_eq!(std::fs::read(sandbox.secret()).unwrap(), SECRET);
}

#[test]
fn hard_links_only_reach_what_is_inside() {
    let sandbox = Sandbox::new();
    symlink(sandbox.secret(), sandbox.share().join("abs")).unwrap();
    let mut guest = FuseGuest::start_dir(&sandbox.config(false));
    guest.init();
    // Node ids the server never handed out name nothing.
    for bogus in [0, 2, 9999, u64::MAX] {
        assert_eq!(guest.link(bogus, ROOT_ID, "x").unwrap_err(), libc::EBADF);
    }
    // Linking a symlink that points outside links the symlink, not its target.
    let abs = guest.lookup(ROOT_ID, "abs").unwrap();
    let linked = guest.link(abs.nodeid, ROOT_ID, "hard").unwrap();
    assert!(is_symlink(linked.attr.mode));
    let meta = std::fs::symlink_metadata(sandbox.share().join("hard")).unwrap();
    assert!(meta.file_type().is_symlink());
    assert_eq!(std::fs::metadata(sandbox.secret()).unwrap().nlink(), 1);
    // And the new name stays a single component in the share.
    assert_eq!(
        guest.link(abs.nodeid, ROOT_ID, "../escape").unwrap_err(),
        libc::EINVAL
    );
    assert!(!sandbox.secret().with_file_name("escape").exists());
}

#[test]
fn devices_are_not_created_and_special_files_not_opened() {
    let sandbox = Sandbox::new();
    let mut guest = FuseGuest::start_dir(&sandbox.config(false));
    guest.init();
    let mknod = |guest: &mut FuseGuest, name: &str, mode: u32, rdev: u32| {
        let body = MknodIn {
            mode,
            rdev,
            ..Default::default()
        };
        guest.call(Opcode::Mknod, ROOT_ID, &[body.as_slice(), &cstr(name)], 256)
    };
    let null = (1 << 8) | 3; // 1:3, /dev/null in the old encoding
    assert_eq!(
        mknod(&mut guest, "chr", libc::S_IFCHR | 0o666, null).unwrap_err(),
        libc::EPERM
    );
    assert_eq!(
        mknod(&mut guest, "blk", libc::S_IFBLK | 0o666, 8 << 8).unwrap_err(),
        libc::EPERM
    );
    assert!(!sandbox.share().join("chr").exists());
    // A FIFO may exist, but the host never opens it (which could block the worker).
    mknod(&mut guest, "fifo", libc::S_IFIFO | 0o666, 0).unwrap();
    let fifo = guest.lookup(ROOT_ID, "fifo").unwrap();
    assert!(guest.open(fifo.nodeid, libc::O_RDONLY).is_err());
    assert!(guest.open(fifo.nodeid, libc::O_WRONLY).is_err());
}

#[test]
fn read_only_refuses_every_change() {
    let sandbox = Sandbox::new();
    let share = sandbox.share();
    std::fs::write(share.join("file"), b"original").unwrap();
    std::fs::create_dir(share.join("dir")).unwrap();
    let mut guest = FuseGuest::start_dir(&sandbox.config(true));
    guest.init();
    let file = guest.lookup(ROOT_ID, "file").unwrap();
    let dir = guest.lookup(ROOT_ID, "dir").unwrap();

    // Reading works.
    let fh = guest.open(file.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(guest.read(file.nodeid, fh, 0, 100).unwrap(), b"original");
    // Writing through a read handle is refused before it reaches the host.
    assert_eq!(
        guest.write(file.nodeid, fh, 0, b"X").unwrap_err(),
        libc::EROFS
    );
    guest.release(file.nodeid, fh).unwrap();

    let erofs: Result<(), i32> = Err(libc::EROFS);
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(
            guest.open(file.nodeid, flags).map(drop),
            erofs,
            "{flags:#x}"
        );
    }
    assert_eq!(guest.truncate(file.nodeid, 0).map(drop), erofs);
    let created = guest.create(ROOT_ID, "new", 0o644, libc::O_RDWR);
    assert_eq!(created.map(drop), erofs);
    assert_eq!(guest.mkdir(ROOT_ID, "newdir", 0o755).map(drop), erofs);
    assert_eq!(guest.unlink(ROOT_ID, "file"), erofs);
    assert_eq!(guest.rename(ROOT_ID, "file", dir.nodeid, "moved"), erofs);
    assert_eq!(guest.symlink(ROOT_ID, "l", "file").map(drop), erofs);
    assert_eq!(guest.link(file.nodeid, dir.nodeid, "hard").map(drop), erofs);
    let rmdir = guest.call(Opcode::Rmdir, ROOT_ID, &[&cstr("dir")], 0);
    assert_eq!(rmdir.map(drop), erofs);
    let body = MknodIn {
        mode: libc::S_IFIFO | 0o644,
        ..Default::default()
    };
    let mknod = guest.call(Opcode::Mknod, ROOT_ID, &[body.as_slice(), &cstr("p")], 256);
    assert_eq!(mknod.map(drop), erofs);

    // Nothing changed on the host.
    assert_eq!(std::fs::read(share.join("file")).unwrap(), b"original");
    let mut names: Vec<_> = std::fs::read_dir(&share)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["dir", "file"]);
    assert!(std::fs::read_dir(share.join("dir"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn swapping_a_looked_up_name_for_a_symlink_changes_nothing() {
    let sandbox = Sandbox::new();
    let share = sandbox.share();
    std::fs::write(share.join("f"), b"inside").unwrap();
    std::fs::create_dir(share.join("d")).unwrap();
    std::fs::write(share.join("d/secret"), b"inside d").unwrap();
    let mut guest = FuseGuest::start_dir(&sandbox.config(false));
    guest.init();
    let f = guest.lookup(ROOT_ID, "f").unwrap();
    let d = guest.lookup(ROOT_ID, "d").unwrap();

    // Between the guest's lookup and its open, the names become links to the outside
    // (as another guest thread racing a rename, or a host process, could arrange).
    std::fs::rename(share.join("f"), share.join("f.old")).unwrap();
    symlink(sandbox.secret(), share.join("f")).unwrap();
    std::fs::rename(share.join("d"), share.join("d.old")).unwrap();
    symlink(sandbox.secret().parent().unwrap(), share.join("d")).unwrap();

    // The node ids still mean the inodes the guest looked up.
    let fh = guest.open(f.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(guest.read(f.nodeid, fh, 0, 100).unwrap(), b"inside");
    let in_d = guest.lookup(d.nodeid, "secret").unwrap();
    let fh = guest.open(in_d.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(guest.read(in_d.nodeid, fh, 0, 100).unwrap(), b"inside d");
    // A fresh lookup finds the links, which lead nowhere on the host.
    let f_now = guest.lookup(ROOT_ID, "f").unwrap();
    assert!(is_symlink(f_now.attr.mode));
    assert!(guest.open(f_now.nodeid, libc::O_RDONLY).is_err());
    let d_now = guest.lookup(ROOT_ID, "d").unwrap();
    assert_eq!(
        guest.lookup(d_now.nodeid, "secret").unwrap_err(),
        libc::ENOTDIR
    );
}

#[test]
fn a_guest_rename_race_with_symlinks_stays_inside() {
    // The guest itself swaps a directory for a symlink (to "/") while looking things up
    // through the old node id; every answer comes from inside the share.
    let sandbox = Sandbox::new();
    let share = sandbox.share();
    std::fs::create_dir(share.join("d")).unwrap();
    std::fs::write(share.join("d/secret"), b"inside d").unwrap();
    let mut guest = FuseGuest::start_dir(&sandbox.config(false));
    guest.init();
    let d = guest.lookup(ROOT_ID, "d").unwrap();
    for round in 0..20 {
        guest.rename(ROOT_ID, "d", ROOT_ID, "d2").unwrap();
        guest.symlink(ROOT_ID, "d", "/").unwrap();
        let found = guest.lookup(d.nodeid, "secret").unwrap();
        assert_eq!(found.attr.size, 8, "round {round}");
        assert_eq!(guest.lookup(d.nodeid, "..").unwrap().nodeid, ROOT_ID);
        guest.unlink(ROOT_ID, "d").unwrap();
        guest.rename(ROOT_ID, "d2", ROOT_ID, "d").unwrap();
    }
}

#[test]
fn a_host_racing_renames_against_the_guest_s_lookups_never_leads_outside() {
    // A host process swaps a directory of the share for a symlink to the directory that holds
    // the secret (under the same name, `secret`) and back, as fast as it can, while the guest
    // looks the name up, looks into it, opens and reads. Every answer comes from inside the
    // share or is an error; none is the secret.
    let sandbox = Sandbox::new();
    let share = sandbox.share();
    std::fs::create_dir(share.join("d")).unwrap();
    std::fs::write(share.join("d/secret"), b"inside d").unwrap();
    let outside = sandbox.secret().parent().unwrap().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let racer = {
        let (share, stop) = (share.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::fs::rename(share.join("d"), share.join("d.real")).unwrap();
                symlink(&outside, share.join("d")).unwrap();
                std::fs::remove_file(share.join("d")).unwrap();
                std::fs::rename(share.join("d.real"), share.join("d")).unwrap();
                swaps += 1;
            }
            swaps
        })
    };
    let mut guest = FuseGuest::start_dir(&sandbox.config(false));
    guest.init();
    let (mut reads, mut refusals) = (0u32, 0u32);
    for round in 0..3000 {
        let Ok(d) = guest.lookup(ROOT_ID, "d") else {
            refusals += 1;
            continue;
        };
        match guest.lookup(d.nodeid, "secret") {
            Ok(found) => {
                match guest.open(found.nodeid, libc::O_RDONLY) {
                    Ok(fh) => {
                        let data = guest.read(found.nodeid, fh, 0, 100).unwrap();
                        assert_eq!(data, b"inside d", "round {round}");
                        guest.release(found.nodeid, fh).unwrap();
                        reads += 1;
                    }
                    Err(_) => refusals += 1,
                }
                guest.forget(found.nodeid, 1);
            }
            Err(errno) => {
                assert!(
                    errno == libc::ENOTDIR || errno == libc::ENOENT,
                    "round {round}: {errno}"
                );
                refusals += 1;
            }
        }
        guest.forget(d.nodeid, 1);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = racer.join().unwrap();
    // The race ran: the host swapped while the guest looked, and both outcomes happened.
    assert!(
        swaps > 0 && reads > 0 && refusals > 0,
        "{swaps} {reads} {refusals}"
    );
}

/// Found by the `virtio_fs` fuzz target. `PassthroughFs` `fcntl(F_SETFL)`s the flags of a READ
/// or WRITE onto the handle's descriptor when they differ from the open flags, and when that
/// fails it closes the descriptor the handle still holds (a `File` made from the borrowed fd is
/// dropped on the error path). `O_DIRECT` on a directory handle fails that way. The handle then
/// names whatever the VMM opens next under that number, and releasing it closes that.
#[test]
fn read_and_write_flags_never_close_a_handles_descriptor() {
    let sandbox = Sandbox::new();
    std::fs::create_dir(sandbox.share().join("sub")).unwrap();
    std::fs::write(sandbox.share().join("f"), b"data").unwrap();
    let mut guest = FuseGuest::start_dir(&sandbox.config(false));
    guest.init();
    let dh = guest.opendir(ROOT_ID).unwrap();
    let flags = (libc::O_DIRECT | libc::O_NOATIME | libc::O_APPEND) as u32;
    let read = ReadIn {
        fh: dh,
        size: 4096,
        flags,
        ..Default::default()
    };
    assert!(guest
        .call(Opcode::Read, ROOT_ID, &[read.as_slice()], 4096)
        .is_err());
    let write = WriteIn {
        fh: dh,
        size: 4,
        flags,
        ..Default::default()
    };
    assert!(guest
        .call(Opcode::Write, ROOT_ID, &[write.as_slice(), b"data"], 64)
        .is_err());
    // The directory handle still lists the share: its descriptor is the one it was.
    let mut names = guest.readdir(ROOT_ID, dh).unwrap();
    names.sort();
    assert_eq!(names, ["f", "sub"]);

    // A file handle's reads and writes work whatever flags the guest sends with them.
    let node = guest.lookup(ROOT_ID, "f").unwrap().nodeid;
    let fh = guest.open(node, libc::O_RDWR).unwrap();
    let write = WriteIn {
        fh,
        size: 4,
        flags,
        ..Default::default()
    };
    guest
        .call(Opcode::Write, node, &[write.as_slice(), b"DATA"], 64)
        .unwrap();
    let read = ReadIn {
        fh,
        size: 64,
        flags,
        ..Default::default()
    };
    let got = guest
        .call(Opcode::Read, node, &[read.as_slice()], 64)
        .unwrap();
    assert_eq!(got, b"DATA");
    guest.release(node, fh).unwrap();
    // A released handle is gone.
    assert_eq!(guest.read(node, fh, 0, 4).unwrap_err(), libc::EBADF);
}
