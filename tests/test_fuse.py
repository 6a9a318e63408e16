"""Specification of stage 2 (fusionpipe.fuse): align several stores to a common (L, T), merge, lazily."""

import pickle

import dask.array as da
import numpy as np
import pytest
import torch

from fusionpipe.errors import FusionpipeError
from fusionpipe.fuse.view import open_fused
from fusionpipe.store import FeatureStore


def reference(x, T, L):
    """Eager numpy: (T_i, L_i, D) -> (L, T, D) by np.interp, time first then layers, ends exact."""
    Ti, Li, D = x.shape
    tpos = np.linspace(0, Ti - 1, T) if T > 1 else np.zeros(1)
    y = np.stack([[np.interp(tpos, np.arange(Ti), x[:, l, d]) for d in range(D)] for l in range(Li)])  # (Li, D, T)
    lpos = np.linspace(0, Li - 1, L) if L > 1 else np.zeros(1)
    z = np.stack([[np.interp(lpos, np.arange(Li), y[:, d, t]) for t in range(T)] for d in range(D)])  # (D, T, L)
    return z.transpose(2, 1, 0)


@pytest.fixture
def tsv(tmp_path, make_tsv):
    return make_tsv(tmp_path / "m.tsv", ["u0", "u1", "u2", "u3"])


@pytest.fixture
def pair(tmp_path, tsv, make_store, random_data):
    """Two stores of `tsv` with different L, D and T (B is 1 frame longer, as Whisper against an SSL model)."""
    ids = [u.id for u in tsv]
    a = make_store(tmp_path / "a.zarr", random_data(ids, [7, 3, 12, 5], 3, 4, 0), tsv, "A")
    b = make_store(tmp_path / "b.zarr", random_data(ids, [8, 4, 13, 6], 5, 6, 1), tsv, "B")
    return a, b


@pytest.fixture
def one_utterance_store(make_store):
    """`one_utterance_store(tmp_path, tsv, name, values)`: every utterance of `tsv` holds `values` (T, L, D)."""
    return lambda tmp_path, tsv, name, values: make_store(
        tmp_path / f"{name}.zarr", {u.id: np.asarray(values, np.float32) for u in tsv}, tsv, name)


# ---- alignment --------------------------------------------------------------------------------
def test_time_is_upsampled_to_the_longest_by_linear_interpolation_with_exact_ends(tmp_path, tsv, one_utterance_store):
    short = one_utterance_store(tmp_path, tsv, "short", np.array([0, 4, 8, 20]).reshape(4, 1, 1))
    long = one_utterance_store(tmp_path, tsv, "long", np.ones((5, 1, 1)))
    view = open_fused([short.url, long.url])
    # output frame t samples input position t * 3/4: 0, .75, 1.5, 2.25, 3
    np.testing.assert_allclose(view.aligned(0)[0][0, :, 0], [0, 3, 6, 11, 20], rtol=0, atol=1e-6)
    assert list(view.lengths) == [5, 5, 5, 5]


def test_align_time_min_downsamples_to_the_shortest(tmp_path, tsv, one_utterance_store):
    long = one_utterance_store(tmp_path, tsv, "long", np.array([0, 10, 20, 30, 40]).reshape(5, 1, 1))
    short = one_utterance_store(tmp_path, tsv, "short", np.ones((3, 1, 1)))
    view = open_fused([long.url, short.url], align_time="min")
    np.testing.assert_allclose(view.aligned(0)[0][0, :, 0], [0, 20, 40], atol=1e-6)


def test_layers_are_interpolated_to_the_most_with_first_and_last_exact(tmp_path, tsv, one_utterance_store):
    few = one_utterance_store(tmp_path, tsv, "few", np.array([0, 3, 12]).reshape(1, 3, 1))
    many = one_utterance_store(tmp_path, tsv, "many", np.ones((1, 4, 1)))
    view = open_fused([few.url, many.url])
    # layer l samples position l * 2/3: 0, 2/3, 4/3, 2
    np.testing.assert_allclose(view.aligned(0)[0][:, 0, 0], [0, 2, 6, 12], atol=1e-6)
    assert view.num_layers == 4


