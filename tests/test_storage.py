"""The lossy store representations (fusionpipe/quantize.py): error bounds, determinism, plain-zarr
readability, the loader reading through them, and the checksum still over every byte."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from fusionpipe.codecs import LOSSY, compressors, serializer
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.stage import extract
from fusionpipe.fuse.loader import make_loader
from fusionpipe.fuse.view import CompactStack
from fusionpipe.integrity import check_store, describe
from fusionpipe.quantize import decode, encode
from fusionpipe.store import FeatureStore, Layout

# (bound on ||decoded - x|| / ||x|| per layer, on channels of very different scales)
BOUNDS = {"int8": 0.01, "int8-std08": 0.028, "int8-std10": 0.035, "int8-std20": 0.07}


def activations(T=300, L=4, D=16, seed=0) -> np.ndarray:
    """A residual-stream-like toy: layers drift from each other, a few outlier channels 100x the rest."""
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.standard_normal((T, L, D)), axis=1) * 0.5
    x += np.cumsum(rng.standard_normal((T, 1, D)) * 0.3, axis=0)  # correlated along frames
    x[:, :, :2] *= 100
    return x.astype(np.float16)


def lossy_store(url, x, codec, chunk_frames=64):
    s = FeatureStore.create(url, Layout(["a", "b"], np.array([len(x) - 100, 100])), num_layers=x.shape[1],
                            hidden_size=x.shape[2], codec=codec, chunk_frames=chunk_frames,
                            attrs={"upstream": {"name": "toy", "frame_rate": 50.0}})
    for c in range(s.num_chunks):
        s.write_chunk(c, x[c * chunk_frames:(c + 1) * chunk_frames])
    return s


def written_and_read_back(tmp_path, codec):
    """(activations, their lossy store, what reads back as float64, per-layer ||y - x|| / ||x||)."""
    x = activations()
    s = lossy_store(tmp_path / "s.zarr", x, codec)
    y = s.hidden[:].astype(np.float64)
    rel = np.sqrt(((y - x) ** 2).sum(axis=(0, 2)) / (x.astype(np.float64) ** 2).sum(axis=(0, 2)))
    return x, s, y, rel


def _chunk(url, c) -> Path:
    return Path(url) / "hidden" / "c" / str(c) / "0" / "0"


@pytest.mark.parametrize("codec", LOSSY)
def test_round_trip_error_stays_within_the_bound_of_each_representation(tmp_path, codec):
    x, s, y, rel = written_and_read_back(tmp_path, codec)
    assert (rel < BOUNDS[codec]).all(), rel
    small = np.abs(y[..., 2:] - x[..., 2:]).max() / np.abs(x[..., 2:].astype(np.float64)).max()
    assert small < 3 * BOUNDS[codec]  # ordinary channels are not drowned by the outliers' steps


@pytest.mark.parametrize("codec", LOSSY)
def test_the_recorded_error_is_the_error_of_what_reads_back(tmp_path, codec):
    x, s, y, rel = written_and_read_back(tmp_path, codec)
    d = describe(FeatureStore.open(s.url))
    assert d["codec"] == codec and d["ratio_to_float16"] < 1
    np.testing.assert_allclose(d["measured_error"]["relative_error_per_layer"], rel, rtol=1e-3, atol=1e-5)
    assert d["measured_error"]["chunks_measured"] == f"{s.num_chunks}/{s.num_chunks}"


@pytest.mark.parametrize("codec", ["zstd", *LOSSY])
def test_write_chunk_stores_the_bytes_zarr_itself_writes(tmp_path, codec):
    """write_chunk runs the codec pipeline once itself (to measure a lossy chunk's error on its very
    bytes): what it stores must be what zarr's own write of the array stores, the short last chunk too."""
    x = activations(T=300)
    s = lossy_store(tmp_path / "s.zarr", x, codec)  # 64-frame chunks: the last one holds 44 frames
    ref = zarr.create_array(tmp_path / "ref.zarr", shape=x.shape, chunks=(64, *x.shape[1:]), dtype="float16",
                            compressors=compressors(codec), serializer=serializer(codec), fill_value=float("nan"))
    ref[:] = x
    for c in range(s.num_chunks):
        assert _chunk(s.url, c).read_bytes() == (tmp_path / "ref.zarr" / "c" / str(c) / "0" / "0").read_bytes(), c


