#!/usr/bin/env python3
"""Render the chat-template fixtures the way Hugging Face transformers does.

transformers compiles chat templates with jinja2's ImmutableSandboxedEnvironment
(trim_blocks=True, lstrip_blocks=True, loopcontrols), a json.dumps-based
`tojson`, and the globals `raise_exception` and `strftime_now`. This script does
the same for each template in engine/tests/fixtures/templates/ over a set of
conversations and writes the outputs to expected.json, which
engine/tests/chat_templates.rs compares our renderer against.

  scripts/template-oracle.py        (needs: pip install jinja2)
"""
import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

DIR = Path(__file__).resolve().parent.parent / "engine/tests/fixtures/templates"

TEMPLATES = {
    # name: (file, bos_token, eos_token) as the model's GGUF / tokenizer_config gives them
    "smollm2": ("smollm2-135m-instruct.jinja", "<|im_start|>", "<|im_end|>"),
    "qwen2.5": ("qwen2.5-coder-0.5b-instruct.jinja", "<|endoftext|>", "<|im_end|>"),
    "gemma3": ("gemma-3-it.jinja", "<bos>", "<eos>"),
}

ROBOT = [
    {"role": "system", "content": "You are a robot arm controller. Answer briefly."},
    {"role": "user", "content": "Move the gripper to the red block."},
    {"role": "assistant", "content": "Moving to (0.25, -0.10, 0.40)."},
    {"role": "user", "content": "Now open the gripper."},
]
TOOLS = [
    {
        "function": {
            "description": "Move the end effector to a position in metres.",
            "name": "move_to",
            "parameters": {
                "properties": {
                    "x": {"type": "number"},
                    "y": {"type": "number"},
                    "z": {"description": "height <= 0.5", "type": "number"},
                },
                "required": ["x", "y", "z"],
                "type": "object",
            },
        },
        "type": "function",
    }
]

CASES = [
    ("multi-turn with system", ROBOT, True, None),
    ("multi-turn with system, no generation prompt", ROBOT, False, None),
    ("no system prompt", [{"role": "user", "content": "Hello! 🤖 ¿Qué tal?"}], True, None),
    ("content with surrounding whitespace", [{"role": "user", "content": "  padded\n\n"}], True, None),
    ("tools", ROBOT[:2], True, {"tools": TOOLS}),
    ("roles out of order", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], True, None),
]


def environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def main():
    env = environment()
    cases = []
    for name, (file, bos, eos) in TEMPLATES.items():
        template = env.from_string((DIR / file).read_text())
        for label, messages, add_generation_prompt, extra in CASES:
            case = {
                "template": name,
                "name": label,
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "bos_token": bos,
                "eos_token": eos,
                "extra": extra,
            }
            try:
                case["expected"] = template.render(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=bos,
                    eos_token=eos,
                    **(extra or {}),
                )
            except jinja2.exceptions.TemplateError as e:
                case["error"] = str(e)
            cases.append(case)
    doc = {
        "generated_by": "scripts/template-oracle.py (jinja2 %s, rendered as transformers does)" % jinja2.__version__,
        "templates": {name: file for name, (file, _, _) in TEMPLATES.items()},
        "cases": cases,
    }
    (DIR / "expected.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"{len(cases)} cases -> {DIR / 'expected.json'}")


if __name__ == "__main__":
    main()
