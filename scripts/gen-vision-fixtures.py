#!/usr/bin/env python3
"""Builds tiny random-weight Qwen2-VL and Qwen2.5-VL folders and records
transformers' outputs for images.

  scripts/fixtures-venv.sh            # once: torch + transformers + Pillow in ~/.cache/embody/venv
  ~/.cache/embody/venv/bin/python scripts/gen-vision-fixtures.py

For each family this writes tests/fixtures/hf/<name>/: the folder as
transformers saves it (config.json with text_config and vision_config,
safetensors weights, tokenizer files, preprocessor_config.json), the images
(PNG) and expected.safetensors:

  img<i>_pixels [N, 1176] / img<i>_grid [3]   the image processor's output (PIL path)
  img<i>_embeds [tokens, d_model]             the vision encoder's rows
  prompt_tokens [L]                           a chat prompt with every image, placeholders expanded
  prompt_positions [3, L]                     get_rope_index's position ids
  prompt_logits [L, V]                        the model's logits over the prompt
  generated [G]                               greedy tokens after the prompt

Qwen2-VL (F32, tied head) sees a 100x75 image scaled up and a 300x200 one
scaled down to fit max_pixels; Qwen2.5-VL (BF16, own head) sees a 250x90 RGBA
image (composited onto white) whose 3x9 merged grid spans three attention
windows, with one of its three blocks attending over the whole image.
Qwen2.5-VL's encoder is also converted with llama.cpp's own converter
(convert_hf_to_gguf.py --mmproj, from the source scripts/build-llamacpp.sh
unpacks) into converted-mmproj.gguf, so the mmproj path is checked against the
same rows. (The converter maps merger.mlp.2 only when the encoder has more
than two blocks, so the two-block Qwen2-VL encoder is not converted.)

Weights are drawn and rounded as in gen-fixtures.py; everything runs on one
thread with seeded generators, so running again rewrites identical files.
"""
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/hf"
_spec = importlib.util.spec_from_file_location("gen_fixtures", ROOT / "scripts/gen-fixtures.py")
gf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gf)

VISION_SPECIALS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
PROMPT = "Pick up the red cube."
GENERATE = 8
SEED = 4321


