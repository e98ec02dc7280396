"""A model's life driven and watched over zenoh with the Python zenoh client:
subscribe to <prefix>/models/events, load a second model through the
<prefix>/models/load queryable, ask it a question through <prefix>/chat,
unload it through <prefix>/models/unload, and try a load that cannot work.
What must hold: the load and unload replies carry the model's entry in the
state reached; the events arrive as loading, ready, draining, unloaded;
the bad load's reply is an error with a code and a message.

usage: models_zenoh.py <daemon endpoint> <prefix> <model path>
Prints one JSON object with what it saw; exits non-zero on any failure.
"""
import json
import sys
import time

import zenoh

ENDPOINT, PREFIX, MODEL = sys.argv[1], sys.argv[2], sys.argv[3]

c = zenoh.Config()
c.insert_json5("mode", '"client"')
c.insert_json5("connect/endpoints", json.dumps([ENDPOINT]))
c.insert_json5("scouting/multicast/enabled", "false")
s = zenoh.open(c)

events = []
sub = s.declare_subscriber(f"{PREFIX}/models/events",
                           lambda sample: events.append(json.loads(sample.payload.to_string())))
time.sleep(0.5)  # the subscription reaches the daemon


def query(key, body, timeout=60):
    replies = list(s.get(f"{PREFIX}/{key}", payload=json.dumps(body), timeout=timeout))
    assert len(replies) == 1, f"{key}: one reply, got {len(replies)}"
    r = replies[0]
    if r.ok is not None:
        return True, json.loads(r.ok.payload.to_string())
    return False, json.loads(r.err.payload.to_string())


ok, entry = query("models/load", {"name": "second", "path": MODEL, "kv_cache_mb": 16})
assert ok, f"the load failed: {entry}"
assert entry["name"] == "second" and entry["state"] == "ready", entry
assert entry["memory_bytes"] > 16 << 20, entry

answer = []
ask = json.dumps({"model": "second", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
for r in s.get(f"{PREFIX}/chat", payload=ask, consolidation=zenoh.ConsolidationMode.NONE, timeout=60):
    answer.append(json.loads(r.ok.payload.to_string()))
assert answer and answer[-1]["type"] == "finished", answer

ok, entry = query("models/unload", {"name": "second"})
assert ok and entry["state"] == "unloaded" and entry["memory_bytes"] == 0, entry

ok, err = query("models/load", {"name": "third", "path": "no/such-model"})
assert not ok and err["code"] == "model_not_found" and "Hugging Face cache" in err["message"], err
ok, err = query("models/load", {"name": "x", "pathh": MODEL})
assert not ok and err["code"] == "bad_request", err

deadline = time.time() + 10
while len([e for e in events if e["name"] == "second"]) < 4 and time.time() < deadline:
    time.sleep(0.05)
states = [e["state"] for e in events if e["name"] == "second"]
assert states == ["loading", "ready", "draining", "unloaded"], states
sub.undeclare()
s.close()
print(json.dumps({"states": states, "answer_events": len(answer)}))
