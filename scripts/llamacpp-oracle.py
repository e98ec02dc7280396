#!/usr/bin/env python3
"""Records llama.cpp's greedy continuations and perplexity as test fixtures.

  scripts/llamacpp-oracle.py [smollm2 gemma3 qwen25 ...]

Runs llama-server (built by scripts/build-llamacpp.sh) on each real model,
renders chat prompts with llama.cpp's own template engine (/apply-template),
asks for 32 greedy tokens per prompt (/completion with top_k=1), and runs
llama-perplexity on tests/fixtures/gpl-3.0.txt. Writes
tests/fixtures/llamacpp/<model>.json. Standard library only.
"""
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("EMBODY_MODELS", Path.home() / ".cache/embody/models"))
FILES = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
    "qwen25": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}
RAW = [
    "The capital of France is",
    "Once upon a time, a small robot",
    "def fibonacci(n):",
    "The three laws of robotics are",
    "Water boils at",
    "In 1969, the first humans",
    "A list of fruits: apple, banana,",
    "To make a cup of tea, first",
]
CHAT = [
    "What is the capital of France?",
    "Write a haiku about a robot.",
    "How many legs does a spider have?",
    "Give me three tips for staying focused.",
    "Explain what a battery does in one sentence.",
    "What is 12 times 12?",
]
# Extra llama-server arguments. The Gemma 3 270M file carries no chat template;
# llama.cpp renders Gemma 3's own (the one embody falls back to) with --jinja.
SERVER_ARGS = {
    "gemma3": ["--jinja", "--chat-template-file", str(ROOT / "engine/src/models/gemma3_chat_template.jinja")],
}
N_PREDICT = 32
PPL_CTX, PPL_CHUNKS = 512, 4
PORT = 18089


def post(path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{PORT}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def greedy(prompt):
    r = post("/completion", {
        "prompt": prompt, "n_predict": N_PREDICT, "temperature": 0, "top_k": 1,
        "samplers": ["top_k"], "cache_prompt": False, "n_probs": 1, "return_tokens": True,
    })
    pieces = [p["token"] for p in r["completion_probabilities"]]
    return {"text": r["content"], "tokens": r["tokens"], "pieces": pieces}


def main():
    names = sys.argv[1:] or ["smollm2"]
    bin_dir = Path(subprocess.check_output([ROOT / "scripts/build-llamacpp.sh"], text=True).strip())
    out_dir = Path(os.environ.get("ORACLE_OUT", ROOT / "tests/fixtures/llamacpp"))
    out_dir.mkdir(parents=True, exist_ok=True)
    text_file = ROOT / "tests/fixtures/gpl-3.0.txt"
    for name in names:
        model = MODELS / FILES[name]
        server = subprocess.Popen(
            [bin_dir / "llama-server", "-m", model, "-t", "2", "-c", "4096", "-np", "1",
             "--port", str(PORT), "--host", "127.0.0.1", "-fa", "off", *SERVER_ARGS.get(name, [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(120):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2)
                    break
                except Exception:
                    time.sleep(0.5)
            cases = []
            for p in RAW:
                cases.append({"chat": False, "prompt": p, **greedy(p)})
            for p in CHAT:
                rendered = post("/apply-template", {"messages": [{"role": "user", "content": p}]})["prompt"]
                cases.append({"chat": True, "prompt": p, "rendered": rendered, **greedy(rendered)})
        finally:
            server.terminate()
            server.wait()
        ppl = {}
        for fa in ("off", "on"):
            ppl_out = subprocess.run(
                [bin_dir / "llama-perplexity", "-m", model, "-f", text_file, "-c", str(PPL_CTX),
                 "--chunks", str(PPL_CHUNKS), "-t", "2", "-fa", fa],
                capture_output=True, text=True, check=True)
            ppl[fa] = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)",
                                ppl_out.stdout + ppl_out.stderr)
        m = ppl["off"]
        fixture = {
            "model": FILES[name],
            "made_with": "llama.cpp from llama-cpp-python 0.3.36, flash attention off (its CPU flash "
                         "attention accumulates V in f16): llama-server /completion greedy (top_k=1), "
                         "/apply-template for chat; llama-perplexity -c 512 --chunks 4",
            "n_predict": N_PREDICT,
            "perplexity": {"file": "tests/fixtures/gpl-3.0.txt", "ctx": PPL_CTX, "chunks": PPL_CHUNKS,
                           "ppl": float(m.group(1)), "stderr": float(m.group(2)),
                           "ppl_flash_attn_on": float(ppl["on"].group(1))},
            "cases": cases,
        }
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
        print(f"{name}: wrote {path} (PPL {m.group(1)})")


if __name__ == "__main__":
    main()
