#!/usr/bin/env python3
"""Writes the hull guest initramfs: an uncompressed newc cpio archive.

usage: mkinitramfs.py OUT_CPIO AGENT_BINARY

The archive holds /init (the agent, mode 0755), the directories /dev /proc /sys /run /tmp
/root, the character device /dev/console (5:1, mode 0600) and the trailer. The device node is
written into the archive directly, so neither root nor mknod is needed. The archive is not
compressed: on a PVM host gunzip in the guest kernel costs about a minute of boot.

The output depends only on the agent binary (fixed owners, inode numbers and mtimes, entries
sorted), so it can be cached by content. mtime is SOURCE_DATE_EPOCH if set, else 0.

>>> entries = initramfs_entries(b"\\x7fELF", mtime=0)
>>> [e.name for e in entries]
['dev', 'dev/console', 'init', 'proc', 'root', 'run', 'sys', 'tmp']
>>> archive = newc_archive(entries)
>>> archive[:6], len(archive) % 512
(b'070701', 0)
>>> newc_archive(entries) == archive
True
"""

import os
import stat
import sys
from typing import List, NamedTuple

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


def initramfs_entries(agent: bytes, mtime: int) -> List[Entry]:
    """What goes into the archive, sorted by name."""
    entries = [
        Entry("init", stat.S_IFREG | 0o755, data=agent, mtime=mtime),
        Entry("dev", stat.S_IFDIR | 0o755, mtime=mtime),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1), mtime=mtime),
        Entry("proc", stat.S_IFDIR | 0o555, mtime=mtime),
        Entry("sys", stat.S_IFDIR | 0o555, mtime=mtime),
        Entry("run", stat.S_IFDIR | 0o755, mtime=mtime),
        Entry("tmp", stat.S_IFDIR | 0o1777, mtime=mtime),
        Entry("root", stat.S_IFDIR | 0o700, mtime=mtime),
    ]
    return sorted(entries, key=lambda e: e.name)


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
    if len(argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out_path, agent_path = argv[1], argv[2]
    with open(agent_path, "rb") as f:
        agent = f.read()
    if not agent.startswith(b"\x7fELF"):
        print(f"error: {agent_path} is not an ELF binary", file=sys.stderr)
        return 1
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    archive = newc_archive(initramfs_entries(agent, mtime))
    tmp_path = f"{out_path}.tmp{os.getpid()}"
    with open(tmp_path, "wb") as f:
        f.write(archive)
    os.replace(tmp_path, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
