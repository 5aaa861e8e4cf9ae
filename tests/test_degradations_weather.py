"""Weather and scene degradations: haze, rain streaks, raindrops, snow, shadow, inpainting holes.

Every type is checked against the contract (seeded, shape/dtype/range, batches, any image size,
level sampling) and for the direction of its effect on a synthetic outdoor-like image: a sky
gradient above a textured ground, with hard-edged objects.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from restore_cli.degradations import haze, inpaint, rain, shadow, snow  # noqa: F401  (registers)
from restore_cli.degradations.base import DEGRADATIONS, LEVELS, Choice, Degradation, Param
from restore_cli.degradations.inpaint import inpaint_mask
from restore_cli.degradations.shadow import shadow_mask

WEATHER = {
    "haze": ("haze", "dehaze"),
    "rain_streaks": ("rain", "derain"),
    "raindrops": ("raindrop", "deraindrop"),
    "snow": ("snow", "desnow"),
    "shadow": ("shadow", "deshadow"),
    "inpaint_mask": ("inpaint", "inpaint"),
}
NAMES = sorted(WEATHER)


def outdoor_scene(height: int = 256, width: int = 256) -> torch.Tensor:
    """``[1,3,H,W]`` in ``[0.05,0.95]``: blue sky ramp, wavy horizon, grainy ground, two objects."""
    y = torch.linspace(0, 1, height).view(-1, 1).expand(height, width)
    x = torch.linspace(0, 1, width).view(1, -1).expand(height, width)
    sky = torch.stack([0.45 + 0.3 * y, 0.6 + 0.25 * y, 0.92 - 0.1 * y])
    grain = torch.rand((1, 1, height + 2, width + 2), generator=torch.Generator().manual_seed(11))
    texture = F.avg_pool2d(grain, 3, stride=1)[0, 0]
    ground = torch.stack([0.25 + 0.35 * texture, 0.35 + 0.35 * texture, 0.12 + 0.2 * texture])
    image = torch.where(y < 0.45 + 0.05 * torch.sin(12 * x), sky, ground)
    house = (x > 0.1) & (x < 0.35) & (y > 0.55) & (y < 0.85)
    image = torch.where(house, torch.tensor([0.75, 0.7, 0.6]).view(3, 1, 1), image)
    sun = (x - 0.75) ** 2 + (y - 0.2) ** 2 < 0.08**2
    image = torch.where(sun, torch.tensor([0.95, 0.9, 0.7]).view(3, 1, 1), image)
    return image.clamp(0.05, 0.95).unsqueeze(0)


def typical_params(degradation: Degradation, level: str, ood: bool = False) -> dict:
    return degradation.typical_params(level, ood)


def run(name: str, image: torch.Tensor, params: dict, seed: int) -> torch.Tensor:
    return DEGRADATIONS[name](image, params, torch.Generator().manual_seed(seed))


def sampled_pair(name: str, seed: int, level: str = "heavy", ood: bool = False) -> torch.Tensor:
    """One degraded image the way the pipeline makes it: params and field from one seed."""
    degradation = DEGRADATIONS[name]
    params = degradation.sample_params(level, np.random.default_rng(seed), ood=ood)
    return run(name, outdoor_scene(96, 128), params, seed)


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_family_task_and_source(name):
    degradation = DEGRADATIONS[name]
    assert (degradation.family, degradation.task) == WEATHER[name]
    assert degradation.summary and "\n" not in degradation.summary
    assert len(degradation.source) > 20


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("level", "ood"), [("light", False), ("heavy", False), ("heavy", True)])
def test_same_seed_gives_identical_bytes(name, level, ood):
    first = sampled_pair(name, seed=3, level=level, ood=ood)
    second = sampled_pair(name, seed=3, level=level, ood=ood)
    assert first.numpy().tobytes() == second.numpy().tobytes()


@pytest.mark.parametrize("name", NAMES)
def test_different_seeds_differ(name):
    assert not torch.equal(sampled_pair(name, seed=1), sampled_pair(name, seed=2))
    params = typical_params(DEGRADATIONS[name], "medium")
    image = outdoor_scene(96, 128)
    assert not torch.equal(run(name, image, params, seed=1), run(name, image, params, seed=2))


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_range_and_batches(name):
    params = typical_params(DEGRADATIONS[name], "heavy")
    image = torch.cat([outdoor_scene(80, 120), outdoor_scene(80, 120).flip(-1)])
    output = run(name, image, params, seed=4)
    assert output.shape == image.shape and output.dtype == torch.float32
    assert torch.isfinite(output).all() and output.min() >= 0 and output.max() <= 1
    assert not torch.equal(output, image)


@pytest.mark.parametrize("name", NAMES)
def test_result_does_not_depend_on_thread_count(name):
    params = typical_params(DEGRADATIONS[name], "heavy")
    image = outdoor_scene(96, 128)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            outputs.append(run(name, image, params, seed=5).numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert outputs[0] == outputs[1]


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    height=st.integers(8, 72),
    width=st.integers(8, 72),
    level=st.sampled_from(LEVELS),
    ood=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_image_size_works(name, height, width, level, ood, seed):
    degradation = DEGRADATIONS[name]
    params = degradation.sample_params(level, np.random.default_rng(seed), ood=ood)
    image = torch.rand((1, 3, height, width), generator=torch.Generator().manual_seed(seed))
    output = run(name, image, params, seed)
    assert output.shape == image.shape
    assert torch.isfinite(output).all() and output.min() >= 0 and output.max() <= 1


def _tolerance(param: Param) -> float:
    return 0.5 if param.integer else 1e-9  # integers are rounded after drawing


@pytest.mark.parametrize("name", NAMES)
def test_level_sampling_respects_thirds_and_ood_is_beyond_heavy(name):
    degradation = DEGRADATIONS[name]
    rng = np.random.default_rng(0)
    draws = {
        (level, ood): [degradation.sample_params(level, rng, ood=ood) for _ in range(100)]
        for level in LEVELS
        for ood in (False, True)
    }
    for p in degradation.params:
        if isinstance(p, Choice):
            assert {d[p.name] for d in draws["medium", False]} <= set(p.options)
            continue
        tol = _tolerance(p)
        for (level, ood), samples in draws.items():
            low, high = sorted(p.interval(level, ood))
            values = [d[p.name] for d in samples]
            assert low - tol <= min(values) and max(values) <= high + tol, (p.name, level, ood)
        if p.severity and p.ood is not None:
            heavy_end = p.in_dist[1]
            rising = p.in_dist[1] > p.in_dist[0]
            for level in LEVELS:
                for d in draws[level, True]:
                    beyond = d[p.name] - heavy_end if rising else heavy_end - d[p.name]
                    assert beyond >= -tol, (p.name, level)


# --- direction of effect --------------------------------------------------------------------


def dark_channel(image: torch.Tensor) -> torch.Tensor:
    """He et al.'s dark channel: min over RGB, then a 15×15 min filter (high where hazy)."""
    darkest = image.amin(1, keepdim=True)
    return -F.max_pool2d(-darkest, 15, stride=1, padding=7)


