"""Drives embodyd's HTTP API with the official `openai` client (and plain
HTTP where the client cannot send what is tested). Run by
tests/tests/http_openai.rs against a daemon on SmolLM2 started with:

    [decoder] max_running = 2, max_queued = 2
    [http]    api_key = "sekrit", max_body_bytes = 1048576

Usage: http_openai.py BASE_URL DAEMON_PID. Prints one line per check and
exits non-zero on the first failure. The last check drains the daemon.
"""

import concurrent.futures
import http.client
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import jsonschema
import openai

BASE, PID = sys.argv[1], int(sys.argv[2])
KEY = "sekrit"
client = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=300)
MODEL = client.models.list().data[0].id


def raw(method, path, body=None, headers=None, key=KEY):
    """One plain HTTP request; returns (status, parsed JSON or text)."""
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def metrics():
    _, text = raw("GET", "/metrics", key=None)
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(what):
    """Waits until no request runs or waits (KV blocks the prefix cache keeps
    for reuse may stay in use)."""
    deadline = time.time() + 30
    while True:
        m = metrics()
        if m["embodyd_requests_running"] == 0 and m["embodyd_queue_depth"] == 0 and m["embodyd_requests_in_flight"] == 0:
            return m
        assert time.time() < deadline, f"{what}: still busy after 30 s: {m}"
        time.sleep(0.1)


def healthy():
    status, body = raw("GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok", (status, body)


def expect_error(status, fn, code=None, param=None):
    try:
        fn()
    except openai.APIStatusError as e:
        assert e.status_code == status, f"expected {status}, got {e.status_code}: {e.body}"
        body = e.body if isinstance(e.body, dict) else {}
        err = body.get("error", body)
        assert set(err) >= {"message", "type", "param", "code"}, err
        if code is not None:
            assert err["code"] == code, err
        if param is not None:
            assert err["param"] == param, err
        return err
    raise AssertionError(f"expected HTTP {status}, the call succeeded")


def user(text):
    return [{"role": "user", "content": text}]


CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


@check
def models_list_the_loaded_model():
    models = client.models.list().data
    assert len(models) == 1 and models[0].owned_by == "embodyd", models
    assert client.models.retrieve(MODEL).id == MODEL


@check
def plain_chat_and_usage_match_the_tokens():
    r = client.chat.completions.create(
        model=MODEL, messages=user("Name three colors."), max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
    )
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content, r
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-"), r
    assert r.usage.completion_tokens == len(c.logprobs.content), (r.usage, len(c.logprobs.content))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 12, r.usage
    assert "".join(t.token for t in c.logprobs.content).strip() == c.message.content.strip()
    for t in c.logprobs.content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2, t
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob, t
    # The same conversation costs the same prompt tokens; a longer one more.
    r2 = client.chat.completions.create(model=MODEL, messages=user("Name three colors."), max_tokens=1)
    r3 = client.chat.completions.create(model=MODEL, messages=user("Name three colors, please, now."), max_tokens=1)
    assert r2.usage.prompt_tokens == r.usage.prompt_tokens < r3.usage.prompt_tokens, (r.usage, r2.usage, r3.usage)
    return c.message.content


@check
def streamed_chat_matches_the_whole_answer():
    whole = client.chat.completions.create(model=MODEL, messages=user("Say hello."), max_tokens=10, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=user("Say hello."), max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content, (text, whole)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason], finals
    assert chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens, (chunks[-1].usage, whole.usage)
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


ROBOT = {
    "type": "object",
    "properties": {
        "action": {"type": "string", "enum": ["grasp", "place", "wait"]},
        "speed": {"type": "integer", "minimum": 0, "maximum": 10},
        "gripper_open": {"type": "boolean"},
    },
    "required": ["action", "speed", "gripper_open"],
    "additionalProperties": False,
}


@check
def json_schema_answers_always_validate():
    fmt = {"type": "json_schema", "json_schema": {"name": "robot_command", "schema": ROBOT, "strict": True}}

    def sample(seed):
        r = client.chat.completions.create(
            model=MODEL, messages=user("Give the robot its next command."), max_tokens=60,
            temperature=1.0, seed=seed, response_format=fmt,
        )
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", (seed, r)
        jsonschema.validate(json.loads(text), ROBOT)
        return text

    # Two at a time: both decoding slots, never more than the queue allows.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(sample, range(20)))
    assert len(answers) == 20
    # json_object: any object.
    r = client.chat.completions.create(
        model=MODEL, messages=user("Describe a cup as JSON."), max_tokens=40, temperature=0,
        response_format={"type": "json_object"},
    )
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict), text
    else:
        assert text.startswith("{"), text


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
FORCED = []
GRIP = {
    "type": "function",
    "function": {"name": "set_gripper", "parameters": {"type": "object", "properties": {"open": {"type": "boolean"}}, "required": ["open"]}},
}


