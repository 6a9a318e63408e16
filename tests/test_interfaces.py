"""Specification of the fusion interfaces and merges (fusionpipe.train.interfaces)."""

import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fusionpipe.cli import app
from fusionpipe.train.heads import ClassifierHead
from fusionpipe.train.interfaces import (INTERFACES, REGISTRY, GumbelSelect, HConv, Interface, LastLayer, SingleLayer,
                                         WeightedSum, interface_option_problems)

OPTS = {"single-layer": {"layer": 2}}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def stacks():
    torch.manual_seed(0)
    return [torch.randn(2, 5, 6, 8), torch.randn(2, 5, 6, 8)]


def test_hconv_13x768_is_the_reference_13_5_2_with_4424832_parameters():
    hconv = HConv(13, 768)
    assert hconv.layer_lengths == [13, 5, 2]
    assert hconv.out_dim == 768
    assert n_params(hconv) == 4_424_832


@pytest.mark.parametrize("layers, dim, lengths, out_dim", [
    (25, 1024, [25, 9, 3], 1023),
    (33, 1280, [33, 11, 4, 2], 1280),
    (7, 512, [7, 3], 510),
])
def test_hconv_layer_lengths_and_out_dims_match_the_method_table(layers, dim, lengths, out_dim):
    hconv = HConv(layers, dim)
    assert hconv.layer_lengths == lengths
    assert hconv.out_dim == out_dim


def test_hconv_number_of_convs_is_floor_log_layers_over_log_stride():
    for layers in range(3, 100):
        assert len(HConv(layers, 16).layer_lengths) - 1 == math.floor(math.log(layers) / math.log(3))


@pytest.mark.parametrize("layers", [1, 2])
def test_hconv_with_fewer_layers_than_the_stride_uses_one_conv_and_keeps_dim(layers):
    hconv = HConv(layers, 16)
    assert hconv.layer_lengths == [layers, 1]
    assert hconv(torch.randn(2, layers, 4, 16)).shape == (2, 4, 16)


def test_hconv_flattens_each_frame_channel_major_like_the_reference():
    torch.manual_seed(0)
    hconv = HConv(13, 16)
    x = torch.randn(1, 13, 3, 16)
    frame = x[0, :, 1, :].T[None]  # (1, D, L): one frame's layers as a sequence
    expected = hconv.convs(frame).reshape(1, -1)  # index c * L_final + l
    assert torch.allclose(hconv(x)[0, 1], expected[0], atol=1e-6)


def test_hconv_normalize_is_a_parameter_free_layer_norm_per_layer():
    torch.manual_seed(0)
    plain, normed = HConv(7, 16), HConv(7, 16, normalize=True)
    normed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 7, 3, 16) * 5 + 2
    assert n_params(plain) == n_params(normed)
    assert torch.allclose(normed(x), plain(F.layer_norm(x, (16,))), atol=1e-5)


def test_weighted_sum_starts_as_the_mean_over_layers():
    x = torch.randn(2, 5, 3, 8)
    assert torch.allclose(WeightedSum(5, 8)(x), x.mean(1), atol=1e-6)


def test_weighted_sum_normalize_layer_norms_each_layer_before_weighting():
    x = torch.randn(2, 5, 3, 8) * 3 + 1
    expected = F.layer_norm(x, (8,)).mean(1)
    assert torch.allclose(WeightedSum(5, 8, normalize=True)(x), expected, atol=1e-5)


def test_last_and_single_layer_pick_one_layer():
    x = torch.randn(2, 5, 3, 8)
    assert torch.equal(LastLayer(5, 8)(x), x[:, 4])
    assert torch.equal(SingleLayer(5, 8, layer=1)(x), x[:, 1])
    with pytest.raises(ValueError, match="layer=5"):
        SingleLayer(5, 8, layer=5)


def test_add_of_equal_dims_adds_no_parameters(stacks):
    fusion = Interface([8, 8], 5, fusion="weighted-sum", merge="add", output_norm=False)
    assert n_params(fusion) == 5
    lengths = torch.tensor([6, 6])
    assert torch.allclose(fusion(stacks, lengths), (stacks[0] + stacks[1]).mean(1), atol=1e-6)


