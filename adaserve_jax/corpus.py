"""Training corpus: Python standard-library source plus English prose, pinned by a manifest.

Lifecycle of a corpus:
    1. `build_manifest` walks the sources (the interpreter's stdlib `.py` files, without tests
       and site-packages; plain-text docs under /usr/share/doc), drops empty and duplicate files,
       and records every file with its sha256, size, kind (`code`/`prose`) and split.
    2. The split is decided by the content hash alone: a file is held out when the first 64 bits
       of its sha256, read as a fraction of 2**64, are below `heldout_fraction` (2%). The same
       bytes are therefore held out on every machine and in every run.
    3. `train_tokenizer` (adaserve_jax.tokenizer_train) fits a byte-level BPE on the train split.
    4. `load_documents` re-reads the files listed in a manifest and refuses to continue when one
       is missing or its bytes changed, so a training run is reproducible or fails loudly.
    5. `tokenize_split` turns documents into one flat u16 stream `<eot> doc <eot> doc ...`
       (the `<|endoftext|>` token is bos/eos between documents), cached under runs/.

CLI:  python -m adaserve_jax.corpus --out checkpoints   (manifest + tokenizer)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

MANIFEST_VERSION = 1
EOT = "<|endoftext|>"
CODE_EXCLUDE_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}
)
PROSE_SUFFIXES = (".txt", ".md", ".rst")
PROSE_EXCLUDE_PARTS = frozenset({"changelogs"})
MAX_FILE_BYTES = 400_000


@dataclasses.dataclass(frozen=True, slots=True)
class CorpusFile:
    """One manifest entry. `path` is absolute; `split` is 'train' or 'heldout'."""

    path: str
    kind: str
    sha256: str
    num_bytes: int
    split: str

    def __post_init__(self) -> None:
        if self.kind not in ("code", "prose"):
            raise ValueError(f"{self.kind=} must be 'code' or 'prose'")
        if self.split not in ("train", "heldout"):
            raise ValueError(f"{self.split=} must be 'train' or 'heldout'")
        if len(self.sha256) != 64:
            raise ValueError(f"{self.sha256=} is not a sha256 hex digest")


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    files: tuple[CorpusFile, ...]
    heldout_fraction: float = 0.02
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"{self.heldout_fraction=} must be in (0, 1)")
        if not self.files:
            raise ValueError("manifest lists no files: the corpus is empty")

    def select(self, split: str, kind: str | None = None) -> list[CorpusFile]:
        return [f for f in self.files if f.split == split and (kind is None or f.kind == kind)]

    def to_json(self) -> dict:
        return {
            "version": MANIFEST_VERSION,
            "heldout_fraction": self.heldout_fraction,
            "sources": list(self.sources),
            "num_files": len(self.files),
            "num_bytes": sum(f.num_bytes for f in self.files),
            "files": [dataclasses.asdict(f) for f in self.files],
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: corpus manifest not found (build it: python -m {__name__})")
        try:
            data = json.loads(path.read_text())
            files = tuple(CorpusFile(**entry) for entry in data["files"])
            return cls(files, data["heldout_fraction"], tuple(data.get("sources", ())))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: malformed corpus manifest: {exc}") from exc


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_of(sha256_hex: str, heldout_fraction: float) -> str:
    """Deterministic split from the content hash: first 64 bits as a fraction of 2**64."""
    return "heldout" if int(sha256_hex[:16], 16) < heldout_fraction * 2**64 else "train"


def stdlib_dir() -> Path:
    """The running interpreter's standard library (`<base prefix>/lib/python3.X`)."""
    return Path(sysconfig.get_paths()["stdlib"])


def find_code_files(root: Path) -> list[Path]:
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if not CODE_EXCLUDE_DIRS.intersection(rel[:-1]) and not rel[-1].startswith("test_"):
            out.append(path)
    return out


def find_prose_files(root: Path) -> list[Path]:
    out = []
    if not root.is_dir():
        return out
    for path in sorted(root.rglob("*")):
        name = path.name
        is_text = name.endswith(PROSE_SUFFIXES) or name.upper().startswith("README")
        if (
            is_text
            and not name.endswith(".gz")
            and path.is_file()
            and not PROSE_EXCLUDE_PARTS.intersection(path.parts)
        ):
            out.append(path)
    return out


