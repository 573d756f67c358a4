#!/usr/bin/env python3
"""Writes a binary wheel (PEP 427) from an explicit list of files.

Used by the Bazel genrule //kt/python:wheel; it has no dependency beyond the standard library, so it runs
offline on any Python 3. Usage:

    build_wheel.py --out kt_kernel-0.1.0-cp311-cp311-linux_x86_64.whl --name kt_kernel --version 0.1.0 \
        --tag cp311-cp311-linux_x86_64 [--version-file kt/python/kt_kernel/_version.py] \
        [--summary TEXT] [--requires-python SPEC] [--requires-dist REQ ...] \
        kt_kernel/__init__.py=kt/python/kt_kernel/__init__.py kt_kernel/_kt.so=bazel-out/.../_kt.so ...

Each positional argument is ARCHIVE_PATH=FILE. The wheel gets those files plus
``<name>-<version>.dist-info/{METADATA,WHEEL,RECORD}``; RECORD carries the sha256 digest (urlsafe base64,
unpadded) and size of every file. Output is reproducible: entries are sorted and stamped 1980-01-01, modes are
0644 (0755 for shared objects and executables).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import sys
import zipfile
from typing import Dict, List, Sequence, Tuple

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+$")


def _record_digest(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _read_version_file(path: str) -> str:
    """Returns the __version__ string assigned in a Python file, without importing it."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    if not match:
        raise SystemExit(f"build_wheel: no __version__ = '...' line in {path}")
    return match.group(1)


def _parse_files(specs: Sequence[str]) -> List[Tuple[str, str]]:
    files: Dict[str, str] = {}
    for spec in specs:
        arcname, sep, path = spec.partition("=")
        if not sep or not arcname or not path:
            raise SystemExit(f"build_wheel: expected ARCHIVE_PATH=FILE, got {spec!r}")
        arcname = arcname.replace(os.sep, "/")
        if arcname.startswith("/") or ".." in arcname.split("/"):
            raise SystemExit(f"build_wheel: archive path must be relative and inside the wheel: {arcname!r}")
        if arcname in files:
            raise SystemExit(f"build_wheel: {arcname!r} given twice")
        if not os.path.isfile(path):
            raise SystemExit(f"build_wheel: {path!r} (for {arcname!r}) is not a file")
        files[arcname] = path
    if not files:
        raise SystemExit("build_wheel: no files given")
    return sorted(files.items())


def _metadata(args: argparse.Namespace) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {args.name}",
        f"Version: {args.version}",
    ]
    if args.summary:
        lines.append(f"Summary: {args.summary}")
    if args.requires_python:
        lines.append(f"Requires-Python: {args.requires_python}")
    for requirement in args.requires_dist:
        lines.append(f"Requires-Dist: {requirement}")
    return "\n".join(lines) + "\n"


def _wheel_file(tag: str) -> str:
    return "\n".join(
        [
            "Wheel-Version: 1.0",
            "Generator: kt tools/build_wheel.py",
            "Root-Is-Purelib: false",  # It ships a compiled extension: install into platlib.
            f"Tag: {tag}",
        ]
    ) + "\n"


def _zip_info(arcname: str, executable: bool) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # Unix, so that external_attr carries the mode.
    info.external_attr = ((0o100755 if executable else 0o100644) & 0xFFFF) << 16
    return info


def build_wheel(args: argparse.Namespace) -> None:
    if not _NAME_RE.match(args.name):
        raise SystemExit(f"build_wheel: invalid distribution name {args.name!r}")
    if not _TAG_RE.match(args.tag):
        raise SystemExit(f"build_wheel: tag must be python-abi-platform, got {args.tag!r}")
    if args.version_file:
        file_version = _read_version_file(args.version_file)
        if file_version != args.version:
            raise SystemExit(
                f"build_wheel: --version {args.version} disagrees with __version__ = {file_version!r} in "
                f"{args.version_file}; update one of them"
            )
    # PEP 427: the distribution name in file names has '-' replaced by '_'.
    dist = re.sub(r"[-_.]+", "_", args.name)
    expected = f"{dist}-{args.version}-{args.tag}.whl"
    if os.path.basename(args.out) != expected:
        raise SystemExit(f"build_wheel: --out must be named {expected}, got {os.path.basename(args.out)}")
    dist_info = f"{dist}-{args.version}.dist-info"

    entries: List[Tuple[str, bytes, bool]] = []
    for arcname, path in _parse_files(args.files):
        if arcname.startswith(dist_info + "/"):
            raise SystemExit(f"build_wheel: {arcname!r} would overwrite generated metadata")
        with open(path, "rb") as f:
            data = f.read()
        executable = arcname.endswith(".so") or (os.access(path, os.X_OK) and not arcname.endswith(".py"))
        entries.append((arcname, data, executable))
    entries.append((f"{dist_info}/METADATA", _metadata(args).encode("utf-8"), False))
    entries.append((f"{dist_info}/WHEEL", _wheel_file(args.tag).encode("utf-8"), False))

    record_name = f"{dist_info}/RECORD"
    record_lines = [f"{name},{_record_digest(data)},{len(data)}" for name, data, _ in entries]
    record_lines.append(f"{record_name},,")
    entries.append((record_name, ("\n".join(record_lines) + "\n").encode("utf-8"), False))

    tmp = args.out + ".tmp"
    with zipfile.ZipFile(tmp, "w") as whl:
        for name, data, executable in entries:  # RECORD last, as PEP 427 recommends.
            whl.writestr(_zip_info(name, executable), data)
    os.replace(tmp, args.out)


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="path of the .whl to write")
    parser.add_argument("--name", required=True, help="distribution name, e.g. kt_kernel")
    parser.add_argument("--version", required=True)
    parser.add_argument("--tag", required=True, help="python-abi-platform, e.g. cp311-cp311-linux_x86_64")
    parser.add_argument("--version-file", help="Python file whose __version__ must equal --version")
    parser.add_argument("--summary", default="")
    parser.add_argument("--requires-python", default="")
    parser.add_argument("--requires-dist", action="append", default=[])
    parser.add_argument("files", nargs="+", metavar="ARCHIVE_PATH=FILE")
    build_wheel(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
