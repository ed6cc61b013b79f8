import pytest
import torch

from slmkit.quantize import groupwise


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("width", [1, 7, 64, 577])
def test_int4_packing_round_trips_two_codes_a_byte(width):
    codes = torch.randint(-8, 8, (5, width), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    packed = groupwise.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (width + 1) // 2)
    assert torch.equal(groupwise.unpack_int4(packed, width), codes)
    if width > 1:  # low nibble: even column, high nibble: odd column, each stored as q + 8
        assert int(packed[0, 0]) == (int(codes[0, 0]) + 8) | ((int(codes[0, 1]) + 8) << 4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16, 128])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, symmetric, group_size):
    weight = _randn(6, 200, seed=1)
    scale, zero = groupwise.group_params(weight, bits, group_size, symmetric)
    assert scale.dtype == torch.float16 and scale.shape == (6, groupwise.num_groups(200, group_size))
    assert (zero is None) == symmetric
    codes = groupwise.quantize_codes(weight, scale, zero, bits, group_size)
    low, high = groupwise.qrange(bits)
    assert codes.min() >= low and codes.max() <= high
    error = (groupwise.dequantize(codes, scale, zero, group_size) - weight).abs()
    step = groupwise.expand_groups(scale.float(), 200, group_size)
    # symmetric: the positive end sits half a step past the top code (plus the float16 rounding of the
    # scale); asymmetric: the rounded zero point can push a range end up to half a step outside the grid
    assert (error <= step * ((0.5 + 2 ** (bits - 1) / 2048) if symmetric else 1.0) + 1e-6).all()
    assert error.mean() < 0.3 * step.mean()


def test_partial_last_group_uses_only_its_own_columns():
    weight = torch.ones(2, 576)
    weight[:, 512:] = 0.01  # the last (partial) group: 64 small columns
    scale, _ = groupwise.group_params(weight, 4, 128, True)
    assert scale.shape == (2, 5)
    assert torch.allclose(scale[:, 4].float(), torch.full((2,), 0.01 / 7.5), rtol=1e-3)
    assert torch.allclose(scale[:, 0].float(), torch.full((2,), 1 / 7.5), rtol=1e-3)


def test_asymmetric_zero_is_exact_and_all_zero_groups_survive():
    weight = torch.zeros(3, 32)
    weight[0] = torch.linspace(0.1, 2.0, 32)  # all positive: zero point at the bottom of the range
    scale, zero = groupwise.group_params(weight, 4, 16, False)
    codes = groupwise.quantize_codes(weight, scale, zero, 4, 16)
    restored = groupwise.dequantize(codes, scale, zero, 16)
    assert torch.equal(restored[1:], torch.zeros(2, 32))  # exact zeros, no NaN from a zero scale
    assert zero[0, 0] == -8
    assert torch.isfinite(scale.float()).all()


def test_clip_shrinks_the_range():
    weight = _randn(4, 64, seed=2)
    full, _ = groupwise.group_params(weight, 4, 32, True)
    clipped, _ = groupwise.group_params(weight, 4, 32, True, clip=0.5)
    assert torch.allclose(clipped.float(), full.float() * 0.5, rtol=1e-3)


def test_a_clipping_pair_shrinks_each_end_of_an_asymmetric_range_separately():
    weight = _randn(4, 64, seed=3)
    grouped = weight.view(4, 2, 32)
    low_only, _ = groupwise.group_params(weight, 4, 32, False, clip=(0.5, 1.0))
    high_only, _ = groupwise.group_params(weight, 4, 32, False, clip=(1.0, 0.5))
    w_min, w_max = grouped.amin(dim=2).clamp(max=0), grouped.amax(dim=2).clamp(min=0)
    assert torch.allclose(low_only.float(), (w_max - 0.5 * w_min) / 15, rtol=1e-3)
    assert torch.allclose(high_only.float(), (0.5 * w_max - w_min) / 15, rtol=1e-3)
    with pytest.raises(ValueError, match="asymmetric"):
        groupwise.group_params(weight, 4, 32, True, clip=(0.5, 1.0))


def _output_errors(weight, gram, symmetric, clip):
    """Output error per (row, group) through ``gram`` (None: the weight error) of W4 g32 round-to-nearest
    with clipping ``clip``."""
    diff = weight - groupwise.fake_quantize(weight, 4, 32, symmetric, clip)
    return groupwise.group_output_errors(diff, gram, 32)


def test_two_sided_clip_search_finds_a_one_sided_outlier():
    # every group has one large positive outlier that costs little output error (its input is quiet):
    # the best range clips the high end and keeps the low end whole
    weight = _randn(8, 64, seed=4) * 0.1
    weight[:, ::32] = 1.0
    gram = torch.eye(64)
    gram[::32, ::32] = 1e-4  # the outlier columns' inputs are almost never active
    one = groupwise.search_clip(weight, gram, 4, 32, False, 0.9, 10)
    low, high = groupwise.search_clip(weight, gram, 4, 32, False, 0.9, 10, two_sided=True)
    assert low.shape == high.shape == one.shape == (8, 2)
    assert (high < low).all()  # the outlier's end is clipped deeper than the other

    assert _output_errors(weight, gram, False, (low, high)).sum() < 0.9 * _output_errors(weight, gram, False, one).sum()
    with pytest.raises(ValueError, match="asymmetric"):
        groupwise.search_clip(weight, gram, 4, 32, True, 0.2, 10, two_sided=True)