def test_encoding_is_deterministic_and_keeps_padding_and_zeros():
    x = activations(T=50).astype(np.float32)
    x[10:20] = 0  # a skipped utterance's frames
    padded = np.concatenate([x, np.full((14, *x.shape[1:]), np.nan, np.float32)])
    y = decode(encode(padded, 0.1, True), padded.shape, padded.dtype, np.nan, predict_layers=True)
    assert np.isnan(y[50:]).all() and (y[10:20] == 0).all()
    assert encode(padded, 0.1, True) == encode(padded.copy(), 0.1, True)


@pytest.mark.slow
def test_a_lossy_store_reads_with_plain_zarr_once_fusionpipe_is_imported(tmp_path):
    x = activations()
    for codec in LOSSY:
        s = lossy_store(tmp_path / f"{codec}.zarr", x, codec)
        code = ("import sys, numpy as np, zarr, fusionpipe.store; "
                f"a = zarr.open_array({str(Path(s.url) / 'hidden')!r}, mode='r'); "
                "np.save(sys.argv[1], a[:])")
        out = tmp_path / f"{codec}.npy"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert np.load(out).tobytes() == s.hidden[:].tobytes()
        meta = zarr.open_array(Path(s.url) / "hidden", mode="r").metadata.to_dict()
        assert meta["codecs"][0] == serializer(codec).to_dict()
        assert meta["codecs"][-1]["name"] == "crc32c"  # the checksum stays last


@pytest.mark.slow
def test_the_loader_on_a_lossy_store_equals_decoding_first_then_loading(tmp_path, speech_manifest):
    lossy = extract(speech_manifest, "toy-wavlm", tmp_path / "lossy", device="cpu", progress=False,
                    codec="int8-std10", chunk_frames=16)
    s = FeatureStore.open(lossy.url)
    decoded = FeatureStore.create(tmp_path / "decoded.zarr", Layout(s.ids, s.lengths), num_layers=s.num_layers,
                                  hidden_size=s.hidden_size, codec="zstd", chunk_frames=16, attrs=dict(s.attrs) | {
                                      "codec": "zstd"})
    for c in range(s.num_chunks):
        decoded.write_chunk(c, s.read_range(c * 16, (c + 1) * 16))
    a = list(make_loader([lossy.url], max_frames=200))
    b = list(make_loader([str(tmp_path / "decoded.zarr")], max_frames=200))
    assert len(a) == len(b) > 0
    for p, q in zip(a, b):
        assert p["ids"] == q["ids"]
        for sp, sq in zip(p["stacks"], q["stacks"]):
            assert torch.equal(sp, sq)


@pytest.mark.slow
def test_compact_batches_expand_on_the_device_to_the_loaders_numbers(tmp_path, speech_manifest):
    """make_loader(compact=True), what a GPU trainer uses: lossy stacks cross as int8 codes and `.to(device)`
    expands, aligns (WavLM 49 Hz, 4 layers against Whisper 50 Hz) and pads them: exactly the loader's tensors."""
    def store(model, codec):
        return extract(speech_manifest, model, tmp_path / codec, device="cpu", progress=False, codec=codec,
                       chunk_frames=16).url
    for stores in ([store("toy-wavlm", "int8-std08"), store("toy-whisper", "int8")],
                   [store("toy-wavlm", "int8-std08"), store("toy-whisper", "zstd")]):
        plain = list(make_loader(stores, max_frames=300))
        compact = list(make_loader(stores, max_frames=300, compact=True))
        assert len(plain) == len(compact) > 1
        for p, q in zip(plain, compact):
            assert p["ids"] == q["ids"] and torch.equal(p["lengths"], q["lengths"])
            for k, (sp, sq) in enumerate(zip(p["stacks"], q["stacks"])):
                lossy = FeatureStore.open(stores[k]).info.codec in LOSSY
                assert isinstance(sq, CompactStack) == lossy
                if lossy:
                    assert sq.nbytes < sp.nbytes / 3  # int8 codes, not float32
                assert torch.equal(sq.to("cpu", non_blocking=True), sp)