def _read_text(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.strip() and "\x00" not in text else None


def build_manifest(
    code_roots: Sequence[Path],
    prose_roots: Sequence[Path] = (),
    heldout_fraction: float = 0.02,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> Manifest:
    """Scan the sources; skip empty/binary/oversized/duplicate files; ValueError if none remain."""
    entries: list[CorpusFile] = []
    seen: set[str] = set()
    for kind, roots, finder in (
        ("code", code_roots, find_code_files),
        ("prose", prose_roots, find_prose_files),
    ):
        for root in roots:
            root = Path(root)
            if not root.is_dir():
                raise ValueError(f"corpus source {root} is not a directory")
            for path in finder(root):
                data = path.read_bytes()
                if len(data) > max_file_bytes or _read_text(data) is None:
                    continue
                digest = sha256_bytes(data)
                if digest in seen:
                    continue
                seen.add(digest)
                split = split_of(digest, heldout_fraction)
                entries.append(CorpusFile(str(path.absolute()), kind, digest, len(data), split))
    if not entries:
        roots = [str(r) for r in (*code_roots, *prose_roots)]
        raise ValueError(f"corpus is empty: no usable text files under {roots}")
    sources = tuple(str(Path(r).absolute()) for r in (*code_roots, *prose_roots))
    return Manifest(tuple(entries), heldout_fraction, sources)


def load_documents(files: Iterable[CorpusFile]) -> list[str]:
    """Read the listed files, verifying each sha256; ValueError on a missing or changed file."""
    docs = []
    for entry in files:
        path = Path(entry.path)
        if not path.is_file():
            raise ValueError(f"corpus file {path} listed in the manifest is missing")
        data = path.read_bytes()
        if sha256_bytes(data) != entry.sha256:
            raise ValueError(f"corpus file {path} changed since the manifest was built (sha256)")
        docs.append(data.decode("utf-8"))
    if not docs:
        raise ValueError("no documents selected: the corpus split is empty")
    return docs


def tokenize_documents(tokenizer, docs: Sequence[str]) -> np.ndarray:
    """u16[N] stream: <eot> doc_0 <eot> doc_1 ... <eot> (the tokenizer's EOT separates docs)."""
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"tokenizer has no {EOT} token")
    if tokenizer.get_vocab_size() > 2**16:
        raise ValueError("vocabulary too large for a u16 token stream")
    pieces = [np.array([eot], np.uint16)]
    for enc in tokenizer.encode_batch(list(docs), add_special_tokens=False):
        pieces.append(np.asarray(enc.ids, np.uint16))
        pieces.append(np.array([eot], np.uint16))
    return np.concatenate(pieces)


def tokenize_split(
    manifest_path: str | Path,
    tokenizer_path: str | Path,
    split: str,
    kind: str | None = None,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """Token stream of one split (optionally one kind), cached as .npy keyed by the inputs' hash."""
    from tokenizers import Tokenizer

    manifest = Manifest.load(manifest_path)
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise ValueError(f"{tokenizer_path}: tokenizer not found")
    files = manifest.select(split, kind)
    key = sha256_bytes(
        ("".join(f.sha256 for f in files) + sha256_bytes(tokenizer_path.read_bytes())).encode()
    )[:16]
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"tokens-{split}-{kind or 'all'}-{key}.npy"
        if cache.is_file():
            return np.load(cache)
    tokens = tokenize_documents(Tokenizer.from_file(str(tokenizer_path)), load_documents(files))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npy")
        np.save(tmp, tokens)
        os.replace(tmp, cache)
    return tokens


def main(argv: Sequence[str] | None = None) -> None:
    from adaserve_jax.tokenizer_train import train_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="checkpoints", help="where manifest + tokenizer go")
    ap.add_argument("--code-root", action="append", default=None, help="default: the stdlib")
    ap.add_argument("--prose-root", action="append", default=None, help="default: /usr/share/doc")
    ap.add_argument("--heldout-fraction", type=float, default=0.02)
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args(argv)
    code_roots = [Path(p) for p in (args.code_root or [stdlib_dir()])]
    prose_roots = [Path(p) for p in (args.prose_root or ["/usr/share/doc"])]
    try:
        manifest = build_manifest(code_roots, prose_roots, args.heldout_fraction)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    out = Path(args.out)
    manifest.save(out / "corpus_manifest.json")
    for split in ("train", "heldout"):
        for kind in ("code", "prose"):
            sel = manifest.select(split, kind)
            print(
                f"{split:8s} {kind:6s} {len(sel):5d} files {sum(f.num_bytes for f in sel):>10d} B"
            )
    docs = load_documents(manifest.select("train"))
    tok = train_tokenizer(docs, args.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    print(f"wrote {out / 'corpus_manifest.json'} and {out / 'tokenizer.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
