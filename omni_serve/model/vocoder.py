"""Unit HiFi-GAN vocoder with duration predictor, reading fairseq's files without fairseq.

fairseq stores `g_XXXXXXXX` (a pickle holding {"generator": state_dict}) whose convolutions are
weight-normalised (`weight_g`, `weight_v`). We fold each pair into a plain weight once at load, so
inference runs ordinary convolutions. Module names follow fairseq's, which keeps loading a plain
`load_state_dict`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omni_serve.model.errors import CheckpointError

INNER_SLOPE = 0.1  # leaky ReLU slope inside the network
FINAL_SLOPE = 0.01  # torch's default slope, used once before conv_post (as fairseq does)


@dataclass(frozen=True)
class VocoderConfig:
    """The fields of fairseq's vocoder config.json that shape the network."""

    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    num_embeddings: int
    embedding_dim: int
    model_in_dim: int
    duration_hidden: int | None
    duration_kernel: int
    sampling_rate: int

    @classmethod
    def from_dict(cls, raw: dict) -> VocoderConfig:
        if raw.get("f0") or raw.get("multispkr"):
            raise CheckpointError("vocoders with f0 or speaker inputs are not supported")
        duration = raw.get("dur_predictor_params")
        return cls(
            upsample_rates=tuple(raw["upsample_rates"]),
            upsample_kernel_sizes=tuple(raw["upsample_kernel_sizes"]),
            upsample_initial_channel=int(raw["upsample_initial_channel"]),
            resblock_kernel_sizes=tuple(raw["resblock_kernel_sizes"]),
            resblock_dilation_sizes=tuple(tuple(d) for d in raw["resblock_dilation_sizes"]),
            num_embeddings=int(raw["num_embeddings"]),
            embedding_dim=int(raw["embedding_dim"]),
            model_in_dim=int(raw.get("model_in_dim", raw["embedding_dim"])),
            duration_hidden=int(duration["var_pred_hidden_dim"]) if duration else None,
            duration_kernel=int(duration["var_pred_kernel_size"]) if duration else 3,
            sampling_rate=int(raw.get("sampling_rate", 16000)),
        )

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates)


