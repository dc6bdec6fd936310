"""The store without a server: Ollama's names, manifests and blobs (a copy costs a small
file, a removal frees a blob only when no name uses it), the names file of earlier
versions migrated, manifests from the network checked, split GGUFs merged back into the
very file they came from, and the Hugging Face quantization pick."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import SMOLLM2, model_path
from registry_util import split_gguf

import edgelm
from edgelm import store
from edgelm.gguf_split import SplitError, merge
from edgelm.pull import PullError, resolve
from edgelm.registry import pick_gguf, quant_of
from edgelm.store import ModelName, ModelNameError, Store, StoreError

# -- names -------------------------------------------------------------------------------

NAMES = [
    # (text, host, namespace, model, tag, shown)
    ("qwen3", "registry.ollama.ai", "library", "qwen3", "latest", "qwen3:latest"),
    ("qwen3:0.6b", "registry.ollama.ai", "library", "qwen3", "0.6b", "qwen3:0.6b"),
    ("Qwen3:0.6B", "registry.ollama.ai", "library", "Qwen3", "0.6B", "Qwen3:0.6B"),
    ("library/qwen3:0.6b", "registry.ollama.ai", "library", "qwen3", "0.6b", "qwen3:0.6b"),
    ("jmorgan/tiny-model:q4", "registry.ollama.ai", "jmorgan", "tiny-model", "q4", "jmorgan/tiny-model:q4"),
    (
        "hf.co/unsloth/Qwen3-0.6B-GGUF:Q4_K_M",
        "hf.co",
        "unsloth",
        "Qwen3-0.6B-GGUF",
        "Q4_K_M",
        "hf.co/unsloth/Qwen3-0.6B-GGUF:Q4_K_M",
    ),
    (
        "huggingface.co/bartowski/SmolLM2-GGUF",
        "hf.co",
        "bartowski",
        "SmolLM2-GGUF",
        "latest",
        "hf.co/bartowski/SmolLM2-GGUF:latest",
    ),
    (
        "registry.local:5000/team/model:v1",
        "registry.local:5000",
        "team",
        "model",
        "v1",
        "registry.local:5000/team/model:v1",
    ),
    (
        "SmolLM2-135M-Instruct.Q4_1",
        "registry.ollama.ai",
        "library",
        "SmolLM2-135M-Instruct.Q4_1",
        "latest",
        "SmolLM2-135M-Instruct.Q4_1:latest",
    ),
]


@pytest.mark.parametrize("text, host, namespace, model, tag, shown", NAMES)
def test_names_are_read_as_ollama_reads_them(
    text: str, host: str, namespace: str, model: str, tag: str, shown: str
) -> None:
    n = ModelName.parse(text)
    assert (n.host, n.namespace, n.model, n.tag) == (host, namespace, model, tag)
    assert str(n) == shown and ModelName.parse(shown) == n
    assert ".." not in str(n.relpath()) and not n.relpath().is_absolute()


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":",
        "a/b/c/d",
        "../etc/passwd",
        "a/../b",
        "x:../../y",
        "/abs",
        "a:b:c",
        "https://x/y.gguf",
        "a b",
        "na\u00efve",
        "-dash",
        "x" * 400,
        "a/:tag",
        ".hidden",
    ],
)
def test_bad_names_are_refused(text: str) -> None:
    with pytest.raises(ModelNameError, match="is not a model name"):
        ModelName.parse(text)


# -- the store ----------------------------------------------------------------------------


def _blob(st: Store, data: bytes) -> tuple[str, int]:
    d = store.digest_of(data)
    st.blobs.mkdir(parents=True, exist_ok=True)
    st.blob(d).write_bytes(data)
    return d, len(data)


def _manifest(*layers: tuple[str, tuple[str, int]]) -> dict:  # type: ignore[type-arg]
    return {
        "schemaVersion": 2,
        "mediaType": store.MANIFEST_TYPE,
        "layers": [{"mediaType": mt, "digest": d, "size": n} for mt, (d, n) in layers],
    }


def test_copy_is_free_and_removal_frees_only_unused_blobs(tmp_path: Path) -> None:
    st = Store(tmp_path)
    model = _blob(st, b"GGUF model bytes")
    lic = _blob(st, b"MIT")
    other = _blob(st, b"GGUF another model")
    st.put("qwen3:0.6b", _manifest((store.MODEL, model), (store.LICENSE, lic)))
    st.put("hf.co/u/r:Q4_K_M", _manifest((store.MODEL, model)))
    st.put("other", _manifest((store.MODEL, other)))
    e = st.lookup("QWEN3:0.6B")  # names compare without case
    assert e is not None and e.name == "qwen3:0.6b" and e.model == st.blob(model[0]) and e.digest == model[0]
    assert st.text_layer(e, store.LICENSE) == "MIT" and st.text_layer(e, store.TEMPLATE) is None
    before = sorted(p.name for p in st.blobs.iterdir())
    st.copy(e, "mine:tiny")
    assert sorted(p.name for p in st.blobs.iterdir()) == before  # no bytes copied
    assert [x.name for x in st.entries()] == ["hf.co/u/r:Q4_K_M", "mine:tiny", "other:latest", "qwen3:0.6b"]
    # The license is used by the copy; the model by the copy and the HF name.
    assert st.remove("qwen3:0.6b") == []
    assert st.remove("mine:tiny") == [lic[0]]
    assert st.lookup("mine:tiny") is None and st.blob(model[0]).is_file()
    # A blob a loaded model reads stays (until `prune`), even with no name.
    assert st.remove("hf.co/u/r:q4_k_m", in_use=lambda p: p == st.blob(model[0])) == []
    assert st.blob(model[0]).is_file()
    assert st.prune(min_age_s=0) == [model[0]]
    with pytest.raises(StoreError, match="not found"):
        st.remove("qwen3:0.6b")
    # Replacing a name's manifest frees what only the old one used.
    newer = _blob(st, b"GGUF other model, newer")
    st.put("other", _manifest((store.MODEL, newer)))
    assert not st.blob(other[0]).exists() and st.blob(newer[0]).is_file()
    assert not list((tmp_path / "manifests").rglob("qwen3*"))  # empty folders go too


def test_a_manifest_needs_its_blobs_and_a_sane_shape(tmp_path: Path) -> None:
    st = Store(tmp_path)
    d = store.digest_of(b"absent")
    with pytest.raises(StoreError, match="not in the store"):
        st.put("x", _manifest((store.MODEL, (d, 6))))
    good = _blob(st, b"GGUF")
    bad = [
        {"layers": "no"},
        _manifest((store.LICENSE, good)),  # no model layer
        _manifest((store.MODEL, good), (store.MODEL, good)),  # two
        _manifest((store.MODEL, ("sha256:../../etc/passwd", 4))),
        _manifest((store.MODEL, ("md5:abc", 4))),
        {"layers": [{"mediaType": store.MODEL, "size": 4, "annotations": {store.FILE_KEY: "../x.gguf"}}]},
        {"layers": [{"mediaType": store.MODEL, "digest": good[0], "size": -1}]},
    ]
    for m in bad:
        with pytest.raises(StoreError):
            store.check_manifest(m)
    # On disk, a manifest that does not parse is no name at all.
    path = tmp_path / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert st.lookup("broken") is None and st.entries() == []


def test_names_of_plain_files_and_the_old_names_file(tmp_path: Path) -> None:
    """A plain GGUF stays a model under its own name; names given to it (copies,
    catalogue pulls, the `.edgelm-names.json` of earlier versions, migrated on first
    use) are manifests whose model layer is the file; removing one leaves the file."""
    (tmp_path / "a.gguf").write_bytes(b"GGUF a")
    (tmp_path / "b.gguf").write_bytes(b"GGUF b")
    (tmp_path / store.NAMES_FILE).write_text(
        json.dumps(
            {
                "names": {
                    "smollm2:latest": "a.gguf",
                    "kitchen:latest": "b.gguf",
                    "gone:latest": "missing.gguf",
                    "../bad": "a.gguf",
                }
            }
        )
    )
    st = Store(tmp_path)
    assert [(e.name, e.file) for e in st.entries()] == [("kitchen:latest", "b.gguf"), ("smollm2:latest", "a.gguf")]
    assert not (tmp_path / store.NAMES_FILE).exists() and (tmp_path / (store.NAMES_FILE + ".migrated")).exists()
    e = st.lookup("smollm2")
    assert e is not None and e.model == tmp_path / "a.gguf" and e.digest is None
    st.copy(e, "again")
    assert st.remove("smollm2") == [] and (tmp_path / "a.gguf").is_file()
    assert st.forget_file("a.gguf") == ["again:latest"]
    assert [e.name for e in st.entries()] == ["kitchen:latest"]


# -- split GGUF ----------------------------------------------------------------------------


def sha(p: Path) -> str:
    return "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()


def test_split_gguf_merges_back_into_the_original(tmp_path: Path) -> None:
    src = model_path(SMOLLM2)
    parts = split_gguf(src, tmp_path / "parts", 30 << 20)
    assert len(parts) >= 3
    out = tmp_path / "merged.gguf"
    assert merge(parts, out) == sha(src) == sha(out)  # gguf-py writes the same layout whole and split
    m = edgelm.Model(out)
    assert len(m.tensors()) == len(edgelm.Model(src).tensors()) and "split.count" not in m.metadata
    # Parts out of order, missing, or damaged: named, nothing merged.
    with pytest.raises(SplitError, match="expected part 1"):
        merge([parts[1], parts[0], *parts[2:]], out)
    with pytest.raises(SplitError, match="part 1 of 3|of 4"):
        merge(parts[:-1], out)
    bad = tmp_path / "bad.gguf"
    shutil.copy(parts[0], bad)
    with open(bad, "r+b") as f:
        f.seek(16)
        f.write((10**12).to_bytes(8, "little"))  # the key count
    with pytest.raises(SplitError, match="keys"):
        merge([bad, *parts[1:]], out)
    bad.write_bytes(parts[0].read_bytes()[:100])
    with pytest.raises(SplitError, match="past the end"):
        merge([bad, *parts[1:]], out)
    with pytest.raises(SplitError, match="not a split GGUF"):
        merge([src], out)


# -- Hugging Face's quantization pick -------------------------------------------------------


def test_hf_quant_pick() -> None:
    def f(path: str) -> dict:  # type: ignore[type-arg]
        return {"path": path}

    files = [
        f("Qwen3-0.6B-Q8_0.gguf"),
        f("Qwen3-0.6B-Q4_K_M.gguf"),
        f("Qwen3-0.6B-IQ4_XS.gguf"),
        f("mmproj-Qwen3-F16.gguf"),
        f("README.md"),
        f("BF16/Qwen3-0.6B-BF16-00001-of-00002.gguf"),
        f("BF16/Qwen3-0.6B-BF16-00002-of-00002.gguf"),
    ]
    assert quant_of("Qwen3-0.6B-Q4_K_M.gguf") == "Q4_K_M" and quant_of("model.q8_0.gguf") == "Q8_0"
    assert quant_of("Qwen3-0.6B-BF16-00001-of-00002.gguf") == "BF16" and quant_of("model.gguf") is None
    assert [x["path"] for x in pick_gguf(files, "latest")] == ["Qwen3-0.6B-Q4_K_M.gguf"]
    assert [x["path"] for x in pick_gguf(files, "q8_0")] == ["Qwen3-0.6B-Q8_0.gguf"]
    assert [x["path"] for x in pick_gguf(files, "BF16")] == [
        "BF16/Qwen3-0.6B-BF16-00001-of-00002.gguf",
        "BF16/Qwen3-0.6B-BF16-00002-of-00002.gguf",
    ]
    with pytest.raises(PullError, match="no Q3_K_S GGUF.*BF16, IQ4_XS, Q4_K_M, Q8_0"):
        pick_gguf(files, "Q3_K_S")
    with pytest.raises(PullError, match="missing parts"):
        pick_gguf(files[:2] + files[-1:], "BF16")
    assert [x["path"] for x in pick_gguf([f("x-Q5_K_M.gguf"), f("x-Q6_K.gguf")], "latest")] == ["x-Q5_K_M.gguf"]


# -- what a pull may name -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_registry_names_are_pulls_a_keyless_lan_daemon_allows() -> None:
    """URL pulls are off on a keyless LAN daemon (allow_urls=False); names from the
    Ollama registry and hf.co stay allowed, a registry at another host does not."""
    assert await resolve("qwen3:0.6b", allow_urls=False) == ModelName.parse("qwen3:0.6b")
    assert (await resolve("hf.co/u/r:Q4_K_M", allow_urls=False)).is_hf  # type: ignore[union-attr]
    for source in ("registry.local:5000/team/model:v1", "https://example.org/x.gguf"):
        with pytest.raises(PullError) as e:
            await resolve(source, allow_urls=False)
        assert e.value.status == 403
    with pytest.raises(PullError, match="not a model name"):
        await resolve("a/b/c/d")
    assert os.environ["EDGELM_REGISTRY_URL"].startswith("http://127.0.0.1")  # tests never reach the real registry
