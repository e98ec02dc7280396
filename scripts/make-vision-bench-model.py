#!/usr/bin/env python3
"""A random-weight vision encoder with Qwen2-VL-2B's shapes, for speed runs.

  ~/.cache/embody/venv/bin/python scripts/make-vision-bench-model.py OUT_DIR [OUT_WIDTH]

Writes OUT_DIR/folder/ (a Qwen2VLForConditionalGeneration config.json,
preprocessor_config.json and the vision tower's weights in F16 safetensors:
depth 32, width 1280, 16 heads, MLP 5120, as Qwen2-VL-2B-Instruct), converts
it with llama.cpp's convert_hf_to_gguf.py --mmproj into OUT_DIR/mmproj-f16.gguf,
and writes two test images, OUT_DIR/448x448.png and OUT_DIR/640x480.png.

The merger's output width is OUT_WIDTH (default 896): the width of the
language model it is paired with, Qwen2.5-Coder-0.5B here, whose vocabulary
holds Qwen's image tokens. No vision-language weights can be downloaded on
the machines this runs on; speed does not depend on the weights' values.
Seeded: running again writes the same files.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gen_fixtures", ROOT / "scripts/gen-fixtures.py")
gf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gf)
_spec = importlib.util.spec_from_file_location("gen_vision", ROOT / "scripts/gen-vision-fixtures.py")
gv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gv)

DEPTH, WIDTH, HEADS, MLP = 32, 1280, 16, 5120


def main():
    out = Path(sys.argv[1])
    out_width = int(sys.argv[2]) if len(sys.argv) > 2 else 896
    folder = out / "folder"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2024)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float16)

    def vec(n, base=0.0, scale=0.1):
        return (base + scale * rng.standard_normal(n, dtype=np.float32)).astype(np.float16)

    t = {"visual.patch_embed.proj.weight": mat(WIDTH, 3 * 2 * 14 * 14).reshape(WIDTH, 3, 2, 14, 14)}
    for i in range(DEPTH):
        b = f"visual.blocks.{i}."
        t[b + "norm1.weight"], t[b + "norm1.bias"] = vec(WIDTH, 1.0), vec(WIDTH)
        t[b + "norm2.weight"], t[b + "norm2.bias"] = vec(WIDTH, 1.0), vec(WIDTH)
        t[b + "attn.qkv.weight"], t[b + "attn.qkv.bias"] = mat(3 * WIDTH, WIDTH), vec(3 * WIDTH)
        t[b + "attn.proj.weight"], t[b + "attn.proj.bias"] = mat(WIDTH, WIDTH), vec(WIDTH)
        t[b + "mlp.fc1.weight"], t[b + "mlp.fc1.bias"] = mat(MLP, WIDTH), vec(MLP)
        t[b + "mlp.fc2.weight"], t[b + "mlp.fc2.bias"] = mat(WIDTH, MLP), vec(WIDTH)
    t["visual.merger.ln_q.weight"], t["visual.merger.ln_q.bias"] = vec(WIDTH, 1.0), vec(WIDTH)
    t["visual.merger.mlp.0.weight"], t["visual.merger.mlp.0.bias"] = mat(4 * WIDTH, 4 * WIDTH), vec(4 * WIDTH)
    t["visual.merger.mlp.2.weight"], t["visual.merger.mlp.2.bias"] = mat(out_width, 4 * WIDTH), vec(out_width)
    save_file(t, str(folder / "model.safetensors"))

    config = Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=out_width, intermediate_size=4864,
                         num_hidden_layers=1, num_attention_heads=14, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=DEPTH, embed_dim=WIDTH, hidden_size=out_width, num_heads=HEADS,
                           mlp_ratio=MLP // WIDTH))
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    config.save_pretrained(folder)
    Qwen2VLImageProcessorPil().save_pretrained(folder)

    src = next(gf.LLAMACPP.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if src is None:
        sys.exit(f"llama.cpp source not found under {gf.LLAMACPP}: run scripts/build-llamacpp.sh")
    subprocess.run([sys.executable, "-c", gf.CONVERTER, str(src), str(folder), "--mmproj",
                    "--outtype", "f16", "--outfile", str(out / "mmproj-f16.gguf")],
                   check=True, stdout=subprocess.DEVNULL)
    for w, h, seed in [(448, 448, 11), (640, 480, 12)]:
        gv.make_image(w, h, seed).save(out / f"{w}x{h}.png")
    (out / "made.json").write_text(json.dumps({"depth": DEPTH, "width": WIDTH, "out": out_width}) + "\n")
    print(out)


if __name__ == "__main__":
    main()
