#!/usr/bin/env python3
"""Record llama.cpp's tokenization of tricky strings as test fixtures.

Runs `llama-tokenize` over STRINGS for each model and writes
engine/tests/fixtures/tokenizer/<model>.json, which
engine/tests/tokenizer_llamacpp.rs checks our tokenizer against.

  scripts/tokenizer-oracle.py            all models present
  scripts/tokenizer-oracle.py smollm2    one model

Environment: LLAMA_TOKENIZE (the binary; default: the llama.cpp build under
~/.cache/embody/llamacpp), EMBODY_MODELS (default ~/.cache/embody/models).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME_CACHE = Path.home() / ".cache/embody"
LLAMA_TOKENIZE = os.environ.get(
    "LLAMA_TOKENIZE",
    str(HOME_CACHE / "llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-tokenize"),
)
MODELS_DIR = Path(os.environ.get("EMBODY_MODELS", HOME_CACHE / "models"))
OUT_DIR = ROOT / "engine/tests/fixtures/tokenizer"

MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m.json"),
    "gemma3": ("gemma-3-270m-q4_k_m.gguf", "gemma-3-270m.json"),
    "qwen25": ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-0.5b.json"),
}

STRINGS = [
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\n\n\n",
    "\n\n\n\n\n\n\n\n\n\n\n\n",
    " \n",
    "\t\n",
    "\r\n",
    "Hello world",
    " Hello world",
    "Hello  world",
    "Hello world ",
    "Hello world\n",
    "  leading and trailing  ",
    "multiple   spaces    here",
    "    four spaces indent",
    "ending with spaces   ",
    "tabs\tand\ttabs",
    "\t\ttab indent",
    "line1\nline2\n\nline4",
    "Héllo wörld, café naïve résumé",
    "Ünïcödé Ελληνικά Русский текст",
    "中文测试，你好世界。",
    "日本語のテキスト",
    "한국어 텍스트",
    "emoji 🤖🚀 and 👍🏽",
    "family 👨‍👩‍👧‍👦 ZWJ",
    "flag 🇫🇷",
    "1234567",
    "3.14159 and 1,000,000",
    "I'm you're they've we'll he'd she's it's",
    "DON'T I'LL WE'VE",
    "def foo(x):\n    return x**2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "url: https://example.com/path?q=1&r=2#frag",
    "'''quotes''' \"double\" `back`",
    "mixed: ABC abc 123 !!! ???",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth",
    "ﬁ ligature Ⅻ",
    "a\u0301 combining",
    "Robot arm: move to (0.25, -0.10, 0.40) m",
    "<html><body><div>x</div></body></html>",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text",
    '<tool_call>{"name": "f"}</tool_call>',
]

# Strings with special-token text, also tokenized with special parsing off.
NO_PARSE_SPECIAL = [s for s in STRINGS if "<" in s]


def tokenize(model: Path, text: str, parse_special: bool) -> list:
    cmd = [LLAMA_TOKENIZE, "-m", str(model), "--stdin", "--no-escape", "--ids", "--log-disable"]
    if not parse_special:
        cmd.append("--no-parse-special")
    out = subprocess.run(cmd, input=text.encode(), capture_output=True, check=True).stdout
    line = out.decode().strip().splitlines()[-1]
    return json.loads(line)


def main():
    wanted = sys.argv[1:] or list(MODELS)
    for key in wanted:
        model_file, fixture = MODELS[key]
        model = MODELS_DIR / model_file
        if not model.exists():
            print(f"skip {key}: {model} not found", file=sys.stderr)
            continue
        cases = [{"text": s, "ids": tokenize(model, s, True)} for s in STRINGS]
        cases += [
            {"text": s, "parse_special": False, "ids": tokenize(model, s, False)}
            for s in NO_PARSE_SPECIAL
        ]
        doc = {
            "model": model_file,
            "generated_by": "scripts/tokenizer-oracle.py",
            "command": "llama-tokenize -m MODEL --stdin --no-escape --ids --log-disable"
            " [--no-parse-special where parse_special is false]",
            "notes": "BOS as llama-tokenize adds it by default (when the model's"
            " add_bos_token is true); special tokens parsed unless parse_special is false.",
            "cases": cases,
        }
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        path = OUT_DIR / fixture
        # One case per line keeps the fixture readable and its diffs small.
        body = ",\n  ".join(json.dumps(c, ensure_ascii=False) for c in cases)
        head = json.dumps({k: v for k, v in doc.items() if k != "cases"}, ensure_ascii=False, indent=1)
        path.write_text(head[:-2] + ',\n "cases": [\n  ' + body + "\n ]\n}\n")
        print(f"{key}: {len(cases)} cases -> {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
