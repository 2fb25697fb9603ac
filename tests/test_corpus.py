"""Corpus manifest, deterministic split, sha256 pinning and the BPE tokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from adaserve_jax import corpus
from adaserve_jax.corpus import Manifest, build_manifest, load_documents, split_of
from adaserve_jax.tokenizer_train import EOT, train_tokenizer


def _write_tree(root: Path, n_code: int = 40) -> tuple[Path, Path]:
    code, prose = root / "lib", root / "doc"
    (code / "pkg").mkdir(parents=True)
    (code / "test").mkdir()
    (prose / "tool").mkdir(parents=True)
    for i in range(n_code):
        (code / "pkg" / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n")
    (code / "test" / "test_skip.py").write_text("assert True\n")  # excluded: test dir
    (code / "pkg" / "empty.py").write_text("")  # excluded: empty
    (code / "pkg" / "dup.py").write_text("def f0(x):\n    return x * 0\n")  # duplicate of mod0
    (prose / "tool" / "README").write_text("This tool reads files and writes reports.\n")
    (prose / "tool" / "notes.md").write_text("# Notes\nThe parser is strict.\n")
    (prose / "tool" / "image.png").write_bytes(b"\x89PNG\x00\x00")
    return code, prose


def test_manifest_records_files_with_sha256(tmp_path):
    code, prose = _write_tree(tmp_path)
    m = build_manifest([code], [prose], heldout_fraction=0.25)
    paths = {Path(f.path).name for f in m.files}
    assert "test_skip.py" not in paths and "empty.py" not in paths and "image.png" not in paths
    assert len([f for f in m.files if f.kind == "code"]) == 40  # dup.py dropped as duplicate
    assert {f.kind for f in m.files if Path(f.path).name in ("README", "notes.md")} == {"prose"}
    for f in m.files:
        assert f.sha256 == hashlib.sha256(Path(f.path).read_bytes()).hexdigest()
        assert f.split == split_of(f.sha256, 0.25)


def test_split_is_deterministic_and_hash_based(tmp_path):
    code, prose = _write_tree(tmp_path)
    a = build_manifest([code], [prose], heldout_fraction=0.25)
    b = build_manifest([code], [prose], heldout_fraction=0.25)
    assert [(f.path, f.split) for f in a.files] == [(f.path, f.split) for f in b.files]
    splits = [f.split for f in a.files]
    assert 0 < splits.count("heldout") < len(splits)  # 42 files at 25%: both splits non-empty
    assert split_of("0" * 64, 0.02) == "heldout" and split_of("f" * 64, 0.02) == "train"
    # Same bytes at another path land in the same split.
    other = tmp_path / "copy"
    other.mkdir()
    src = Path(a.files[0].path)
    (other / "renamed.py").write_bytes(src.read_bytes())
    c = build_manifest([other], heldout_fraction=0.25)
    assert c.files[0].split == a.files[0].split


def test_manifest_round_trip(tmp_path):
    code, prose = _write_tree(tmp_path)
    m = build_manifest([code], [prose])
    m.save(tmp_path / "out" / "corpus_manifest.json")
    assert Manifest.load(tmp_path / "out" / "corpus_manifest.json") == m


def test_empty_or_missing_corpus_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.py").write_text("   \n")
    with pytest.raises(ValueError, match="corpus is empty"):
        build_manifest([empty], [])
    with pytest.raises(ValueError, match="not a directory"):
        build_manifest([tmp_path / "nope"], [])
    with pytest.raises(ValueError, match="manifest not found"):
        Manifest.load(tmp_path / "missing.json")
    with pytest.raises(SystemExit, match="corpus is empty"):
        corpus.main(
            ["--out", str(tmp_path / "o"), "--code-root", str(empty), "--prose-root", str(empty)]
        )


def test_changed_or_missing_file_is_detected(tmp_path):
    code, prose = _write_tree(tmp_path)
    m = build_manifest([code], [prose])
    assert len(load_documents(m.files)) == len(m.files)
    Path(m.files[0].path).write_text("def changed():\n    pass\n")
    with pytest.raises(ValueError, match="changed since the manifest"):
        load_documents(m.files)
    Path(m.files[0].path).unlink()
    with pytest.raises(ValueError, match="missing"):
        load_documents(m.files)


def test_tokenizer_eot_and_stream(tmp_path):
    docs = [f"def f{i}(x):\n    return x + {i}  # add\n" for i in range(50)]
    tok = train_tokenizer(docs, vocab_size=300)
    assert tok.token_to_id(EOT) == 0 and tok.get_vocab_size() <= 300
    text = "def g(y):\n    return y\n"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: exact round trip
    stream = corpus.tokenize_documents(tok, docs[:3])
    assert stream.dtype == np.uint16
    assert stream[0] == 0 and stream[-1] == 0 and int((stream == 0).sum()) == 4
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([], vocab_size=300)