@pytest.mark.slow
def test_compact_batches_from_worker_processes_keep_the_lossless_stacks_in_shared_slots(tmp_path, speech_manifest):
    """With worker processes, a compact batch's lossless stacks are still built in the shared slots (they used to
    be turned off for every store) and its lossy ones travel as codes beside them, each in its place."""
    stores = [extract(speech_manifest, model, tmp_path / codec, device="cpu", progress=False, codec=codec,
                      chunk_frames=16).url for model, codec in (("toy-wavlm", "int8-std08"), ("toy-whisper", "zstd"))]
    loader = make_loader(stores, max_frames=300, compact=True, num_workers=1)
    view = loader.dataset.view
    assert loader.dataset.slots.nbytes == 300 * view.num_layers * view.dims[1] * 4  # sized for toy-whisper's only
    plain = list(make_loader(stores, max_frames=300))
    got = list(loader)
    assert [b["ids"] for b in got] == [b["ids"] for b in plain]
    for p, q in zip(plain, got):
        assert isinstance(q["stacks"][0], CompactStack) and isinstance(q["stacks"][1], torch.Tensor)
        assert torch.equal(q["stacks"][0].to("cpu"), p["stacks"][0]) and torch.equal(q["stacks"][1], p["stacks"][1])


@pytest.mark.slow
def test_kill_9_then_rerun_of_a_lossy_extraction_is_byte_identical(long_manifest, tmp_path, extract_cmd, run_extract,
                                                                   kill_extract_midway):
    def cmd(cache):
        return extract_cmd(long_manifest, cache, "--codec", "int8-std10")

    run_extract(cmd(tmp_path / "ref"))
    chunk_dir = tmp_path / "killed" / long_manifest.name / "toy-wavlm.zarr" / "hidden" / "c"
    kill_extract_midway(cmd(tmp_path / "killed"), chunk_dir)
    assert 0 < int(FeatureStore.open(chunk_dir.parents[1]).done_chunks().sum())
    run_extract(cmd(tmp_path / "killed"))
    ref = FeatureStore.open(tmp_path / "ref" / long_manifest.name / "toy-wavlm.zarr")
    resumed = FeatureStore.open(chunk_dir.parents[1])
    assert resumed.is_complete() and resumed.info.codec == "int8-std10"
    for c in range(ref.num_chunks):  # the encoded bytes, not only the decoded values
        assert _chunk(ref.url, c).read_bytes() == _chunk(resumed.url, c).read_bytes()
    assert describe(ref)["measured_error"] == describe(resumed)["measured_error"]


@pytest.mark.slow
@pytest.mark.parametrize("codec", LOSSY)
def test_verify_catches_a_flipped_bit_in_a_lossy_chunk(tmp_path, codec):
    s = lossy_store(tmp_path / "s.zarr", activations(), codec)
    path = _chunk(s.url, 1)
    good = path.read_bytes()
    rng = np.random.default_rng(0)
    for bit in rng.choice(len(good) * 8, 20, replace=False):
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(bad))
        faults = check_store(FeatureStore.open(s.url))
        assert faults and "chunk 1 " in faults[0], f"bit {bit} went unnoticed"
        with pytest.raises(FusionpipeError, match="chunk 1 .*verify --repair"):  # the GPU path's read too
            FeatureStore.open(s.url).read_codes(50, 130)
    path.write_bytes(good)
    assert check_store(FeatureStore.open(s.url)) == []


def test_a_resume_with_another_codec_is_refused(speech_manifest, tmp_path):
    r = extract(speech_manifest, "toy-wavlm", tmp_path, device="cpu", progress=False, codec="int8")
    from fusionpipe.errors import FusionpipeError
    with pytest.raises(FusionpipeError, match="codec: cached 'int8', now 'int8-std10'"):
        extract(speech_manifest, "toy-wavlm", tmp_path, device="cpu", progress=False, codec="int8-std10", url=r.url)


def test_extract_codec_is_recorded_and_inspect_shows_ratio_and_measured_error(speech_manifest, tmp_path):
    from typer.testing import CliRunner

    from fusionpipe.cli import app
    runner = CliRunner()
    got = runner.invoke(app, ["extract", "--model", "toy-wavlm", "--manifest", str(speech_manifest.source), "--cache",
                              str(tmp_path), "--device", "cpu", "--codec", "int8-std10"], catch_exceptions=False)
    assert got.exit_code == 0, got.output
    url = tmp_path / speech_manifest.name / "toy-wavlm.zarr"
    assert FeatureStore.open(url).info.codec == "int8-std10"
    shown = runner.invoke(app, ["inspect", str(url)], catch_exceptions=False).output
    assert "int8-std10" in shown and "ratio_to_float16" in shown and "bytes_per_audio_second" in shown
    assert "measured_error" in shown and "mean " in shown