class DurationPredictor(nn.Module):
    """Two (conv -> ReLU -> LayerNorm) blocks and a projection to log(1 + duration) per unit."""

    def __init__(self, dim: int, hidden: int, kernel: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(dim, hidden, kernel, padding=kernel // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)
        self.context_units = 2 * (kernel // 2)

    def forward(self, embedded: torch.Tensor) -> torch.Tensor:
        """(batch, units, dim) -> log duration (batch, units)."""
        x = self.ln1(self.conv1(embedded.transpose(1, 2)).transpose(1, 2))
        x = self.ln2(self.conv2(x.transpose(1, 2)).transpose(1, 2))
        return self.proj(x).squeeze(-1)


class ResBlock(nn.Module):
    """fairseq's ResBlock1: per dilation, a dilated conv then a plain conv, with a skip."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2) for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for dilated, plain in zip(self.convs1, self.convs2):
            x = plain(F.leaky_relu(dilated(F.leaky_relu(x, INNER_SLOPE)), INNER_SLOPE, inplace=True)).add_(x)
        return x


class UnitHiFiGAN(nn.Module):
    """Discrete units -> 16 kHz waveform (`samples_per_frame` samples per frame)."""

    def __init__(self, config: VocoderConfig) -> None:
        super().__init__()
        self.config = config
        self.dict = nn.Embedding(config.num_embeddings, config.embedding_dim)
        self.dur_predictor = (
            DurationPredictor(config.embedding_dim, config.duration_hidden, config.duration_kernel)
            if config.duration_hidden else None
        )
        channels = config.upsample_initial_channel
        self.conv_pre = nn.Conv1d(config.model_in_dim, channels, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for rate, kernel in zip(config.upsample_rates, config.upsample_kernel_sizes):
            self.ups.append(nn.ConvTranspose1d(channels, channels // 2, kernel, rate, padding=(kernel - rate) // 2))
            channels //= 2
            for res_kernel, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(channels, res_kernel, dilations))
        self.conv_post = nn.Conv1d(channels, 1, 7, padding=3)

    @property
    def samples_per_frame(self) -> int:
        return self.config.samples_per_frame

    def durations(self, units: torch.Tensor) -> torch.Tensor:
        """Frames per unit for a (1, units) tensor: max(1, round(exp(log_dur) - 1))."""
        if self.dur_predictor is None:
            return torch.ones_like(units)
        log_duration = self.dur_predictor(self.dict(units))
        return torch.clamp(torch.round(torch.exp(log_duration) - 1).long(), min=1)

    def frames(self, units: torch.Tensor, durations: torch.Tensor | None) -> torch.Tensor:
        """Unit embeddings repeated by their durations: (1, dim, frames)."""
        embedded = self.dict(units).transpose(1, 2)
        if durations is None:
            return embedded
        return torch.repeat_interleave(embedded, durations.view(-1), dim=2)

    def synthesize(self, frames: torch.Tensor) -> torch.Tensor:
        """HiFi-GAN proper: (1, dim, frames) -> (samples,)."""
        num_kernels = len(self.config.resblock_kernel_sizes)
        x = self.conv_pre(frames)
        for stage, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, INNER_SLOPE, inplace=True))  # x is always a fresh tensor here
            blocks = self.resblocks[stage * num_kernels : (stage + 1) * num_kernels]
            x = sum(block(x) for block in blocks) / num_kernels
        x = self.conv_post(F.leaky_relu(x, FINAL_SLOPE, inplace=True))
        return torch.tanh(x).view(-1)

    @torch.inference_mode()
    def forward(self, units: torch.Tensor, use_durations: bool = True) -> torch.Tensor:
        """Whole-utterance vocoding of (1, units) ids; negative ids are dropped first."""
        units = units[units >= 0].view(1, -1)
        durations = self.durations(units) if use_durations else None
        return self.synthesize(self.frames(units, durations))

    def synthesis_stream(self) -> SynthesisStream:
        """Incremental, exact `synthesize`: push frames, get every sample they already determine."""
        return SynthesisStream(self)

    def receptive_field_frames(self) -> int:
        """Frames on each side that can change one output sample (an upper bound, measured in tests)."""
        config = self.config
        reach = 3.0  # conv_pre, in frames
        rate = 1
        for up_rate, up_kernel in zip(config.upsample_rates, config.upsample_kernel_sizes):
            reach += math.ceil(up_kernel / up_rate) / rate
            rate *= up_rate
            block_reach = max(
                (k - 1) // 2 * (sum(d) + len(d)) for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes)
            )
            reach += block_reach / rate
        reach += 3 / rate  # conv_post
        return math.ceil(reach) + 1


class SynthesisStream:
    """`UnitHiFiGAN.synthesize` run incrementally, computing every sample once.

    Each convolution keeps the input samples its next outputs still need (its left context) and
    outputs only samples whose inputs have all arrived, so the output lags the input by the
    network's reach and the joined output equals `synthesize` over all frames (to float rounding).
    Each leaky ReLU is applied while copying a convolution's new input after its held context, and
    skip connections are added in place, so a push makes few passes over memory.
    """

    def __init__(self, model: UnitHiFiGAN) -> None:
        num_kernels = len(model.config.resblock_kernel_sizes)
        self.pre = _StreamConv(model.conv_pre)
        self.stages = [
            _StreamStage(up, model.resblocks[stage * num_kernels : (stage + 1) * num_kernels])
            for stage, up in enumerate(model.ups)
        ]
        self.post = _StreamConv(model.conv_post)

    def push(self, frames: torch.Tensor, final: bool) -> torch.Tensor:
        """(1, dim, new frames) -> (new samples,); `final` flushes the end of the utterance."""
        x = self.pre(frames, final)
        for stage in self.stages:
            x = stage(x, final)
        return torch.tanh_(self.post(x, final, FINAL_SLOPE)).view(-1)

    def clone(self) -> SynthesisStream:
        """An independent copy of the state (to flush speculatively without disturbing this one)."""
        twin = copy.copy(self)
        twin.pre, twin.post = self.pre.clone(), self.post.clone()
        twin.stages = [stage.clone() for stage in self.stages]
        return twin


def _window(held: torch.Tensor, x: torch.Tensor, slope: float | None, right_zeros: int = 0) -> torch.Tensor:
    """held, then leaky_relu(x, slope) (x itself when slope is None), then zeros, in one new tensor."""
    width, count = held.shape[2], x.shape[2]
    window = x.new_empty(1, x.shape[1], width + count + right_zeros)
    window[:, :, :width] = held
    if slope is None:
        window[:, :, width : width + count] = x
    else:
        torch._C._nn.leaky_relu(x, slope, out=window[:, :, width : width + count])
    if right_zeros:
        window[:, :, width + count :] = 0
    return window


class _StreamConv:
    """A same-padded Conv1d on a stream: holds the last 2 * pad inputs (zeros before the start)."""

    def __init__(self, conv: nn.Conv1d) -> None:
        self.conv = conv
        self.pad = conv.padding[0]
        self.held: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, final: bool, slope: float | None = None) -> torch.Tensor:
        """Outputs for new inputs `x` (leaky ReLU with `slope` applied to them first, if given)."""
        conv, pad = self.conv, self.pad
        held = x.new_zeros(1, x.shape[1], pad) if self.held is None else self.held
        window = _window(held, x, slope, pad if final else 0)
        self.held = window[:, :, max(0, window.shape[2] - 2 * pad) :].clone()
        if window.shape[2] <= 2 * pad:
            return x.new_zeros(1, conv.out_channels, 0)
        return F.conv1d(window, conv.weight, conv.bias, dilation=conv.dilation)

    def clone(self) -> _StreamConv:
        return copy.copy(self)  # tensors are replaced, never written in place


class _StreamUpsample:
    """A stage's ConvTranspose1d on a stream.

    Output t needs inputs (t + pad - kernel + 1) / rate up to (t + pad) / rate (rounded in).
    """

    def __init__(self, up: nn.ConvTranspose1d) -> None:
        self.up = up
        self.rate, self.kernel, self.pad = up.stride[0], up.kernel_size[0], up.padding[0]
        self.held: torch.Tensor | None = None
        self.first = 0  # input index of held[..., 0]
        self.emitted = 0  # outputs given so far

    def __call__(self, x: torch.Tensor, final: bool, slope: float) -> torch.Tensor:
        up, rate, pad = self.up, self.rate, self.pad
        held = x.new_zeros(1, x.shape[1], 0) if self.held is None else self.held
        window = _window(held, x, slope)
        inputs = self.first + window.shape[2]
        end = inputs * rate if final else inputs * rate - pad  # outputs before `end` have all their inputs
        if end <= self.emitted:
            self.held = window
            return x.new_zeros(1, up.out_channels, 0)
        full = F.conv_transpose1d(window, up.weight, up.bias, stride=rate)  # full[u] is output u + first * rate - pad
        offset = self.first * rate - pad
        out = full[:, :, self.emitted - offset : end - offset]
        keep_from = min(inputs, max(0, -(-(end + pad - self.kernel + 1) // rate)))
        self.held = window[:, :, keep_from - self.first :].clone()
        self.first, self.emitted = keep_from, end
        return out

    def clone(self) -> _StreamUpsample:
        return copy.copy(self)


class _StreamResBlock:
    """ResBlock1 on a stream: each skip input waits for its (lagging) convolution output."""

    def __init__(self, block: ResBlock) -> None:
        self.convs = [(_StreamConv(dilated), _StreamConv(plain)) for dilated, plain in zip(block.convs1, block.convs2)]
        self.skips: list[torch.Tensor | None] = [None] * len(self.convs)

    def __call__(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        for index, (dilated, plain) in enumerate(self.convs):
            y = plain(dilated(x, final, INNER_SLOPE), final, INNER_SLOPE)  # y is new: add the skip in place
            skip = x if self.skips[index] is None else torch.cat([self.skips[index], x], dim=2)
            ready = y.shape[2]
            y += skip[:, :, :ready]
            self.skips[index] = skip[:, :, ready:]
            x = y
        return x

    def clone(self) -> _StreamResBlock:
        twin = copy.copy(self)
        twin.convs = [(dilated.clone(), plain.clone()) for dilated, plain in self.convs]
        twin.skips = list(self.skips)
        return twin


class _StreamStage:
    """leaky ReLU -> upsample -> mean of the stage's resblocks, whose outputs lag by different amounts."""

    def __init__(self, up: nn.ConvTranspose1d, blocks: nn.ModuleList) -> None:
        self.up = _StreamUpsample(up)
        self.blocks = [_StreamResBlock(block) for block in blocks]
        self.waiting: list[torch.Tensor | None] = [None] * len(self.blocks)

    def __call__(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        x = self.up(x, final, INNER_SLOPE)
        outputs = []
        for index, block in enumerate(self.blocks):
            y = block(x, final)
            outputs.append(y if self.waiting[index] is None else torch.cat([self.waiting[index], y], dim=2))
        ready = min(y.shape[2] for y in outputs)
        self.waiting = [y[:, :, ready:] for y in outputs]
        total = outputs[0][:, :, :ready].clone()  # sum() order: ((y0 + y1) + y2) / n, as in `synthesize`
        for y in outputs[1:]:
            total += y[:, :, :ready]
        return total.div_(len(outputs))

    def clone(self) -> _StreamStage:
        twin = copy.copy(self)
        twin.up = self.up.clone()
        twin.blocks = [block.clone() for block in self.blocks]
        twin.waiting = list(self.waiting)
        return twin


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each (weight_g, weight_v) pair by weight = g * v / ||v|| (norm over all dims but 0)."""
    folded = {}
    for key, value in state.items():
        if key.endswith(".weight_g"):
            continue
        if key.endswith(".weight_v"):
            prefix = key[: -len("weight_v")]
            g = state[prefix + "weight_g"]
            norm = value.flatten(1).norm(dim=1).view(-1, *([1] * (value.dim() - 1)))
            folded[prefix + "weight"] = g * value / norm
        else:
            folded[key] = value
    return folded


def find_vocoder_files(folder: Path) -> tuple[Path, Path]:
    """The generator checkpoint (`g_*`, newest step) and config.json in a vocoder folder."""
    folder = Path(folder)
    config = folder / "config.json"
    checkpoints = sorted(folder.glob("g_*"))
    if not config.is_file() or not checkpoints:
        raise CheckpointError(f"{folder} must hold a fairseq vocoder: config.json and a g_XXXXXXXX file")
    return checkpoints[-1], config


def load_unit_hifigan(folder: Path) -> UnitHiFiGAN:
    """Load fairseq's unit HiFi-GAN (code_hifigan) from its folder, with weight norm folded."""
    checkpoint_path, config_path = find_vocoder_files(folder)
    config = VocoderConfig.from_dict(json.loads(config_path.read_text()))
    try:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["generator"]
    except (KeyError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"{checkpoint_path} is not a fairseq vocoder checkpoint: {exc}") from exc
    vocoder = UnitHiFiGAN(config)
    vocoder.load_state_dict(fold_weight_norm(state), strict=True)
    return vocoder.eval()
