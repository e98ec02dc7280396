#!/usr/bin/env python3
"""Builds tiny random-weight Hugging Face models and records transformers' logits.

  scripts/fixtures-venv.sh            # once: torch + transformers in ~/.cache/embody/venv
  ~/.cache/embody/venv/bin/python scripts/gen-fixtures.py

For each family (Llama, Qwen2, Qwen3, Gemma 3) this writes a model folder under
tests/fixtures/hf/<name>/ as transformers saves it (config.json,
generation_config.json, safetensors weights, tokenizer.json,
tokenizer_config.json) plus expected.safetensors with transformers' float32
logits for fixed token sequences:

  a_tokens [A] / a_logits [A, V]     prefill of sequence a, every position
  a_decode_tokens [D] / a_decode_logits [D, V]
                                     then D decode steps through the KV cache
  b_tokens [B] / b_logits [B, V]     a second, shorter sequence (ragged batches)

tokenizer.json's ids for a sample text (expected_tokens.json), and transformers'
greedy generation for a chat prompt rendered with the folder's template
(expected_generation.json: prompt ids, generated ids and text). Weights are
drawn with a fixed seed at a scale that makes logits spread over several units
(transformers' own init leaves a tiny model's output nearly uniform), then
rounded to the dtype they are saved in (F32, BF16 or F16) before the logits are
computed, so the file and the reference hold the same numbers. Gemma's sliding
window (8) is shorter than sequence a (40). Qwen3's weights are sharded.

Llama and Qwen3 are also converted with llama.cpp's own converter
(convert_hf_to_gguf.py from the source scripts/build-llamacpp.sh unpacks) into
converted.gguf beside the folder's files, so the GGUF path is checked against
the same logits: Llama's Q/K rows come out permuted for interleaved rope and
its Llama 3 scaling as a rope_freqs tensor; Qwen3 has no real GGUF here.
(Gemma 3's GGUF cannot carry query_pre_attn_scalar, and the converter refuses
the tiny Qwen2 vocabulary; their GGUF paths are checked on the real models.)

It also writes seeds for the `hf` fuzz target (fuzz/corpus/hf/<family>:
config.json, a zero byte, then model.safetensors) from the same families
shrunk to a few hundred weights.

Everything runs on one CPU thread with seeded generators: running the script
again rewrites identical files.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/hf"
LLAMACPP = Path(os.environ.get("EMBODY_LLAMACPP", Path.home() / ".cache/embody/llamacpp"))
CONVERT = ["llama", "qwen3"]
# Runs llama.cpp's converter; the tiny tokenizer is not one of the BPE
# pre-tokenizers it knows by hash, so that lookup answers "default".
CONVERTER = """
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src + "/gguf-py", src]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""
SEED = 1234
VOCAB = 320
A_LEN, B_LEN, DECODE = 40, 13, 4
SPECIALS = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SAMPLE_TEXT = "The robot arm picks up the red cube, then places it on the tray."
CHAT_PROMPT = "Pick up the red cube."
GENERATE = 12
CORPUS = [
    "The robot arm picks up the red cube and places it on the blue tray.",
    "A small mobile robot follows the line on the warehouse floor.",
    "Sensors report the joint angles, the gripper force and the camera frame.",
    "Plan the path, check for obstacles, then move the base forward slowly.",
    "Battery low: return to the charging dock before the next task begins.",
] * 20


