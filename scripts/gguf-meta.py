#!/usr/bin/env python3
"""Print GGUF metadata without numpy or gguf-py.

  gguf-meta.py MODEL.gguf              list keys (arrays summarised)
  gguf-meta.py MODEL.gguf KEY          print one value (strings raw, others as JSON)

Used to copy chat templates out of model files into test fixtures.
"""
import json
import struct
import sys

# GGUF value types -> struct format (scalars only).
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, fmt):
        size = struct.calcsize("<" + fmt)
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self):
        n = self.take("Q")
        s = self.data[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype):
        if vtype in SCALARS:
            return self.take(SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype = self.take("I")
            n = self.take("Q")
            return [self.value(etype) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_metadata(path):
    with open(path, "rb") as f:
        # Metadata sits at the front; 64 MiB covers a 262k-token vocabulary.
        data = f.read(64 << 20)
    r = Reader(data)
    if r.take("I") != 0x46554747:
        raise SystemExit(f"{path}: not a GGUF file")
    r.take("I")  # version
    r.take("Q")  # tensor count
    n_kv = r.take("Q")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.take("I"))
    return meta


def main():
    meta = read_metadata(sys.argv[1])
    if len(sys.argv) > 2:
        v = meta[sys.argv[2]]
        sys.stdout.write(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
        return
    for k, v in meta.items():
        if isinstance(v, list):
            print(f"{k}: [{len(v)} items] {json.dumps(v[:8], ensure_ascii=False)}")
        elif isinstance(v, str) and len(v) > 80:
            print(f"{k}: {json.dumps(v[:80], ensure_ascii=False)}... ({len(v)} chars)")
        else:
            print(f"{k}: {json.dumps(v, ensure_ascii=False)}")


if __name__ == "__main__":
    main()