def test_a_store_already_at_the_target_shape_is_read_unchanged(pair):
    a, b = pair
    view = open_fused([a.url, b.url])
    i = view.ids.index("u2")
    np.testing.assert_array_equal(view.aligned(i)[1], b.read("u2").transpose(1, 0, 2))


def test_aligned_stacks_equal_the_eager_numpy_interpolation(pair):
    a, b = pair
    view = open_fused([a.url, b.url])
    for i, u in enumerate(view.ids):
        T = int(view.lengths[i])
        for s, got in zip((a, b), view.aligned(i)):
            np.testing.assert_allclose(got, reference(s.read(u), T, 5), rtol=1e-5, atol=1e-5)


def test_different_frame_rates_meet_at_the_faster_one(tmp_path, tsv, make_store, random_data):
    ids = [u.id for u in tsv]
    slow = make_store(tmp_path / "25.zarr", random_data(ids, [5, 3, 6, 4], 2, 3, 0), tsv, frame_rate=25.0)
    fast = make_store(tmp_path / "50.zarr", random_data(ids, [10, 6, 12, 8], 2, 3, 1), tsv, frame_rate=50.0)
    view = open_fused([slow.url, fast.url], merge="add")
    assert list(view.lengths) == [10, 6, 12, 8] and view.frame_rate == 50.0
    np.testing.assert_allclose(view.aligned(0)[0], reference(slow.read("u0"), 10, 2), atol=1e-5)


# ---- merge -------------------------------------------------------------------------------------
def test_add_sums_the_aligned_stacks(tmp_path, tsv, make_store, random_data):
    ids = [u.id for u in tsv]
    a = make_store(tmp_path / "a.zarr", random_data(ids, [6, 3, 9, 4], 3, 4, 0), tsv)
    b = make_store(tmp_path / "b.zarr", random_data(ids, [7, 4, 10, 5], 2, 4, 1), tsv)
    view = open_fused([a.url, b.url], merge="add")
    x, (sa, sb) = view[2], view.aligned(2)
    assert x.shape == (3, 10, 4) and view.out_dim == 4 and x.dtype == np.float32
    np.testing.assert_array_equal(x, sa + sb)


def test_concat_puts_the_stores_side_by_side_on_the_feature_axis(pair):
    view = open_fused([s.url for s in pair], merge="concat")
    x, (sa, sb) = view[0], view.aligned(0)
    assert x.shape == (5, int(view.lengths[0]), 10) and view.out_dim == 10 and view.dims == [4, 6]
    np.testing.assert_array_equal(x[..., :4], sa)
    np.testing.assert_array_equal(x[..., 4:], sb)


def test_no_merge_gives_the_per_store_stacks(pair):
    view = open_fused([s.url for s in pair])
    assert [s.shape for s in view[1]] == [(5, 4, 4), (5, 4, 6)] and view.out_dim is None


def test_a_batch_read_equals_the_utterances_read_one_by_one(pair):
    """Runs of neighbouring utterances are read with one slice; holes and padding must not leak."""
    view = open_fused([s.url for s in pair], merge="concat")
    batch = view.read_merged([3, 0, 2]).numpy()
    for b, i in enumerate([3, 0, 2]):
        T = int(view.lengths[i])
        np.testing.assert_array_equal(batch[b, :, :T], view[i])
        assert not batch[b, :, T:].any()