def make_image(w, h, seed, alpha=False):
    """Smooth colour ramps with seeded noise, so that resizing has detail to round."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 100 * np.sin(x / 7 + y / 5)], -1)
    px = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    if alpha:
        a = np.clip(255 * (x / max(w - 1, 1)) + rng.normal(0, 30, (h, w)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.concatenate([px, a[..., None]], -1), "RGBA")
    return Image.fromarray(px, "RGB")


def text_config(mrope):
    return dict(
        vocab_size=gf.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope})


def families(ids):
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return [
        ("qwen2vl", Qwen2VLForConditionalGeneration, Qwen2VLConfig(
            text_config=text_config([2, 3, 3]),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2),
            tie_word_embeddings=True, **tokens), torch.float32,
         dict(max_pixels=28 * 28 * 20), [make_image(100, 75, 1), make_image(300, 200, 2)]),
        ("qwen25vl", Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(
            text_config=text_config([2, 3, 3]),
            vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4,
                               out_hidden_size=64, window_size=112, fullatt_block_indexes=[1]),
            tie_word_embeddings=False, **tokens), torch.bfloat16,
         dict(), [make_image(250, 90, 3, alpha=True)]),
    ]


def convert_mmproj(folder):
    """llama.cpp's mmproj conversion of a folder, as converted-mmproj.gguf inside it."""
    src = next(gf.LLAMACPP.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if src is None:
        sys.exit(f"llama.cpp source not found under {gf.LLAMACPP}: run scripts/build-llamacpp.sh")
    subprocess.run(
        [sys.executable, "-c", gf.CONVERTER, str(src), str(folder), "--mmproj", "--outtype", "f32",
         "--outfile", str(folder / "converted-mmproj.gguf")],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def init_weights(model, gen):
    """gen-fixtures' scales: matrices N(0, 1/fan_in) (the patch embedding's fan-in
    is its whole kernel), embeddings N(0, 1), norm scales 1 + N(0, 0.1) (the
    merger's ln_q included), biases N(0, 0.1)."""
    for name, p in sorted(model.named_parameters()):
        shape = tuple(p.shape)
        if name.endswith(".bias"):
            v = 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif "embed_tokens" in name:
            v = torch.randn(shape, generator=gen)
        else:
            v = torch.randn(shape, generator=gen) / float(np.prod(shape[1:])) ** 0.5
        p.copy_(v)


@torch.no_grad()
def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    gf.SPECIALS = gf.SPECIALS + VISION_SPECIALS
    tokenizer = gf.build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIALS}
    for i, (name, cls, config, dtype, proc_args, images) in enumerate(families(ids)):
        config.architectures = [cls.__name__]
        config._attn_implementation = "eager"
        torch.manual_seed(SEED + i)
        model = cls(config).eval()
        init_weights(model, torch.Generator().manual_seed(SEED + i))
        gf.round_to(model, dtype)

        out = OUT / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        files = []
        for k, img in enumerate(images):
            path = out / f"image{k}.png"
            img.save(path)
            files.append(path)
        # The processor reads the files back, as the engine will.
        loaded = [Image.open(p) for p in files]
        proc = Qwen2VLImageProcessorPil(**proc_args)
        px = proc(images=[im.convert("RGBA") if im.mode == "RGBA" else im for im in loaded],
                  return_tensors="np")
        pixels = torch.from_numpy(px["pixel_values"])
        grids = torch.from_numpy(px["image_grid_thw"])
        expected = {}
        embeds = model.model.get_image_features(pixels, grids).pooler_output
        start = 0
        for k, g in enumerate(grids):
            n = int(g.prod())
            expected[f"img{k}_pixels"] = pixels[start:start + n].contiguous()
            expected[f"img{k}_grid"] = g.to(torch.int64).contiguous()
            expected[f"img{k}_embeds"] = embeds[k].float().contiguous()
            start += n

        # The chat prompt: each image as <|vision_start|><|image_pad|><|vision_end|>
        # before the text, its placeholder repeated once per merged token.
        slot = "<|vision_start|><|image_pad|><|vision_end|>"
        messages = [{"role": "user", "content": slot * len(images) + PROMPT}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        merge = config.vision_config.spatial_merge_size
        counts = iter([int(g.prod()) // merge**2 for g in grids])
        expanded = []
        for t in prompt:
            expanded += [t] * next(counts) if t == ids["<|image_pad|>"] else [t]
        input_ids = torch.tensor([expanded])
        mm = (input_ids == ids["<|image_pad|>"]).to(torch.int32)
        positions, _ = model.model.get_rope_index(input_ids, mm, image_grid_thw=grids)
        logits = model(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grids,
                       mm_token_type_ids=mm).logits[0]
        gen = model.generate(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grids,
                             mm_token_type_ids=mm, max_new_tokens=GENERATE, do_sample=False,
                             repetition_penalty=1.0, eos_token_id=2, pad_token_id=0)
        expected["prompt_tokens"] = input_ids[0].to(torch.int64)
        expected["prompt_positions"] = positions[:, 0].to(torch.int64).contiguous()
        expected["prompt_logits"] = logits.float().contiguous()
        expected["generated"] = gen[0, input_ids.shape[1]:].to(torch.int64).contiguous()

        model.to(dtype).save_pretrained(out)
        tokenizer.save_pretrained(out)
        proc.save_pretrained(out)
        save_file(expected, out / "expected.safetensors")
        (out / "expected_prompt.json").write_text(json.dumps(
            {"rendered": rendered, "prompt": PROMPT, "images": [p.name for p in files]}) + "\n")
        if config.vision_config.depth > 2:
            convert_mmproj(out)
        all_files = sorted(out.iterdir())
        size = sum(p.stat().st_size for p in all_files)
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in all_files)).hexdigest()[:16]
        print(f"{name}: grids {grids.tolist()}, {len(expanded)} prompt tokens, {size / 1024:.0f} KiB, "
              f"logit std {logits.float().std().item():.2f}, generated {expected['generated'].tolist()}, "
              f"sha256 {digest}")


if __name__ == "__main__":
    main()