def test_haze_lowers_contrast_and_raises_the_dark_channel_more_when_heavier():
    image = outdoor_scene()
    light = run("haze", image, typical_params(DEGRADATIONS["haze"], "light"), seed=0)
    heavy = run("haze", image, typical_params(DEGRADATIONS["haze"], "heavy"), seed=0)
    assert image.std() > light.std() > heavy.std()
    assert dark_channel(image).mean() < dark_channel(light).mean() < dark_channel(heavy).mean()


def test_haze_is_thicker_at_the_top_where_the_proxy_puts_far_things():
    image = outdoor_scene()
    hazy = run("haze", image, typical_params(DEGRADATIONS["haze"], "medium"), seed=0)
    change = (hazy - image).abs().mean(1)[0]
    assert change[:64].mean() > change[-64:].mean()


def test_rain_streaks_brighten_and_vary_across_their_direction():
    image = outdoor_scene()
    params = typical_params(DEGRADATIONS["rain_streaks"], "heavy") | {"angle": 0.0, "width": 1}
    rainy = run("rain_streaks", image, params, seed=0)
    assert (rainy >= image - 1e-6).all() and rainy.mean() > image.mean() + 0.02
    streaks = (rainy - image).mean(1)
    across = (streaks[..., :, 1:] - streaks[..., :, :-1]).square().sum()  # d/dx
    along = (streaks[..., 1:, :] - streaks[..., :-1, :]).square().sum()  # d/dy
    assert across > 5 * along


