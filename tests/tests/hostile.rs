//! The hostile-guest suite, from the guest's machine code: tiny guests that attack hull-vmm's
//! virtio devices (a virtio-fs share and a vsock device) through their MMIO windows and their
//! queues, run by the real hull-vmm binary, jailed and under its seccomp filters. Each test
//! checks what the host sees afterwards: hull-vmm ended as the guest asked (no panic, no
//! seccomp kill, no hang), its log stayed small, the shared directory holds what it held, and
//! nothing is left of the jail.
//!
//! The attacks from a guest kernel's user space (fork and memory bombs, a full disk, floods of
//! lookups) are in `run.rs`, with a container.

use std::process::Command;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use hull_tests::harness::{footprint, run, workspace_bin, Finished, Running, TempDir};
use hull_tests::rng::Rng;
use hull_tests::tiny_guest::Asm;
use vm_memory::{Bytes, GuestAddress};
use vmm::{ConsoleConfig, KvmKind, VmConfig, VmExit};

const COM1: u16 = 0x3f8;
/// The device manager's first virtio-mmio window; each is 4 KiB.
const MMIO_BASE: u64 = 0xd000_0000;
const WINDOW: u64 = 0x1000;
/// The vsock device's window (3 queues: rx, tx, events) and the virtio-fs device's (2: high
/// priority, requests).
const VSOCK: u64 = 0;
const FS: u64 = 1;
/// Windows attacked: the two devices' and two nobody claims.
const WINDOWS: u64 = 4;
/// Guest RAM the attacks point the devices at (32-48 MiB): away from the code (16 MiB) and
/// the page tables, so that whatever a device writes there leaves the attacker running.
const SCRATCH: u64 = 0x200_0000;
const SCRATCH_LEN: u64 = 0x100_0000;
const MEM_MIB: u64 = 64;
/// The most hull-vmm may log in one of these runs.
const MAX_LOG: u64 = 256 << 10;
const DEADLINE: Duration = Duration::from_secs(300);

// virtio-mmio registers (virtio 1.2, 4.2.2).
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_DRIVER: u64 = 0x090;
const QUEUE_DEVICE: u64 = 0x0a0;
const CONFIG: u64 = 0x100;

// Descriptor flags.
const NEXT: u64 = 1;
const WRITE: u64 = 2;
const INDIRECT: u64 = 4;

/// A guest address: in the scratch area, or anywhere at all (beyond RAM, unaligned, huge).
fn guest_addr(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => rng.bits(),
        1 => (MEM_MIB << 20) - rng.below(0x1000),
        _ => SCRATCH + rng.below(SCRATCH_LEN),
    }
}

/// What an attacked hull-vmm left.
struct Attacked {
    out: Finished,
    log: String,
}

/// hull-vmm for `asm`, jailed in `dir/jail`, with a virtio-fs share (`dir/share`, made empty
/// here and returned), a vsock device (`dir/vsock.sock`) and its log in `dir/vmm.log`.
fn jailed_vmm(dir: &TempDir, asm: &Asm) -> (Command, std::path::PathBuf) {
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, asm.to_elf()).unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .args(["--mem-size-mib", &MEM_MIB.to_string()])
        .arg("--shared-dir")
        .arg(format!("share={}", share.display()))
        .arg("--vsock-uds")
        .arg(dir.path().join("vsock.sock"))
        .arg("--log-file")
        .arg(dir.path().join("vmm.log"))
        .arg("--jail")
        .arg(dir.path().join("jail"));
    (cmd, share)
}