def test_symmetric_clip_search_widens_to_keep_a_positive_outlier():
    # the symmetric scale max|w| / 7.5 rounds a positive maximum down to 7 steps (half a step short);
    # when that weight's input is loud the search widens the range to max|w| / 7 instead of clipping
    weight = _randn(8, 64, seed=5) * 0.1
    weight[:, ::32] = 1.0
    gram = torch.eye(64)
    gram[::32, ::32] = 1e3
    assert groupwise.widening(4, True) == pytest.approx([(1 + 7.5 / 7) / 2, 7.5 / 7])
    assert groupwise.widening(8, True) == pytest.approx([(1 + 127.5 / 127) / 2, 127.5 / 127])
    ratio = groupwise.search_clip(weight, gram, 4, 32, True, 0.2, 10)
    assert torch.allclose(ratio, torch.full((8, 2), 7.5 / 7))
    scale, _ = groupwise.group_params(weight, 4, 32, True, clip=ratio)
    codes = groupwise.quantize_codes(weight, scale, None, 4, 32)
    assert (codes[:, ::32] == 7).all()

    assert _output_errors(weight, gram, True, ratio).sum() < 0.1 * _output_errors(weight, gram, True, 1.0).sum()
    # a quiet outlier is still clipped: the search never widens what it should shrink
    gram[::32, ::32] = 1e-4
    assert (groupwise.search_clip(weight, gram, 4, 32, True, 0.9, 10) < 1).all()


def test_asymmetric_clip_search_widens_when_the_zero_point_shifts_an_end_off_the_grid():
    # range [-0.3, 1.0]: scale 1.3 / 15, zero round(-8 + 0.3 / scale) = round(-4.54) = -5, so the minimum
    # -0.3 would need code -8.46 and clips to -8; with a loud input on it, and no shrinking allowed (grid 1:
    # ratio 1 only), the search widens the range by a step so that -0.3 falls inside the grid
    assert groupwise.widening(4, False) == pytest.approx([15.5 / 15, 16 / 15])
    assert groupwise.widening(8, False) == pytest.approx([255.5 / 255, 256 / 255])
    weight = _randn(4, 32, seed=6).clamp(-0.3, 0.9) * 0.5
    weight[:, 0], weight[:, 1] = 1.0, -0.3
    gram = torch.eye(32)
    gram[1, 1] = 1e3
    scale, zero = groupwise.group_params(weight, 4, 32, False)
    assert (zero == -5).all()
    assert (weight[:, 1] / scale.float()[:, 0] + zero[:, 0] < -8.4).all()  # off the grid: clipped
    ratio = groupwise.search_clip(weight, gram, 4, 32, False, 0.2, 1)
    assert torch.allclose(ratio, torch.full((4, 1), 16 / 15))

    assert _output_errors(weight, gram, False, ratio).sum() < 0.4 * _output_errors(weight, gram, False, 1.0).sum()
    # the two-sided search does not widen
    low, high = groupwise.search_clip(weight, gram, 4, 32, False, 0.2, 1, two_sided=True)
    assert (low <= 1).all() and (high <= 1).all()


def test_weight_error_search_widens_an_asymmetric_range_without_data():
    # gram=None scores each group's own squared weight error (RTN's data-free choice). Half of each group
    # sits on the minimum -0.3, which the rounded zero point pushes off the grid (code -8.46, clipped):
    # widening the range costs the other half a little precision and saves that half a large error
    weight = _randn(4, 32, seed=7).clamp(-0.3, 0.9) * 0.5
    weight[:, 0], weight[:, 1::2] = 1.0, -0.3
    diff = weight - groupwise.fake_quantize(weight, 4, 32, False)
    assert torch.allclose(groupwise.group_output_errors(diff, None, 32)[:, 0], (diff * diff).sum(dim=1))
    assert torch.allclose(groupwise.group_output_errors(diff, None, 32), groupwise.group_output_errors(
        diff, torch.eye(32), 32))

    ratio = groupwise.search_clip(weight, None, 4, 32, False, 0.0, 1)
    assert (ratio > 1).all()

    candidates = [1.0] + groupwise.widening(4, False)
    assert torch.allclose(_output_errors(weight, None, False, ratio)[:, 0],
                          torch.stack([_output_errors(weight, None, False, c)[:, 0] for c in candidates]).amin(dim=0))
    assert (_output_errors(weight, None, False, ratio) < 0.8 * _output_errors(weight, None, False, 1.0)).all()