def test_tilted_rain_follows_its_angle():
    image = outdoor_scene()
    params = typical_params(DEGRADATIONS["rain_streaks"], "heavy") | {"angle": 30.0, "width": 1}
    streaks = (run("rain_streaks", image, params, seed=0) - image).mean(1)[0]
    streaks = streaks - streaks.mean()
    # Positive angle: falls to the right, so 4 rows down a streak is ~4·tan(30°) ≈ 2.3 px right.
    down_right = (streaks[4:, 2:] * streaks[:-4, :-2]).mean()
    down_left = (streaks[4:, :-2] * streaks[:-4, 2:]).mean()
    assert down_right > 3 * down_left.clamp_min(0) and down_right > 0


def changed_fraction(before: torch.Tensor, after: torch.Tensor) -> float:
    return float(((after - before).abs().amax(1) > 1e-6).float().mean())


def test_raindrops_touch_few_pixels_when_light_and_more_when_heavy():
    image = outdoor_scene()
    degradation = DEGRADATIONS["raindrops"]
    light = changed_fraction(
        image, run("raindrops", image, typical_params(degradation, "light"), 0)
    )
    heavy = changed_fraction(
        image, run("raindrops", image, typical_params(degradation, "heavy"), 0)
    )
    assert 0 < light < 0.15
    assert heavy > 2 * light


def test_raindrops_show_the_scene_upside_down():
    """Behind a drop a top-bright, bottom-dark ramp appears the other way up (lens inversion)."""
    ramp = torch.linspace(0.9, 0.1, 128).view(1, 1, -1, 1).expand(1, 3, 128, 128).contiguous()
    params = {"count": 1, "radius": 60.0}  # one drop of ~15 px radius at 128 px
    checked = 0
    for seed in range(6):
        drop = run("raindrops", ramp, params, seed=seed)
        changed = ((drop - ramp).abs().amax(1)[0] > 1e-6).nonzero().float()
        row, column = (int(v) for v in changed.mean(0))
        if not (24 <= row < 104 and 24 <= column < 104):
            continue  # a drop cut by the border: its centroid is not its centre
        # Lower half of the drop, clear of the rim and of the glint at the top left.
        assert drop[0, 1, row + 6, column] > drop[0, 1, row, column] + 0.005, seed
        checked += 1
    assert checked >= 2


def test_snow_brightens_and_heavier_snow_more():
    image = outdoor_scene()
    degradation = DEGRADATIONS["snow"]
    light = run("snow", image, typical_params(degradation, "light"), seed=0)
    heavy = run("snow", image, typical_params(degradation, "heavy"), seed=0)
    assert image.mean() < light.mean() < heavy.mean()
    assert heavy.mean() - image.mean() > 0.05


