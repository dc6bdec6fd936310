"""`edgelm convert`: small llama-shaped ONNX graphs (tests/python/onnx_models.py) in the
float (Optimum) and int4 MatMulNBits (onnxruntime) layouts, converted to GGUF; edgelm's
logits on the GGUF are checked against onnx.reference.ReferenceEvaluator running the
original graph, the int4 blocks against the graph's own dequantized weights, and the
tokenizer (SmolLM2's, rebuilt as a tokenizer.json) against the original GGUF's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_models as om
import pytest
from conftest import FIXTURES, SMOLLM2, model_path
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import edgelm
from edgelm import _native
from edgelm.convert import ConvertError, convert_onnx

SHAPE = om.Shape()
IDS = [1, 504, 3458, 282, 4649, 314, 27, 198, 4093, 28, 29, 30]


def reference_logits(path: Path) -> np.ndarray:
    ref = ReferenceEvaluator(onnx.load(str(path)), new_ops=[om.MatMulNBits])
    (logits,) = ref.run(
        None, {"input_ids": np.array([IDS], np.int64), "position_ids": np.arange(SHAPE.seq, dtype=np.int64)}
    )
    return logits[0]


def compare(got: np.ndarray, want: np.ndarray, rel: float) -> float:
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max()) / scale
    assert err < rel, f"logits differ by {err:.2e} of their range (allowed {rel:.0e})"
    # Greedy choices agree wherever the reference's top two are not a near-tie.
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 4 * rel * scale
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()
    return err


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    smol = model_path(SMOLLM2)
    out = {}
    for layout, fp16 in (("float", False), ("int4", False), ("int4-fp16", True), ("int4-fused", True)):
        meant: dict = {}
        p = om.write_model_dir(
            tmp_path_factory.mktemp(layout),
            layout.split("-")[0],
            SHAPE,
            smol,
            seed=7,
            fp16_scales=fp16,
            meant=meant,
            fused=layout.endswith("fused"),
        )
        out[layout] = (p, meant)
    return out


@pytest.mark.parametrize("out_type,rel", [("F32", 2e-4), ("F16", 5e-3)])
def test_float_layout_matches_reference_evaluator(dirs: dict, tmp_path: Path, out_type: str, rel: float) -> None:
    src, _ = dirs["float"]
    info = convert_onnx(src, tmp_path / "m.gguf", out_type=out_type)
    assert info["architecture"] == "llama" and info["n_layer"] == SHAPE.n_layer
    assert set(info["types"]) == {"F32", out_type}
    m = edgelm.Model(tmp_path / "m.gguf")
    err = compare(m.logits(IDS), reference_logits(src), rel)
    print(f"float layout as {out_type}: max logit error {err:.2e} of range")


@pytest.mark.parametrize("layout", ["int4", "int4-fp16", "int4-fused"])
def test_int4_layout_matches_reference_evaluator(dirs: dict, tmp_path: Path, layout: str) -> None:
    src, _ = dirs[layout]
    info = convert_onnx(src, tmp_path / "m.gguf")
    # q/k (block 32, no zero points) → Q4_0; v/o/gate/up (zero points, blocks 32–128)
    # → Q4_1; down (block 16) cannot be a GGUF block and is widened to F16. A fused
    # qkv_proj (zero points) splits into three Q4_1 tensors.
    q4_0 = 0 if layout.endswith("fused") else 2
    want = {
        "Q4_0": q4_0 * SHAPE.n_layer,
        "Q4_1": (6 - q4_0) * SHAPE.n_layer,
        "F16": SHAPE.n_layer + 1,
        "F32": 2 * SHAPE.n_layer + 1,
    }
    assert info["types"] == {k: v for k, v in want.items() if v}
    assert len(info["widened"]) == SHAPE.n_layer
    m = edgelm.Model(tmp_path / "m.gguf")
    # The CPU kernels quantize activations to 8 bits for Q4 weights: most of this error.
    err = compare(m.logits(IDS), reference_logits(src), 1e-2)
    print(f"{layout}: max logit error {err:.2e} of range")


def gguf_weights(path: Path) -> dict[str, np.ndarray]:
    import gguf

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        n = int(np.prod(t.shape))
        raw = np.asarray(t.data).view(np.uint8).tobytes()
        vals = np.frombuffer(_native.dequantize(int(t.tensor_type), raw, n), np.float32)
        out[t.name] = vals.reshape(list(reversed([int(x) for x in t.shape])))
    return out


@pytest.mark.parametrize("layout", ["int4-fp16", "int4-fused"])
def test_int4_blocks_keep_their_codes(dirs: dict, tmp_path: Path, layout: str) -> None:
    """With fp16 scales, Q4_0 holds exactly the graph's weights and Q4_1 holds them up to
    the f16 rounding of its offset m = −scale·zero_point: nothing is requantized."""
    src, meant = dirs[layout]
    convert_onnx(src, tmp_path / "m.gguf")
    got = gguf_weights(tmp_path / "m.gguf")
    hd = SHAPE.head_dim
    for (layer, name), w in meant.items():
        gname = f"blk.{layer}.{dict(q_proj='attn_q', k_proj='attn_k', v_proj='attn_v', o_proj='attn_output', gate_proj='ffn_gate', up_proj='ffn_up', down_proj='ffn_down')[name]}.weight"  # noqa: E501
        if name in ("q_proj", "k_proj"):  # rows permuted to GGUF's interleaved RoPE
            n_head = w.shape[0] // hd
            w = w.reshape(n_head, 2, hd // 2, -1).swapaxes(1, 2).reshape(w.shape)
        g = got[gname]
        assert g.shape == w.shape, gname
        if name in ("q_proj", "k_proj") and not layout.endswith("fused"):
            np.testing.assert_array_equal(g, w, err_msg=f"{gname}: Q4_0 must hold the codes exactly")
        else:
            np.testing.assert_allclose(g, w, rtol=0, atol=float(np.abs(w).max()) * 2e-3, err_msg=gname)


def test_tokenizer_and_template_carry_over(dirs: dict, tmp_path: Path) -> None:
    src, _ = dirs["float"]
    convert_onnx(src, tmp_path / "m.gguf")
    m, orig = edgelm.Model(tmp_path / "m.gguf"), edgelm.Model(model_path(SMOLLM2))
    corpus = json.loads((FIXTURES / "tokenize_corpus.json").read_text())
    texts = [c if isinstance(c, str) else c.get("text", "") for c in corpus]
    texts.append("<|im_start|>user\nTurn on the light 123<|im_end|>")
    for text in texts:
        assert m.tokenize(text, parse_special=True) == orig.tokenize(text, parse_special=True), text
    assert m.metadata["tokenizer.chat_template"] == orig.metadata["tokenizer.chat_template"]
    assert m.native.bos == orig.native.bos and m.native.eos == orig.native.eos


def test_cli_convert_writes_a_model_edgelm_runs(dirs: dict, tmp_path: Path) -> None:
    src, _ = dirs["int4"]
    out = tmp_path / "cli.gguf"
    r = subprocess.run(
        [sys.executable, "-m", "edgelm.cli", "convert", str(src), str(out)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "Q4_1" in r.stdout
    assert "converting" in r.stderr  # progress
    info = subprocess.run(
        [sys.executable, "-m", "edgelm.cli", "info", str(out)], capture_output=True, text=True, timeout=120
    )
    assert info.returncode == 0, info.stderr
    assert "Q4_0" in info.stdout and "blk.0.attn_q.weight" in info.stdout


# ---- bad input: each ends with a clear error and no file under the output name ------


def _edit(src: Path, d: Path, change) -> Path:  # type: ignore[no-untyped-def]
    d.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src))
    change(model)
    onnx.save(model, str(d / "model.onnx"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((src.parent / f).read_bytes())
    return d / "model.onnx"


def _fails(src: Path, out: Path, *words: str, **kw: object) -> None:
    with pytest.raises(ConvertError) as e:
        convert_onnx(src, out, **kw)  # type: ignore[arg-type]
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "a temporary file was left behind"
    print(msg)


def test_truncated_and_corrupt_onnx(dirs: dict, tmp_path: Path) -> None:
    src, _ = dirs["float"]
    d = tmp_path / "t"
    _edit(src, d, lambda m: None)
    data = (d / "model.onnx").read_bytes()
    (d / "model.onnx").write_bytes(data[: len(data) // 2])
    _fails(d / "model.onnx", tmp_path / "a.gguf", "cannot read ONNX model")
    (d / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    _fails(d / "model.onnx", tmp_path / "b.gguf")
    _fails(tmp_path / "missing.onnx", tmp_path / "c.gguf", "does not exist")


def test_unsupported_op_is_named(dirs: dict, tmp_path: Path) -> None:
    src, _ = dirs["float"]

    def add_conv(m: onnx.ModelProto) -> None:
        m.graph.node.append(helper.make_node("Conv", ["input_ids", "input_ids"], ["junk"], name="/model/conv/Conv"))

    _fails(_edit(src, tmp_path / "op", add_conv), tmp_path / "o.gguf", "unsupported op Conv", "/model/conv/Conv")


def test_unknown_tensor_is_named(dirs: dict, tmp_path: Path) -> None:
    src, _ = dirs["float"]

    def add_init(m: onnx.ModelProto) -> None:
        m.graph.initializer.append(
            numpy_helper.from_array(np.ones((128, 128), np.float32), "model.layers.0.mlp.extra_proj.weight")
        )

    _fails(_edit(src, tmp_path / "t", add_init), tmp_path / "o.gguf", "model.layers.0.mlp.extra_proj.weight")


def test_unsupported_weights_are_named(dirs: dict, tmp_path: Path) -> None:
    src, _ = dirs["int4"]

    def eight_bit(m: onnx.ModelProto) -> None:
        n = next(n for n in m.graph.node if n.op_type == "MatMulNBits")
        for a in n.attribute:
            if a.name == "bits":
                a.i = 8

    _fails(_edit(src, tmp_path / "b8", eight_bit), tmp_path / "o.gguf", "8-bit", "MatMulNBits")


def test_config_and_tokenizer_problems(dirs: dict, tmp_path: Path) -> None:
    src, _ = dirs["float"]
    d = tmp_path / "cfg"
    p = _edit(src, d, lambda m: None)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 512}))
    _fails(p, tmp_path / "o.gguf", "config.json implies")
    (d / "config.json").unlink()
    _fails(p, tmp_path / "o.gguf", "config.json not found")
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    _fails(p, tmp_path / "o.gguf", "gpt_neox")
    (d / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((d / "tokenizer.json").read_text())
    (d / "tokenizer.json").write_text(json.dumps({**tok, "model": {"type": "Unigram", "vocab": []}}))
    _fails(p, tmp_path / "o.gguf", "Unigram")
    (d / "tokenizer.json").write_text(json.dumps({**tok, "pre_tokenizer": {"type": "Whitespace"}}))
    _fails(p, tmp_path / "o.gguf", "pre-tokenizer", "Whitespace")


def test_external_data_and_its_truncation(dirs: dict, tmp_path: Path) -> None:
    """Large exports keep weights in a separate file beside model.onnx."""
    src, _ = dirs["float"]
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save(
        onnx.load(str(src)),
        str(d / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((src.parent / f).read_bytes())
    assert (d / "model.onnx.data").stat().st_size > (d / "model.onnx").stat().st_size
    convert_onnx(d / "model.onnx", tmp_path / "ok.gguf", out_type="F32")
    compare(edgelm.Model(tmp_path / "ok.gguf").logits(IDS), reference_logits(src), 2e-4)
    data = (d / "model.onnx.data").read_bytes()
    (d / "model.onnx.data").write_bytes(data[: len(data) // 2])
    _fails(d / "model.onnx", tmp_path / "cut.gguf")
