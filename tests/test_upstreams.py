"""Upstreams: the registry, exact frame counts, batch independence, loading and its errors."""

import hashlib
import json
import os

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor, AutoModel, BertConfig

from fusionpipe.errors import FusionpipeError
from fusionpipe.extract.registry import UPSTREAMS, list_upstreams
from fusionpipe.extract.toys import TOY_VERSION, make_local_model
from fusionpipe.extract.upstreams import load_upstream

SSL_TOYS = ["toy-wavlm", "toy-hubert", "toy-data2vec"]


@pytest.fixture(scope="module")
def toy():
    """alias -> the loaded toy upstream on CPU, each built and loaded once."""
    loaded = {}
    return lambda alias: loaded.setdefault(alias, load_upstream(alias, device="cpu"))


def noise(num_samples: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(num_samples)).astype(np.float32)


def plain_forward(upstream, wave: np.ndarray) -> torch.Tensor:
    """One utterance through plain transformers, loaded afresh from the same directory: (T, L, D).

    The last layer is the encoder's output (last_hidden_state): see test_last_layer_is_the_normalised_encoder_output.
    """
    fe = AutoFeatureExtractor.from_pretrained(upstream.model_id)
    model = AutoModel.from_pretrained(upstream.model_id).eval()
    with torch.inference_mode():
        if upstream.family == "whisper":
            out = model.encoder(fe(wave, sampling_rate=16000, return_tensors="pt").input_features,
                                output_hidden_states=True)
        else:
            out = model(fe(wave, sampling_rate=16000, return_tensors="pt").input_values, output_hidden_states=True)
    return torch.stack((*out.hidden_states[:-1], out.last_hidden_state), dim=2)[0, :upstream.num_frames(len(wave))]


# ---- registry ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias, hf_id, num_layers, hidden_size, family", [
    ("hubert-base", "facebook/hubert-base-ls960", 13, 768, "ssl"),
    ("hubert-large", "facebook/hubert-large-ll60k", 25, 1024, "ssl"),
    ("wavlm-base-plus", "microsoft/wavlm-base-plus", 13, 768, "ssl"),
    ("wavlm-large", "microsoft/wavlm-large", 25, 1024, "ssl"),
    ("data2vec-base", "facebook/data2vec-audio-base", 13, 768, "ssl"),
    ("data2vec-large", "facebook/data2vec-audio-large", 25, 1024, "ssl"),
    ("wav2vec2-base", "facebook/wav2vec2-base", 13, 768, "ssl"),
    ("whisper-base", "openai/whisper-base", 7, 512, "whisper"),
    ("whisper-small", "openai/whisper-small", 13, 768, "whisper"),
    ("whisper-small.en", "openai/whisper-small.en", 13, 768, "whisper"),
    ("whisper-medium", "openai/whisper-medium", 25, 1024, "whisper"),
    ("whisper-large-v3", "openai/whisper-large-v3", 33, 1280, "whisper"),
])
def test_registry_rows_follow_the_method_table(alias, hf_id, num_layers, hidden_size, family):
    spec = UPSTREAMS[alias]
    assert (spec.hf_id, spec.num_layers, spec.hidden_size, spec.frame_rate, spec.family) == (
        hf_id, num_layers, hidden_size, 50.0, family)


def test_list_upstreams_is_every_row_toys_included():
    specs = list_upstreams()
    assert [s.alias for s in specs] == list(UPSTREAMS)
    assert {"toy-wavlm", "toy-hubert", "toy-whisper", "toy-data2vec"} <= {s.alias for s in specs}
    assert all(s.hf_id.startswith("toy:") == s.alias.startswith("toy-") for s in specs)


def test_toy_models_differ_in_shape_and_match_their_rows(toy):
    toys = [s for s in list_upstreams() if s.alias.startswith("toy-")]
    assert len({(s.num_layers, s.hidden_size) for s in toys}) == len({s.hidden_size for s in toys}) == len(toys)
    for s in toys:
        up = toy(s.alias)
        assert (up.num_layers, up.hidden_size, up.frame_rate, up.family) == (
            s.num_layers, s.hidden_size, s.frame_rate, s.family)


