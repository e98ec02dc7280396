"""A ROS 2 peer of embodyd as rmw_zenoh (Jazzy) puts it on the wire, built
from eclipse-zenoh and rosbags only: rosbags computes the type hashes and
serializes real sensor_msgs/msg/Image, sensor_msgs/msg/CompressedImage and
std_msgs/msg/String messages; they are published on rmw_zenoh's keys with its
33-byte attachment, and embodyd's answer is read back as a std_msgs/msg/String.

usage: ros2_interop.py <daemon zenoh endpoint>
Prints one JSON object with what it saw; exits non-zero on any failure.
"""
import json
import struct
import sys
import time
import zlib

import numpy as np
import zenoh
from rosbags.typesys import Stores, get_typestore

ENDPOINT = sys.argv[1]
TS = get_typestore(Stores.ROS2_JAZZY)
STRING, IMAGE, COMPRESSED = (
    "std_msgs/msg/String",
    "sensor_msgs/msg/Image",
    "sensor_msgs/msg/CompressedImage",
)
HASHES = {t: TS.hash_rihs01(t) for t in (STRING, IMAGE, COMPRESSED)}
GID = bytes(range(16))
SEQ = {"n": 0}


def dds(t):
    pkg, kind, name = t.split("/")
    return f"{pkg}::{kind}::dds_::{name}_"


def key(topic, t):
    return f"0/{topic.strip('/')}/{dds(t)}/{HASHES[t]}"


def attachment():
    SEQ["n"] += 1
    return struct.pack("<qqB16s", SEQ["n"], time.time_ns(), 16, GID)


