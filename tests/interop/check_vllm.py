"""`make check-vllm`: serve a kakehashi LLaVA export with vLLM (CPU build, its own venv) and check that its greedy
answers equal transformers' on freshly drawn shapes. `make check-vllm-tiles` does the same for a tiled export
(LlavaOnevisionForConditionalGeneration): the images then come in several sizes, so that several tile grids are
served, and the export's processor files are loaded by transformers' own LlavaOnevisionProcessor (AutoProcessor,
torchvision being in this venv), whose input_ids must equal kakehashi's OnevisionProcessor's for every image.

Run with the vLLM venv's python (tests/interop/install_vllm.sh): `python tests/interop/check_vllm.py EXPORT`.
Prints one JSON document (the answers of both and how many agree); exits 1 when any answer or input_ids differ.
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
TILED = "LlavaOnevisionForConditionalGeneration"
# (width, height) in turn for a tiled export, from 64x64 shapes: grids of 2x2, 1x3, 3x1, 1x1 and 1x4 tiles of 32 px
TILED_SIZES = [(64, 64), (96, 40), (40, 96), (28, 28), (128, 48)]


def architecture(export: Path) -> str:
    """What config.json says the export is; vLLM picks its classes by the same field."""
    return json.loads((export / "config.json").read_text())["architectures"][0]


def fresh_shapes(samples: int, seed: int, sizes: list[tuple[int, int]] | None = None) -> list:
    """`samples` shapes of 64x64, resized in turn to `sizes` when given."""
    from PIL import Image

    from data_pipelines.synthetic.synth import COLOURS, SHAPES, draw_shape

    rng = random.Random(seed)
    images = [draw_shape(rng, rng.choice(SHAPES), rng.choice(list(COLOURS)), 64) for _ in range(samples)]
    if sizes:
        images = [image.resize(sizes[i % len(sizes)], Image.Resampling.BICUBIC) for i, image in enumerate(images)]
    return images


MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def tiled_inputs_agree(export: Path, processor, prompt: str, images: list) -> dict:
    """transformers' LlavaOnevisionProcessor (`processor`) against kakehashi's OnevisionProcessor on the same prompt
    and images: the chat template's text, input_ids (so each image's number of image tokens) and image_sizes equal;
    the largest pixel difference is reported."""
    from train.models.onevision import OnevisionProcessor

    ours = OnevisionProcessor.from_pretrained(export)
    ours_prompt = ours.apply_chat_template(MESSAGES, add_generation_prompt=True)
    equal, tokens, pixels = 0, [], 0.0
    for image in images:
        theirs, mine = processor(images=[image], text=prompt, return_tensors="pt"), ours(images=[image], text=prompt)
        same = (ours_prompt == prompt and theirs["input_ids"].tolist() == mine["input_ids"].tolist()
                and theirs["image_sizes"].tolist() == mine["image_sizes"].tolist())
        equal += same
        tokens.append(int((theirs["input_ids"] == processor.image_token_id).sum()))
        pixels = max(pixels, float((theirs["pixel_values"] - mine["pixel_values"]).abs().max()))
    return {"input_ids_equal": equal, "image_tokens": tokens, "pixel_values_max_diff": pixels}


def transformers_answers(export: Path, images: list, max_new_tokens: int) -> tuple[list[str], dict]:
    """The greedy answers of transformers' class for the export's architecture, and (for a tiled export) how its
    processor's inputs compare with kakehashi's."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    tiled = architecture(export) == TILED
    model_class = LlavaOnevisionForConditionalGeneration if tiled else LlavaForConditionalGeneration
    model = model_class.from_pretrained(export).eval()
    processor = AutoProcessor.from_pretrained(export)
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs_check = tiled_inputs_agree(export, processor, prompt, images) if tiled else {}
    answers = []
    for image in images:
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return [a.strip() for a in answers], inputs_check


def serve(export: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export), "--port",
               str(port), "--dtype", "float32", "--max-model-len", "256", "--served-model-name", "export"]
    # a tiled export serves images only: otherwise vLLM's start-up profiles a dummy video, which LlavaOnevisionProcessor
    # refuses, kakehashi's tokenizers having no <video> token ("Mismatch in `video` token count ... ids=[0] text=[65]")
    if architecture(export) == TILED:
        command += ["--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0})]
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
    images = fresh_shapes(args.samples, args.seed, TILED_SIZES if architecture(export) == TILED else None)
    expected, inputs_check = transformers_answers(export, images, args.max_new_tokens)
    server = serve(export, args.port, export.parent / "vllm-serve.log")
    try:
        served = [vllm_answer(args.port, image, args.max_new_tokens) for image in images]
    finally:
        server.terminate()
        server.wait(timeout=60)
    import transformers
    import vllm

    equal = sum(a == b for a, b in zip(served, expected))
    print(json.dumps({"vllm": vllm.__version__, "transformers": transformers.__version__,
                      "architecture": architecture(export), "samples": len(images), "equal": equal,
                      **inputs_check, "vllm_answers": served, "transformers_answers": expected},
                     ensure_ascii=False, indent=1))
    inputs_equal = inputs_check.get("input_ids_equal", len(images))
    return 0 if equal == len(images) and inputs_equal == len(images) else 1


if __name__ == "__main__":  # vLLM spawns worker processes that import this module
    sys.exit(main())
