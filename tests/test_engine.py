"""Engine: tile choice, OOM fallback (simulated), NaN fallback, precision/device validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from restore_cli.engine import Engine, EngineOptions, tile_for_memory
from restore_cli.errors import ConfigError, RestoreCliError
from restore_cli.models.registry import LoadedModel, ModelSpec

from .test_tiling import LocalConvNet


def loaded(module: nn.Module, **spec) -> LoadedModel:
    return LoadedModel(name="test", module=module, spec=ModelSpec(arch="test", **spec))


class OutOfMemoryAbove(nn.Module):
    """Raises CUDA-style OOM for inputs above ``limit`` pixels; otherwise a local model."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.inner = LocalConvNet()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        if x.shape[-2] * x.shape[-1] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


class NanInHalfPrecision(nn.Module):
    """Finite in fp32, NaN whenever autocast has lowered the convolution's precision."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * float("nan") if y.dtype != torch.float32 else x


def test_oom_halves_the_tile_and_retries_the_image():
    torch.manual_seed(0)
    module = OutOfMemoryAbove(limit=160 * 160)
    engine = Engine(loaded(module), EngineOptions(device="cpu", tile=0, tile_overlap=16))
    image = np.random.default_rng(0).random((300, 260, 3), dtype=np.float32)
    output, info = engine.restore(image)
    assert info.tile == 150  # whole (300) → 150 fits the limit
    assert any("out of memory" in note for note in info.notes)
    with torch.no_grad():
        expected = module.inner(torch.from_numpy(image).permute(2, 0, 1)[None]).clamp(0, 1)
    expected = expected[0].permute(1, 2, 0).numpy()
    assert np.abs(output - expected).max() < 1e-5  # local model: tiled == whole


def test_oom_at_the_smallest_tile_is_one_clear_error():
    engine = Engine(loaded(OutOfMemoryAbove(limit=10)), EngineOptions(device="cpu", tile=128))
    with pytest.raises(RestoreCliError, match="out of memory"):
        engine.restore(np.zeros((256, 256, 3), np.float32))


def test_nan_in_half_precision_is_redone_in_fp32():
    engine = Engine(loaded(NanInHalfPrecision()), EngineOptions(device="cpu", precision="bf16"))
    image = np.random.default_rng(1).random((40, 50, 3), dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="NaN"):
        output, info = engine.restore(image)
    assert info.precision == "fp32"
    np.testing.assert_allclose(output, image, atol=1e-6)


def test_nan_in_fp32_is_an_error_not_an_output():
    class AlwaysNan(nn.Module):
        def forward(self, x):
            return x * float("nan")

    engine = Engine(loaded(AlwaysNan()), EngineOptions(device="cpu"))
    with pytest.raises(RestoreCliError, match="NaN"):
        engine.restore(np.zeros((8, 8, 3), np.float32))


def test_auto_tile_on_cpu_tiles_only_large_images():
    engine = Engine(loaded(LocalConvNet(), size_multiple=16), EngineOptions(device="cpu"))
    assert engine.choose_tile(400, 500) == 0
    assert engine.choose_tile(3000, 4000) == 512
    assert engine.precision == "fp32"


def test_tile_for_memory_fits_the_budget_and_respects_the_multiple():
    tile = tile_for_memory(free_mib=8000, mib_per_mp=1000, batch_size=2, multiple=16, overlap=32)
    assert tile % 16 == 0
    assert 2 * (tile * tile / 1e6) * 1000 <= 0.6 * 8000
    assert tile_for_memory(1, 1e6, 1, 16, 32) >= 64  # never below the minimum tile


def test_single_channel_models_get_luma_and_return_rgb():
    class Identity(nn.Module):
        def forward(self, x):
            assert x.shape[1] == 1
            return x

    spec = {"input_channels": 1, "output_channels": 1}
    engine = Engine(loaded(Identity(), **spec), EngineOptions(device="cpu"))
    image = np.random.default_rng(2).random((16, 16, 3), dtype=np.float32)
    output, _ = engine.restore(image)
    luma = image @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(output, np.repeat(luma[..., None], 3, axis=2), atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (EngineOptions(device="tpu"), "--device"),
        (EngineOptions(device="cpu", precision="fp8"), "--precision"),
        (EngineOptions(device="cpu", tile=-1), "--tile"),
    ],
)
def test_bad_engine_options_are_clear_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        Engine(loaded(LocalConvNet()), options)


def test_fp16_refused_for_models_not_safe_in_half():
    with pytest.raises(ConfigError, match="fp16"):
        Engine(
            loaded(LocalConvNet(), supports_half=False),
            EngineOptions(device="cpu", precision="fp16"),
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_requested_without_cuda():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Engine(loaded(LocalConvNet()), EngineOptions(device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_tile_and_bf16_match_fp32():
    torch.manual_seed(0)
    model = loaded(LocalConvNet(), size_multiple=8)
    image = np.random.default_rng(3).random((1200, 1000, 3), dtype=np.float32)
    fast, info = Engine(model, EngineOptions(device="cuda")).restore(image)
    exact, _ = Engine(model, EngineOptions(device="cuda", precision="fp32", tile=0)).restore(image)
    assert info.precision in ("bf16", "fp16")
    assert np.abs(fast - exact).mean() < 5e-3


class RecordsInputs(nn.Module):
    """A local model that remembers the shape and memory format of every batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = LocalConvNet()
        self.seen: list[tuple[tuple[int, ...], bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        self.seen.append((tuple(x.shape), channels_last))
        return self.inner(x)


@pytest.mark.parametrize("prefers", [True, False])
def test_channels_last_follows_the_spec_unless_overridden(prefers):
    image = np.random.default_rng(4).random((70, 90, 3), dtype=np.float32)
    outputs = {}
    torch.manual_seed(0)
    module = RecordsInputs()  # one module for both engines: the second converts it back
    for override in (None, not prefers):
        module.seen.clear()
        engine = Engine(
            loaded(module, channels_last=prefers),
            EngineOptions(device="cpu", channels_last=override),
        )
        outputs[override], _ = engine.restore(image)
        expected = prefers if override is None else override
        assert {last for _, last in module.seen} == {expected}
        weight = module.inner.body[0].weight  # 3x3: channels_last and contiguous differ
        assert weight.is_contiguous(memory_format=torch.channels_last) == expected
    assert np.abs(outputs[None] - outputs[not prefers]).max() < 1e-5


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with the eager backend: Dynamo still traces and guards every shape (so
    recompiles are caught), without the minutes of C++ code generation. Yields the shapes the
    compiled network was called with."""
    real_compile = torch.compile
    shapes: list[tuple[int, ...]] = []

    def compile_eager(module, **kwargs):
        compiled = real_compile(module, backend="eager", **kwargs)

        def call(batch, **conditions):
            shapes.append(tuple(batch.shape))
            return compiled(batch, **conditions)

        return call

    monkeypatch.setattr("restore_cli.engine.torch.compile", compile_eager)
    torch._dynamo.reset()
    yield shapes
    torch._dynamo.reset()


def test_compile_runs_every_image_size_with_one_shape_and_no_recompiles(eager_compile):
    torch.manual_seed(0)
    model = loaded(LocalConvNet(), size_multiple=4)
    engine = Engine(model, EngineOptions(device="cpu", tile=64, batch_size=3, compile=True))
    eager = Engine(model, EngineOptions(device="cpu", tile=64, batch_size=3))
    rng = np.random.default_rng(5)
    # smaller than a tile, a thin strip, several tiles with a short last batch, not multiples
    sizes = [(40, 30), (20, 150), (130, 101), (64, 64)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for height, width in sizes:
            image = rng.random((height, width, 3), dtype=np.float32)
            compiled, info = engine.restore(image)
            assert compiled.shape == image.shape and info.tile == 64
            reference, _ = eager.restore(image)
            # A local model (radius 3): unbalanced tiles change nothing; the reflect padding up
            # to the tile only changes what the bottom/right border pixels see (eager pads to
            # a multiple of 4 and the convolutions zero-pad beyond).
            interior = (slice(0, height - 8), slice(0, width - 8))
            assert np.abs(compiled - reference)[interior].max() < 1e-5
    assert set(eager_compile) == {(3, 3, 64, 64)}


def test_compile_without_a_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("restore_cli.engine.shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="--compile on CPU needs a C"):
        Engine(loaded(LocalConvNet()), EngineOptions(device="cpu", compile=True))


CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_compile_with_inductor_matches_eager_fp32(device):
    """The real code generator (C++ on the CPU; Triton on CUDA, in bf16/fp16 and channels_last
    there), on a tiny network."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = loaded(LocalConvNet(), size_multiple=8)
    image = np.random.default_rng(6).random((300, 260, 3), dtype=np.float32)
    compiled, info = Engine(model, EngineOptions(device=device, tile=128, compile=True)).restore(
        image
    )
    eager, _ = Engine(model, EngineOptions(device=device, precision="fp32", tile=128)).restore(
        image
    )
    difference = np.abs(compiled - eager)
    if info.precision == "fp32":
        assert difference.max() < 1e-4
    else:
        assert difference.mean() < 5e-3
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("spec", "options", "size"),
    [
        ({}, {}, (300, 200)),  # whole image
        ({"size_multiple": 8}, {}, (700, 1100)),  # auto 512 tiles, balanced
        ({"size_multiple": 4, "min_size": 40, "square": True}, {"tile": 64}, (30, 150)),
        ({"size_multiple": 4}, {"tile": 64, "tile_overlap": 40}, (130, 101)),
    ],
)
def test_forward_size_is_what_the_network_gets(spec, options, size):
    module = RecordsInputs()
    engine = Engine(loaded(module, **spec), EngineOptions(device="cpu", **options))
    image = np.random.default_rng(8).random((*size, 3), dtype=np.float32)
    engine.restore(image)
    assert module.seen[0][0][-2:] == engine.forward_size(*size)  # the first tile's shape


def test_forward_size_when_compiled(eager_compile):
    engine = Engine(loaded(LocalConvNet(), size_multiple=4),
                    EngineOptions(device="cpu", tile=64, compile=True))  # fmt: skip
    for size in [(40, 30), (130, 101)]:
        engine.restore(np.zeros((*size, 3), dtype=np.float32))
        assert {shape[-2:] for shape in eager_compile} == {engine.forward_size(*size)}
