"""Specification of the task heads (fusionpipe.train.heads), shrunk to test sizes."""

import pytest
import torch
import torch.nn.functional as F

from fusionpipe.train.heads import (AMSoftmaxLoss, ClassifierHead, Conv2dSubsampling2, CTCHead, SpeakerHead,
                              TransformerCTCHead, XVectorHead, masked_mean_std)

SMALL_XVECTOR = {"embed_dim": 12, "proj": 10, "tdnn": 10, "last": 14}
SMALL_TRANSFORMER = {"proj": 20, "d_model": 16, "heads": 2, "ffn": 32, "layers": 2}


@pytest.fixture
def feats():
    torch.manual_seed(0)
    return torch.randn(3, 24, 6), torch.tensor([24, 17, 15])


def with_padding_changed(x, lengths, value=50.0):
    x = x.clone()
    for b, n in enumerate(lengths.tolist()):
        x[b, n:] = value
    return x


def test_ctc_head_returns_log_probs_over_the_vocabulary_and_the_input_lengths(feats):
    x, lengths = feats
    head = CTCHead(6, vocab_size=5, proj=8, hidden=8, layers=2)
    log_probs, out_lengths = head(x, lengths)
    assert log_probs.shape == (3, 24, 5)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, 24), atol=1e-5)
    assert torch.equal(out_lengths, lengths)


def test_ctc_head_valid_frames_ignore_padding(feats):
    x, lengths = feats
    head = CTCHead(6, vocab_size=5, proj=8, hidden=8).eval()
    out, out_changed = head(x, lengths).output, head(with_padding_changed(x, lengths), lengths).output
    for b, n in enumerate(lengths.tolist()):
        assert torch.allclose(out[b, :n], out_changed[b, :n], atol=1e-6)


def test_ctc_head_superb_defaults():
    head = CTCHead(768, vocab_size=30)
    lstm = head.lstm
    assert (head.proj.out_features, lstm.forward_lstms[0].hidden_size, len(lstm.forward_lstms)) == (1024, 1024, 2)
    assert len(lstm.backward_lstms) == 2 and lstm.dropout.p == 0.2 and head.out.in_features == 2048


def test_classifier_head_returns_logits_and_no_lengths(feats):
    x, lengths = feats
    logits, out_lengths = ClassifierHead(6, num_classes=4, proj=8)(x, lengths)
    assert logits.shape == (3, 4) and out_lengths is None


def test_classifier_head_mean_pool_ignores_padding(feats):
    x, lengths = feats
    head = ClassifierHead(6, num_classes=4, proj=8)
    assert torch.allclose(head(x, lengths).output, head(with_padding_changed(x, lengths), lengths).output,
                          atol=1e-6)


def test_stats_pooling_is_mean_and_std_of_the_valid_frames():
    x = torch.tensor([[[1.0], [3.0], [99.0]]])
    assert torch.allclose(masked_mean_std(x, torch.tensor([2])), torch.tensor([[2.0, 1.0]]), atol=1e-4)


def test_xvector_superb_sizes():
    head = XVectorHead(32)
    assert head.proj.out_features == 512
    assert head.affine1.in_features == 3000 and head.affine1.out_features == 512
    kernels = [(c.kernel_size[0], c.dilation[0]) for c in head.tdnn if isinstance(c, torch.nn.Conv1d)]
    assert kernels == [(5, 1), (3, 2), (3, 3), (1, 1), (1, 1)]


def test_xvector_pooling_ignores_padding(feats):
    x, lengths = feats
    head = XVectorHead(6, **SMALL_XVECTOR)
    changed = with_padding_changed(x, lengths)
    assert torch.allclose(head(x, lengths).output, head(changed, lengths).output, atol=1e-5)
    assert torch.allclose(head.embed(x, lengths), head.embed(changed, lengths), atol=1e-5)


def test_xvector_embedding_is_l2_normalised(feats):
    x, lengths = feats
    embedding = XVectorHead(6, **SMALL_XVECTOR).embed(x, lengths)
    assert embedding.shape == (3, 12)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_xvector_refuses_utterances_shorter_than_its_receptive_field(feats):
    x, _ = feats
    with pytest.raises(ValueError, match="at least 15 frames"):
        XVectorHead(6, **SMALL_XVECTOR)(x, torch.tensor([24, 17, 14]))


def test_am_softmax_is_cross_entropy_of_scaled_cosines_with_the_target_margin():
    torch.manual_seed(0)
    loss = AMSoftmaxLoss(4, 3, s=30.0, m=0.4)
    x, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    logits = 30.0 * (loss.cosine(x) - 0.4 * F.one_hot(labels, 3))
    assert torch.allclose(loss(x, labels), F.cross_entropy(logits, labels))


def test_speaker_head_trains_the_am_softmax_weights_with_the_x_vector():
    head = SpeakerHead(6, num_speakers=3, **SMALL_XVECTOR)
    assert any(p is head.amsoftmax.weight for p in head.parameters())


def test_transformer_ctc_head_halves_time_and_returns_valid_output_lengths(feats):
    x, lengths = feats
    log_probs, out_lengths = TransformerCTCHead(6, vocab_size=5, **SMALL_TRANSFORMER)(x, lengths)
    assert log_probs.shape == (3, (24 - 1) // 2 - 2, 5)
    assert out_lengths.tolist() == [9, 6, 5]


def test_transformer_ctc_head_valid_frames_ignore_padding(feats):
    x, lengths = feats
    head = TransformerCTCHead(6, vocab_size=5, **SMALL_TRANSFORMER).eval()
    (out, out_lengths), changed = head(x, lengths), head(with_padding_changed(x, lengths), lengths).output
    for b, n in enumerate(out_lengths.tolist()):
        assert torch.allclose(out[b, :n], changed[b, :n], atol=1e-5)


def test_conv2d_subsampling2_flattens_channels_times_reduced_features_like_espnet():
    assert Conv2dSubsampling2(80, 256).out.in_features == 256 * 37


def test_bilstm_equals_packed_bidirectional_lstm_on_valid_frames():
    """The unpacked BiLSTM computes exactly what nn.LSTM(bidirectional) computes on packed sequences."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from fusionpipe.train.heads import BiLSTM

    torch.manual_seed(0)
    ours = BiLSTM(6, 5, layers=2, dropout=0.0)
    ref = torch.nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True)
    for layer in range(2):
        for direction, lstm in (("", ours.forward_lstms[layer]), ("_reverse", ours.backward_lstms[layer])):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(lstm, f"{name}_l0").data.copy_(getattr(ref, f"{name}_l{layer}{direction}"))
    x, lengths = torch.randn(3, 9, 6), torch.tensor([9, 4, 7])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    expected, _ = pad_packed_sequence(ref(packed)[0], batch_first=True, total_length=9)
    torch.testing.assert_close(ours(x, lengths), expected)
