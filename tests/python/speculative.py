"""Speculative decoding by prompt lookup, through the official `openai`
client. Run by tests/tests/speculative.rs against a daemon serving one GGUF
file twice:

    [[models]] name = "drafted", draft_tokens = 8   (first: /metrics shows it)
    [[models]] name = "plain",   draft_tokens = 0

Every request goes to both and must get the same answer: drafting may only
make decoding faster. Usage: speculative.py BASE_URL. Prints one line per
check and exits non-zero on the first failure.
"""

import concurrent.futures
import json
import sys
import urllib.request

import openai

BASE = sys.argv[1]
client = openai.OpenAI(base_url=BASE + "/v1", api_key="none", max_retries=0, timeout=300)

PERCEPTION = {
    "robot": "arm-2",
    "frame": 1842,
    "objects": [
        {"label": "red cup", "confidence": 0.93, "box": [112, 48, 176, 131], "graspable": True},
        {"label": "blue box", "confidence": 0.88, "box": [301, 90, 402, 188], "graspable": True},
        {"label": "screwdriver", "confidence": 0.71, "box": [20, 210, 140, 236], "graspable": True},
        {"label": "person", "confidence": 0.97, "box": [480, 12, 620, 470], "graspable": False},
    ],
    "gripper": {"state": "open", "force_n": 0.0},
    "mode": "autonomous",
}
REWRITE = (
    "Here is a JSON perception result:\n"
    + json.dumps(PERCEPTION, indent=2)
    + '\nRewrite it with the gripper state changed to "closed". Answer with the JSON only.'
)


def metrics():
    with urllib.request.urlopen(BASE + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def ask(model, **kw):
    r = client.chat.completions.create(model=model, **kw)
    c = r.choices[0]
    logprobs = None
    if c.logprobs is not None:
        logprobs = [(t.token, round(t.logprob, 4)) for t in c.logprobs.content]
    return c.message.content, c.finish_reason, r.usage.completion_tokens, logprobs


def same_on_both(name, **kw):
    a = ask("drafted", **kw)
    b = ask("plain", **kw)
    assert a == b, f"{name}: drafted {a!r}\nplain {b!r}"
    return a


def check(name, f):
    f()
    print(f"ok {name}", flush=True)


def greedy_rewrite():
    before = metrics()
    text, reason, n, _ = same_on_both(
        "rewrite",
        messages=[{"role": "user", "content": REWRITE}],
        temperature=0,
        max_tokens=300,
    )
    after = metrics()
    drafted = after["embodyd_draft_tokens_total"] - before["embodyd_draft_tokens_total"]
    accepted = (
        after["embodyd_draft_accepted_tokens_total"]
        - before["embodyd_draft_accepted_tokens_total"]
    )
    assert '"red cup"' in text and '"screwdriver"' in text, text
    # The answer copies most of the prompt: most of it was drafted and confirmed.
    assert accepted >= n / 3, f"{accepted} of {drafted} drafts accepted for {n} tokens"
    assert accepted <= drafted, (accepted, drafted)
    steps = after["embodyd_decoder_steps_total"] - before["embodyd_decoder_steps_total"]
    # The plain model's steps are not counted here (only the first model's
    # are): the drafted one needed fewer forward passes than tokens.
    assert steps < n, f"{steps} steps for {n} tokens"
    print(f"   {n} tokens, {drafted:.0f} drafted, {accepted:.0f} accepted, {steps:.0f} steps")


def seeded_sampling():
    # Each token is still sampled from its own row with the request's random
    # stream, so a seeded answer does not change either.
    for seed in (1, 2, 3):
        same_on_both(
            "seeded",
            messages=[{"role": "user", "content": REWRITE}],
            temperature=0.9,
            top_p=0.95,
            seed=seed,
            max_tokens=120,
        )


def json_schema_and_logprobs():
    schema = {
        "type": "object",
        "properties": {
            "gripper": {"type": "string", "enum": ["open", "closed"]},
            "objects": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        },
        "required": ["gripper", "objects"],
        "additionalProperties": False,
    }
    text, _, _, logprobs = same_on_both(
        "schema",
        messages=[{"role": "user", "content": REWRITE + " List the object labels."}],
        temperature=0,
        max_tokens=120,
        logprobs=True,
        top_logprobs=2,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "scene", "schema": schema, "strict": True},
        },
    )
    json.loads(text)
    assert logprobs and len(logprobs) > 5, logprobs


def concurrent_requests():
    # Drafting sequences share steps with others decoding and prefilling.
    prompts = [
        REWRITE,
        "Count from one to twenty in words, separated by commas.",
        REWRITE.replace("closed", "half-open"),
        "Name three colours.",
    ]

    def run(model):
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as ex:
            futs = [
                ex.submit(
                    ask,
                    model,
                    messages=[{"role": "user", "content": p}],
                    temperature=0,
                    max_tokens=160,
                )
                for p in prompts
            ]
            return [f.result() for f in futs]

    assert run("drafted") == run("plain")


check("a greedy JSON rewrite is the same with drafts, in fewer steps", greedy_rewrite)
check("seeded sampling is the same with drafts", seeded_sampling)
check("a schema-constrained answer and its logprobs are the same", json_schema_and_logprobs)
check("four concurrent requests get the same answers", concurrent_requests)
