"""Vision through the HTTP API with the official openai client.

  vision_openai.py URL FIXTURE_DIR EXPECTED_TEXT

The fixture folder holds a tiny Qwen2-VL-family model, its images and the
prompt transformers answered; EXPECTED_TEXT is that answer (greedy). Each
check prints "ok <name>"; the first failure raises.
"""
import base64
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import openai

url, fixture, expected = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
meta = json.loads((fixture / "expected_prompt.json").read_text())
MODEL = client.models.list().data[0].id


def data_url(raw, media="image/png"):
    return f"data:{media};base64," + base64.b64encode(raw).decode()


def png(width, height):
    """A valid grey PNG of the given size, written by hand (no Pillow here)."""
    row = b"\x00" + b"\x80" * width
    body = zlib.compress(row * height)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def ask(images, text=meta["prompt"], **kw):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    content.append({"type": "text", "text": text})
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}],
        temperature=0, max_tokens=kw.pop("max_tokens", 8), **kw)


images = [data_url((fixture / name).read_bytes()) for name in meta["images"]]

r = ask(images)
assert r.choices[0].message.content == expected, (r.choices[0].message.content, expected)
prompt_tokens = r.usage.prompt_tokens
assert prompt_tokens > 40, r.usage
print("ok the answer about the fixture's images is transformers' greedy answer")

r = ask(images)
assert r.choices[0].message.content == expected
assert r.usage.prompt_tokens == prompt_tokens
print("ok asking again about the same images gives the same answer")

stream = ask(images, stream=True)
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
assert text == expected, (text, expected)
print("ok streamed")


def refused(images, needle):
    try:
        ask(images)
    except openai.BadRequestError as e:
        body = json.dumps(e.body)
        assert needle in body, body
        return
    raise AssertionError(f"accepted an image that should be refused ({needle})")


refused([data_url(b"not an image at all")], "cannot be decoded")
refused([data_url(png(3, 100))], "at least")
refused([data_url(png(1000, 4))], "aspect ratio")
refused([data_url(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)], "cannot be decoded")
print("ok broken, tiny and elongated images are refused with 400 and a reason")

# A text-only question and a small valid image still work after the refusals.
r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                   temperature=0, max_tokens=4)
assert r.choices[0].finish_reason in ("stop", "length")
r = ask([data_url(png(40, 30))])
assert r.choices[0].finish_reason in ("stop", "length")
print("ok the daemon keeps serving text and images after refusing bad ones")