def test_toy_wavlm_has_group_norm_convs_and_toy_hubert_layer_norm_convs(toy):
    wavlm, hubert = toy("toy-wavlm"), toy("toy-hubert")
    assert wavlm.model.config.feat_extract_norm == "group" and not wavlm.feature_extractor.return_attention_mask
    assert hubert.model.config.feat_extract_norm == "layer" and hubert.model.config.do_stable_layer_norm
    assert hubert.feature_extractor.return_attention_mask


# ---- frames -----------------------------------------------------------------------------------------------
def test_one_second_is_49_frames_for_ssl_and_50_for_whisper(toy):
    assert [toy(a).num_frames(16000) for a in SSL_TOYS] == [49, 49, 49]
    assert toy("toy-whisper").num_frames(16000) == 50


@pytest.mark.parametrize("alias", SSL_TOYS)
def test_num_frames_is_the_forward_length_for_ssl(toy, alias):
    up = toy(alias)
    lengths = [0, 399, 400, 401, 16000, 33333]
    out = up.forward([noise(n, seed=n) for n in lengths])
    assert [h.shape for h in out] == [(up.num_frames(n), up.num_layers, up.hidden_size) for n in lengths]
    assert [up.num_frames(n) for n in lengths] == [0, 0, 1, 1, 49, 103]
    assert up.forward([noise(399)])[0].shape == (0, up.num_layers, up.hidden_size)


def test_num_frames_is_the_forward_length_for_whisper_across_windows(toy):
    up = toy("toy-whisper")
    lengths = [0, 400, 16000, 16001, 33333, 480000, 31 * 16000, 61 * 16000]
    out = up.forward([noise(n, seed=n) for n in lengths])
    assert [h.shape for h in out] == [(up.num_frames(n), up.num_layers, up.hidden_size) for n in lengths]
    assert [up.num_frames(n) for n in lengths] == [0, 2, 50, 51, 105, 1500, 1550, 3050]


def test_whisper_frames_are_those_of_the_feature_extractors_attention_mask(toy):
    """A frame is real when its centre lies in the audio: ceil(n / 160) mel frames, then the stride-2 conv."""
    up = toy("toy-whisper")
    w = up.feature_extractor.n_samples  # one window
    for n in [1, 159, 160, 161, 16001, 16159, 33333, w - 1, w]:
        mask = up.feature_extractor(np.zeros(n, np.float32), sampling_rate=16000, return_attention_mask=True,
                                    return_tensors="pt").attention_mask
        assert up.num_frames(n) == int(up.model._get_feat_extract_output_lengths(mask.sum())), n


def test_whisper_audio_longer_than_a_window_is_independent_windows_concatenated(toy):
    up = toy("toy-whisper")  # 4 s windows (30 s for the real models)
    w = up.feature_extractor.n_samples
    wave = noise(2 * w + 16000)
    (whole,) = up.forward([wave])
    windows = up.forward([wave[:w], wave[w:2 * w], wave[2 * w:]])
    torch.testing.assert_close(whole, torch.cat(windows), rtol=0, atol=0)


# ---- batch independence -------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias", ["toy-wavlm", "toy-hubert", "toy-data2vec", "toy-whisper"])
def test_batch_equals_each_utterance_alone_through_plain_transformers(toy, alias):
    """Group norm (wavlm), layer norm (hubert), stacked positional convs (data2vec), 30 s windows (whisper)."""
    up = toy(alias)
    waves = [noise(24011, seed=1), 3 * noise(51234, seed=2), noise(8001, seed=3) + 0.05]
    for got, wave in zip(up.forward(waves), waves):
        torch.testing.assert_close(got, plain_forward(up, wave), rtol=1e-4, atol=1e-4)


def test_last_layer_is_the_normalised_encoder_output(toy):
    """Stable-layer-norm models (toy-hubert, like the large ones): the final layer norm is applied to the last
    hidden state, as in s3prl and transformers 4 (transformers 5 records it before that norm)."""
    up = toy("toy-hubert")
    wave = noise(16000)
    (got,) = up.forward([wave])
    x = up.feature_extractor(wave, sampling_rate=16000, return_tensors="pt").input_values
    with torch.inference_mode():
        out = up.model(x, output_hidden_states=True)
    torch.testing.assert_close(got[:, -1], out.last_hidden_state[0])
    last = out.hidden_states[-1][0]
    if not torch.allclose(last, out.last_hidden_state[0]):  # transformers 5: recorded before the final norm
        torch.testing.assert_close(got[:, -1], up.model.encoder.layer_norm(last))