def test_add_of_unequal_dims_projects_every_upstream_to_the_largest():
    fusion = Interface([8, 12], 5, fusion="last-layer", merge="add", output_norm=False)
    p0, p1 = fusion.front.projections
    assert (p0.in_features, p0.out_features, p1.in_features, p1.out_features) == (8, 12, 12, 12)
    a, b = torch.randn(2, 5, 6, 8), torch.randn(2, 5, 6, 12)
    out = fusion([a, b], torch.tensor([6, 6]))
    assert out.shape == (2, 6, 12)
    assert torch.allclose(out, p0(a[:, -1]) + p1(b[:, -1]), atol=1e-6)


def test_concat_projects_the_concatenated_features_to_the_largest_dim():
    fusion = Interface([8, 12], 5, fusion="weighted-sum", merge="concat")
    assert (fusion.front.projection.in_features, fusion.front.projection.out_features) == (20, 12)
    out = fusion([torch.randn(2, 5, 6, 8), torch.randn(2, 5, 6, 12)], torch.tensor([6, 4]))
    assert out.shape == (2, 6, 12)


def test_concat_without_projection_feeds_the_sum_of_dims_to_the_interface():
    fusion = Interface([8, 12], 7, fusion="hconv", merge="concat", project=False)
    assert fusion.front.projection is None
    assert fusion.interface.dim == 20
    assert fusion([torch.randn(1, 7, 3, 8), torch.randn(1, 7, 3, 12)], torch.tensor([3])).shape == (1, 3, 18)


@pytest.mark.parametrize("merge", ["add", "concat"])
def test_one_upstream_is_passed_through_unmerged(merge):
    fusion = Interface([8], 5, fusion="last-layer", merge=merge, output_norm=False)
    x = torch.randn(2, 5, 3, 8)
    assert n_params(fusion) == 0
    assert torch.equal(fusion([x], torch.tensor([3, 3])), x[:, -1])


