#!/usr/bin/env python3
"""Writes the hull guest initramfs: an uncompressed newc cpio archive.

usage: mkinitramfs.py OUT_CPIO AGENT_BINARY [--add SRC:DEST[:MODE]]... [--symlink DEST:TARGET]...

The archive holds /init (the agent, mode 0755), the directories /dev /proc /sys /run /tmp
/root, the character device /dev/console (5:1, mode 0600) and the trailer. The device node is
written into the archive directly, so neither root nor mknod is needed. The archive is not
compressed: on a PVM host gunzip in the guest kernel costs about a minute of boot.

Extra files for test images: --add copies the regular file SRC (symbolic links followed) to
DEST with the octal permission bits MODE (default 0755 if SRC is executable by its owner, else
0644); --symlink makes DEST a symbolic link to TARGET. Missing parent directories of DEST are
added with mode 0755. DEST may start with a slash; it must not contain '.' or '..' components,
repeat a path, or be one of the entries above. SRC and DEST cannot contain ':'.

The output depends only on the inputs' contents and modes (fixed owners, inode numbers and
mtimes, entries sorted), so it can be cached by content. mtime is SOURCE_DATE_EPOCH if set,
else 0.

>>> entries = initramfs_entries(b"\\x7fELF", mtime=0)
>>> [e.name for e in entries]
['dev', 'dev/console', 'init', 'proc', 'root', 'run', 'sys', 'tmp']
>>> archive = newc_archive(entries)
>>> archive[:6], len(archive) % 512
(b'070701', 0)
>>> newc_archive(entries) == archive
True
>>> extra = [Entry("bin/busybox", stat.S_IFREG | 0o755, b"\\x7fELF"),
...          Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
...          Entry("usr/lib/x/y", stat.S_IFREG | 0o644)]
>>> [(e.name, oct(e.mode)) for e in initramfs_entries(b"\\x7fELF", 0, extra)
...  if e.name not in ("dev", "dev/console", "init", "proc", "root", "run", "sys", "tmp")]
[('bin', '0o40755'), ('bin/busybox', '0o100755'), ('bin/sh', '0o120777'), ('usr', '0o40755'), ('usr/lib', '0o40755'), ('usr/lib/x', '0o40755'), ('usr/lib/x/y', '0o100644')]
>>> initramfs_entries(b"", 0, [Entry("init", stat.S_IFREG | 0o755)])
Traceback (most recent call last):
...
ValueError: init: already in the archive
>>> initramfs_entries(b"", 0, [Entry("dev/console/x", stat.S_IFREG | 0o755)])
Traceback (most recent call last):
...
ValueError: dev/console/x: parent dev/console is not a directory
>>> archive_path("/bin//sh"), archive_path("bin/sh")
('bin/sh', 'bin/sh')
>>> archive_path("/bin/../etc")
Traceback (most recent call last):
...
ValueError: /bin/../etc: not a plain path (no '.' or '..' components, not empty)
>>> parse_add("out/ymm-stress:/bin/ymm-stress:0750")
('out/ymm-stress', 'bin/ymm-stress', 488)
>>> parse_add("busybox:/bin/busybox")
('busybox', 'bin/busybox', None)
>>> parse_symlink("/bin/sh:busybox")
('bin/sh', 'busybox')
"""

import argparse
import os
import stat
import sys
from typing import List, NamedTuple, Optional, Sequence, Tuple

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
# Pad the whole archive like cpio(1) does; the kernel does not need it.
BLOCK_SIZE = 512


class Entry(NamedTuple):
    name: str  # relative to /, no leading slash, as the kernel's unpacker expects
    mode: int  # file type and permission bits
    data: bytes = b""
    rdev: tuple = (0, 0)  # (major, minor) for device nodes
    mtime: int = 0


def initramfs_entries(agent: bytes, mtime: int, extra: Sequence["Entry"] = ()) -> List[Entry]:
    """What goes into the archive, sorted by name: the base entries, `extra` (given mtime
    `mtime` too) and the missing parent directories of `extra`."""
    entries = {
        e.name: e
        for e in [
            Entry("init", stat.S_IFREG | 0o755, data=agent, mtime=mtime),
            Entry("dev", stat.S_IFDIR | 0o755, mtime=mtime),
            Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1), mtime=mtime),
            Entry("proc", stat.S_IFDIR | 0o555, mtime=mtime),
            Entry("sys", stat.S_IFDIR | 0o555, mtime=mtime),
            Entry("run", stat.S_IFDIR | 0o755, mtime=mtime),
            Entry("tmp", stat.S_IFDIR | 0o1777, mtime=mtime),
            Entry("root", stat.S_IFDIR | 0o700, mtime=mtime),
        ]
    }
    for entry in extra:
        if entry.name in entries:
            raise ValueError(f"{entry.name}: already in the archive")
        entries[entry.name] = entry._replace(mtime=mtime)
    for entry in extra:
        parts = entry.name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            existing = entries.get(parent)
            if existing is None:
                entries[parent] = Entry(parent, stat.S_IFDIR | 0o755, mtime=mtime)
            elif not stat.S_ISDIR(existing.mode):
                raise ValueError(f"{entry.name}: parent {parent} is not a directory")
    # A parent sorts before its children: a name sorts before every longer name it starts.
    return sorted(entries.values(), key=lambda e: e.name)


