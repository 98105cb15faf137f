"""llama.cpp's HF -> GGUF converter, as it ships inside the llama-cpp-python sdist on PyPI (vendor/llama.cpp:
convert_hf_to_gguf.py, its conversion/ package and gguf-py), fetched from the package registry and unpacked once."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp with conversion/sarashina2.py (Sarashina2VisionForCausalLM)
MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter(cache: Path) -> Path:
    """The unpacked llama.cpp directory (convert_hf_to_gguf.py at its top), downloading the sdist when missing."""
    root = cache / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    SDIST, "-d", str(cache)], check=True, capture_output=True, timeout=900)
    (archive,) = cache.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(archive) as tar:
        prefix = f"{tar.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
        picked = [m for m in tar.getmembers() if m.name.startswith(prefix)
                  and m.name[len(prefix):].startswith(MEMBERS)]
        for member in picked:
            member.name = member.name[len(prefix):]
        tar.extractall(root, members=picked, filter="data")
    return root


def convert(root: Path, model: Path, out: Path, mmproj: bool = False) -> subprocess.CompletedProcess:
    """Run the converter on `model` (f32, so tensors compare exactly) into `out`."""
    command = [sys.executable, str(root / "convert_hf_to_gguf.py"), str(model), "--outfile", str(out),
               "--outtype", "f32", *(["--mmproj"] if mmproj else [])]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=900)


def read_gguf(root: Path, path: Path):
    """gguf-py's reader on a written file (tensor names and shapes, metadata).

    gguf-py is on sys.path only while `gguf` is imported: it holds a `tests` package of its own, which would shadow
    ours in every process spawned later in the session (multiprocessing's spawn copies sys.path)."""
    sys.path.insert(0, str(root / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.remove(str(root / "gguf-py"))
    return gguf.GGUFReader(str(path))
