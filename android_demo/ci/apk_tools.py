"""Small APK helpers for build.sh: add classes.dex to an APK, and inspect a built APK.

    python apk_tools.py add-dex APP.apk classes.dex
    python apk_tools.py check APP.apk --stored assets/model.tflite --forbid org.tensorflow.lite --require org.quantface.demo.MainActivity

``check`` lists the classes *defined* in every classes*.dex (the dex header's class_defs, not
mere type references) and the compression of the named entries, and prints a JSON report; it
exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import zipfile


def add_dex(apk: str, dex: str) -> None:
    with zipfile.ZipFile(apk, "a", compression=zipfile.ZIP_DEFLATED) as z:
        if "classes.dex" in z.namelist():
            raise SystemExit(f"{apk} already has a classes.dex")
        z.write(dex, "classes.dex")


def _uleb128(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def defined_classes(dex: bytes) -> list[str]:
    """Class names from a dex file's class_defs table (format: source.android.com/docs/core/runtime/dex-format)."""
    if dex[:4] != b"dex\n":
        raise ValueError("not a dex file")
    string_ids_off = struct.unpack_from("<I", dex, 0x3C)[0]
    type_ids_off = struct.unpack_from("<I", dex, 0x44)[0]
    class_defs_size, class_defs_off = struct.unpack_from("<II", dex, 0x60)
    names = []
    for k in range(class_defs_size):
        class_idx = struct.unpack_from("<I", dex, class_defs_off + 32 * k)[0]
        string_idx = struct.unpack_from("<I", dex, type_ids_off + 4 * class_idx)[0]
        data_off = struct.unpack_from("<I", dex, string_ids_off + 4 * string_idx)[0]
        _, start = _uleb128(dex, data_off)
        end = dex.index(b"\0", start)
        descriptor = dex[start:end].decode("utf-8", "replace")  # "Lorg/quantface/demo/MainActivity;"
        names.append(descriptor[1:-1].replace("/", "."))
    return names


def check(apk: str, stored: list[str], forbid: list[str], require: list[str]) -> int:
    report: dict = {"apk": apk, "failures": []}
    with zipfile.ZipFile(apk) as z:
        infos = {i.filename: i for i in z.infolist()}
        classes = [c for n in sorted(infos) if n.startswith("classes") and n.endswith(".dex") for c in defined_classes(z.read(n))]
        report["classes"] = len(classes)
        report["entries"] = {n: {"bytes": i.file_size, "stored": i.compress_type == zipfile.ZIP_STORED} for n, i in infos.items()
                             if n.startswith("assets/") or n.endswith(".dex")}
    for name in stored:
        if name not in infos:
            report["failures"].append(f"{name} is missing")
        elif infos[name].compress_type != zipfile.ZIP_STORED:
            report["failures"].append(f"{name} is compressed (LiteRT memory-maps models: store them uncompressed)")
    for prefix in forbid:
        bad = [c for c in classes if c.startswith(prefix)]
        if bad:
            report["failures"].append(f"classes from {prefix} are packaged (compile-only stubs must not ship): {bad[:3]}")
    for name in require:
        if name not in classes:
            report["failures"].append(f"class {name} is not in the dex")
    print(json.dumps(report, indent=1))
    return 1 if report["failures"] else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add-dex")
    a.add_argument("apk")
    a.add_argument("dex")
    c = sub.add_parser("check")
    c.add_argument("apk")
    c.add_argument("--stored", action="append", default=[])
    c.add_argument("--forbid", action="append", default=[])
    c.add_argument("--require", action="append", default=[])
    args = ap.parse_args()
    if args.cmd == "add-dex":
        add_dex(args.apk, args.dex)
        return 0
    return check(args.apk, args.stored, args.forbid, args.require)


if __name__ == "__main__":
    sys.exit(main())