def stamp():
    ns = time.time_ns()
    Time = TS.types["builtin_interfaces/msg/Time"]
    return TS.types["std_msgs/msg/Header"](
        stamp=Time(sec=ns // 10**9, nanosec=ns % 10**9), frame_id="camera"
    )


def png(w, h):
    rows = b"".join(b"\x00" + bytes(v for x in range(w) for v in ((x * 30) % 256, (y * 20) % 256, 90)) for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")


conf = zenoh.Config()
conf.insert_json5("mode", '"peer"')
conf.insert_json5("connect/endpoints", json.dumps([ENDPOINT]))
conf.insert_json5("listen/endpoints", "[]")
conf.insert_json5("scouting/multicast/enabled", "false")
session = zenoh.open(conf)
out = {"hashes": HASHES}

# The graph: embodyd's node and its entities, as `ros2 node list` and
# `ros2 topic list` read them from the liveliness tokens.
deadline = time.time() + 10
tokens = []
while time.time() < deadline:
    tokens = [str(r.ok.key_expr) for r in session.liveliness().get("@ros2_lv/0/**", timeout=2) if r.ok]
    if any("/MP/" in t for t in tokens) and any("/NN/" in t for t in tokens):
        break
    time.sleep(0.2)
entities = []
for t in tokens:
    parts = t.split("/")
    check(parts[0] == "@ros2_lv" and parts[1] == "0" and all(parts), f"token layout: {t}")
    kind, ns, node = parts[5], parts[7].replace("%", "/"), parts[8]
    if kind == "NN":
        check(len(parts) == 9, f"a node token has 9 parts: {t}")
        entities.append(("NN", ns, node, None, None))
    else:
        check(len(parts) == 13, f"an entity token has 13 parts: {t}")
        topic, type_, hash_ = parts[9].replace("%", "/"), parts[10], parts[11]
        entities.append((kind, ns, node, topic, type_))
        tname = {dds(x): x for x in HASHES}[type_]
        check(hash_ == HASHES[tname], f"the token's hash is rosbags' for {tname}: {t}")
out["entities"] = sorted(map(list, entities))
check(("NN", "/", "embodyd", None, None) in entities, f"node /embodyd: {entities}")
check(("MS", "/", "embodyd", "/embodyd/prompt", dds(STRING)) in entities, "prompt subscription")
check(("MP", "/", "embodyd", "/embodyd/answer", dds(STRING)) in entities, "answer publisher")
check(("MS", "/", "embodyd", "/camera/image_raw", dds(IMAGE)) in entities, "image subscription")
check(("MP", "/", "embodyd", "/embodyd/front_task", dds(STRING)) in entities, "task result publisher")

answers = session.declare_subscriber(key("/embodyd/answer", STRING))
task_results = session.declare_subscriber(key("/embodyd/front_task", STRING))


def chat(camera):
    req = {"messages": [{"role": "user", "content": "what is this?"}], "max_tokens": 4,
           "cameras": [{"name": camera, "max_age_ms": 5000}]}
    replies = session.get("embody/ri/chat", payload=json.dumps(req),
                          consolidation=zenoh.ConsolidationMode.NONE, timeout=30)
    return [json.loads(r.ok.payload.to_bytes()) for r in replies if r.ok]


def until_attached(camera):
    deadline = time.time() + 10
    while True:
        events = chat(camera)
        if events[-1].get("code") != "bad_request" or time.time() > deadline:
            return events
        time.sleep(0.1)


# Camera frames: a real sensor_msgs/msg/Image and a CompressedImage (PNG).
W, H = 16, 12
pixels = np.arange(W * H * 3, dtype=np.uint8)
img = TS.types[IMAGE](header=stamp(), height=H, width=W, encoding="rgb8", is_bigendian=0,
                      step=W * 3, data=pixels)
session.put(key("/camera/image_raw", IMAGE), bytes(TS.serialize_cdr(img, IMAGE)), attachment=attachment())
events = until_attached("front")
out["image"] = events
check(events[-1]["type"] == "error" and events[-1]["code"] == "vision_unsupported", f"image attached: {events}")

# The perception task on that camera publishes its results as std_msgs/String
# holding JSON: the frame it attached, and the text-only model's refusal.
deadline = time.time() + 10
while True:
    s = task_results.recv()
    result = json.loads(TS.deserialize_cdr(bytes(s.payload.to_bytes()), STRING).data)
    if result["frame"] is not None or time.time() > deadline:
        break
out["task"] = result
check(result["task"] == "front" and result["frame"]["width"] == W and result["frame"]["height"] == H, f"{result}")
check(result["error"]["code"] == "vision_unsupported", f"{result}")
check(abs(result["frame"]["stamp_ms"] - img.header.stamp.sec * 1000 - img.header.stamp.nanosec // 10**6) <= 1,
      f"the result describes the frame by its header stamp: {result}")

comp = TS.types[COMPRESSED](header=stamp(), format="png", data=np.frombuffer(png(W, H), dtype=np.uint8))
session.put(key("/camera/compressed", COMPRESSED), bytes(TS.serialize_cdr(comp, COMPRESSED)),
            attachment=attachment())
events = until_attached("front_c")
out["compressed"] = events
check(events[-1]["code"] == "vision_unsupported", f"compressed image attached: {events}")


def next_answer():
    s = answers.recv()
    att = bytes(s.attachment.to_bytes())
    check(len(att) == 33, f"the answer's attachment is 33 bytes: {att.hex()}")
    seq, ts, n, gid = struct.unpack("<qqB16s", att)
    check(seq >= 1 and n == 16 and abs(ts - time.time_ns()) < 60 * 10**9, f"attachment {seq} {ts} {n}")
    return TS.deserialize_cdr(bytes(s.payload.to_bytes()), STRING).data, seq


# A prompt in, an answer out, both std_msgs/msg/String.
prompt = TS.types[STRING](data="Name one colour.")
session.put(key("/embodyd/prompt", STRING), bytes(TS.serialize_cdr(prompt, STRING)), attachment=attachment())
text, seq1 = next_answer()
out["answer"] = text
check(not text.startswith("error"), f"an answer, not an error: {text!r}")

# Malformed CDR on the prompt topic: answered with the error, daemon serves on.
session.put(key("/embodyd/prompt", STRING), b"\x00\x01\x00\x00\xff\xff\xff\x7f", attachment=attachment())
text, seq2 = next_answer()
out["malformed_answer"] = text
check(text.startswith("error (bad_request): malformed std_msgs/msg/String on /embodyd/prompt"), text)
check(seq2 == seq1 + 1, f"sequence numbers count up: {seq1} {seq2}")

# A malformed Image: refused, the previous frame stays attached.
session.put(key("/camera/image_raw", IMAGE), bytes(TS.serialize_cdr(img, IMAGE))[:40], attachment=attachment())
time.sleep(0.3)
events = chat("front")
check(events[-1]["code"] == "vision_unsupported", f"the previous frame stays: {events}")

session.close()
print(json.dumps(out))