def test_gumbel_at_eval_takes_each_dimension_from_exactly_one_upstream(stacks):
    torch.manual_seed(0)
    gumbel = GumbelSelect([8, 8], 5, merge="add")
    gumbel.logits.data.normal_()
    gumbel.eval()
    selection = gumbel.selection()
    assert set(selection.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(selection.sum(0), torch.ones(8))
    streams = torch.stack([ws(x) for ws, x in zip(gumbel.sums, stacks)])
    picked = torch.where(selection[0].bool(), streams[0], streams[1])
    assert torch.allclose(gumbel(stacks), gumbel.projection(picked), atol=1e-6)


def test_gumbel_in_training_mixes_upstreams_softly():
    gumbel = GumbelSelect([8, 8], 5)
    selection = gumbel.selection()
    assert torch.allclose(selection.sum(0), torch.ones(8))
    assert ((selection > 0) & (selection < 1)).any()


def test_gumbel_temperature_anneals_from_1_to_0_1_through_fusion():
    fusion = Interface([8, 8], 5, fusion="gumbel", merge="add")
    assert float(fusion.interface.tau) == pytest.approx(1.0)
    fusion.set_progress(0.5)
    assert float(fusion.interface.tau) == pytest.approx(math.sqrt(0.1))
    fusion.set_progress(1.0)
    assert float(fusion.interface.tau) == pytest.approx(0.1)


def test_gumbel_concat_projects_the_n_masked_streams(stacks):
    fusion = Interface([8, 12], 5, fusion="gumbel", merge="concat")
    assert fusion.interface.projection.in_features == 2 * 12
    out = fusion([stacks[0], torch.randn(2, 5, 6, 12)], torch.tensor([6, 2]))
    assert out.shape == (2, 6, 12)


@pytest.mark.parametrize("interface", INTERFACES)
@pytest.mark.parametrize("merge", ["add", "concat"])
def test_padded_frames_do_not_change_valid_frames_and_come_out_zero(stacks, interface, merge):
    torch.manual_seed(0)
    fusion = Interface([8, 8], 5, fusion=interface, merge=merge, **OPTS.get(interface, {})).eval()
    lengths = torch.tensor([6, 3])
    changed = [x.clone() for x in stacks]
    for x in changed:
        x[1, :, 3:] = 100.0
    out, out_changed = fusion(stacks, lengths), fusion(changed, lengths)
    assert torch.allclose(out, out_changed, atol=1e-5)
    assert torch.count_nonzero(out[1, 3:]) == 0


def test_unknown_interface_is_a_value_error_naming_the_valid_ones():
    with pytest.raises(ValueError, match=", ".join(INTERFACES)):
        Interface([8], 5, fusion="attention", merge="add")


def test_the_train_help_names_every_interface():
    """cli.py lists them itself (importing this module would cost every command torch's start-up)."""
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output
    assert [name for name in INTERFACES if name not in out] == []


def test_an_option_is_checked_by_the_rule_in_the_table():
    assert interface_option_problems("hconv", {"stride": 1})[0][0] == "stride"  # stride 1 never shrinks the layers
    assert interface_option_problems("hconv", {"stride": 2}) == []
    assert interface_option_problems("gumbel", {"project": True})[0][0] == "project"  # no merge front to project


def test_a_required_option_left_out_is_named_with_the_interface_help():
    assert interface_option_problems("single-layer", {}) == [
        ("layer", f"interface single-layer needs the option layer ({REGISTRY['single-layer'].help})")]


def test_unknown_merge_is_a_value_error():
    with pytest.raises(ValueError, match="add, concat"):
        Interface([8], 5, fusion="hconv", merge="interleave")


def test_an_option_the_interface_does_not_take_is_a_value_error():
    with pytest.raises(ValueError, match="stride"):
        Interface([8], 5, fusion="weighted-sum", merge="add", stride=2)


def test_a_stack_of_the_wrong_shape_is_a_value_error(stacks):
    fusion = Interface([8, 8], 5, fusion="hconv", merge="add")
    with pytest.raises(ValueError, match="stack 1"):
        fusion([stacks[0], torch.randn(2, 4, 6, 8)], torch.tensor([6, 6]))


@pytest.mark.slow
def test_fusion_hconv_and_classifier_learn_to_separate_two_classes():
    torch.manual_seed(0)

    def batch(n):
        labels = torch.randint(0, 2, (n,))
        a, b = torch.randn(n, 7, 10, 8), torch.randn(n, 7, 10, 8)
        a[:, 3, :, :2] += (2 * labels - 1)[:, None, None].float()  # the class lives in layer 3 of one model
        return [a, b], torch.full((n,), 10), labels

    fusion = Interface([8, 8], 7, fusion="hconv", merge="concat")
    head = ClassifierHead(fusion.out_dim, 2, proj=16)
    optimiser = torch.optim.Adam([*fusion.parameters(), *head.parameters()], lr=3e-3)
    stacks, lengths, labels = batch(64)
    for _ in range(40):
        loss = F.cross_entropy(head(fusion(stacks, lengths), lengths).output, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    stacks, lengths, labels = batch(200)
    with torch.no_grad():
        predicted = head(fusion(stacks, lengths), lengths).output.argmax(-1)
    assert (predicted == labels).float().mean() > 0.8


# ---- Standardize: the default front of every interface (docs/method.md, "The blank plateau") ----------
def test_every_interface_standardizes_and_norms_its_output_by_default_and_takes_the_options():
    for fusion in INTERFACES:
        default = Interface([8], 5, fusion=fusion, **OPTS.get(fusion, {}))
        assert default.standardize is not None and default.output_norm is True
        plain = Interface([8], 5, fusion=fusion, standardize=False, output_norm=False, **OPTS.get(fusion, {}))
        assert plain.standardize is None and plain.output_norm is False


def test_output_norm_is_a_parameter_free_layer_norm_of_each_output_frame(stacks):
    torch.manual_seed(0)
    normed = Interface([8, 8], 5, fusion="hconv", merge="concat")
    plain = Interface([8, 8], 5, fusion="hconv", merge="concat", output_norm=False)
    plain.load_state_dict({k: v for k, v in normed.state_dict().items() if k != "output_norm_on"})  # same weights
    assert plain.output_norm is False
    lengths = torch.tensor([6, 4])
    expected = F.layer_norm(plain(stacks, lengths), (normed.out_dim,)) * (torch.arange(6) < lengths[:, None])[..., None]
    assert n_params(normed) == n_params(plain) and torch.allclose(normed(stacks, lengths), expected, atol=1e-5)


def test_standardize_and_output_norm_false_is_exactly_the_reference_hconv():
    torch.manual_seed(0)
    interface = Interface([16], 7, fusion="hconv", standardize=False, output_norm=False)
    x = torch.randn(2, 7, 5, 16) * 40
    lengths = torch.tensor([5, 5])
    assert torch.equal(interface([x], lengths), interface.interface(x, lengths))


def test_standardize_maps_every_layer_and_channel_to_zero_mean_unit_std():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 40, 8) * torch.linspace(0.1, 300, 8) + torch.linspace(-50, 50, 8)  # outlier channels
    flat = x.permute(1, 0, 2, 3).reshape(5, -1, 8)  # (L, frames, D)
    interface = Interface([8], 5, fusion="last-layer")
    interface.set_statistics([(flat.mean(1).numpy(), flat.std(1, unbiased=False).numpy())])
    out = interface.standardize([x])[0].permute(1, 0, 2, 3).reshape(5, -1, 8)
    assert torch.allclose(out.mean(1), torch.zeros(5, 8), atol=1e-4)
    assert torch.allclose(out.std(1, unbiased=False), torch.ones(5, 8), atol=1e-4)


def test_standardized_interface_equals_the_reference_on_standardized_input(stacks):
    torch.manual_seed(0)
    ours = Interface([8, 8], 5, fusion="hconv", merge="concat")
    torch.manual_seed(0)
    reference = Interface([8, 8], 5, fusion="hconv", merge="concat", standardize=False)  # output_norm as ours
    stats = [(torch.full((5, 8), 2.0), torch.full((5, 8), 4.0)), (torch.zeros(5, 8), torch.full((5, 8), 0.5))]
    ours.set_statistics(stats)
    lengths = torch.tensor([6, 4])
    expected = reference([(stacks[0] - 2) / 4, stacks[1] / 0.5], lengths)
    assert torch.allclose(ours(stacks, lengths), expected, atol=1e-5)


def test_statistics_are_saved_with_the_model_and_an_older_checkpoint_loads_as_the_model_it_trained_as(stacks):
    ours = Interface([8, 8], 5, fusion="weighted-sum")
    ours.set_statistics([(torch.ones(5, 8), torch.full((5, 8), 3.0))] * 2)
    again = Interface([8, 8], 5, fusion="weighted-sum")
    again.load_state_dict(ours.state_dict())
    assert torch.equal(again.standardize.std_1, torch.full((5, 8), 3.0))
    older = {k: v for k, v in ours.state_dict().items()  # as an older fusionpipe saved it
             if not k.startswith("standardize.") and k != "output_norm_on"}
    again.load_state_dict(older)  # saved before both options existed: identity, no output norm, as it trained
    assert again.output_norm is False
    resaved = Interface([8, 8], 5, fusion="weighted-sum")  # a resumed older run saved again stays as it trained
    resaved.load_state_dict(again.state_dict())
    assert resaved.output_norm is False
    reference = Interface([8, 8], 5, fusion="weighted-sum", standardize=False, output_norm=False)
    reference.load_state_dict(older)
    lengths = torch.tensor([6, 6])
    assert torch.equal(again(stacks, lengths), reference(stacks, lengths))


def test_statistics_of_the_wrong_shape_are_refused():
    interface = Interface([8], 5, fusion="hconv")
    with pytest.raises(ValueError, match="expected"):
        interface.set_statistics([(torch.zeros(4, 8), torch.ones(4, 8))])
    with pytest.raises(ValueError, match="statistics of 2 upstreams for an interface of 1"):
        interface.set_statistics([(torch.zeros(5, 8), torch.ones(5, 8))] * 2)


def test_a_channel_constant_in_training_comes_out_zero_not_blown_up():
    interface = Interface([4], 2, fusion="last-layer")
    interface.set_statistics([(torch.zeros(2, 4), torch.tensor([[2.0, 2.0, 2.0, 0.0]] * 2))])
    out = interface.standardize([torch.ones(1, 2, 3, 4)])[0]
    assert torch.equal(out[..., 3], torch.zeros(1, 2, 3)) and torch.equal(out[..., :3], torch.full((1, 2, 3, 3), 0.5))
