"""The robot scenario, end to end (run by scripts/bench-robot-vision.sh).

  bench_robot_vision.py ZENOH_ENDPOINT HTTP_URL IMAGE.png SECONDS

A camera publishes PNG frames at 30 Hz over zenoh (each frame differs: a
counter in its first pixels); the daemon's perception task asks about the
latest frame every second and publishes results with the frame's age. Then
the camera stops, and a new frame is asked about twice over HTTP
(as a data: URL): the second time the encoder and the prefill of the image's
rows are skipped. Prints one line per figure.
"""
import base64
import json
import statistics
import sys
import threading
import time
import zlib
import struct

import openai
import zenoh

endpoint, url, image, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
base = open(image, "rb").read()


def chunks(png):
    pos, out = 8, []
    while pos < len(png):
        length = struct.unpack(">I", png[pos:pos + 4])[0]
        out.append((png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


parts = chunks(base)
ihdr = parts[0][1]
pixels = bytearray(zlib.decompress(b"".join(d for k, d in parts if k == b"IDAT")))


def frame(n):
    """The PNG with n written into the first pixels of its first row: every
    frame's bytes differ, as a real camera's do."""
    raw = bytearray(pixels)
    # After the row's filter byte; whatever the filter, any bytes decode.
    raw[1:9] = struct.pack(">Q", n)
    out = bytearray(base[:8])
    for kind, data in [(b"IHDR", ihdr), (b"IDAT", zlib.compress(bytes(raw), 1)), (b"IEND", b"")]:
        out += struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return bytes(out)

conf = zenoh.Config()
conf.insert_json5("mode", '"client"')
conf.insert_json5("connect/endpoints", json.dumps([endpoint]))
session = zenoh.open(conf)
results = []
sub = session.declare_subscriber("embody/bench/tasks/look",
                                 lambda s: results.append(json.loads(s.payload.to_bytes())))
stop = threading.Event()


def camera():
    n, period = 0, 1 / 30
    next_t = time.monotonic()
    while not stop.is_set():
        session.put("bench/front", frame(n))
        n += 1
        next_t += period
        time.sleep(max(0.0, next_t - time.monotonic()))
    print(f"camera: {n} frames in {seconds:.0f} s ({n / seconds:.1f} Hz)")


t = threading.Thread(target=camera)
t.start()
time.sleep(seconds)
stop.set()
t.join()
ok = [r for r in results if not r.get("error")]
if not ok:
    sys.exit(f"no perception result without error: {results[:3]}")
lat = [r["latency_ms"] for r in ok]
age = [r["frame"]["age_ms"] for r in ok]
skipped = sum(r.get("skipped_ticks", 0) for r in ok)
print(f"perception: {len(ok)} results ({len(results) - len(ok)} errors, {skipped} ticks skipped while a run went on), "
      f"latency median {statistics.median(lat):.0f} ms, frame age at attach median {statistics.median(age):.0f} ms, "
      f"answer {ok[-1]['text']!r}")

# A frame the daemon has not seen, asked about twice: the second time its rows
# come from the image cache and their KV from the prefix cache. First, let the
# task run still going on the last frame finish (later ticks find the frame
# stale and fail at once).
time.sleep(15)
client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
model = client.models.list().data[0].id
fresh = "data:image/png;base64," + base64.b64encode(frame(10**9)).decode()
ttft = []
for i in range(2):
    t0 = time.monotonic()
    stream = client.chat.completions.create(
        model=model, stream=True, temperature=0, max_tokens=4,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": fresh}},
            {"type": "text", "text": "What is in front of the robot?"}]}])
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - t0
    ttft.append(first * 1000)
print(f"same frame: first question {ttft[0]:.0f} ms to the first token, again {ttft[1]:.0f} ms "
      f"({ttft[1] / ttft[0]:.3f} of the first)")
session.close()