# ---- lazy and dataset-wide ----------------------------------------------------------------------
@pytest.mark.parametrize("merge", ["add", "concat", None])
def test_to_dask_is_a_lazy_expression_equal_to_the_direct_read(tmp_path, tsv, merge, make_store, random_data):
    ids = [u.id for u in tsv]
    a = make_store(tmp_path / "a.zarr", random_data(ids, [7, 3, 12, 5], 3, 4, 0), tsv)
    b = make_store(tmp_path / "b.zarr", random_data(ids, [8, 4, 13, 6], 5, 4, 1), tsv)
    view = open_fused([a.url, b.url], merge=merge)
    for i in range(len(view)):
        lazy = view.to_dask(i)
        if merge is None:
            assert all(isinstance(x, da.Array) for x in lazy)
            for x, y in zip(lazy, view[i]):
                np.testing.assert_array_equal(x.compute(), y)
        else:
            assert isinstance(lazy, da.Array) and lazy.shape == view[i].shape
            np.testing.assert_array_equal(lazy.compute(), view[i])


def test_layer_stats_are_the_mean_and_std_over_every_frame(pair):
    view = open_fused([s.url for s in pair], merge="concat")
    frames = np.concatenate([view[i] for i in range(len(view))], axis=1)  # (L, all frames, D)
    mean, std = view.layer_stats()
    assert mean.shape == std.shape == (5, 10)
    np.testing.assert_allclose(mean, frames.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, frames.std(1), rtol=1e-5, atol=1e-6)


def test_layer_stats_without_merge_are_per_store(pair):
    view = open_fused([s.url for s in pair])
    (m0, s0), (m1, s1) = view.layer_stats()
    assert m0.shape == (5, 4) and m1.shape == (5, 6)
    np.testing.assert_allclose(m1, np.concatenate([view.aligned(i)[1] for i in range(4)], 1).mean(1), atol=1e-6)


# ---- materialise -----------------------------------------------------------------------------
def test_write_round_trips_through_featurestore_open(pair, tmp_path, tsv):
    view = open_fused([s.url for s in pair], merge="concat")
    out = view.write(tmp_path / "fused.zarr", dtype="float32")
    again = FeatureStore.open(tmp_path / "fused.zarr")
    assert again.is_complete() and sorted(again.ids) == sorted(view.ids)
    for i, u in enumerate(view.ids):
        np.testing.assert_array_equal(again.read(u).transpose(1, 0, 2), view[i])
    up = again.attrs["upstream"]
    assert up["name"] == "fused-concat(A+B)" and (up["num_layers"], up["hidden_size"]) == (5, 10)
    assert [s["store"] for s in up["sources"]] == [s.url for s in pair]
    assert again.attrs["manifest"]["sha256"] == tsv.content_hash()
    assert out.url == again.url


def test_a_written_fusion_fuses_again_with_its_manifests_stores(pair, tmp_path):
    fused = open_fused([s.url for s in pair], merge="concat").write(tmp_path / "fused.zarr")
    view = open_fused([fused.url, pair[0].url], merge="concat")
    assert view.dims == [10, 4] and len(view) == 4


def test_write_keeps_the_sources_dtype_and_stores_longest_first(pair, tmp_path):
    view = open_fused([s.url for s in pair], merge="concat")
    out = view.write(tmp_path / "fused.zarr")
    assert out.hidden.dtype == np.float32  # the sources are float32
    assert list(out.lengths) == sorted(view.lengths, reverse=True)  # like every store, so the loader reads runs
    half = view.write(tmp_path / "half.zarr", dtype="float16")
    np.testing.assert_allclose(half.read("u0").astype(np.float32).transpose(1, 0, 2), view[0], rtol=1e-3, atol=1e-3)


# ---- ids, order, describe, pickling ---------------------------------------------------------
def test_ids_come_in_manifest_order_whatever_the_store_order(pair, tsv):
    view = open_fused([s.url for s in pair])
    assert view.ids == [u.id for u in tsv]
    assert pair[0].ids[0] == "u2"  # the stores hold the longest first


def test_ids_restrict_and_order_the_view(pair):
    view = open_fused([s.url for s in pair], ids=["u3", "u1"])
    assert view.ids == ["u3", "u1"] and list(view.lengths) == [6, 4]