/// Runs `asm` (which ends by printing "survived" and resetting) in hull-vmm with a virtio-fs
/// share and a vsock device, jailed; checks what every attack must leave.
fn attack(name: &str, asm: &Asm) -> Attacked {
    let dir = TempDir::new(name);
    let (mut cmd, share) = jailed_vmm(&dir, asm);
    std::fs::write(share.join("kept"), b"the host's file\n").unwrap();
    cmd.args(["--log-level", "info"]);
    let log_file = dir.path().join("vmm.log");
    let jail = dir.path().join("jail");
    let out = run(cmd, DEADLINE);
    let log = std::fs::read_to_string(&log_file).unwrap_or_default();
    let context = format!(
        "{name}: status {:?}\nstdout: {}\nstderr: {}\nlog: {}",
        out.status,
        out.stdout,
        out.stderr,
        &log[..log.len().min(4000)]
    );
    assert!(out.stdout.ends_with("survived\n"), "{context}");
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert!(!log.contains("panicked"), "{context}");
    let log_len = std::fs::metadata(&log_file).map_or(0, |m| m.len());
    assert!(
        log_len <= MAX_LOG,
        "{name}: {log_len} bytes of log\n{context}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&share)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["kept"], "{context}");
    assert_eq!(
        std::fs::read(share.join("kept")).unwrap(),
        b"the host's file\n"
    );
    assert_eq!(
        std::fs::read_dir(&jail).map(|d| d.count()).unwrap_or(0),
        0,
        "{context}"
    );
    if std::env::var_os("HULL_TEST_SHOW_LOG").is_some() {
        eprintln!("{log}");
    }
    Attacked { out, log }
}

/// The tiny guest's start: the MMIO windows mapped.
fn prologue() -> Asm {
    let mut asm = Asm::new();
    asm.identity_map_gib_of(MMIO_BASE, 0x20_0000);
    asm
}

fn epilogue(asm: &mut Asm) {
    asm.out_bytes(COM1, b"survived\n").i8042_reset();
}

fn window(index: u64) -> u64 {
    MMIO_BASE + index * WINDOW
}

/// Initializes the device in window `w` the way a driver does, with its first `queues` queues
/// of `size` entries (at most 128) at `rings` (each queue takes 0x1000 bytes there: the table,
/// the avail ring at 0x800, the used ring at 0xc00).
fn driver_init(asm: &mut Asm, w: u64, queues: u64, size: u64, rings: u64) {
    let base = window(w);
    asm.store(base + STATUS, 0, 4)
        .store(base + STATUS, 1, 4)
        .store(base + STATUS, 3, 4)
        .store(base + DRIVER_FEATURES_SEL, 0, 4)
        .store(base + DRIVER_FEATURES, 0, 4)
        .store(base + DRIVER_FEATURES_SEL, 1, 4)
        .store(base + DRIVER_FEATURES, 1, 4) // VIRTIO_F_VERSION_1
        .store(base + STATUS, 11, 4);
    for q in 0..queues {
        let table = rings + q * 0x1000;
        asm.store(base + QUEUE_SEL, q, 4)
            .store(base + QUEUE_NUM, size, 4);
        for (reg, addr) in [
            (QUEUE_DESC, table),
            (QUEUE_DRIVER, table + 0x800),
            (QUEUE_DEVICE, table + 0xc00),
        ] {
            asm.store(base + reg, addr & 0xffff_ffff, 4)
                .store(base + reg + 4, addr >> 32, 4);
        }
        asm.store(base + QUEUE_READY, 1, 4);
    }
    asm.store(base + STATUS, 15, 4);
}

/// Writes descriptor `index` of the table at `table`.
fn descriptor(asm: &mut Asm, table: u64, index: u64, addr: u64, len: u64, flags: u64, next: u64) {
    let at = table + index * 16;
    asm.store(at, addr, 8).store(
        at + 8,
        (len & 0xffff_ffff) | (flags & 0xffff) << 32 | (next & 0xffff) << 48,
        8,
    );
}

/// Publishes `head` as avail entry `idx - 1` and the avail index `idx` (ring at `table +
/// 0x800`, queue size `size`), then notifies queue `q` of window `w`.
fn publish(asm: &mut Asm, w: u64, q: u64, table: u64, size: u64, idx: u64, head: u64) {
    let avail = table + 0x800;
    let slot = (idx.wrapping_sub(1) % size) * 2;
    // The ring entry's 8-byte word, with its neighbours zeroed (the attacks do not care).
    let word = (avail + 4 + slot) & !7;
    let shift = ((avail + 4 + slot) - word) * 8;
    asm.store(word, (head & 0xffff) << shift, 8)
        .store(avail, (idx & 0xffff) << 16, 4)
        .store(window(w) + QUEUE_NOTIFY, q, 4);
}

#[test]
fn random_mmio_accesses_of_every_width_to_every_window() {
    let mut rng = Rng(0x6875_6c6c_2d6d_6d69);
    let registers: Vec<u64> = (0..CONFIG / 4).map(|r| r * 4).collect();
    let mut asm = prologue();
    let mut accesses = 0;
    for _ in 0..16_000 {
        let w = rng.below(WINDOWS);
        let offset = match rng.below(10) {
            0..=5 => rng.pick(&registers),
            6 | 7 => CONFIG + rng.below(0x100),
            _ => rng.below(WINDOW),
        };
        let width = rng.pick(&[1u8, 2, 4, 8]);
        // Where the access would cross out of the window, a 1-byte one.
        let width = if offset + u64::from(width) > WINDOW {
            1
        } else {
            width
        };
        asm.mov_rbx(window(w) + offset);
        if rng.below(3) == 0 {
            asm.load_from_rbx(width);
        } else {
            let value = match offset {
                // The queue addresses' low and high halves.
                QUEUE_DESC..=0xa7 if offset & 4 == 0 => guest_addr(&mut rng) & 0xffff_ffff,
                QUEUE_DESC..=0xa7 => guest_addr(&mut rng) >> 32,
                STATUS => rng.pick(&[0, 1, 3, 11, 15, 0x80, 0xff]),
                QUEUE_NUM => rng.pick(&[0, 1, 2, 16, 256, 0xffff, 0x1_0000]),
                _ => rng.bits(),
            };
            asm.mov_rax(value).store_at_rbx(width);
        }
        accesses += 1;
    }
    // A device reset each, and the interrupts acknowledged: the guest stops on its own terms.
    for w in 0..WINDOWS {
        asm.store(window(w) + INTERRUPT_ACK, 0xffff_ffff, 4)
            .store(window(w) + STATUS, 0, 4);
    }
    epilogue(&mut asm);
    let attacked = attack("hostile-mmio", &asm);
    eprintln!(
        "{accesses} random MMIO accesses: hull-vmm ran {:?}, logged {} bytes",
        attacked.out.elapsed,
        attacked.log.len()
    );
}

#[test]
fn broken_descriptor_chains_and_ten_thousand_resets() {
    let mut rng = Rng(0x6465_7363_6c6f_6f70);
    let size = 16;
    let mut asm = prologue();
    let mut chains = 0;
    for w in 0..2 {
        let rings = SCRATCH + w * 0x10_0000;
        let queues = if w == VSOCK { 3 } else { 2 };
        driver_init(&mut asm, w, queues, size, rings);
        for q in 0..queues {
            let table = rings + q * 0x1000;
            let buffer = rings + 0x8_0000 + q * 0x1_0000;
            let indirect = buffer + 0x8000;
            let mut idx = 0u64;
            let mut head_of = |asm: &mut Asm, kind: u64| -> u64 {
                let head = rng.below(size);
                match kind {
                    // A descriptor that is its own next.
                    0 => descriptor(asm, table, head, buffer, 64, NEXT, head),
                    // A next beyond the table.
                    1 => descriptor(asm, table, head, buffer, 64, NEXT, size + rng.below(1000)),
                    // A length of 4 GiB, and one that runs off the end of RAM.
                    2 => descriptor(asm, table, head, buffer, 0xffff_ffff, 0, 0),
                    3 => descriptor(asm, table, head, (MEM_MIB << 20) - 16, 4096, WRITE, 0),
                    // An address beyond RAM.
                    4 => descriptor(asm, table, head, 1 << 40, 64, 0, 0),
                    // An indirect table that loops, one of a length that is no table's, one
                    // that holds another indirect descriptor, and one beyond RAM.
                    5 => {
                        descriptor(asm, indirect, 0, buffer, 64, NEXT, 1);
                        descriptor(asm, indirect, 1, buffer, 64, NEXT, 0);
                        descriptor(asm, table, head, indirect, 32, INDIRECT, 0)
                    }
                    6 => descriptor(asm, table, head, indirect, 17, INDIRECT, 0),
                    7 => {
                        descriptor(asm, indirect, 0, indirect, 16, INDIRECT, 0);
                        descriptor(asm, table, head, indirect, 16, INDIRECT, 0)
                    }
                    8 => descriptor(asm, table, head, 1 << 40, 0x1_0000, INDIRECT, 0),
                    // A long chain that visits every descriptor, then loops.
                    _ => {
                        for i in 0..size {
                            let flags = if rng.below(2) == 0 {
                                NEXT
                            } else {
                                NEXT | WRITE
                            };
                            descriptor(asm, table, i, buffer + i * 64, 64, flags, (i + 1) % size);
                        }
                    }
                };
                head
            };
            for round in 0..40 {
                let head = head_of(&mut asm, round % 10);
                idx += 1;
                // Now and then the avail index jumps far ahead of what was published.
                if round % 13 == 12 {
                    idx += 40_000;
                }
                publish(&mut asm, w, q, table, size, idx, head);
                chains += 1;
            }
        }
    }
    // 10,000 resets, half of them of a device at work: reset, then set up again.
    for i in 0..10_000u64 {
        let w = i % 2;
        let base = window(w);
        asm.store(base + STATUS, 0, 4);
        if i % 2 == 0 {
            asm.store(base + STATUS, 1, 4)
                .store(base + STATUS, 3, 4)
                .store(base + STATUS, 11, 4)
                .store(base + QUEUE_READY, 1, 4)
                .store(base + STATUS, 15, 4)
                .store(base + QUEUE_NOTIFY, i % 3, 4);
        }
    }
    for w in 0..2 {
        asm.store(window(w) + STATUS, 0, 4);
    }
    epilogue(&mut asm);
    let attacked = attack("hostile-queues", &asm);
    eprintln!(
        "{chains} broken chains and 10000 resets: hull-vmm ran {:?}, logged {} bytes",
        attacked.out.elapsed,
        attacked.log.len()
    );
}

/// Keeps `size` requests outstanding on queue `q` of window `w` (rings at `table`, the ring's
/// entries already written): avail index = used index + `size`, then a notification; forever.
fn refill_forever(asm: &mut Asm, w: u64, q: u64, table: u64, size: u64) -> &mut Asm {
    let used = table + 0xc00;
    let avail = table + 0x800;
    asm.mov_rbx(used)
        .load_eax_from_rbx()
        .raw(&[0xc1, 0xe8, 0x10]) // shr eax, 16: the used index
        .raw(&[0x83, 0xc0, size as u8]) // add eax, size
        .raw(&[0x25, 0xff, 0xff, 0x00, 0x00]) // and eax, 0xffff
        .raw(&[0xc1, 0xe0, 0x10]) // shl eax, 16: the avail index, flags 0
        .mov_rbx(avail)
        .store_eax_at_rbx()
        .store(window(w) + QUEUE_NOTIFY, q, 4)
}

#[test]
fn a_guest_refilling_its_queues_without_end_still_stops_within_two_seconds() {
    let size = 16;
    let fs_rings = SCRATCH;
    let vsock_rings = SCRATCH + 0x10_0000;
    let fs_table = fs_rings + 0x1000; // the request queue, 1
    let vsock_table = vsock_rings + 0x1000; // tx, 1
    let mut asm = prologue();
    driver_init(&mut asm, FS, 2, size, fs_rings);
    driver_init(&mut asm, VSOCK, 3, size, vsock_rings);
    // virtio-fs: GETATTR of the root, each with room for its answer (8 chains, each twice in
    // the ring).
    for i in 0..8 {
        let request = fs_rings + 0x8_0000 + i * 0x100;
        // fuse_in_header: len, opcode 3 (GETATTR), unique, nodeid 1; fuse_getattr_in.
        asm.store(request, 56 | 3 << 32, 8)
            .store(request + 8, i + 1, 8)
            .store(request + 16, 1, 8);
        descriptor(&mut asm, fs_table, 2 * i, request, 56, NEXT, 2 * i + 1);
        descriptor(&mut asm, fs_table, 2 * i + 1, request + 0x80, 120, WRITE, 0);
    }
    // vsock: packets from the guest's CID to the host's, to ports nobody listens on, half of
    // them of an operation that does not exist.
    for i in 0..size {
        let packet = vsock_rings + 0x8_0000 + i * 0x100;
        let op = if i % 2 == 0 { 5 } else { 0 };
        asm.store(packet, 3, 8) // src_cid
            .store(packet + 8, 2, 8) // dst_cid
            .store(packet + 16, (1024 + i) | (5000 + i) << 32, 8) // src_port, dst_port
            .store(packet + 24, 1 << 32 | op << 48, 8) // len 0, type stream, op
            .store(packet + 32, 0, 8)
            .store(packet + 40, 0, 4);
        descriptor(&mut asm, vsock_table, i, packet, 44, 0, 0);
    }
    // The avail rings' entries: the 8 virtio-fs chains' heads twice, the 16 packets.
    for (table, head) in [
        (fs_table, (|k: u64| k % 8 * 2) as fn(u64) -> u64),
        (vsock_table, |k| k),
    ] {
        for k in 0..size / 4 {
            let entries = (0..4).fold(0, |word, j| word | head(k * 4 + j) << (16 * j));
            asm.store(table + 0x804 + k * 8, entries, 8);
        }
    }
    asm.out_bytes(COM1, b"flooding\n");
    let start = asm.code().len();
    refill_forever(&mut asm, FS, 1, fs_table, size);
    refill_forever(&mut asm, VSOCK, 1, vsock_table, size);
    asm.jmp_back_to(start);

    let dir = TempDir::new("hostile-flood");
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, asm.to_elf()).unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let console = dir.path().join("console.log");
    let mut config = VmConfig::new(kernel);
    config.mem_size_mib = MEM_MIB as u32;
    config.console = ConsoleConfig::File(console.clone());
    config.shared_dirs = vec![vmm::config::SharedDirConfig {
        tag: "share".into(),
        path: share,
        read_only: false,
        binds: Vec::new(),
    }];
    config.vsock = Some(vmm::config::VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("vsock.sock"),
    });
    let vmm = vmm::build(&config, KvmKind::detect()).unwrap();
    let stopper = vmm.stopper();
    let memory = vmm.memory().clone();
    let (done_tx, done) = channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(vmm.run().map(|outcome| outcome.exit));
    });
    let used_index = |table: u64| -> u16 {
        memory
            .read_obj(GuestAddress(table + 0xc02))
            .expect("the used ring is in guest memory")
    };
    let deadline = Instant::now() + DEADLINE;
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("flooding")
    {
        assert!(
            Instant::now() < deadline,
            "the guest never started its flood"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Both devices keep answering: their used indexes move, again and again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (fs_before, vsock_before) = (used_index(fs_table), used_index(vsock_table));
    let mut moved = false;
    while !moved {
        assert!(
            Instant::now() < deadline,
            "the devices stopped answering the flood (used indexes {} and {})",
            used_index(fs_table),
            used_index(vsock_table)
        );
        std::thread::sleep(Duration::from_millis(100));
        let fs_moved = used_index(fs_table).wrapping_sub(fs_before) > 4 * size as u16;
        let vsock_moved = used_index(vsock_table).wrapping_sub(vsock_before) > 4 * size as u16;
        moved = fs_moved && vsock_moved;
    }
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    stopper.stop("the test");
    let ended = done.recv_timeout(Duration::from_secs(30));
    let took = asked.elapsed();
    eprintln!(
        "flood: used indexes {} (virtio-fs) and {} (vsock); stopped in {took:?}",
        used_index(fs_table),
        used_index(vsock_table)
    );
    let exit = ended
        .expect("the VM did not stop under the flood")
        .expect("the VM ran");
    assert_eq!(exit, VmExit::Stopped("the test".into()));
    assert!(took < Duration::from_secs(2), "stopping took {took:?}");
}

#[test]
fn twenty_mib_to_the_serial_port_fill_the_console_file_to_its_cap_and_no_further() {
    const FLOOD: u64 = 20 << 20;
    let mut asm = Asm::new();
    asm.out_bytes(COM1, b"flooding\n");
    // `rep outsb` from guest RAM, a MiB at a time. PVM makes every byte an exit (about 200 s
    // in all); so does KVM under QEMU's emulated SVM, at over 40 us an exit, which is why the
    // nested lane leaves this test to the PVM lane (tests/lanes/test.sh).
    const CHUNK: u64 = 1 << 20;
    for _ in 0..FLOOD / CHUNK {
        asm.raw(&[0x48, 0xbe]) // mov rsi, imm64
            .raw(&SCRATCH.to_le_bytes())
            .mov_rcx(CHUNK)
            .raw(&[0x66, 0xba])
            .raw(&COM1.to_le_bytes()) // mov dx, COM1
            .raw(&[0xfc, 0xf3, 0x6e]); // cld; rep outsb
    }
    asm.i8042_reset();
    let dir = TempDir::new("hostile-serial");
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, asm.to_elf()).unwrap();
    let console = dir.path().join("console.log");
    let log_file = dir.path().join("vmm.log");
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .args(["--mem-size-mib", &MEM_MIB.to_string()])
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .arg("--log-file")
        .arg(&log_file)
        .arg("--jail")
        .arg(dir.path().join("jail"));
    let out = run(cmd, Duration::from_secs(900));
    let log = std::fs::read_to_string(&log_file).unwrap_or_default();
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{log}");
    let written = std::fs::metadata(&console).unwrap().len();
    eprintln!(
        "{} MiB to the serial port in {:?}: {written} bytes in the console file",
        FLOOD >> 20,
        out.elapsed
    );
    // The cap (16 MiB) and the line that says later output was dropped.
    assert!(
        written > 15 << 20 && written <= (16 << 20) + 4096,
        "{written}"
    );
    assert!(log.len() <= MAX_LOG as usize, "{} bytes of log", log.len());
}

