"""The front end: everything an upstream does on the CPU before its forward (frame arithmetic, feature extractor).

It holds no weights, so extract/pipeline.py's reader processes get it pickled small and fill a batch's
inputs one utterance at a time (`FrontEnd.rows`, then `FrontEnd.fill`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusionpipe.audio import SAMPLE_RATE


@dataclass
class Inputs:
    """One batch as the model takes it, laid out from sample counts alone (`FrontEnd.rows`) so that other
    processes can fill the values one utterance at a time (`FrontEnd.fill`; extract/pipeline.py).

    A row is one utterance (SSL: its feature-extractor output, zero-padded) or one Whisper window (its log-mel).
    """

    frames: list[int]       # output frames of each wave (0: too short for the convs, no row)
    owners: list[int]       # the wave of each row
    starts: list[int]       # first sample of each row in its wave (Whisper windows; 0 for SSL)
    lengths: list[int]      # real length of each row: samples (SSL) or output frames (Whisper window)
    shape: tuple[int, ...]  # of `values`: (rows, samples) SSL, (windows, n_mels, n_frames) Whisper
    values: np.ndarray | None = None  # float32

    def subset(self, waves: list[int]) -> Inputs:
        """The batch of only `waves` (the others were bad audio), as `rows` lays it out for them alone."""
        pick = {w: j for j, w in enumerate(waves)}
        rows = [r for r, o in enumerate(self.owners) if o in pick]
        lengths = [self.lengths[r] for r in rows]
        shape = (len(rows), *self.shape[1:])
        if len(self.shape) == 2:  # SSL: padded to the longest remaining utterance
            shape = (len(rows), max(lengths, default=0))
        values = np.ascontiguousarray(self.values[rows][:, :shape[1]]) if self.values is not None else None
        return Inputs([self.frames[w] for w in waves], [pick[self.owners[r]] for r in rows],
                      [self.starts[r] for r in rows], lengths, shape, values)


class FrontEnd:
    """The CPU half of an upstream: frame arithmetic and the feature extractor (normalisation, Whisper's log-mel).

    It holds no weights, so it pickles small into the pipeline's reader processes. Frame counts are integer
    arithmetic on the config's conv kernels and strides (transformers' _get_feat_extract_output_lengths, without
    torch ops: it runs per utterance).
    """

    def __init__(self, family: str, feature_extractor, conv_kernel=(), conv_stride=()):
        self.family, self.feature_extractor = family, feature_extractor
        self.convs = list(zip(conv_kernel, conv_stride))

    @property
    def window_samples(self) -> int | None:
        return self.feature_extractor.n_samples if self.family == "whisper" else None

    def num_frames(self, num_samples: int) -> int:
        if self.family == "whisper":
            full, rest = divmod(num_samples, self.window_samples)
            return full * self.window_frames(self.window_samples) + self.window_frames(rest)
        n = num_samples
        for kernel, stride in self.convs:
            n = (n - kernel) // stride + 1
        return max(0, n)

    def window_frames(self, num_samples: int) -> int:
        # the frames whose centre lies in the audio: ceil(n / hop) mel frames, as the feature extractor's
        # attention mask counts them, then the encoder's stride-2 conv (kernel 3, padding 1)
        mel = -(-num_samples // self.feature_extractor.hop_length)
        return (mel - 1) // 2 + 1

    def rows(self, num_samples: list[int]) -> Inputs:
        """The layout of a batch of waves of these lengths, without their values."""
        frames = [self.num_frames(n) for n in num_samples]
        if self.family == "whisper":
            window = self.window_samples
            pieces = [(i, s) for i, n in enumerate(num_samples) for s in range(0, n, window)]
            lengths = [self.window_frames(min(window, num_samples[i] - s)) for i, s in pieces]
            fe = self.feature_extractor
            return Inputs(frames, [i for i, _ in pieces], [s for _, s in pieces], lengths,
                          (len(pieces), fe.feature_size, fe.nb_max_frames))
        keep = [i for i, t in enumerate(frames) if t > 0]  # shorter than one conv receptive field: no frames
        lengths = [num_samples[i] for i in keep]
        return Inputs(frames, keep, [0] * len(keep), lengths, (len(keep), max(lengths, default=0)))

    def fill(self, inputs: Inputs, wave_index: int, wave: np.ndarray, values: np.ndarray) -> None:
        """Write the rows of wave `wave_index` into `values` (inputs.shape), padding included."""
        for r in (r for r, o in enumerate(inputs.owners) if o == wave_index):
            if self.family == "whisper":  # the feature extractor pads each window to its full length
                piece = wave[inputs.starts[r]:inputs.starts[r] + self.window_samples]
                mel = self.feature_extractor(piece, sampling_rate=SAMPLE_RATE, return_tensors="np")
                values[r] = mel.input_features[0]
            else:  # it normalises over the whole input, so it sees one utterance at a time
                n = inputs.lengths[r]
                x = self.feature_extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="np")
                values[r, :n] = x.input_values[0]
                values[r, n:] = 0

    def prepare(self, waves: list[np.ndarray]) -> Inputs:
        inputs = self.rows([len(w) for w in waves])
        inputs.values = np.empty(inputs.shape, np.float32)
        for i, w in enumerate(waves):
            self.fill(inputs, i, w, inputs.values)
        return inputs
