"""Stage 1 end to end: manifest -> frozen toy upstream -> Zarr store, resumable and safe."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import zarr
from transformers import AutoFeatureExtractor, AutoModel

from fusionpipe.chunks import starts
from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.batching import plan
from fusionpipe.extract.stage import extract
from fusionpipe.extract.upstreams import load_upstream
from fusionpipe.integrity import check_store
from fusionpipe.manifest import Manifest, Utterance, read_manifest, write_manifest
from fusionpipe.store import FeatureStore, store_order


def _plain_forward(upstream, wave):
    """Single utterance through plain transformers, as a user would run it: (T, L, D)."""
    fe = AutoFeatureExtractor.from_pretrained(upstream.model_id)
    model = AutoModel.from_pretrained(upstream.model_id).eval()
    with torch.inference_mode():
        if upstream.family == "whisper":
            feats = fe(wave, sampling_rate=16000, return_tensors="pt").input_features
            hs = model.encoder(feats, output_hidden_states=True).hidden_states
            return torch.stack(hs, 2)[0, :upstream.num_frames(len(wave))]
        x = fe(wave, sampling_rate=16000, return_tensors="pt").input_values
        out = model(x, output_hidden_states=True)
        # the last layer is the encoder output: with the final layer norm of stable-layer-norm models
        # (transformers 5 records hidden_states[-1] before it; s3prl and the paper use the normalised one)
        return torch.stack([*out.hidden_states[:-1], out.last_hidden_state], 2)[0]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["toy-wavlm", "toy-hubert", "toy-whisper"])
def test_cached_features_equal_single_utterance_forward(model, speech_manifest, tmp_path):
    """Batching, padding and the store never change an utterance's features (group norm, layer norm, Whisper)."""
    upstream = load_upstream(model, device="cpu")
    result = extract(speech_manifest, upstream, tmp_path, max_seconds=60, progress=False)
    store = FeatureStore.open(result.url)
    assert store.is_complete() and len(store) == len(speech_manifest)
    for row, utt in enumerate(speech_manifest):
        wave, _ = sf.read(speech_manifest.audio_path(utt), dtype="float32")
        expected = _plain_forward(upstream, wave).numpy()
        cached = store.read(utt.id)
        assert cached.dtype == np.float16
        assert cached.shape == expected.shape == (upstream.num_frames(len(wave)), upstream.num_layers,
                                                  upstream.hidden_size)
        np.testing.assert_allclose(cached.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_store_records_fingerprint_and_layout(speech_manifest, tmp_path):
    r = extract(speech_manifest, "toy-wavlm", tmp_path, progress=False, device="cpu")
    store = FeatureStore.open(r.url)
    assert r.url == f"{tmp_path}/{speech_manifest.name}/toy-wavlm.zarr"
    a = store.attrs
    assert a["manifest"]["sha256"] == speech_manifest.content_hash()
    assert a["upstream"]["name"] == "toy-wavlm" and len(a["upstream"]["revision"]) >= 12
    assert (a["dtype"], a["codec"], a["num_layers"]) == ("float16", "zstd", store.hidden.shape[1])
    assert store.hidden.chunks[1:] == store.hidden.shape[1:], "chunked on frames only"
    assert int(store.lengths.sum()) == store.total_frames == store.hidden.shape[0]
    assert sorted(store.ids) == sorted(u.id for u in speech_manifest)


def test_second_extract_is_a_noop_that_says_so(speech_manifest, tmp_path):
    extract(speech_manifest, "toy-wavlm", tmp_path, progress=False, device="cpu")
    again = extract(speech_manifest, "toy-wavlm", tmp_path, progress=False, device="cpu")
    assert again.already_complete and "already complete" in again.summary()


@pytest.mark.slow
def test_store_of_another_fingerprint_is_refused_unless_overwrite(speech_manifest, tmp_path):
    r = extract(speech_manifest, "toy-wavlm", tmp_path, progress=False, device="cpu")
    with pytest.raises(FusionpipeError, match="dtype.*--overwrite"):
        extract(speech_manifest, "toy-wavlm", tmp_path, dtype="float32", progress=False, device="cpu")
    r2 = extract(speech_manifest, "toy-wavlm", tmp_path, dtype="float32", overwrite=True, progress=False,
                 device="cpu")
    assert r2.url == r.url and FeatureStore.open(r.url).hidden.dtype == np.float32


def test_a_store_killed_while_being_created_asks_for_overwrite(speech_manifest, tmp_path):
    """The arrays exist but the metadata written last (with `format`) does not: refused, --overwrite mends it."""
    url = tmp_path / "half.zarr"
    group = zarr.open_group(str(url), mode="w")
    group.create_array("hidden", shape=(10, 4, 32), chunks=(5, 4, 32), dtype="float16")
    with pytest.raises(FusionpipeError, match="interrupted.*--overwrite"):
        extract(speech_manifest, "toy-wavlm", url=str(url), progress=False, device="cpu")
    r = extract(speech_manifest, "toy-wavlm", url=str(url), overwrite=True, progress=False, device="cpu")
    assert FeatureStore.open(r.url).is_complete()


def test_changed_manifest_is_refused(speech_manifest, tmp_path):
    r = extract(speech_manifest, "toy-wavlm", tmp_path, progress=False, device="cpu")
    smaller = Manifest(speech_manifest.name, speech_manifest.root, speech_manifest.utterances[:-1])
    with pytest.raises(FusionpipeError, match="manifest .* changed"):
        extract(smaller, "toy-wavlm", tmp_path, progress=False, device="cpu", url=r.url)


def test_batch_plan_respects_the_budget_and_sorts_longest_first(speech_manifest):
    upstream = load_upstream("toy-wavlm", device="cpu")
    p = plan(speech_manifest, upstream, max_seconds=4.0)
    assert list(p.layout.lengths) == sorted(p.layout.lengths, reverse=True)
    assert sorted(i for b in p.batches for i in b) == list(range(len(speech_manifest)))
    for b in p.batches:
        longest = max(speech_manifest[p.rows[i]].duration for i in b)
        assert len(b) == 1 or len(b) * longest <= 4.0


def test_store_order_is_longest_first_with_ties_by_id_and_offsets_follow_the_lengths():
    order = store_order(["b", "a", "c", "d"], [3, 5, 3, 1])
    assert list(order) == [1, 0, 2, 3]  # a (5), then b and c (3, by id), then d (1)
    assert list(starts([5, 3, 0, 1])) == [0, 5, 8, 8] and starts([]).dtype == np.int64 and len(starts([])) == 0


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted_run(long_manifest, tmp_path, extract_cmd, run_extract,
                                                    kill_extract_midway):
    """A real SIGKILL mid-extraction: the rerun completes and every array is byte-identical."""
    run_extract(extract_cmd(long_manifest, tmp_path / "ref"))
    chunk_dir = tmp_path / "killed" / long_manifest.name / "toy-wavlm.zarr" / "hidden" / "c"
    kill_extract_midway(extract_cmd(long_manifest, tmp_path / "killed"), chunk_dir)
    partial = FeatureStore.open(chunk_dir.parents[1])
    n_done = int(partial.done_chunks().sum())
    assert 0 < n_done < partial.num_chunks
    run_extract(extract_cmd(long_manifest, tmp_path / "killed"))
    ref = FeatureStore.open(tmp_path / "ref" / long_manifest.name / "toy-wavlm.zarr")
    resumed = FeatureStore.open(chunk_dir.parents[1])
    assert resumed.is_complete()
    assert ref.ids == resumed.ids
    assert np.array_equal(ref.offsets, resumed.offsets) and np.array_equal(ref.lengths, resumed.lengths)
    assert ref.hidden[:].tobytes() == resumed.hidden[:].tobytes()


# ---- bad input ------------------------------------------------------------------------------
def _one_bad(tmp_path, speech_manifest, make_bad):
    """The good manifest plus one bad row made by make_bad(dir) -> Utterance."""
    bad = make_bad(speech_manifest.root)
    m = Manifest("withbad", speech_manifest.root, [*speech_manifest.utterances, bad])
    write_manifest(m, tmp_path / "withbad.tsv")
    return read_manifest(tmp_path / "withbad.tsv")


def _missing(root):
    return Utterance("missing", "nope.wav", 16000, 16000)


def _corrupt(root):
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    return Utterance("corrupt", "corrupt.wav", 16000, 16000)


def _empty(root):
    sf.write(root / "empty.wav", np.zeros(0, np.float32), 16000)
    return Utterance("empty", "empty.wav", 0, 16000)


def _too_short(root):
    sf.write(root / "short.wav", np.zeros(100, np.float32), 16000)
    return Utterance("short", "short.wav", 100, 16000)


def _wrong_rate(root):
    sf.write(root / "rate.wav", np.zeros(8000, np.float32), 8000)
    return Utterance("rate", "rate.wav", 16000, 16000)  # the manifest lies about the rate


def _nan(root):
    x = np.zeros(16000, np.float32)
    x[100] = np.nan
    sf.write(root / "nan.wav", x, 16000, subtype="FLOAT")
    return Utterance("nan", "nan.wav", 16000, 16000)


@pytest.mark.parametrize("make_bad,message", [
    (_missing, "does not exist"), (_corrupt, "cannot read"), (_empty, "empty|shorter than one frame"),
    pytest.param(_too_short, "shorter than one frame", marks=pytest.mark.slow),
    pytest.param(_wrong_rate, "manifest says", marks=pytest.mark.slow), (_nan, "NaN"),
])
def test_bad_row_is_an_error_naming_it_or_a_recorded_skip(make_bad, message, speech_manifest, tmp_path):
    m = _one_bad(tmp_path, speech_manifest, make_bad)
    bad_id = m[-1].id
    with pytest.raises(FusionpipeError, match=f"(?s)withbad.tsv row {len(m)} \\(id {bad_id}\\).*({message}).*--skip-bad"):
        extract(m, "toy-wavlm", tmp_path / "a", progress=False, device="cpu")
    r = extract(m, "toy-wavlm", tmp_path / "b", progress=False, device="cpu", skip_bad=True)
    store = FeatureStore.open(r.url)
    assert r.skipped == 1 and list(store.skipped()) == [bad_id]
    assert store.is_complete() and check_store(store) == []


def test_other_sample_rates_are_resampled_and_stereo_down_mixed(tmp_path):
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "a8k.wav", rng.standard_normal(8000).astype(np.float32) * 0.1, 8000)
    sf.write(tmp_path / "st.wav", rng.standard_normal((16000, 2)).astype(np.float32) * 0.1, 16000)
    m = Manifest("mixed", tmp_path, [Utterance("a8k", "a8k.wav", 8000, 8000), Utterance("st", "st.wav", 16000, 16000)])
    with pytest.warns(UserWarning, match="down-mixed"):
        r = extract(m, "toy-wavlm", tmp_path / "cache", progress=False, device="cpu")
    store = FeatureStore.open(r.url)
    assert store.read("a8k").shape[0] == store.read("st").shape[0] == 49  # both 1 s at 16 kHz


