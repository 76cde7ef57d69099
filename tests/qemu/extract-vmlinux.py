#!/usr/bin/env python3
"""Unpack the ELF vmlinux from an xz-compressed x86 bzImage: extract-vmlinux.py BZIMAGE OUT.

QEMU boots an ELF vmlinux through PVH, which skips the slow in-guest decompression under TCG.
"""
import lzma
import sys


def main():
    bz, out = sys.argv[1], sys.argv[2]
    data = open(bz, "rb").read()
    at = data.find(b"\xfd7zXZ\x00")
    if at < 0:
        sys.exit("no xz payload in %s" % bz)
    elf = lzma.LZMADecompressor().decompress(data[at:])
    if not elf.startswith(b"\x7fELF"):
        sys.exit("the xz payload of %s is not an ELF image" % bz)
    with open(out, "wb") as f:
        f.write(elf)


if __name__ == "__main__":
    main()