/// Spins until the used index of the ring at `table` is `idx`, or for at most 2^24 tries (a
/// device that stopped answering leaves the guest going on, and the test fails on what it
/// printed).
fn wait_used(asm: &mut Asm, table: u64, idx: u64) {
    asm.mov_rcx(1 << 24);
    // wait: mov rbx, used; mov eax, [rbx]; shr eax, 16; cmp eax, idx; je done; dec rcx;
    // jnz wait; done:
    asm.mov_rbx(table + 0xc00)
        .load_eax_from_rbx()
        .raw(&[0xc1, 0xe8, 0x10, 0x3d])
        .raw(&((idx & 0xffff) as u32).to_le_bytes())
        .raw(&[0x74, 0x05, 0x48, 0xff, 0xc9, 0x75, 0xe5]);
}

/// One vsock packet (header and a 16-byte payload) at `at`: the header's fields as given.
#[allow(clippy::too_many_arguments)]
fn vsock_packet(
    asm: &mut Asm,
    at: u64,
    (src_cid, dst_cid): (u64, u64),
    (src_port, dst_port): (u64, u64),
    len: u64,
    (type_, op, flags): (u64, u64, u64),
    (buf_alloc, fwd_cnt): (u64, u64),
) {
    asm.store(at, src_cid, 8)
        .store(at + 8, dst_cid, 8)
        .store(at + 16, src_port | dst_port << 32, 8)
        .store(at + 24, (len & 0xffff_ffff) | type_ << 32 | op << 48, 8)
        .store(at + 32, flags | buf_alloc << 32, 8)
        .store(at + 40, fwd_cnt | 0x6c6c_7568 << 32, 8) // and the payload's first bytes
        .store(at + 48, 0x6c6c_7568_6c6c_7568, 8);
}