def test_describe_names_stores_target_and_bytes_per_batch(pair):
    d = open_fused([s.url for s in pair], merge="concat").describe(batch_frames=1000)
    assert [s["num_layers"] for s in d["stores"]] == [3, 5] and d["num_layers"] == 5
    assert d["out_dim"] == 10 and d["merge"] == "concat" and d["align_time"].startswith("max")
    assert d["per_batch"]["bytes_out_float32"] == 1000 * 5 * 10 * 4
    assert 0 < d["per_batch"]["bytes_decoded"] < 1000 * (3 * 4 + 5 * 6) * 4


def test_a_view_pickles_as_its_spec_and_reopens(pair):
    view = open_fused([s.url for s in pair], merge="concat")
    again = pickle.loads(pickle.dumps(view))
    assert again.ids == view.ids and len(pickle.dumps(view)) < 2000
    np.testing.assert_array_equal(again[1], view[1])


# ---- refusals -------------------------------------------------------------------------------
def test_stores_of_different_manifests_are_refused_naming_both(tmp_path, pair, make_tsv, make_store, random_data):
    other = make_tsv(tmp_path / "other.tsv", ["u0", "u1", "u2", "u3", "u4"])
    c = make_store(tmp_path / "c.zarr", random_data([u.id for u in other], [3] * 5, 3, 4, 2), other)
    with pytest.raises(FusionpipeError, match=r"different manifests.*a\.zarr: manifest m .*c\.zarr: manifest other"):
        open_fused([pair[0].url, c.url])


def test_an_unfinished_utterance_is_refused_with_the_fix(tmp_path, tsv, pair, make_store, random_data):
    ids = [u.id for u in tsv]
    data = random_data(ids, [7, 3, 12, 5], 3, 4, 0)
    partial = make_store(tmp_path / "p.zarr", data, tsv, written=range(5))  # u1 sits in the 6th, unwritten chunk
    with pytest.raises(FusionpipeError, match=r"1 utterance.*p\.zarr lacks 1.*u1.*fusionpipe extract.*skip_missing"):
        open_fused([pair[1].url, partial.url])


def test_skip_missing_drops_unusable_utterances_and_says_why(tmp_path, tsv, pair, make_store, random_data):
    data = random_data([u.id for u in tsv][:3], [7, 3, 12], 3, 4, 0)
    fewer = make_store(tmp_path / "f.zarr", data, tsv)
    view = open_fused([pair[1].url, fewer.url], skip_missing=True)
    assert view.ids == ["u0", "u1", "u2"] and "not in the store" in view.dropped["u3"]


def test_skipped_utterances_count_as_missing(tmp_path, tsv, pair):
    store = FeatureStore.open(pair[0].url, mode="r+")
    store.mark_skipped("u1", "clipped audio")
    with pytest.raises(FusionpipeError, match="u1"):
        open_fused([pair[0].url, pair[1].url])
    assert "clipped audio" in open_fused([pair[0].url, pair[1].url], skip_missing=True).dropped["u1"]


def test_add_with_unequal_hidden_sizes_points_to_the_learned_projection(pair):
    with pytest.raises(FusionpipeError, match=r"equal hidden sizes.*D=4.*D=6.*fusionpipe train --merge add.*concat"):
        open_fused([s.url for s in pair], merge="add")


def test_align_layers_none_refuses_unequal_layer_counts(pair):
    with pytest.raises(FusionpipeError, match=r"equal layer counts.*L=3.*L=5.*interpolate"):
        open_fused([s.url for s in pair], align_layers="none")


def test_unknown_options_are_refused(pair):
    with pytest.raises(FusionpipeError, match="merge='sum'.*add, concat"):
        open_fused([s.url for s in pair], merge="sum")


def test_write_without_merge_is_refused(pair, tmp_path):
    with pytest.raises(FusionpipeError, match="--merge add\\|concat"):
        open_fused([s.url for s in pair]).write(tmp_path / "x.zarr")


