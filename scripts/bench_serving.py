"""Serving load generator: drives an OpenAI-compatible server through
/v1/chat/completions (streamed, with the official openai client) and prints time to first token and
throughput for three loads.

  1. sequential: a ~1,000-token system prompt with one question (cold), then
     new questions behind the same system prompt one at a time (warm);
  2. shared:     8 concurrent requests behind that system prompt;
  3. short:      8 concurrent short prompts generating 128 tokens each, and
                 one such request alone.

Prints one JSON object on stdout; scripts/bench-serving.sh runs it against
embodyd and llama-server and compares.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time

from openai import AsyncOpenAI

SYSTEM_SENTENCES = [
    "You are the onboard assistant of a mobile warehouse robot called Orin-7.",
    "The robot carries a 2D lidar on its mast that scans 360 degrees at ten hertz up to twenty metres.",
    "Two depth cameras face forward and see from thirty centimetres to six metres.",
    "A bumper strip around the base stops the drive motors at once when it is pressed.",
    "The arm lifts boxes of up to ten kilograms from shelves between twenty centimetres and two metres high.",
    "The gripper has a force sensor; it reports slip when a box weighs more than it should.",
    "The battery lasts about six hours; below fifteen percent the robot returns to its dock.",
    "Aisles are numbered from one to forty, shelves from A to H, and levels from one to five.",
    "Humans have right of way; slow to half speed within two metres of a person.",
    "Never enter the loading bay while its red light is on.",
    "When asked about an obstacle, name the sensor that saw it and its distance.",
    "Answer briefly, in one or two sentences, and never invent sensor readings.",
]

TOOLS_TEXT = (
    "Tools you may ask for: move_to(aisle, shelf, level), pick(box_id), place(box_id, "
    "aisle, shelf, level), scan(), dock(), report(text). Each tool answers with a JSON "
    "object holding ok, and an error message when ok is false. "
)


def system_prompt(target_words: int = 760) -> str:
    """About 1,000 tokens for SmolLM2's tokenizer."""
    parts, words, i = [], 0, 0
    while words < target_words:
        s = SYSTEM_SENTENCES[i % len(SYSTEM_SENTENCES)]
        if i % len(SYSTEM_SENTENCES) == 0 and i > 0:
            s = f"Section {i // len(SYSTEM_SENTENCES) + 1}. " + TOOLS_TEXT + s
        parts.append(s)
        words += len(s.split())
        i += 1
    return " ".join(parts)


QUESTIONS = [
    "Is aisle 12 clear right now?",
    "How heavy a box can you lift?",
    "What do you do when the battery is low?",
    "Which sensor sees farthest?",
    "Can you enter the loading bay now?",
    "What happens if the bumper is pressed?",
    "How fast do you go near people?",
    "Where is shelf C on level 4 of aisle 30?",
    "What does the gripper's force sensor tell you?",
    "Which tool would you use to bring box 77 to aisle 2?",
    "How far can the depth cameras see?",
    "What should you report after a failed pick?",
]

SHORT_PROMPTS = [
    "Write a short story about a robot that learns to paint.",
    "Explain how a lidar works to a child.",
    "List ideas for a warehouse robot's safety checklist.",
    "Describe a sunrise over a factory.",
    "Write a poem about batteries.",
    "Explain what odometry is and why it drifts.",
    "Tell a story about two robots who meet in an aisle.",
    "Describe the job of a forklift driver.",
]


async def one(client, model, messages, max_tokens):
    """Streams one completion; returns (ttft seconds, total seconds, tokens)."""
    t0 = time.perf_counter()
    ttft = None
    tokens = None
    pieces = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for ev in stream:
        for ch in ev.choices or []:
            if ch.delta and ch.delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                pieces += 1
        if ev.usage:
            tokens = ev.usage.completion_tokens
    total = time.perf_counter() - t0
    return (ttft if ttft is not None else total), total, (tokens if tokens is not None else pieces)


def chat(system, question):
    msgs = [{"role": "user", "content": question}]
    if system:
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


async def run(args):
    system = system_prompt()
    out = {"label": args.label}
    c = AsyncOpenAI(base_url=f"{args.url}/v1", api_key=args.api_key or "none", timeout=600)
    m = args.model or (await c.models.list()).data[0].id
    # 1. Sequential: cold, then warm questions behind the same system prompt.
    cold, _, _ = await one(c, m, chat(system, QUESTIONS[0]), 16)
    warm = []
    for q in QUESTIONS[1:6]:
        t, _, _ = await one(c, m, chat(system, q), 16)
        warm.append(t)
    out["seq_cold_ttft_s"] = cold
    out["seq_warm_ttft_s"] = statistics.median(warm)

    # 2. Eight at once behind the same system prompt.
    t0 = time.perf_counter()
    res = await asyncio.gather(
        *[one(c, m, chat(system, q), args.shared_tokens) for q in QUESTIONS[4:12]]
    )
    wall = time.perf_counter() - t0
    out["shared8_median_ttft_s"] = statistics.median(r[0] for r in res)
    out["shared8_tok_s"] = sum(r[2] for r in res) / wall
    out["shared8_tokens"] = sum(r[2] for r in res)

    # 3. Short prompts, 128 tokens each: one alone, then eight at once.
    _, total, n = await one(c, m, chat(None, SHORT_PROMPTS[0]), 128)
    out["short1_tok_s"] = n / total
    t0 = time.perf_counter()
    res = await asyncio.gather(*[one(c, m, chat(None, p), 128) for p in SHORT_PROMPTS])
    wall = time.perf_counter() - t0
    out["short8_tok_s"] = sum(r[2] for r in res) / wall
    out["short8_tokens"] = sum(r[2] for r in res)
    await c.close()
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--label", default="server")
    p.add_argument("--model", default="", help="model id (default: the server's first)")
    p.add_argument("--api-key", default="")
    p.add_argument("--shared-tokens", type=int, default=64, help="tokens per request of load 2")
    args = p.parse_args()
    try:
        asyncio.run(run(args))
    except Exception as e:  # noqa: BLE001 - report and fail
        print(f"{args.label}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