#[test]
fn ten_thousand_vsock_connection_requests_and_packets_that_lie() {
    const PORT: u64 = 5000;
    const REQUESTS: u64 = 10_000;
    const LIES: u64 = 2_000;
    const BATCH: u64 = 16;
    // (A queue's rings take 0x1000 bytes here: the table must end before the avail ring at
    // 0x800, so at most 128 entries.)
    let size = 64;
    let rings = SCRATCH;
    let (rx, tx) = (rings, rings + 0x1000);
    let mut rng = Rng(0x7673_6f63_6b6c_6965);
    let mut asm = prologue();
    driver_init(&mut asm, VSOCK, 3, size, rings);
    // rx: 64 buffers of 1 KiB for what the device answers, posted again after every batch.
    for i in 0..size {
        descriptor(
            &mut asm,
            rx,
            i,
            rings + 0x10_0000 + i * 0x400,
            0x400,
            WRITE,
            0,
        );
    }
    for k in 0..size / 4 {
        let entries = (0..4).fold(0, |word, j| word | (k * 4 + j) << (16 * j));
        asm.store(rx + 0x804 + k * 8, entries, 8)
            .store(tx + 0x804 + k * 8, entries, 8);
    }
    let packets = rings + 0x8_0000;
    let mut published = 0u64;
    for batch in 0..(REQUESTS + LIES) / BATCH {
        for j in 0..BATCH {
            let k = batch * BATCH + j;
            let slot = published % size;
            let at = packets + slot * 0x40;
            let credit = (
                rng.pick(&[0, 1, 0xffff_ffff, 0x1_0000]),
                rng.bits() & 0xffff_ffff,
            );
            if k < REQUESTS {
                // A connection request to the host's listener, each from a port of its own.
                vsock_packet(&mut asm, at, (3, 2), (2000 + k, PORT), 0, (1, 1, 0), credit);
            } else {
                // Data, shutdowns and credit on those connections (and on none), with lengths
                // that are not the payload's, credit that jumps, and strange addresses.
                let len = rng.pick(&[0, 16, 17, 60_000, 0xffff_ffff]);
                let op = rng.pick(&[5, 5, 4, 6, 7, 1, 2, 0, 9]);
                let cids = rng.pick(&[(3, 2), (3, 2), (3, 1), (4, 2), (3, 0xffff_ffff)]);
                let ports = (
                    2000 + rng.below(REQUESTS),
                    rng.pick(&[PORT, PORT, 0, 1 << 31]),
                );
                let type_ = rng.pick(&[1, 1, 1, 2, 0]);
                let flags = rng.below(8);
                vsock_packet(&mut asm, at, cids, ports, len, (type_, op, flags), credit);
            }
            descriptor(&mut asm, tx, slot, at, 44 + 16, 0, 0);
            published += 1;
        }
        // Publish the batch (the ring's entries are the slots), let the device take it, and
        // give rx its buffers back.
        asm.store(tx + 0x800, (published & 0xffff) << 16, 4).store(
            window(VSOCK) + QUEUE_NOTIFY,
            1,
            4,
        );
        wait_used(&mut asm, tx, published);
        asm.mov_rbx(rx + 0xc00)
            .load_eax_from_rbx()
            .raw(&[0xc1, 0xe8, 0x10]) // shr eax, 16: rx's used index
            .raw(&[0x05]) // add eax, size
            .raw(&(size as u32).to_le_bytes())
            .raw(&[0x25, 0xff, 0xff, 0x00, 0x00, 0xc1, 0xe0, 0x10]) // and eax, 0xffff; shl eax, 16
            .mov_rbx(rx + 0x800)
            .store_eax_at_rbx()
            .store(window(VSOCK) + QUEUE_NOTIFY, 0, 4);
    }
    epilogue(&mut asm);

    let dir = TempDir::new("hostile-vsock");
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, asm.to_elf()).unwrap();
    let uds = dir.path().join("vsock.sock");
    // The host service: accepts every connection and holds it, reading nothing.
    let listener =
        std::os::unix::net::UnixListener::bind(format!("{}_{PORT}", uds.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let (stop_tx, stop) = channel::<()>();
    let service = std::thread::spawn(move || {
        let mut held = Vec::new();
        let mut accepted = 0usize;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    accepted += 1;
                    held.push(stream);
                }
                Err(_) => {
                    if stop.try_recv().is_ok() {
                        return accepted;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    });
    let log_file = dir.path().join("vmm.log");
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .args(["--mem-size-mib", &MEM_MIB.to_string()])
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--log-file")
        .arg(&log_file)
        .arg("--jail")
        .arg(dir.path().join("jail"));
    let vmm = Running::spawn(cmd);
    let pid = vmm.pid();
    // hull-vmm's descriptors and resident memory, at their highest while it ran.
    let monitor = std::thread::spawn(move || {
        let (mut most_fds, mut most_rss) = (0usize, 0u64);
        while std::path::Path::new(&format!("/proc/{pid}/fd")).exists() {
            let (fds, rss_kib) = footprint(pid as i32);
            (most_fds, most_rss) = (most_fds.max(fds), most_rss.max(rss_kib));
            std::thread::sleep(Duration::from_millis(20));
        }
        (most_fds, most_rss)
    });
    let out = vmm.wait(DEADLINE);
    let _ = stop_tx.send(());
    let accepted = service.join().unwrap();
    let (fds, rss_kib) = monitor.join().unwrap();
    let log = std::fs::read_to_string(&log_file).unwrap_or_default();
    eprintln!(
        "{REQUESTS} requests and {LIES} lying packets in {:?}: the host accepted {accepted} \
         connections; hull-vmm had at most {fds} descriptors and {rss_kib} KiB resident, and \
         logged {} bytes",
        out.elapsed,
        log.len()
    );
    let context = format!("{out:?}\nlog: {}", &log[..log.len().min(4000)]);
    assert!(out.stdout.ends_with("survived\n"), "{context}");
    assert_eq!(out.status.code(), Some(0), "{context}");
    // The device's own cap on connections, and a few for everything else.
    assert!(
        fds <= devices::virtio::vsock::MAX_CONNECTIONS + 64,
        "{fds} descriptors"
    );
    assert!(accepted >= 1, "no request reached the host: {context}");
    assert!(rss_kib < (MEM_MIB << 10) + (64 << 10), "{rss_kib} KiB");
    assert!(log.len() as u64 <= MAX_LOG, "{} bytes of log", log.len());
}

#[test]
fn warnings_the_guest_provokes_for_two_minutes_stay_at_the_rate_limit() {
    // Every pass of the guest's endless loop provokes a warning from each device (a queue
    // that does not exist, selected, sized and notified) and touches a window nobody claims.
    // The warnings are rate-limited per device (`GuestErrorLog`: a burst a second, then one
    // line with the count); for two minutes the log must grow at that rate and no faster, and
    // hull-vmm's descriptors and memory must not grow from one minute to the next.
    const MINUTES: u32 = 2;
    let mut asm = prologue();
    driver_init(&mut asm, VSOCK, 3, 16, SCRATCH);
    driver_init(&mut asm, FS, 2, 16, SCRATCH + 0x10_0000);
    asm.out_bytes(COM1, b"flooding\n");
    let start = asm.code().len();
    for w in [VSOCK, FS] {
        asm.store(window(w) + QUEUE_SEL, 9, 4)
            .store(window(w) + QUEUE_NUM, 16, 4)
            .store(window(w) + QUEUE_READY, 1, 4)
            .store(window(w) + QUEUE_NOTIFY, 9, 4);
    }
    asm.store(window(2) + STATUS, 1, 4)
        .store(window(3) + QUEUE_NOTIFY, 0, 4);
    asm.jmp_back_to(start);

    let dir = TempDir::new("hostile-rate");
    let (cmd, _share) = jailed_vmm(&dir, &asm);
    let log_file = dir.path().join("vmm.log");
    let jail = dir.path().join("jail");
    let mut vmm = Running::spawn(cmd);
    let pid = vmm.pid() as i32;
    vmm.wait_for_line(DEADLINE, |line| line == "flooding\n");
    let lines = || {
        std::fs::read_to_string(&log_file)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let mut samples = vec![(lines(), footprint(pid))];
    for _ in 0..MINUTES {
        std::thread::sleep(Duration::from_secs(60));
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let running = state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'));
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        assert!(
            running,
            "hull-vmm ended\nlog: {}",
            &log[..log.len().min(4000)]
        );
        samples.push((lines(), footprint(pid)));
    }
    drop(vmm);
    let log = std::fs::read_to_string(&log_file).unwrap_or_default();
    eprintln!(
        "log lines, descriptors and resident KiB at the start and after each minute: {samples:?}"
    );
    assert!(!log.contains("panicked"), "{}", &log[..log.len().min(4000)]);
    // Two devices, each with a burst of 10 lines and one count line a second; the minute is
    // given a few seconds' slack.
    let most_a_minute = 2 * (10 + 1) * 65;
    for pair in samples.windows(2) {
        let ((before, _), (after, _)) = (pair[0], pair[1]);
        let grown = after - before;
        assert!(
            grown > 0,
            "nothing logged in a minute: the attack did not run"
        );
        assert!(
            grown <= most_a_minute,
            "{grown} lines in a minute (the limit allows {most_a_minute})\n{}",
            &log[log.len().saturating_sub(4000)..]
        );
    }
    // Descriptors and memory, from the first minute on: at the start the log file is still to
    // be opened and the threads to settle (the nested lane saw 33 descriptors, then 35).
    for pair in samples[1..].windows(2) {
        let ((_, (fds_before, rss_before)), (_, (fds, rss))) = (pair[0], pair[1]);
        assert!(fds <= fds_before, "descriptors grew: {samples:?}");
        assert!(rss <= rss_before + 1024, "memory grew: {samples:?}");
    }
    assert_eq!(std::fs::read_dir(&jail).map(|d| d.count()).unwrap_or(0), 0);
}