# ---- the command ---------------------------------------------------------------------------
def run_cli(*args, capsys):
    import sys

    from fusionpipe.cli import main

    old, sys.argv = sys.argv, ["fusionpipe", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_fuse_command_writes_a_store_from_a_comma_list(pair, tmp_path, capsys):
    code, out, _ = run_cli("fuse", "--stores", f"{pair[0].url},{pair[1].url}", "--merge", "concat",
                           "--write", tmp_path / "f.zarr", capsys=capsys)
    assert code in (0, None) and "fused-concat(A+B)" in out
    assert FeatureStore.open(tmp_path / "f.zarr").hidden_size == 10


def test_fuse_command_describes_and_refuses_in_one_line(pair, capsys):
    code, out, _ = run_cli("fuse", "--stores", pair[0].url, "--stores", pair[1].url, "--describe", capsys=capsys)
    assert code in (0, None) and '"num_layers": 5' in out
    code, _, err = run_cli("fuse", "--stores", pair[0].url, "--stores", pair[1].url, "--merge", "add", capsys=capsys)
    assert code == 1 and err.startswith("error: merge='add' needs equal hidden sizes") and "Traceback" not in err


def test_recycled_batch_memory_is_never_reused_while_held(pair):
    view = open_fused([s.url for s in pair], merge="concat")
    held = view.read_merged([0, 1])
    kept = view[2]  # a numpy array on pooled memory
    copy_held, copy_kept = held.clone(), kept.copy()
    for _ in range(3):
        for i in range(len(view)):
            view.read_merged([i, (i + 1) % len(view)])
            view[i]
    assert torch.equal(held, copy_held) and np.array_equal(kept, copy_kept)


def test_layer_stats_on_a_frame_budget_are_a_seeded_sample_of_whole_groups(pair, monkeypatch):
    from fusionpipe.fuse import runs

    monkeypatch.setattr(runs, "GROUP_BYTES", 1)  # one utterance per group
    view = open_fused([s.url for s in pair], merge="concat")
    full = view.layer_stats()
    np.testing.assert_array_equal(view.layer_stats(max_frames=10**9)[0], full[0])
    mean, std = view.layer_stats(max_frames=1, seed=3)  # the first group drawn is already enough
    np.testing.assert_array_equal(view.layer_stats(max_frames=1, seed=3)[0], mean)
    one = [view[i] for i in range(len(view))]
    matches = [i for i, x in enumerate(one) if np.allclose(mean, x.mean(1), atol=1e-5)]
    assert len(matches) == 1 and np.allclose(std, one[matches[0]].std(1), atol=1e-5)


def test_neighbour_runs_cut_at_a_hole_wider_than_the_gap_and_once_the_budget_is_reached():
    from fusionpipe.fuse.runs import neighbour_runs

    offsets, frames = np.array([10, 0, 30, 4]), np.array([5, 4, 2, 6])  # by offset: 1 [0,4) 3 [4,10) 0 [10,15) 2 [30,32)
    assert [r.tolist() for r in neighbour_runs(offsets, frames, gap=15)] == [[1, 3, 0, 2]]  # hole 15
    assert [r.tolist() for r in neighbour_runs(offsets, frames, gap=14)] == [[1, 3, 0], [2]]
    sizes = np.array([5, 4, 2, 6])
    assert [r.tolist() for r in neighbour_runs(offsets, frames, sizes=sizes, budget=10)] == [[1, 3], [0, 2]]
    assert [r.tolist() for r in neighbour_runs(offsets, frames, sizes=sizes, budget=10, order=[0, 1, 2, 3])] == [
        [0, 1, 2], [3]]


def test_each_read_returns_its_own_kind_of_result(pair):
    view = open_fused([s.url for s in pair], merge="concat")
    stacks, merged = view.read_stacks([1, 2]), view.read_merged([1, 2])
    assert [s.shape for s in stacks] == [(2, 5, 13, 4), (2, 5, 13, 6)] and merged.shape == (2, 5, 13, 10)
    assert torch.equal(torch.cat(stacks, -1), merged)
    assert all(torch.equal(a, b) for a, b in zip(view.read_compact([1, 2]), stacks))  # lossless: no codes
    with pytest.raises(ValueError, match="read_stacks"):
        open_fused([s.url for s in pair]).read_merged([0])
