"""Lays out a Hugging Face cache as huggingface_hub does (blobs named by
their sha256, snapshots/<commit>/ linking into them, refs/<branch or tag>
holding a commit), then asks huggingface_hub itself what it finds there:
scan_cache_dir must see every repository and revision, and
try_to_load_from_cache gives the file each id must resolve to.

usage: hf_cache.py <cache folder> <gguf a> <gguf b> <hf model folder>
Prints a JSON object: id -> the path huggingface_hub resolves.
"""
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from huggingface_hub import scan_cache_dir, try_to_load_from_cache

CACHE, GGUF_A, GGUF_B, FOLDER = (Path(a) for a in sys.argv[1:5])
GGUF_REPO = "embody-test/SmolLM2-135M-Instruct-GGUF"
HF_REPO = "embody-test/tiny-llama"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def commit(repo, revision, files, refs=()):
    """One snapshot: files maps repository names to local files."""
    root = CACHE / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / revision
    for name, src in files.items():
        blob = root / "blobs" / sha256(src)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            try:
                os.link(src, blob)  # the same bytes, without a copy
            except OSError:
                shutil.copyfile(src, blob)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        # huggingface_hub links relatively: ../../blobs/<hash> from the snapshot root.
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(revision)


OLD, NEW, HF = "1" * 40, "2" * 40, "3" * 40
commit(GGUF_REPO, OLD, {"SmolLM2-135M-Instruct-Q4_1.gguf": GGUF_A}, refs=["v1"])
commit(GGUF_REPO, NEW, {"SmolLM2-135M-Instruct-Q4_1.gguf": GGUF_A,
                        "quants/SmolLM2-135M-Instruct-Q8_0.gguf": GGUF_B}, refs=["main"])
commit(HF_REPO, HF, {n: FOLDER / n for n in
                     ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                      "generation_config.json", "model.safetensors"]}, refs=["main"])

info = scan_cache_dir(CACHE)
assert not info.warnings, info.warnings
repos = {r.repo_id: r for r in info.repos}
assert set(repos) == {GGUF_REPO, HF_REPO}, repos
assert {r.commit_hash for r in repos[GGUF_REPO].revisions} == {OLD, NEW}
assert {ref for r in repos[GGUF_REPO].revisions for ref in r.refs} == {"main", "v1"}


def found(repo, name, revision=None):
    p = try_to_load_from_cache(repo, name, cache_dir=CACHE, revision=revision)
    assert isinstance(p, str), f"huggingface_hub does not find {repo}/{name}@{revision}: {p}"
    return p


print(json.dumps({
    f"{GGUF_REPO}:Q4_1": found(GGUF_REPO, "SmolLM2-135M-Instruct-Q4_1.gguf"),
    f"{GGUF_REPO}:q8_0": found(GGUF_REPO, "quants/SmolLM2-135M-Instruct-Q8_0.gguf"),
    f"{GGUF_REPO}@v1": found(GGUF_REPO, "SmolLM2-135M-Instruct-Q4_1.gguf", "v1"),
    HF_REPO: str(Path(found(HF_REPO, "config.json")).parent),
}))