def archive_path(dest: str) -> str:
    """A destination path as an archive name: relative to /, no empty components."""
    parts = [p for p in dest.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"{dest}: not a plain path (no '.' or '..' components, not empty)")
    return "/".join(parts)


def parse_add(spec: str) -> Tuple[str, str, Optional[int]]:
    """`SRC:DEST[:MODE]` as (source path, archive name, permission bits or None)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise ValueError(f"--add {spec}: expected SRC:DEST[:MODE]")
    mode = None
    if len(parts) == 3:
        try:
            mode = int(parts[2], 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"--add {spec}: MODE must be octal permission bits, like 0755")
    return parts[0], archive_path(parts[1]), mode


def parse_symlink(spec: str) -> Tuple[str, str]:
    """`DEST:TARGET` as (archive name, link target)."""
    dest, sep, target = spec.partition(":")
    if not sep or not target:
        raise ValueError(f"--symlink {spec}: expected DEST:TARGET")
    return archive_path(dest), target


def extra_entries(adds: Sequence[str], symlinks: Sequence[str]) -> List[Entry]:
    """The --add and --symlink arguments as entries, reading the sources."""
    entries = []
    for spec in adds:
        src, name, mode = parse_add(spec)
        st = os.stat(src)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"--add {spec}: {src} is not a regular file")
        if mode is None:
            mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
        with open(src, "rb") as f:
            entries.append(Entry(name, stat.S_IFREG | mode, data=f.read()))
    for spec in symlinks:
        name, target = parse_symlink(spec)
        entries.append(Entry(name, stat.S_IFLNK | 0o777, data=target.encode()))
    return entries


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(ino: int, entry: Entry, nlink: int, name: bytes) -> bytes:
    fields = [
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        entry.mtime,
        len(entry.data),
        0,  # devmajor (of the file system holding the file)
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name) + 1,  # with the terminating NUL
        0,  # check, unused by newc
    ]
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{entry.name or TRAILER}: field {value} does not fit newc")
    return NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)


def newc_archive(entries: List[Entry]) -> bytes:
    """The entries as a newc archive, trailer and block padding included."""
    out = bytearray()
    for ino, entry in enumerate(entries + [Entry(TRAILER, 0)], start=1):
        is_trailer = entry.name == TRAILER
        name = entry.name.encode()
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        header = _header(0 if is_trailer else ino, entry, nlink, name)
        out += header + name + b"\0"
        out += _pad4(len(header) + len(name) + 1)
        out += entry.data + _pad4(len(entry.data))
    out += b"\0" * (-len(out) % BLOCK_SIZE)
    return bytes(out)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=os.path.basename(argv[0]),
        description="Writes the hull guest initramfs: an uncompressed newc cpio archive.",
    )
    parser.add_argument("out_cpio", metavar="OUT_CPIO")
    parser.add_argument("agent", metavar="AGENT_BINARY")
    parser.add_argument("--add", action="append", default=[], metavar="SRC:DEST[:MODE]",
                        help="add the file SRC as DEST (octal MODE, default from SRC)")
    parser.add_argument("--symlink", action="append", default=[], metavar="DEST:TARGET",
                        help="add DEST as a symbolic link to TARGET")
    args = parser.parse_args(argv[1:])  # exits with status 2 on bad usage
    try:
        with open(args.agent, "rb") as f:
            agent = f.read()
        if not agent.startswith(b"\x7fELF"):
            raise ValueError(f"{args.agent} is not an ELF binary")
        mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
        entries = initramfs_entries(agent, mtime, extra_entries(args.add, args.symlink))
        archive = newc_archive(entries)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tmp_path = f"{args.out_cpio}.tmp{os.getpid()}"
    with open(tmp_path, "wb") as f:
        f.write(archive)
    os.replace(tmp_path, args.out_cpio)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