@pytest.mark.parametrize("shape", ["polygon", "blob"])
def test_shadow_darkens_only_inside_its_mask(shape):
    image = outdoor_scene()
    params = typical_params(DEGRADATIONS["shadow"], "heavy") | {"shape": shape, "softness": 4.0}
    shaded = run("shadow", image, params, seed=9)
    mask = shadow_mask(tuple(image.shape), params, torch.Generator().manual_seed(9))
    assert mask.shape == (1, 1, 256, 256) and mask.min() >= 0 and mask.max() <= 1
    outside, inside = mask == 0, mask > 0.99
    assert outside.float().mean() > 0.3 and inside.float().mean() > 0.05
    assert shaded.mean() < image.mean()
    assert torch.equal(shaded.masked_select(outside), image.masked_select(outside))
    ratio = shaded.masked_select(inside) / image.masked_select(inside)
    assert ratio.max() < 1 - 0.5 * params["strength"]
    # Bluish: red is attenuated more than blue inside the shadow.
    red = (shaded[:, 0] / image[:, 0]).masked_select(inside[:, 0])
    blue = (shaded[:, 2] / image[:, 2]).masked_select(inside[:, 0])
    assert red.mean() <= blue.mean()


@pytest.mark.parametrize(("level", "ood"), [(lv, False) for lv in LEVELS] + [("heavy", True)])
def test_inpaint_mask_covers_the_sampled_fraction(level, ood):
    degradation = DEGRADATIONS["inpaint_mask"]
    rng = np.random.default_rng(LEVELS.index(level))
    for seed in range(4):
        params = degradation.sample_params(level, rng, ood=ood)
        masks = inpaint_mask((2, 3, 256, 256), params, torch.Generator().manual_seed(seed))
        assert masks.shape == (2, 1, 256, 256) and set(masks.unique().tolist()) <= {0.0, 1.0}
        for mask in masks:
            assert abs(float(mask.mean()) - params["coverage"]) <= 0.05


def test_inpaint_blackens_exactly_the_mask():
    image = outdoor_scene()
    params = {"coverage": 0.2}
    holed = run("inpaint_mask", image, params, seed=2)
    mask = inpaint_mask(tuple(image.shape), params, torch.Generator().manual_seed(2)).bool()
    assert (holed.masked_select(mask.expand_as(image)) == 0).all()
    assert torch.equal(holed.masked_select(~mask), image.masked_select(~mask))


def test_sizes_scale_with_the_image():
    """Per-512-px geometry: the same params darken/brighten a 2× larger image alike."""
    small, large = outdoor_scene(128, 128), outdoor_scene(256, 256)
    for name in ("rain_streaks", "snow"):
        params = typical_params(DEGRADATIONS[name], "medium")
        gain_small = float(run(name, small, params, 0).mean() - small.mean())
        gain_large = float(run(name, large, params, 0).mean() - large.mean())
        assert 0.6 < gain_small / gain_large < 1.6, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_gives_the_cpu_result(name):
    """Random fields come from the CPU generator, so only float rounding may differ on CUDA."""
    image = outdoor_scene(128, 160)
    params = typical_params(DEGRADATIONS[name], "heavy")
    on_cpu = run(name, image, params, seed=5)
    on_cuda = run(name, image.cuda(), params, seed=5).cpu()
    assert on_cuda.shape == on_cpu.shape and on_cuda.dtype == on_cpu.dtype
    assert float(((on_cuda - on_cpu).abs() > 1e-3).float().mean()) < 1e-3


def test_speed_at_512(capsys):
    """Pairs per second per type at 512×512, heavy, one image per call (printed, not asserted).

    The median of 5 timed calls, so that a burst of load from another process does not decide.
    """
    image = outdoor_scene(512, 512)
    lines = []
    for name in NAMES:
        params = typical_params(DEGRADATIONS[name], "heavy")
        run(name, image, params, seed=0)  # warm-up
        seconds = []
        for seed in range(5):
            start = time.perf_counter()
            run(name, image, params, seed=seed)
            seconds.append(time.perf_counter() - start)
        rate = 1 / statistics.median(seconds)
        lines.append(
            f"{name:>14}: {rate:6.1f} pairs/s at 512×512 ({torch.get_num_threads()} threads)"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
