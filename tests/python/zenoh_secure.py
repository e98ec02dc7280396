"""Clients of embodyd under configs/zenoh-secure.json5, with the Python zenoh
client: the daemon is the router, every client logs in, access control gives
each user its part. What must hold: a logged-in robot asks and gets its
answer; a connection without a login, or with a wrong password, reaches
nothing; an impostor's queryable on the chat key never sees a query nor
answers one; a snoop on the response topics reads nothing of a planner's
stream; a forged "finished" published into that stream never arrives.

usage: zenoh_secure.py <router endpoint> <prefix> <users file>
(the users file holds user:password lines). Prints one JSON object with
what it saw; exits non-zero on any failure.
"""
import json
import sys
import time

import zenoh

ENDPOINT, PREFIX, USERS = sys.argv[1], sys.argv[2], sys.argv[3]
PASSWORDS = dict(l.strip().split(":", 1) for l in open(USERS) if ":" in l)
ASK = json.dumps({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4})


def session(user=None, password=None):
    c = zenoh.Config()
    c.insert_json5("mode", '"client"')
    c.insert_json5("connect/endpoints", json.dumps([ENDPOINT]))
    c.insert_json5("scouting/multicast/enabled", "false")
    c.insert_json5("connect/timeout_ms", "3000")
    if user is not None:
        c.insert_json5("transport/auth/usrpwd/user", json.dumps(user))
        c.insert_json5("transport/auth/usrpwd/password", json.dumps(password))
    return zenoh.open(c)


def login(user):
    return session(user, PASSWORDS[user])


def chat(s, timeout=60):
    events = []
    for r in s.get(f"{PREFIX}/chat", payload=ASK, consolidation=zenoh.ConsolidationMode.NONE, timeout=timeout):
        assert r.ok is not None, f"an error reply: {r.err.payload.to_string() if r.err else r}"
        events.append(json.loads(r.ok.payload.to_string()))
    return events


def refused(user, password):
    """Whether a session with this login (None: none) reaches nothing."""
    try:
        s = session(user, password)
    except Exception as e:  # zenoh refuses to open: the login failed
        return f"open failed: {e}"
    try:
        replies = list(s.get(f"{PREFIX}/status", timeout=2))
        assert not replies, f"a session logged in as {user!r} got {len(replies)} status replies"
        return "opened, reached nothing"
    finally:
        s.close()


seen = {}

# A robot asks and is answered; the answer is its own.
robot = login("robot")
# The daemon declares its key space once it serves: wait for its token.
deadline = time.time() + 30
while not list(robot.liveliness().get(f"{PREFIX}/alive", timeout=1)):
    assert time.time() < deadline, "the daemon's alive token never appeared"
    time.sleep(0.1)
events = chat(robot)
assert events and events[-1]["type"] == "finished", events
seen["robot_answer"] = [e["type"] for e in events]
status = [json.loads(r.ok.payload.to_string()) for r in robot.get(f"{PREFIX}/status", timeout=10)]
assert len(status) == 1 and status[0]["ready"], status

# No login, a wrong password, an unknown user: nothing.
seen["no_login"] = refused(None, None)
seen["wrong_password"] = refused("robot", "not-the-password")
seen["unknown_user"] = refused("mallory", "x")

# An impostor (a logged-in robot) declares a queryable on the chat key.
impostor = login("robot")
asked = []


def answer(q):
    asked.append(q.key_expr)
    q.reply(q.key_expr, json.dumps({"type": "finished", "reason": "stop", "usage": {"prompt_tokens": 0, "completion_tokens": 666}}))


fake = impostor.declare_queryable(f"{PREFIX}/chat", answer)
time.sleep(1.0)
events = chat(robot)
assert events and events[-1]["type"] == "finished", events
assert all(e.get("usage", {}).get("completion_tokens") != 666 for e in events), f"the impostor answered: {events}"
assert not asked, f"the impostor's queryable was asked {len(asked)} times"
seen["impostor_asked"] = len(asked)

# A planner uses the request/response topics; a snoop (a robot) listens to
# every response stream and a forger publishes into the planner's.
planner = login("planner")
snoop = login("robot")
snooped = []
snoop_sub = snoop.declare_subscriber(f"{PREFIX}/responses/**", lambda s: snooped.append(s.payload.to_string()))
got = []
sub = planner.declare_subscriber(f"{PREFIX}/responses/plan-1", lambda s: got.append(json.loads(s.payload.to_string())))
time.sleep(1.0)
forger = login("robot")
forger.put(f"{PREFIX}/responses/plan-1", json.dumps({"type": "error", "code": "internal", "message": "forged"}))
planner.put(f"{PREFIX}/requests", json.dumps({"id": "plan-1", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}))
deadline = time.time() + 60
while not (got and got[-1]["type"] in ("finished", "error")) and time.time() < deadline:
    time.sleep(0.05)
assert got and got[-1]["type"] == "finished", f"the planner's stream: {got}"
assert all(e.get("message") != "forged" for e in got), f"a forged event arrived: {got}"
time.sleep(0.5)
assert not snooped, f"the snoop read {len(snooped)} response events"
seen["planner_answer"] = [e["type"] for e in got]
seen["snooped"] = len(snooped)

# A robot may not use the request topic.
robot_sub = []
rs = planner.declare_subscriber(f"{PREFIX}/responses/robot-1", lambda s: robot_sub.append(s))
time.sleep(0.5)
forger.put(f"{PREFIX}/requests", json.dumps({"id": "robot-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
time.sleep(2.0)
assert not robot_sub, "a robot's published request was served"

for s in (robot, impostor, planner, snoop, forger):
    s.close()
print(json.dumps(seen))
