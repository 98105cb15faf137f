"""`make check-vllm`: serve a kakehashi LLaVA export with vLLM (CPU build, its own venv) and check that its greedy
answers equal transformers' on freshly drawn shapes.

Run with the vLLM venv's python (tests/interop/install_vllm.sh): `python tests/interop/check_vllm.py EXPORT`.
Prints one JSON document (the answers of both and how many agree); exits 1 when any answer differs.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # data_pipelines.synthetic.synth draws the shapes the tiny recipe trains on

QUESTION = "この図形は何色ですか？"
SERVER_START_BOUND = 900  # seconds: vLLM's CPU start-up compiles and profiles; a bound, not a timing


def fresh_shapes(samples: int, seed: int) -> list:
    from data_pipelines.synthetic.synth import COLOURS, SHAPES, draw_shape

    rng = random.Random(seed)
    return [draw_shape(rng, rng.choice(SHAPES), rng.choice(list(COLOURS)), 64) for _ in range(samples)]


def transformers_answers(export: Path, images: list, max_new_tokens: int) -> list[str]:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(export).eval()
    processor = AutoProcessor.from_pretrained(export)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    answers = []
    for image in images:
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return [a.strip() for a in answers]


def serve(export: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export), "--port",
               str(port), "--dtype", "float32", "--max-model-len", "256", "--served-model-name", "export"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + SERVER_START_BOUND
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vllm serve exited with {server.returncode}; its log:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    server.kill()
    raise SystemExit(f"vllm serve did not answer /health within {SERVER_START_BOUND} s; log: {log}")


def vllm_answer(port: int, image, max_new_tokens: int) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"model": "export", "temperature": 0.0, "max_tokens": max_new_tokens,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": QUESTION}]}]}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)["choices"][0]["message"]["content"].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--seed", type=int, default=4242, help="drawing seed (training data uses others)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    export = Path(args.export).resolve()
    images = fresh_shapes(args.samples, args.seed)
    expected = transformers_answers(export, images, args.max_new_tokens)
    server = serve(export, args.port, export.parent / "vllm-serve.log")
    try:
        served = [vllm_answer(args.port, image, args.max_new_tokens) for image in images]
    finally:
        server.terminate()
        server.wait(timeout=60)
    import transformers
    import vllm

    equal = sum(a == b for a, b in zip(served, expected))
    print(json.dumps({"vllm": vllm.__version__, "transformers": transformers.__version__, "samples": len(images),
                      "equal": equal, "vllm_answers": served, "transformers_answers": expected},
                     ensure_ascii=False, indent=1))
    return 0 if equal == len(images) else 1


if __name__ == "__main__":  # vLLM spawns worker processes that import this module
    sys.exit(main())