@pytest.mark.slow
def test_training_on_codes_expanded_by_the_trainer_equals_training_on_the_loaders_tensors(
        tmp_path, pitch_stores, train_config, logged_losses, monkeypatch):
    """The GPU path end to end, on the CPU: with `expands_on` forced, the trainer and its dev evaluation get
    CompactStacks and expand them themselves; the losses and dev metrics are the float32 path's, exactly."""
    from fusionpipe.fuse import view
    from fusionpipe.train import evaluation, loop

    lossy = {split: [extract(FeatureStore.open(u).recorded_manifest(), model, tmp_path / "cache", device="cpu",
                             progress=False, codec="int8-std08").url
                     for u, model in zip(urls, ("toy-wavlm", "toy-whisper"))]
             for split, urls in pitch_stores.items()}
    kw = dict(fusion=["hconv", "weighted-sum"], steps=12, eval_every=6)
    loop.train(train_config(lossy, tmp_path / "tensors", **kw), progress=False)
    expanded = []
    to = view.CompactStack.to
    monkeypatch.setattr(view.CompactStack, "to", lambda self, *a, **k: expanded.append(1) or to(self, *a, **k))
    monkeypatch.setattr(loop, "expands_on", lambda device: True)
    loop.train(train_config(lossy, tmp_path / "codes", **kw), progress=False)
    assert len(expanded) > 12  # every training batch and every dev batch
    for variant in ("hconv-concat", "weighted-sum-concat"):
        assert logged_losses(tmp_path / "codes", variant) == logged_losses(tmp_path / "tensors", variant)
        dev = [json.loads((tmp_path / run / variant / "results.json").read_text())["dev"] for run in ("codes", "tensors")]
        assert untimed(dev[0]) == untimed(dev[1])
    scores = [evaluation.evaluate(tmp_path / run, lossy["dev"]) for run in ("codes", "tensors")]
    assert {k: untimed(m) for k, m in scores[0].items()} == {k: untimed(m) for k, m in scores[1].items()}


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}


def test_the_extract_help_offers_every_codec_of_the_table_and_recommends_the_recommended_one(monkeypatch):
    import inspect

    from fusionpipe import cli, codecs
    help_text = inspect.signature(cli.extract).parameters["codec"].default.help
    assert all(name in help_text for name in codecs.CODECS)
    assert f"for large corpora: {codecs.RECOMMENDED_LOSSY}" in help_text
    monkeypatch.setitem(codecs.CODECS, "int4", codecs.Codec("a codec added to the table", 0.2, codecs.ZSTD, {}))
    monkeypatch.setattr(codecs, "LOSSY", (*codecs.LOSSY, "int4"))
    assert "int4 (5.0x)" in codecs.help_text()


def test_zarrs_private_codec_pipeline_is_reached_in_one_place_and_still_works():
    """store.codec_pipeline is the only use of zarr's private API: if a zarr upgrade moves it, this fails."""
    from fusionpipe.store import codec_pipeline
    a = zarr.create_array({}, shape=(8, 2, 3), chunks=(4, 2, 3), dtype="float16", compressors=compressors("int8"),
                          serializer=serializer("int8"), fill_value=float("nan"))
    pipeline, spec = codec_pipeline(a)
    x = np.arange(24, dtype=np.float16).reshape(4, 2, 3)
    (buf,) = asyncio.run(pipeline.encode([(spec.prototype.nd_buffer.from_numpy_array(x), spec)]))
    (back,) = asyncio.run(pipeline.decode([(buf, spec)]))
    assert spec.shape == (4, 2, 3) and [type(c).__name__ for c in pipeline.bytes_bytes_codecs] == ["ZstdCodec",
                                                                                                   "Crc32cCodec"]
    np.testing.assert_allclose(back.as_numpy_array(), x, atol=0.1)


def test_a_zarr_without_that_private_api_is_named_with_its_version():
    from fusionpipe.store import codec_pipeline
    a = zarr.create_array({}, shape=(4,), chunks=(4,), dtype="float32")
    message = rf"zarr {zarr.__version__} changed the private API .*store.py `codec_pipeline`"
    with pytest.raises(RuntimeError, match=message):
        codec_pipeline(type("Array", (), {"ndim": 1, "_async_array": object()})())
    assert codec_pipeline(a)[1].shape == (4,)