@check
def required_tool_calls_follow_the_schema():
    r = client.chat.completions.create(
        model=MODEL, messages=user("What is the weather in Oslo?"), max_tokens=60, temperature=0.7, seed=1,
        tools=[WEATHER, GRIP], tool_choice="required",
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", r
    assert c.message.content is None, r
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_"), call
    schema = {"get_weather": WEATHER, "set_gripper": GRIP}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    FORCED.append(call)


@check
def named_tool_calls_stream_as_deltas():
    stream = client.chat.completions.create(
        model=MODEL, messages=user("Open the gripper."), max_tokens=40, temperature=0,
        tools=[WEATHER, GRIP], tool_choice={"type": "function", "function": {"name": "set_gripper"}}, stream=True,
    )
    calls = {}
    finish = None
    for chunk in stream:
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or d.id
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1, (finish, calls)
    call = calls[0]
    assert call["name"] == "set_gripper" and call["id"], call
    jsonschema.validate(json.loads(call["arguments"]), GRIP["function"]["parameters"])


@check
def tool_results_round_trip():
    call = FORCED[0]
    messages = user("What is the weather in Oslo?") + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}
        ]},
        {"role": "tool", "tool_call_id": call.id, "content": "4 degrees and raining"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, tools=[WEATHER, GRIP])
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls"), r
    # The tool's answer is in the prompt: it costs more than the question alone.
    alone = client.chat.completions.create(model=MODEL, messages=user("What is the weather in Oslo?"), max_tokens=1, tools=[WEATHER, GRIP])
    assert r.usage.prompt_tokens > alone.usage.prompt_tokens + 5, (r.usage, alone.usage)
    # tool_choice none hides the tools: the prompt is the plain conversation's.
    none = client.chat.completions.create(model=MODEL, messages=user("What is the weather in Oslo?"), max_tokens=1, tools=[WEATHER], tool_choice="none")
    plain = client.chat.completions.create(model=MODEL, messages=user("What is the weather in Oslo?"), max_tokens=1)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < alone.usage.prompt_tokens


@check
def text_completions():
    r = client.completions.create(model=MODEL, prompt="The robot arm", max_tokens=8, temperature=0, logprobs=2)
    c = r.choices[0]
    assert r.object == "text_completion" and c.text, r
    assert len(c.logprobs.tokens) == r.usage.completion_tokens, (c.logprobs, r.usage)
    assert "".join(c.logprobs.tokens) == c.text
    streamed = "".join(
        ch.choices[0].text for ch in client.completions.create(
            model=MODEL, prompt="The robot arm", max_tokens=8, temperature=0, stream=True) if ch.choices
    )
    assert streamed == c.text, (streamed, c.text)


@check
def errors_have_openai_shape_and_status():
    bad = openai.OpenAI(base_url=BASE + "/v1", api_key="wrong", max_retries=0)
    expect_error(401, lambda: bad.models.list(), code="invalid_api_key")
    status, body = raw("GET", "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key", (status, body)
    expect_error(404, lambda: client.chat.completions.create(model="gpt-4o", messages=user("hi")), param="model")
    status, body = raw("POST", "/v1/nowhere", {"x": 1})
    assert status == 404 and body["error"]["type"] == "invalid_request_error", (status, body)
    status, body = raw("GET", "/v1/chat/completions")
    assert status == 405, (status, body)
    expect_error(400, lambda: client.chat.completions.create(model=MODEL, messages=user("hi"), n=2), param="n")
    expect_error(400, lambda: client.chat.completions.create(model=MODEL, messages=user("hi"), temperature=5), param="temperature")
    expect_error(400, lambda: client.chat.completions.create(model=MODEL, messages=[]), param="messages")
    expect_error(400, lambda: client.chat.completions.create(model=MODEL, messages=user("hi"), extra_body={"frobnicate": 1}), param="frobnicate")
    err = expect_error(400, lambda: client.chat.completions.create(
        model=MODEL, messages=user("hi"),
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}))
    assert "schema" in err["message"], err
    err = expect_error(400, lambda: client.chat.completions.create(
        model=MODEL, messages=user("hi"),
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}))
    assert "frobnicate" in err["message"], err
    # A schema that is only a reference to itself compiles and admits nothing:
    # refused before generation, naming the problem.
    err = expect_error(400, lambda: client.chat.completions.create(
        model=MODEL, messages=user("hi"),
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}))
    assert err["code"] == "bad_request" and "refers to itself" in err["message"], err
    for body in [b"{", b"[]", b'{"model": 3, "messages": []}', b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "robot", "content": "x"}]}', b"\xff\xfe"]:
        status, resp = raw("POST", "/v1/chat/completions", body)
        assert status == 400 and "error" in resp, (body, status, resp)
    # Images: a data: URL reaches the model's "no vision" answer; unknown cameras are refused.
    png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    err = expect_error(400, lambda: client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": png}}]}]))
    assert err["code"] == "vision_unsupported", err
    err = expect_error(400, lambda: client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "camera:front?max_age_ms=500"}}]}]))
    assert "front" in err["message"], err
    # Too large for the body limit: 413. Within it but beyond the context: 400.
    expect_error(413, lambda: client.chat.completions.create(model=MODEL, messages=user("robot " * 2_000_000)))
    err = expect_error(400, lambda: client.chat.completions.create(model=MODEL, messages=user("robot " * 100_000)))
    assert "context" in err["message"], err
    healthy()