def test_forward_is_float32_on_cpu_in_eval_mode(toy):
    up = toy("toy-wavlm")
    (h,) = up.forward([noise(8000)])
    assert h.dtype == torch.float32 and h.device == torch.device("cpu") and not up.model.training


def test_layerdrop_in_the_config_still_gives_every_hidden_state(tmp_path):
    model_dir = make_local_model("wavlm", tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "layerdrop": 0.99}))
    up = load_upstream(str(model_dir), device="cpu")
    first, second = up.forward([noise(16000)]), up.forward([noise(16000)])
    assert first[0].shape == (49, up.num_layers, up.hidden_size) == (49, 4, 32)
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=0)


# ---- loading ------------------------------------------------------------------------------------------------
def test_local_directory_loads_with_the_weights_sha256_as_revision(tmp_path):
    model_dir = make_local_model("hubert", tmp_path / "my-hubert")
    up = load_upstream(str(model_dir), device="cpu")
    assert up.name == str(model_dir) and up.model_id == str(model_dir.resolve())
    assert up.revision == hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    fp = json.loads(json.dumps(up.fingerprint()))
    assert fp["revision"] == up.revision and (fp["num_layers"], fp["hidden_size"], fp["family"]) == (3, 48, "ssl")
    assert {"name", "model_id", "frame_rate", "fusionpipe_version"} <= fp.keys()


def test_same_seed_gives_the_same_revision_and_another_seed_another(tmp_path):
    revision = {d: load_upstream(str(make_local_model("whisper", tmp_path / d, seed=s)), device="cpu").revision
                for d, s in [("a", 0), ("b", 0), ("c", 1)]}
    assert revision["a"] == revision["b"] != revision["c"]


def test_toy_alias_is_built_once_under_fusionpipe_home(toy):
    up = toy("toy-wavlm")
    built = os.path.join(os.environ["FUSIONPIPE_HOME"], "toy", f"toy-wavlm-v{TOY_VERSION}")
    assert up.model_id == os.path.realpath(built)
    mtime = os.stat(os.path.join(built, "model.safetensors")).st_mtime_ns
    again = load_upstream("toy-wavlm", device="cpu")
    assert again.revision == up.revision and os.stat(os.path.join(built, "model.safetensors")).st_mtime_ns == mtime


def test_hub_id_loads_from_the_local_hf_cache_with_its_commit_as_revision(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-wavlm"
    make_local_model("wavlm", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    up = load_upstream("someone/tiny-wavlm", device="cpu")
    assert (up.model_id, up.revision, up.num_layers) == ("someone/tiny-wavlm", commit, 4)


# ---- errors -------------------------------------------------------------------------------------------------
def test_unknown_alias_lists_the_aliases_and_suggests_fusionpipe_models():
    with pytest.raises(FusionpipeError, match="fusionpipe models") as e:
        load_upstream("wavlm-base-pluss")
    assert "wavlm-base-plus" in str(e.value) and "toy-whisper" in str(e.value)


def test_hub_id_not_available_offline_says_where_it_looked_and_what_to_do(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FusionpipeError, match="could not load nobody/no-such-model from the hub or the local cache"
                       ) as e:
        load_upstream("nobody/no-such-model")
    assert "HF_HUB_OFFLINE" in str(e.value) and "local directory" in str(e.value)


def test_missing_directory_is_an_error_naming_it(tmp_path):
    with pytest.raises(FusionpipeError, match="does not exist"):
        load_upstream(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("garbage", ["config", "weights"])
def test_directory_with_garbage_is_an_error_naming_it(tmp_path, garbage):
    model_dir = make_local_model("hubert", tmp_path / "broken")
    (model_dir / ("config.json" if garbage == "config" else "model.safetensors")).write_text("garbage")
    with pytest.raises(FusionpipeError, match=f"could not load upstream {model_dir}"):
        load_upstream(str(model_dir), device="cpu")


def test_unsupported_architecture_is_an_error(tmp_path):
    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(
        tmp_path / "bert")
    with pytest.raises(FusionpipeError, match="'bert' model; supported: hubert, wavlm"):
        load_upstream(str(tmp_path / "bert"))
