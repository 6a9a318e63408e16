"""`fusionpipe analyze`: layer CKA between upstreams (stores), layer use of trained interfaces (runs)."""

import numpy as np
import pytest

from fusionpipe.analyze.cka import cka_matrix, layer_similarity, read_similarity, sample_frames, write_similarity
from fusionpipe.errors import FusionpipeError


def _gram_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """The textbook computation (Kornblith et al. 2019, their reference code): N x N Gram matrices, centred."""
    def center(k):
        k = k.copy()
        n = len(k)
        if not debiased:
            h = np.eye(n) - 1 / n
            return h @ k @ h
        np.fill_diagonal(k, 0)
        means = k.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        k -= means[:, None]
        k -= means[None, :]
        np.fill_diagonal(k, 0)
        return k

    kx, ky = center(x @ x.T), center(y @ y.T)
    return float((kx * ky).sum() / np.sqrt((kx * kx).sum() * (ky * ky).sum()))


def _two_upstreams(rng, n=60):
    a = rng.standard_normal((n, 3, 5)) + 4.0  # off-centre on purpose: centring is the estimator's job
    b = np.stack([a[:, 0] @ rng.standard_normal((5, 7)), rng.standard_normal((n, 7)) * 3 - 1], 1)  # (n, 2, 7)
    return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("estimator", ["linear", "debiased"])
def test_streamed_cka_equals_the_gram_matrix_computation(estimator):
    a, b = _two_upstreams(np.random.default_rng(0))
    got = cka_matrix([a, b], estimator)
    layers = [a[:, i].astype(np.float64) for i in range(3)] + [b[:, i].astype(np.float64) for i in range(2)]
    want = np.array([[_gram_cka(x, y, estimator == "debiased") for y in layers] for x in layers])
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got, got.T)


@pytest.mark.parametrize("estimator", ["linear", "debiased"])
def test_cka_of_a_representation_with_itself_and_an_orthogonal_transform_of_it_is_one(estimator):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 16)).astype(np.float32) @ rng.standard_normal((16, 16)).astype(np.float32)
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    pair = np.stack([x, x @ q.astype(np.float32), 3 * x + 2], 1)  # itself, rotated, scaled and shifted
    np.testing.assert_allclose(cka_matrix([pair], estimator), np.ones((3, 3)), atol=1e-5)


def test_unrelated_random_features_score_near_zero_given_enough_frames():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20_000, 1, 8)).astype(np.float32)
    y = rng.standard_normal((20_000, 1, 8)).astype(np.float32)
    assert cka_matrix([x, y], "linear")[0, 1] < 0.01
    wide = [rng.standard_normal((2000, 1, 256)).astype(np.float32) for _ in range(2)]
    assert cka_matrix(wide, "linear")[0, 1] > 0.05  # the linear estimator's bias when D is not small against N
    assert abs(cka_matrix(wide, "debiased")[0, 1]) < 0.01


def test_frames_are_a_seeded_sample_of_distinct_aligned_frames():
    lengths = np.array([5, 3, 8])
    utt, t = sample_frames(lengths, 10, seed=3)
    assert len(set(zip(utt.tolist(), t.tolist()))) == 10 and (t < lengths[utt]).all() and (t >= 0).all()
    assert all((a == b).all() for a, b in zip((utt, t), sample_frames(lengths, 10, seed=3)))
    utt, t = sample_frames(lengths, 100, seed=0)  # more than there are: all of them
    assert len(utt) == 16


@pytest.fixture
def related_stores(tmp_path, make_tsv, make_store):
    """Two stores of one manifest: B (2 layers, 6 dims, 25 Hz) is a linear map of A's layer 1 (A: 3 layers, 4 dims,
    50 Hz) in its layer 0 and noise in its layer 1; A moves slowly in time, so B at half A's rate, aligned back
    to A's frames, is close to A."""
    rng = np.random.default_rng(0)
    ids = [f"u{i}" for i in range(12)]
    m = make_tsv(tmp_path / "m.tsv", ids)
    a, b = {}, {}
    w = rng.standard_normal((4, 6))
    for i, u in enumerate(ids):
        x = rng.standard_normal((20 + 2 * i, 3, 4)).cumsum(0).astype(np.float32)  # slow: survives resampling
        a[u] = x
        slow = x[::2, 1] @ w  # B runs at half the frame rate
        b[u] = np.stack([slow, rng.standard_normal(slow.shape)], 1).astype(np.float32)
    sa = make_store(tmp_path / "a.zarr", a, m, name="up-a", chunk_frames=16)
    sb = make_store(tmp_path / "b.zarr", b, m, name="up-b", chunk_frames=16, frame_rate=25.0)
    return sa.url, sb.url


def test_store_cka_compares_every_layer_at_aligned_frames(related_stores):
    sim = layer_similarity(related_stores, frames=300, seed=0)
    assert sim.upstreams == ["up-a", "up-b"] and sim.layers == [3, 2] and sim.matrix.shape == (5, 5)
    assert sim.frames == 300
    np.testing.assert_allclose(np.diag(sim.matrix), 1, atol=1e-6)
    cross = sim.block(0, 1)
    assert cross[1, 0] > 0.5 and cross[1, 0] == cross.max()  # B's layer 0 is a map of A's layer 1
    assert cross[:, 1].max() < 0.3
    again = layer_similarity(related_stores, frames=300, seed=0)
    np.testing.assert_array_equal(sim.matrix, again.matrix)  # the sample is seeded
    pair = next(r for r in sim.summary() if r["upstream_a"] == "up-a" and r["upstream_b"] == "up-b")
    assert 0 < pair["mean_best_match"] < 1 and pair["max"] == cross.max()


