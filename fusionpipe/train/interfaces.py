"""Stage 3: the interface, the trained part that reads every layer of the merged upstreams.

    >>> import torch
    >>> from fusionpipe.train.interfaces import Interface
    >>> interface = Interface(dims=[768, 768], num_layers=13, fusion="hconv", merge="add")
    >>> stacks = [torch.randn(2, 13, 50, 768), torch.randn(2, 13, 50, 768)]
    >>> interface(stacks, lengths=torch.tensor([50, 31])).shape
    torch.Size([2, 50, 768])

Input convention: a list of N per-upstream stacks, each (B, L, T, D_i), already aligned by
stage 2 to a common number of layers L and frames T, plus ``lengths`` (B,) long, the valid
frames of each utterance. Every interface works frame by frame, so padded frames never
change valid ones; `Interface` returns zeros at padded frames.

`Interface` = merge front (the paper's add / concat, trained) + ONE interface over the layer
axis, chosen by name (``fusion``: a key of `REGISTRY`, the one table of the interfaces, their options and
help) (`HConv`, `WeightedSum`, `LastLayer`, `SingleLayer`), or the GumD baseline (`GumbelSelect`), which
does its own merging. Choices the paper leaves open are written
where they are made: add with unequal hidden sizes (`Merge`), HConv with fewer layers than
the stride (`HConv`), the Gumbel details (`GumbelSelect`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fusionpipe import cuda
from fusionpipe.fuse.view import MERGES
from fusionpipe.train.options import BOOL, Rule, real, value_problem, whole

INTERFACES = ("hconv", "weighted-sum", "gumbel", "last-layer", "single-layer")


def frame_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) valid lengths -> (B, max_len) bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    # Parameter-free, over D, separately for every layer and frame (s3prl's `normalize`).
    return F.layer_norm(x, x.shape[-1:])


class Standardize(nn.Module):
    """Every (layer, channel) of every upstream to zero mean and unit variance over the training frames.

    Buffers ``mean_<k>`` and ``std_<k>`` (L, D_k) per upstream k, set once before training from the
    train stores (`set_statistics`; `FusedView.layer_stats`) and saved with the model, so evaluating
    and predicting use the training statistics. Why (docs/method.md): pretrained hidden states have a
    few channels 50-100x larger than the rest and nearly constant in time (real Whisper-base: |x| up
    to 350, most below 6); a learned mix of channels (HConv's convs, a concat projection) then moves
    mostly those channels, loses the frame-to-frame signal, and stalls on the CTC blank plateau.
    A checkpoint saved without these buffers (an older fusionpipe) loads as the identity (and `Interface` then
    turns its output norm off: the model it trained as).
    """

    def __init__(self, dims: list[int], num_layers: int):
        super().__init__()
        self.dims = list(dims)
        for k, d in enumerate(self.dims):
            self.register_buffer(f"mean_{k}", torch.zeros(num_layers, d))
            self.register_buffer(f"std_{k}", torch.ones(num_layers, d))

    def set_statistics(self, stats: list[tuple]) -> None:
        """``stats``: one (mean, std) pair of (L, D_k) arrays per upstream, in the order of the stacks.
        A channel (nearly) constant over the training frames, std <= 1e-6 of its layer's median std,
        carries nothing and is set to zero (std = inf), so it cannot blow up on other data."""
        if len(stats) != len(self.dims):
            raise ValueError(f"statistics of {len(stats)} upstreams for an interface of {len(self.dims)}")
        for k, (mean, std) in enumerate(stats):
            mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
            if mean.shape != self.get_buffer(f"mean_{k}").shape or std.shape != mean.shape:
                raise ValueError(f"statistics of upstream {k}: shape {tuple(mean.shape)}, expected "
                                 f"{tuple(self.get_buffer(f'mean_{k}').shape)} (L, D)")
            constant = std <= 1e-6 * std.median(dim=1, keepdim=True).values
            self.get_buffer(f"mean_{k}").copy_(mean)
            self.get_buffer(f"std_{k}").copy_(torch.where(constant, torch.inf, std))

    def forward(self, stacks: list[torch.Tensor]) -> list[torch.Tensor]:
        # (B, L, T, D_k) - (L, 1, D_k): every frame, padded ones too (the interface masks them out)
        return [(x - getattr(self, f"mean_{k}")[:, None]) / getattr(self, f"std_{k}")[:, None]
                for k, x in enumerate(stacks)]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if not any(key.startswith(prefix) for key in state_dict):  # saved before standardisation: identity
            for k in range(len(self.dims)):
                self.get_buffer(f"mean_{k}").zero_()
                self.get_buffer(f"std_{k}").fill_(1.0)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class HConv(nn.Module):
    """Hierarchical convolution over the layer axis (SSL_Interface hconvInterface.py).

    Every frame's L x D stack is a length-L sequence with D channels. n_convs =
    floor(log L / log stride) strided Conv1d (kernel 5, stride 3, padding 2), each followed by
    ReLU, shrink it to L_final positions; the last conv has D // L_final output channels, and
    the result is flattened channel-major (c * L_final + l):
    out_dim = (D // L_final) * L_final. 13 x 768: 13->5->2, out 768, 4,424,832 parameters;
    25 x 1024 -> 1023; 33 x 1280 -> 1280; 7 x 512 -> 510.

    Fewer layers than the stride (L = 1 or 2), where the reference refuses: one conv all the
    same, L_final = 1 and out_dim = D. Only valid frames are convolved (padded frames come
    out as zeros), so memory grows with sum(lengths), not B * T.
    """

    def __init__(self, num_layers: int, dim: int, kernel_size: int = 5, stride: int = 3,
                 normalize: bool = False):
        super().__init__()
        n_convs = 0
        while stride ** (n_convs + 1) <= num_layers:  # floor(log L / log stride), no float error
            n_convs += 1
        self.layer_lengths = [num_layers]
        convs = []
        for i in range(max(n_convs, 1)):
            length = (self.layer_lengths[-1] + 2 * (kernel_size // 2) - kernel_size) // stride + 1
            self.layer_lengths.append(length)
            out_channels = dim // length if i == max(n_convs, 1) - 1 else dim
            if out_channels < 1:
                raise ValueError(f"HConv: dim {dim} is smaller than the final layer length {length}")
            convs += [nn.Conv1d(dim, out_channels, kernel_size, stride, padding=kernel_size // 2),
                      nn.ReLU()]
        self.convs = nn.Sequential(*convs)
        self.num_layers, self.dim, self.normalize = num_layers, dim, normalize
        self.out_dim = out_channels * self.layer_lengths[-1]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        B, L, T, D = x.shape
        if self.normalize:
            x = _layer_norm(x)
        x = x.permute(0, 2, 3, 1)  # (B, L, T, D) -> (B, T, D, L)
        if lengths is None:
            return self.convs(x.reshape(B * T, D, L)).flatten(1).view(B, T, self.out_dim)
        # the (utterance, frame) pairs of the valid frames, found where the lengths are (the host, in training)
        # and copied over: a boolean mask on the device would make the host wait for its count of True
        b, t = cuda.upload(frame_mask(lengths, T).nonzero(), x.device).unbind(1)  # (N_valid,) each
        y = self.convs(x[b, t]).flatten(1)  # (N_valid, D, L) -> (N_valid, D // L', L') -> (N_valid, out)
        out = y.new_zeros(B, T, self.out_dim)
        out[b, t] = y
        return out


class WeightedSum(nn.Module):
    """s3prl Featurizer: softmax(weights) over layers, weights initialised to zero (= the mean).

    ``normalize``: parameter-free layer norm over D of each layer before weighting.
    """

    def __init__(self, num_layers: int, dim: int, normalize: bool = False):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))
        self.normalize, self.out_dim = normalize, dim

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if self.normalize:
            x = _layer_norm(x)
        return torch.einsum("l,bltd->btd", F.softmax(self.weights, dim=0), x)  # (B, L, T, D) -> (B, T, D)


class SingleLayer(nn.Module):
    """One fixed layer of the stack (negative indices count from the last)."""

    def __init__(self, num_layers: int, dim: int, layer: int):
        super().__init__()
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"single-layer: layer={layer} is outside the {num_layers} layers "
                             f"(0 .. {num_layers - 1}, or negative from the last)")
        self.layer, self.out_dim = layer, dim

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return x[:, self.layer]  # (B, L, T, D) -> (B, T, D)


class LastLayer(SingleLayer):
    """The last layer of the stack: the usual "use the top of the model" baseline."""

    def __init__(self, num_layers: int, dim: int):
        super().__init__(num_layers, dim, layer=-1)


def _to_common(dims: list[int]) -> tuple[int, nn.ModuleList | None]:
    # Hidden sizes differ (e.g. 1024 + 1280): the paper does not say what to do. We map EVERY
    # upstream with its own learned Linear(D_i -> max D_i), so no upstream is privileged.
    common = max(dims)
    if len(set(dims)) == 1:
        return common, None
    return common, nn.ModuleList(nn.Linear(d, common) for d in dims)


class Merge(nn.Module):
    """The paper's merges of N aligned stacks (B, L, T, D_i) -> (B, L, T, out_dim), trained.

    The merge names are stage 2's (`fusionpipe.fuse.view.MERGES`), but not its rules: stage 2
    merges features as stored, without parameters, so its add refuses unequal hidden sizes;
    here the merge is part of the trained model and may learn projections to a common size.

    add: element-wise sum; equal sizes add no parameters, unequal sizes first go through a
      learned per-upstream Linear(D_i -> D), D = max D_i (our choice; the paper only fuses
      equal sizes).
    concat ("CHConv"): concat on features -> sum D_i, then, if ``project`` (default),
      Linear(sum D_i -> D), D = max D_i; without it the interface sees sum D_i.
    One upstream: the identity, whatever the merge (layer-only fusion).
    """

    def __init__(self, dims: list[int], merge: str, project: bool = True):
        super().__init__()
        if merge not in MERGES:
            raise ValueError(f"unknown merge {merge!r}; choose one of {', '.join(MERGES)}")
        self.merge, self.projections, self.projection = merge, None, None
        if len(dims) == 1:
            self.out_dim = dims[0]
        elif merge == "add":
            self.out_dim, self.projections = _to_common(dims)
        elif project:
            self.out_dim, self.projection = max(dims), nn.Linear(sum(dims), max(dims))
        else:
            self.out_dim = sum(dims)

    def forward(self, stacks: list[torch.Tensor]) -> torch.Tensor:
        if len(stacks) == 1:
            return stacks[0]
        if self.merge == "add":
            if self.projections is not None:
                stacks = [p(x) for p, x in zip(self.projections, stacks)]
            return torch.stack(stacks).sum(0)
        x = torch.cat(stacks, dim=-1)  # (B, L, T, sum D_i)
        return x if self.projection is None else self.projection(x)


class GumbelSelect(nn.Module):
    """The paper's GumD baseline: dimension-wise Gumbel-softmax selection across upstreams.

    Per upstream a `WeightedSum` over its layers -> (B, T, D_i), mapped to D = max D_i by a
    per-upstream Linear when sizes differ (as in `Merge`). Selection logits (N, D) start at
    zero. Training: a relaxed (soft) Gumbel-softmax sample over the N upstreams for every
    dimension, one sample per forward pass shared by the batch and its frames, at
    temperature ``tau``; the trainer anneals tau geometrically from ``tau_start`` to
    ``tau_end`` with `set_progress` (our choices: the paper gives no schedule). Eval: hard,
    argmax of the logits, no noise, so each dimension comes from exactly one upstream.
    merge "add": the selected streams are summed -> (B, T, D), then Linear(D -> D).
    merge "concat": the N masked streams are concatenated -> (B, T, N * D), then
      Linear(N * D -> D) (the paper's "concat + projection" instead of time interleaving).
    """

    def __init__(self, dims: list[int], num_layers: int, merge: str = "add",
                 normalize: bool = False, tau_start: float = 1.0, tau_end: float = 0.1):
        super().__init__()
        if merge not in MERGES:
            raise ValueError(f"unknown merge {merge!r}; choose one of {', '.join(MERGES)}")
        self.sums = nn.ModuleList(WeightedSum(num_layers, d, normalize) for d in dims)
        self.out_dim, self.projections = _to_common(dims)
        self.logits = nn.Parameter(torch.zeros(len(dims), self.out_dim))
        n_in = self.out_dim * (len(dims) if merge == "concat" else 1)
        self.projection = nn.Linear(n_in, self.out_dim)
        self.merge, self.tau_start, self.tau_end = merge, tau_start, tau_end
        self.register_buffer("tau", torch.tensor(float(tau_start)))  # in checkpoints; `_tau` is what is read
        self._tau = float(tau_start)

    def set_progress(self, fraction: float) -> None:
        """Anneal the temperature: fraction of training done, 0 -> tau_start, 1 -> tau_end."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        # kept as a number too (set_progress runs before every training forward): float(self.tau) of a buffer
        # on a GPU would make the host wait for the device at every step
        self._tau = self.tau_start * (self.tau_end / self.tau_start) ** fraction
        self.tau.fill_(self._tau)

    def selection(self) -> torch.Tensor:
        """(N, D) weights of each upstream per dimension; they sum to 1 over N."""
        if self.training:
            return F.gumbel_softmax(self.logits, tau=self._tau, hard=False, dim=0)
        picked = self.logits.argmax(dim=0)
        return F.one_hot(picked, len(self.sums)).T.to(self.logits.dtype)

    def forward(self, stacks: list[torch.Tensor], lengths: torch.Tensor | None = None) -> torch.Tensor:
        streams = [ws(x) for ws, x in zip(self.sums, stacks)]  # N x (B, T, D_i)
        if self.projections is not None:
            streams = [p(s) for p, s in zip(self.projections, streams)]
        picked = torch.stack(streams) * self.selection()[:, None, None, :]  # (N, B, T, D)
        merged = picked.sum(0) if self.merge == "add" else torch.cat(list(picked), dim=-1)
        return self.projection(merged)


class InterfaceSpec(NamedTuple):
    """A row of `REGISTRY`: what ``--fusion NAME`` builds, the options it takes besides `COMMON_OPTIONS`
    (each with its rule, options.py), and what it is in a few words (errors name it). cli.py names the
    interfaces itself, as importing this module would cost every command torch's start-up; a test holds
    its list to this table."""

    module: type[nn.Module]  # built as module(num_layers, D, **options), GumbelSelect as (dims, num_layers, merge, ...)
    options: dict[str, Rule]
    help: str
    front: bool = True  # behind a merge front (`Merge`, which takes ``project``); GumbelSelect merges itself
    required: tuple[str, ...] = ()


# options every interface takes (docs/method.md)
COMMON_OPTIONS = {"standardize": BOOL, "output_norm": BOOL}
FRONT_OPTIONS = {"project": BOOL}
REGISTRY: dict[str, InterfaceSpec] = {
    # stride 1 would never shrink the layers (an endless loop)
    "hconv": InterfaceSpec(HConv, {"kernel_size": whole(1, 64), "stride": whole(2, 64), "normalize": BOOL},
                           "hierarchical convolution over the layers (the paper)"),
    "weighted-sum": InterfaceSpec(WeightedSum, {"normalize": BOOL}, "softmax-weighted sum of the layers (SUPERB)"),
    "gumbel": InterfaceSpec(GumbelSelect, {"normalize": BOOL, "tau_start": real(0, open_low=True),
                                           "tau_end": real(0, open_low=True)},
                            "per-dimension Gumbel-softmax choice of upstream (the GumD baseline)", front=False),
    "last-layer": InterfaceSpec(LastLayer, {}, "the last layer"),
    "single-layer": InterfaceSpec(SingleLayer, {"layer": whole(None, 4096)}, "one fixed layer, layer=k (-1: the last)",
                                  required=("layer",)),
}
INTERFACES = tuple(REGISTRY)


def interface_option_rules(fusion: str) -> dict[str, Rule]:
    """The options (interface_options keys) the interface named ``fusion`` takes, with their rules."""
    spec = REGISTRY[fusion]
    return {**spec.options, **COMMON_OPTIONS, **(FRONT_OPTIONS if spec.front else {})}


def interface_option_names(fusion: str) -> set[str]:
    """The options (interface_options keys) the interface named ``fusion`` takes."""
    return set(interface_option_rules(fusion))


def interface_option_problems(fusion: str, options: dict) -> list[tuple[str, str]]:
    """(option, what is wrong) for every option the interface ``fusion`` cannot take: an unknown name, a
    value outside its rule, a required option missing (single-layer's ``layer``). Empty when all are fine.
    Whether ``layer`` lies inside the stores' layers is known only once they are open (`SingleLayer`)."""
    rules = interface_option_rules(fusion)
    out = []
    for name, value in options.items():
        if name not in rules:
            out.append((name, f"unknown to interface {fusion}, which takes {', '.join(sorted(rules)) or 'none'}"))
        elif (why := value_problem(rules[name], value)) is not None:
            out.append((name, f"{why} (interface {fusion})"))
    for name in REGISTRY[fusion].required:
        if name not in options:
            out.append((name, f"interface {fusion} needs the option {name} ({REGISTRY[fusion].help})"))
    return out


class Interface(nn.Module):
    """Merge front + ONE interface: N stacks (B, L, T, D_i) + lengths (B,) -> (B, T, out_dim).

    ``dims``: hidden size D_i of each upstream, in the order of the stacks; ``num_layers``:
    the common L after alignment; ``fusion``: which interface, a key of `REGISTRY`; ``merge``:
    "add" or "concat" (`Merge`). ``opts``: the options `REGISTRY` lists for ``fusion``; the front's
    ``project`` defaults to True, and so do every interface's ``standardize`` and ``output_norm``
    (docs/method.md). Call `set_progress` every step; it only matters for gumbel.
    """

    def __init__(self, dims: list[int], num_layers: int, fusion: str = "hconv", merge: str = "add", **opts):
        super().__init__()
        if fusion not in INTERFACES:
            raise ValueError(f"unknown interface {fusion!r}; choose one of {', '.join(INTERFACES)}")
        if merge not in MERGES:
            raise ValueError(f"unknown merge {merge!r}; choose one of {', '.join(MERGES)}")
        problems = interface_option_problems(fusion, opts)  # the same rules TrainConfig.check_settings applies
        if problems:
            raise ValueError("; ".join(f"{name}: {why}" for name, why in problems))
        self.dims, self.num_layers = list(dims), num_layers
        self.fusion, self.merge = fusion, merge
        self.output_norm = opts.pop("output_norm", True)
        self.register_buffer("output_norm_on", torch.tensor(self.output_norm))  # saved with the model
        self.standardize = Standardize(self.dims, num_layers) if opts.pop("standardize", True) else None
        # the modules keep their names (front, interface): they are the keys of saved checkpoints
        spec = REGISTRY[fusion]
        if spec.front:
            self.front = Merge(self.dims, merge, project=opts.pop("project", True))
            self.interface = spec.module(num_layers, self.front.out_dim, **opts)
        else:
            self.front = None
            self.interface = spec.module(self.dims, num_layers, merge, **opts)
        self.out_dim = self.interface.out_dim

    def _load_from_state_dict(self, state_dict, prefix, *args):
        key = prefix + "output_norm_on"
        if key not in state_dict:  # saved before the two options existed (a run of an older fusionpipe, its config
            # without them): the model it trained as, Standardize's identity and no output norm
            older = self.standardize is not None and not any(k.startswith(prefix + "standardize.") for k in state_dict)
            state_dict[key] = torch.tensor(self.output_norm and not older)  # load_state_dict's own copy
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.output_norm = bool(self.output_norm_on)  # the saved value, kept on the host for forward

    def set_statistics(self, stats: list[tuple]) -> None:
        """Per-upstream (mean, std) of every (layer, channel) over the training frames (`Standardize`);
        without ``standardize`` nothing to set."""
        if self.standardize is not None:
            self.standardize.set_statistics(stats)

    def set_progress(self, fraction: float) -> None:
        """Tell the interface how far training is (0..1): anneals the Gumbel temperature."""
        if isinstance(self.interface, GumbelSelect):
            self.interface.set_progress(fraction)

    def forward(self, stacks: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        self._check(stacks)
        if self.standardize is not None:
            stacks = self.standardize(stacks)
        if self.front is None:
            out = self.interface(stacks, lengths)
        else:
            out = self.interface(self.front(stacks), lengths)
        if self.output_norm:
            out = _layer_norm(out)
        return out * cuda.upload(frame_mask(lengths, out.shape[1]), out.device)[..., None].to(out.dtype)

    def _check(self, stacks: list[torch.Tensor]) -> None:
        if len(stacks) != len(self.dims):
            raise ValueError(f"Interface was built for {len(self.dims)} upstreams, got {len(stacks)} stacks")
        B, _, T, _ = stacks[0].shape
        for i, x in enumerate(stacks):
            if x.dim() != 4 or x.shape[0] != B or x.shape[1] != self.num_layers or x.shape[2] != T \
                    or x.shape[3] != self.dims[i]:
                raise ValueError(f"stack {i} has shape {tuple(x.shape)}; expected (B={B}, "
                                 f"L={self.num_layers}, T={T}, D={self.dims[i]}) as the others, "
                                 "aligned by stage 2")
