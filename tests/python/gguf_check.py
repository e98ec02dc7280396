"""Reads a GGUF file written by `embody quantize` with gguf-py, llama.cpp's
own GGUF reader and quantizer, against the file it came from. What must
hold: the same tensors with the same shapes and metadata; every tensor whose
format gguf-py can write (Q8_0, Q5_0, Q4_0, ...) is byte for byte what
gguf-py writes from the source's values; every K-quant tensor dequantizes
(by gguf-py) close to the source's values.

usage: gguf_check.py <source.gguf> <ours.gguf>
Prints one JSON object: tensor types by name, counts, worst errors.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType as T
from gguf import quants

src, ours = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
src_t = {t.name: t for t in src.tensors}
def llama_order(name):
    """llama.cpp's loader order: outside the blocks first, then by block, then by name."""
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blk" else -1, name)


assert [t.name for t in ours.tensors] == sorted((t.name for t in src.tensors), key=llama_order), \
    "the same tensors, in the order llama-quantize writes them"
src_keys = set(src.fields) - {"general.file_type", "general.quantization_version"}
assert src_keys <= set(ours.fields), src_keys - set(ours.fields)

WRITABLE = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
types, exact, checked, worst = {}, 0, 0, {}
for t in ours.tensors:
    s = src_t[t.name]
    assert list(t.shape) == list(s.shape), t.name
    types[t.name] = t.tensor_type.name
    values = quants.dequantize(s.data, s.tensor_type).astype(np.float32)
    if t.tensor_type in WRITABLE:
        want = quants.quantize(values, t.tensor_type)
        got = np.asarray(t.data)
        checked += 1
        same = want.tobytes() == got.tobytes()
        exact += same
        if not same:
            diff = int(np.count_nonzero(want.view(np.uint8) != got.view(np.uint8)))
            print(f"{t.name} ({t.tensor_type.name}): {diff} bytes differ from gguf-py's", file=sys.stderr)
    else:
        back = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        err = float(np.sqrt(np.mean((back - values) ** 2)) / (np.sqrt(np.mean(values ** 2)) + 1e-12))
        name = t.tensor_type.name
        worst[name] = max(worst.get(name, 0.0), err)

print(json.dumps({
    "file_type": int(ours.fields["general.file_type"].parts[-1][0]),
    "types": types,
    "exact": exact,
    "checked": checked,
    "worst_relative_rms": worst,
}))