@check
def a_full_queue_is_429_and_disconnects_free_their_slots():
    before = metrics()
    results, conns = [], []
    lock = threading.Lock()

    def open_stream():
        # Plain HTTP: the stream is held open, unread, then dropped.
        conn = http.client.HTTPConnection(urllib.parse.urlparse(BASE).netloc, timeout=300)
        body = json.dumps({"model": MODEL, "messages": user("Tell a long story about robots."),
                           "max_tokens": 400, "stream": True})
        conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        with lock:
            results.append(resp.status)
            conns.append((conn, resp))

    threads = [threading.Thread(target=open_stream) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # max_running = 2 and max_queued = 2: at most 4 are taken, the rest refused.
    assert results.count(200) <= 4 and results.count(429) >= 4, results
    assert set(results) <= {200, 429}, results
    m = metrics()
    assert m["embodyd_requests_running"] >= 1, m
    refused = [r for c, r in conns if r.status == 429]
    err = json.loads(refused[0].read())
    assert err["error"]["code"] == "overloaded" and err["error"]["type"] == "rate_limit_error", err
    # Read a little of one stream, then hang up on every one.
    live = [r for c, r in conns if r.status == 200]
    first = live[0].readline()
    assert first.startswith(b"data: "), first
    for c, r in conns:
        c.close()
    after = wait_idle("after the clients disconnected")
    cancelled = after['embodyd_requests_total{interface="http",outcome="cancelled"}'] - before['embodyd_requests_total{interface="http",outcome="cancelled"}']
    assert cancelled >= len(live), (cancelled, len(live))
    assert after['embodyd_requests_total{interface="http",outcome="overloaded"}'] >= 4, after
    assert after["embodyd_time_to_first_token_seconds_count"] > 0, after
    assert after["embodyd_completion_tokens_total"] > 0, after
    healthy()


@check
def flush_cache_frees_the_cached_prefixes():
    prompt = user("Name three sensors a mobile robot carries, with one sentence about each of them.")
    client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=2, temperature=0)
    before = wait_idle("before the flush")
    assert before["embodyd_kv_blocks_cached"] > 0, before
    status, _ = raw("POST", "/flush_cache", key=None)
    assert status == 401, status
    status, body = raw("POST", "/flush_cache")
    assert status == 200, (status, body)
    assert body["freed_blocks"] == before["embodyd_kv_blocks_cached"], (body, before)
    after = metrics()
    assert after["embodyd_kv_blocks_cached"] == 0, after
    hits = after["embodyd_prefix_hit_tokens_total"]
    client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=2, temperature=0)
    assert metrics()["embodyd_prefix_hit_tokens_total"] == hits, "a flushed prefix was reused"


@check
def draining_answers_503_and_finishes_what_runs():
    stream = client.chat.completions.create(model=MODEL, messages=user("Count to twenty."), max_tokens=40, temperature=0, stream=True)
    first = next(iter(stream))
    os.kill(PID, signal.SIGTERM)
    deadline = time.time() + 10
    while True:
        status, body = raw("GET", "/health", key=None)
        if status == 503:
            break
        assert time.time() < deadline, (status, body)
        time.sleep(0.05)
    assert body["status"] == "draining", body
    expect_error(503, lambda: client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2))
    rest = list(stream)
    finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"]), (first, rest)


for fn in CHECKS:
    t = time.time()
    fn()
    print(f"ok {fn.__name__} ({time.time() - t:.1f} s)", flush=True)
