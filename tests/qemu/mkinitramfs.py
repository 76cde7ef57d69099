#!/usr/bin/env python3
"""Write an uncompressed newc cpio archive (a Linux initramfs).

Usage: mkinitramfs.py OUT ENTRY...
  ENTRY is DEST=SRC (a file, mode taken from SRC), DEST/ (a directory) or DEST@TARGET (a symlink).
"""
import os
import stat
import sys


def header(ino, mode, size, name, nlink=1):
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def pad(n):
    return b"\0" * ((4 - n % 4) % 4)


def record(out, ino, mode, name, data=b""):
    name_b = name.encode()
    h = header(ino, mode, len(data), name_b, 2 if stat.S_ISDIR(mode) else 1)
    out.write(h + name_b + b"\0")
    out.write(pad(len(h) + len(name_b) + 1))
    out.write(data)
    out.write(pad(len(data)))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    entries = []
    dirs = set()
    for arg in sys.argv[2:]:
        if "=" in arg:
            dest, src = arg.split("=", 1)
            entries.append(("file", dest.strip("/"), src))
        elif "@" in arg:
            dest, target = arg.split("@", 1)
            entries.append(("link", dest.strip("/"), target))
        elif arg.endswith("/"):
            dirs.add(arg.strip("/"))
        else:
            sys.exit("bad entry %r" % arg)
    # Every parent directory exists, created before its children.
    for _, dest, _ in entries:
        parts = dest.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    ino = 1
    with open(sys.argv[1], "wb") as out:
        for d in sorted(dirs, key=lambda d: (d.count("/"), d)):
            record(out, ino, stat.S_IFDIR | 0o755, d)
            ino += 1
        for kind, dest, src in entries:
            if kind == "file":
                with open(src, "rb") as f:
                    data = f.read()
                perm = os.stat(src).st_mode & 0o777
                record(out, ino, stat.S_IFREG | perm, dest, data)
            else:
                record(out, ino, stat.S_IFLNK | 0o777, dest, src.encode())
            ino += 1
        record(out, 0, 0, "TRAILER!!!")


if __name__ == "__main__":
    main()