def test_unknown_model_alias_is_a_clear_error(speech_manifest, tmp_path):
    with pytest.raises(FusionpipeError, match="fusionpipe models"):
        extract(speech_manifest, "wavlm-bass-plus", tmp_path, progress=False)


@pytest.mark.slow
def test_verify_reports_a_corrupted_chunk(speech_manifest, tmp_path):
    r = extract(speech_manifest, "toy-wavlm", tmp_path, progress=False, device="cpu", chunk_frames=32)
    assert check_store(FeatureStore.open(r.url)) == []
    chunk = Path(r.url) / "hidden" / "c" / "1" / "0" / "0"
    chunk.write_bytes(b"garbage")
    faults = check_store(FeatureStore.open(r.url))
    assert faults and "chunk 1" in faults[0]


def test_an_all_zero_chunk_still_counts_as_done_after_reopening(tmp_path):
    """A skipped utterance's frames are zeros: that chunk must be written, or the store never completes."""
    from fusionpipe.store import Layout

    FeatureStore.create(tmp_path / "z.zarr", Layout(["a"], np.array([10])), num_layers=2, hidden_size=3)
    store = FeatureStore.open(tmp_path / "z.zarr", mode="r+")
    store.write_chunk(0, np.zeros((10, 2, 3), np.float16))
    assert FeatureStore.open(tmp_path / "z.zarr").is_complete()


@pytest.mark.slow
def test_stores_live_at_any_fsspec_url(speech_manifest):
    """memory:// stands for s3://, gs://...: same layout, resume and fingerprint rules through fsspec."""
    from fusionpipe.fuse.loader import make_loader

    urls = [extract(speech_manifest, m, "memory://fp-test", device="cpu", progress=False).url
            for m in ("toy-wavlm", "toy-whisper")]
    assert urls[0] == f"memory://fp-test/{speech_manifest.name}/toy-wavlm.zarr"
    assert FeatureStore.open(urls[0]).is_complete() and check_store(FeatureStore.open(urls[0])) == []
    assert extract(speech_manifest, "toy-wavlm", "memory://fp-test", device="cpu", progress=False).already_complete
    with pytest.raises(FusionpipeError, match="--overwrite"):
        extract(speech_manifest, "toy-wavlm", "memory://fp-test", dtype="float32", device="cpu", progress=False)
    batch = next(iter(make_loader(urls, max_frames=10_000)))
    assert len(batch["ids"]) == len(speech_manifest) and len(batch["stacks"]) == 2