@pytest.mark.slow
def test_cka_csv_round_trips(related_stores, tmp_path):
    import matplotlib.image

    sim = layer_similarity(related_stores, frames=100, seed=1, estimator="debiased")
    paths = write_similarity(sim, tmp_path / "out")
    back = read_similarity(tmp_path / "out")
    np.testing.assert_array_equal(back.matrix, sim.matrix)
    assert (back.upstreams, back.layers, back.frames, back.estimator, back.seed, back.manifest) == (
        sim.upstreams, sim.layers, sim.frames, sim.estimator, sim.seed, sim.manifest)
    assert matplotlib.image.imread(paths[-1]).shape[0] > 100
    assert "mean_best_match" in (tmp_path / "out" / "cka-summary.csv").read_text().splitlines()[0]


def test_bad_estimator_and_sample_size_are_refused_naming_the_flag(related_stores):
    with pytest.raises(FusionpipeError, match="--estimator"):
        layer_similarity(related_stores, estimator="rbf")
    with pytest.raises(FusionpipeError, match="--frames"):
        layer_similarity(related_stores, frames=2)


# ---- layer use of a run --------------------------------------------------------------------------------
def test_knockout_of_layers_a_single_layer_interface_ignores_changes_nothing(pitch_stores, tmp_path, train_config):
    from fusionpipe.analyze.use import layer_use
    from fusionpipe.train.loop import train

    run = tmp_path / "run"
    train(train_config(pitch_stores, run, fusion=["single-layer"], merge=["add"], interface_options={"layer": 2},
                       steps=10, eval_every=10), progress=False)
    rows = layer_use(run, device="cpu")
    knock = {r["layer"]: r["value"] for r in rows if r["measure"] == "knockout" and r["metric"] == "accuracy"}
    assert sorted(knock) == [0, 1, 2, 3]  # toy-wavlm has 4 layers, toy-whisper's 3 are aligned to 4
    assert all(knock[layer] == 0 for layer in (0, 1, 3))
    dev = next(r["value"] for r in rows if r["measure"] == "dev" and r["metric"] == "accuracy")
    assert dev > 0.5 and knock[2] != 0  # the layer it reads is what it learned from


@pytest.mark.slow
def test_run_analysis_reads_weights_and_shares_per_seed_and_round_trips(pitch_stores, tmp_path, train_config):
    import matplotlib.image

    from fusionpipe.analyze.use import describe_use, layer_use, read_layer_use, write_layer_use
    from fusionpipe.train.loop import train

    run = tmp_path / "run"
    train(train_config(pitch_stores, run, fusion=["weighted-sum", "gumbel", "hconv"], merge=["add"], seeds=[0, 1],
                       steps=6, eval_every=6), progress=False)
    rows = layer_use(run, device="cpu")
    for seed in (0, 1):
        weights = [r["value"] for r in rows if r["measure"] == "weight" and r["seed"] == seed]
        assert len(weights) == 4 and abs(sum(weights) - 1) < 1e-6
        shares = {r["upstream"]: r["value"] for r in rows if r["measure"] == "share" and r["seed"] == seed}
        assert set(shares) == {"toy-wavlm", "toy-whisper"} and abs(sum(shares.values()) - 1) < 1e-6
        layer_shares = [r["value"] for r in rows if r["measure"] == "layer-share" and r["seed"] == seed]
        assert abs(sum(layer_shares) - 1) < 1e-6
    assert {r["variant"] for r in rows if r["measure"] == "knockout"} == {"weighted-sum-add", "gumbel-add", "hconv-add"}
    paths = write_layer_use(rows, tmp_path / "out")
    back = read_layer_use(tmp_path / "out")
    assert back == rows
    assert matplotlib.image.imread(paths[1]).shape[0] > 100
    assert "weighted-sum-add" in describe_use(rows)


@pytest.mark.slow
def test_cli_analyze_stores_and_a_run(pitch_stores, tmp_path, train_config):
    from typer.testing import CliRunner

    from fusionpipe.cli import app
    from fusionpipe.train.loop import train

    runner = CliRunner()
    result = runner.invoke(app, ["analyze", *pitch_stores["dev"], "--frames", "200", "--out", str(tmp_path / "cka")])
    assert result.exit_code == 0, result.output
    assert "toy-wavlm ~ toy-whisper: mean best-match CKA" in result.output
    assert (tmp_path / "cka" / "cka.png").is_file() and (tmp_path / "cka" / "cka-summary.csv").is_file()
    run = tmp_path / "run"
    train(train_config(pitch_stores, run, fusion=["weighted-sum"], merge=["add"], steps=2, eval_every=2),
          progress=False)
    result = runner.invoke(app, ["analyze", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (run / "analysis" / "layer-use.csv").is_file() and "weighted-sum-add" in result.output
    result = runner.invoke(app, ["analyze", *pitch_stores["dev"], "--estimator", "rbf"])
    assert result.exit_code == 1 and "--estimator" in str(result.exception)