def build_tokenizer():
    """A byte-level BPE trained on a fixed corpus: VOCAB ids, control tokens first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        add_bos_token=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_weights(model, gen, norm_offset):
    """Seeded weights at a scale that keeps activations (and logits) around unit size.

    Matrices: N(0, 1/fan_in). Embeddings: N(0, 1). Norm scales: offset + N(0, 0.1)
    (Gemma stores w of a (1 + w) scale, so its offset is 0). Biases: N(0, 0.1).
    """
    for name, p in sorted(model.named_parameters()):
        shape = tuple(p.shape)
        if "norm" in name:
            v = norm_offset + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            v = 0.1 * torch.randn(shape, generator=gen)
        elif "embed_tokens" in name:
            v = torch.randn(shape, generator=gen)
        else:
            v = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        with torch.no_grad():
            p.copy_(v)


def round_to(model, dtype):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


@torch.no_grad()
def record(model, gen):
    """Logits of sequence a (prefill, then decode steps with the cache) and b."""
    a = torch.randint(len(SPECIALS), VOCAB, (A_LEN + DECODE,), generator=gen)
    b = torch.randint(len(SPECIALS), VOCAB, (B_LEN,), generator=gen)
    out = model(input_ids=a[None, :A_LEN], use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    decode = []
    for i in range(DECODE):
        pos = A_LEN + i
        step = model(
            input_ids=a[None, pos : pos + 1],
            cache=cache,
            use_cache=True,
            cache_position=torch.tensor([pos]),
        )
        cache = step.cache if hasattr(step, "cache") and step.cache is not None else step.past_key_values
        decode.append(step.logits[0, -1])
    # The cached decode agrees with a plain forward over the whole sequence.
    full = model(input_ids=a[None, :], use_cache=False).logits[0, A_LEN:]
    assert torch.allclose(torch.stack(decode), full, atol=1e-4), "cached decode differs from a full forward"
    return {
        "a_tokens": a[:A_LEN].to(torch.int64),
        "a_logits": out.logits[0].contiguous(),
        "a_decode_tokens": a[A_LEN:].to(torch.int64),
        "a_decode_logits": torch.stack(decode).contiguous(),
        "b_tokens": b.to(torch.int64),
        "b_logits": model(input_ids=b[None]).logits[0].contiguous(),
    }


@torch.no_grad()
def greedy(model, tokenizer):
    """Greedy decoding (no repetition penalty) of a one-message chat."""
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]
    model32 = model.to(torch.float32)
    out = model32.generate(ids, max_new_tokens=GENERATE, do_sample=False, repetition_penalty=1.0,
                           eos_token_id=2, pad_token_id=0)
    new = out[0, ids.shape[1]:].tolist()
    return {"prompt": CHAT_PROMPT, "rendered": rendered, "prompt_ids": ids[0].tolist(), "ids": new,
            "text": tokenizer.decode(new, skip_special_tokens=True)}


def convert(folder, outtype):
    """llama.cpp's GGUF conversion of a folder, as converted.gguf inside it."""
    src = next(LLAMACPP.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if src is None:
        sys.exit(f"llama.cpp source not found under {LLAMACPP}: run scripts/build-llamacpp.sh")
    subprocess.run(
        [sys.executable, "-c", CONVERTER, str(src), str(folder), "--outtype", outtype,
         "--outfile", str(folder / "converted.gguf")],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def families():
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return [
        # Llama 3 RoPE scaling, separate output head, F32.
        ("llama", LlamaForCausalLM, LlamaConfig(
            **common, num_hidden_layers=2, num_key_value_heads=2, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64},
            tie_word_embeddings=False), torch.float32, 1.0, None),
        # Q/K/V biases, tied head, BF16 as Qwen2.5 ships.
        ("qwen2", Qwen2ForCausalLM, Qwen2Config(
            **common, num_hidden_layers=2, num_key_value_heads=2, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True), torch.bfloat16, 1.0, None),
        # Per-head Q/K norms, head_dim (32) != hidden / heads (16), F16, sharded.
        ("qwen3", Qwen3ForCausalLM, Qwen3Config(
            **common, num_hidden_layers=2, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False), torch.float16, 1.0, "100KB"),
        # Five sliding layers then a global one, window 8, two RoPE bases (linear
        # scaling on the global one), query_pre_attn_scalar != head_dim,
        # final soft-capping, tied head, F32.
        ("gemma3", Gemma3ForCausalLM, Gemma3TextConfig(
            **{**common, "hidden_size": 64}, num_hidden_layers=6, num_key_value_heads=1, head_dim=16,
            query_pre_attn_scalar=24, sliding_window=8, final_logit_softcapping=5.0, rms_norm_eps=1e-6,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            }), torch.float32, 0.0, None),
    ]


def fuzz_seeds():
    """The families at hidden size 8, one or two layers, vocabulary 16."""
    out = ROOT / "fuzz/corpus/hf"
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, cls, config, dtype, norm_offset, _) in enumerate(families()):
        small = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=128)
        if name == "qwen3":
            small["head_dim"] = 8
        if name == "gemma3":
            small.update(head_dim=4, query_pre_attn_scalar=4, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention"])
        base = {k: v for k, v in config.to_dict().items() if k != "layer_types"}
        config = type(config)(**{**base, **small, "num_hidden_layers": 2 if name == "gemma3" else 1})
        config.architectures = [cls.__name__]
        torch.manual_seed(SEED + i)
        model = cls(config).eval()
        init_weights(model, torch.Generator().manual_seed(SEED + i), norm_offset)
        tensors = {k: v.to(dtype).contiguous() for k, v in sorted(model.state_dict().items())
                   if not (config.tie_word_embeddings and k == "lm_head.weight")}
        tmp = out / f"{name}.safetensors"
        save_file(tensors, tmp)
        seed = config.to_json_string().encode() + b"\0" + tmp.read_bytes()
        tmp.unlink()
        (out / name).write_bytes(seed)
        print(f"fuzz seed {name}: {len(seed)} bytes")


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    sample_ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    only = set(sys.argv[1:])
    if not only or "fuzz" in only:
        fuzz_seeds()
    for i, (name, cls, config, dtype, norm_offset, shard) in enumerate(families()):
        if only and name not in only:
            continue
        config.architectures = [cls.__name__]
        config._attn_implementation = "eager"
        torch.manual_seed(SEED + i)
        gen = torch.Generator().manual_seed(SEED + i)
        model = cls(config).eval()
        init_weights(model, gen, norm_offset)
        round_to(model, dtype)
        expected = record(model, gen)
        if name == "qwen2":
            # Sampling defaults the folder carries (generation_config.json).
            model.generation_config.do_sample = True
            model.generation_config.temperature = 0.7
            model.generation_config.top_k = 20
            model.generation_config.top_p = 0.8
            model.generation_config.repetition_penalty = 1.05

        out = OUT / name
        if out.exists():
            shutil.rmtree(out)
        model.to(dtype).save_pretrained(out, max_shard_size=shard or "50MB")
        tokenizer.save_pretrained(out)
        save_file(expected, out / "expected.safetensors")
        (out / "expected_tokens.json").write_text(
            json.dumps({"text": SAMPLE_TEXT, "ids": sample_ids}) + "\n")
        (out / "expected_generation.json").write_text(json.dumps(greedy(model, tokenizer)) + "\n")
        if name in CONVERT:
            convert(out, "f32" if dtype == torch.float32 else "f16")
        files = sorted(p for p in out.iterdir())
        size = sum(p.stat().st_size for p in files)
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]
        spread = expected["a_logits"].std().item()
        print(f"{name}: {len(files)} files, {size / 1024:.0f} KiB, logit std {spread:.2f}, sha256 {digest}")


if __name__ == "__main__":
    main()
