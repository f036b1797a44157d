"""The pixel operations' conventions, on random inputs, against independent NumPy/SciPy
references: what a twin of engines/ops.py (the CuPy one on the cuda backend) must
reproduce. Sizes are (width, height), shapes (height, width[, channels])."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from scipy import ndimage

from livefuse.engines import ops
from livefuse.engines.ops_protocol import Ops

RNG_SEED = 20240601


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def test_the_module_has_every_function_of_the_interface_with_its_signature() -> None:
    for name, member in vars(Ops).items():
        if name.startswith("_") or not callable(member):
            continue
        ours = inspect.signature(getattr(ops, name))
        wanted = inspect.signature(member)
        params = list(wanted.parameters.values())[1:]  # without self
        assert list(ours.parameters) == [p.name for p in params], name
        for param in params:
            assert ours.parameters[param.name].kind == param.kind, (name, param.name)
            assert ours.parameters[param.name].default == param.default, (name, param.name)
    assert ops.xp is np


def test_host_transfers_keep_shape_dtype_and_values(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    back = ops.to_host(ops.from_host(image))
    assert back.dtype == image.dtype and back.shape == image.shape
    assert np.array_equal(back, image)


# Warps ------------------------------------------------------------------------------


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Reference bilinear sample of a float image at (x, y), edges replicated."""
    height, width = image.shape[:2]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    if image.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return image[np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1)]

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def test_warp_affine_shapes_and_an_identity_matrix(rng: np.random.Generator) -> None:
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    for image in (
        rng.integers(0, 256, (9, 13, 3), dtype=np.uint8),
        rng.random((9, 13), dtype=np.float32),
    ):
        out = ops.warp_affine(image, identity, (13, 9))
        assert out.dtype == image.dtype and out.shape == image.shape
        assert np.array_equal(out, image)
        wide = ops.warp_affine(image, identity, (20, 4))
        assert wide.shape[:2] == (4, 20)  # size is (width, height)


def test_warp_affine_borders(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    shift = np.array([[1.0, 0, 3], [0, 1.0, 2]])  # frame (x, y) -> output (x + 3, y + 2)
    constant = ops.warp_affine(image, shift, (12, 10), border="constant", border_value=7)
    assert np.array_equal(constant[2:, 3:], image[:-2, :-3])
    assert (constant[:2] == 7).all() and (constant[:, :3] == 7).all()
    replicate = ops.warp_affine(image, shift, (12, 10), border="replicate")
    assert np.array_equal(replicate[2:, 3:], image[:-2, :-3])
    assert np.array_equal(replicate[5, :3], np.repeat(image[3, :1], 3, axis=0))
    assert np.array_equal(replicate[:2, 5], np.repeat(image[:1, 2], 2, axis=0))


def test_warp_affine_is_bilinear_with_pixel_centres_at_integers(
    rng: np.random.Generator,
) -> None:
    image = rng.random((16, 16), dtype=np.float32)
    # Output (x, y) samples the frame at (0.5 x + 0.25, 0.5 y + 0.75): quarter pixels are
    # exact on OpenCV's 1/32 px grid, so the reference matches to rounding.
    to_frame = np.array([[0.5, 0, 0.25], [0, 0.5, 0.75]])
    out = ops.warp_affine(image, to_frame, (24, 24), border="replicate", inverse_map=True)
    ys, xs = np.mgrid[0:24, 0:24].astype(np.float64)
    expected = _bilinear(image.astype(np.float64), 0.5 * xs + 0.25, 0.5 * ys + 0.75)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # Without inverse_map the matrix maps frame to output.
    forward = ops.warp_affine(image, ops.invert_affine(to_frame), (24, 24), border="replicate")
    np.testing.assert_allclose(forward, out, atol=1e-5)


def test_remap_samples_bilinearly_and_honours_the_border(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    ys, xs = np.mgrid[0:8, 0:9].astype(np.float32)
    assert np.array_equal(ops.remap(image, xs, ys), image)
    half = ops.remap(image.astype(np.float32), xs + 0.5, ys, border="replicate")
    expected = _bilinear(image.astype(np.float64), xs + 0.5, ys)
    np.testing.assert_allclose(half, expected, atol=1e-4)
    # Half the pixels map outside (to -1, as an uncovered raster pixel does). OpenCV 5.0
    # misreads a few pixels of a map whose every coordinate lies outside (see ops.remap).
    outside = rng.random((8, 9)) < 0.5
    map_x, map_y = xs.copy(), ys.copy()
    map_x[outside] = map_y[outside] = -1
    constant = ops.remap(image, map_x, map_y, border="constant", border_value=3)
    assert (constant[outside] == 3).all()
    assert np.array_equal(constant[~outside], image[~outside])
    replicate = ops.remap(image, map_x, map_y, border="replicate")
    assert (replicate[outside] == image[0, 0]).all()


def test_resize_linear_aligns_pixel_centres(rng: np.random.Generator) -> None:
    image = rng.random((5, 7, 3), dtype=np.float32)
    out = ops.resize(image, (17, 11), interpolation="linear")
    assert out.shape == (11, 17, 3) and out.dtype == np.float32
    ys, xs = np.mgrid[0:11, 0:17].astype(np.float64)
    x = np.clip((xs + 0.5) * 7 / 17 - 0.5, 0, None)
    y = np.clip((ys + 0.5) * 5 / 11 - 0.5, 0, None)
    np.testing.assert_allclose(out, _bilinear(image.astype(np.float64), x, y), atol=1e-5)


def test_resize_area_averages_what_each_pixel_covers(rng: np.random.Generator) -> None:
    image = rng.random((12, 18), dtype=np.float32)
    out = ops.resize(image, (6, 4), interpolation="area")
    expected = image.reshape(4, 3, 6, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    image8 = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
    out8 = ops.resize(image8, (9, 6), interpolation="area")
    mean8 = image8.reshape(6, 2, 9, 2, 3).mean(axis=(1, 3))
    assert out8.dtype == np.uint8 and np.abs(out8 - mean8).max() <= 0.5 + 1e-6


def test_flip_horizontal_mirrors_about_the_middle(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, (4, 7, 3), dtype=np.uint8)
    assert np.array_equal(ops.flip_horizontal(image), image[:, ::-1])


# Filters ----------------------------------------------------------------------------


def _gaussian_reference(image: np.ndarray, sigma: float, ksize: int) -> np.ndarray:
    """Separable Gaussian, borders reflected without the edge (NumPy's 'reflect')."""
    radius = ksize // 2
    taps = np.exp(-((np.arange(ksize) - radius) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    pad = [(radius, radius), (radius, radius)] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image.astype(np.float64), pad, mode="reflect")
    height, width = image.shape[:2]
    rows = sum(taps[i] * padded[i : i + height] for i in range(ksize))
    return sum(taps[i] * rows[:, i : i + width] for i in range(ksize))


def test_gaussian_blur_kernel_size_from_sigma_and_reflected_borders(
    rng: np.random.Generator,
) -> None:
    image = rng.random((23, 31, 3), dtype=np.float32)
    sigma = 1.7
    out = ops.gaussian_blur(image, sigma)
    assert out.shape == image.shape and out.dtype == np.float32
    ksize = int(round(8 * sigma + 1)) | 1  # float images: 4 sigma each side
    np.testing.assert_allclose(out, _gaussian_reference(image, sigma, ksize), atol=1e-5)
    # A wrong size would show: the next odd size down differs by more than the tolerance.
    assert np.abs(out - _gaussian_reference(image, sigma, ksize - 2)).max() > 3e-5


def test_gaussian_blur_sigma_from_kernel_size(rng: np.random.Generator) -> None:
    image = rng.random((20, 20), dtype=np.float32)
    out = ops.gaussian_blur(image, 0, ksize=11)
    sigma = 0.3 * ((11 - 1) * 0.5 - 1) + 0.8
    np.testing.assert_allclose(out, _gaussian_reference(image, sigma, 11), atol=1e-5)
    flat = np.full((9, 9), 0.25, dtype=np.float32)
    np.testing.assert_allclose(ops.gaussian_blur(flat, 2.0), flat, atol=1e-6)


def test_ellipse_kernel_is_a_symmetric_disc() -> None:
    for diameter in (3, 7, 9, 13):
        kernel = ops.ellipse_kernel(diameter)
        assert kernel.shape == (diameter, diameter) and kernel.dtype == np.uint8
        assert set(np.unique(kernel)) <= {0, 1}
        assert np.array_equal(kernel, kernel[::-1]) and np.array_equal(kernel, kernel[:, ::-1])
        assert kernel[diameter // 2].all() and kernel[:, diameter // 2].all()
        if diameter >= 7:
            assert kernel[0, 0] == 0


def test_erode_dilate_and_close_ignore_pixels_beyond_the_image(
    rng: np.random.Generator,
) -> None:
    mask = (rng.random((30, 40)) > 0.3).astype(np.uint8)
    for kernel in (ops.ellipse_kernel(5), np.ones((3, 3), np.uint8), ops.ellipse_kernel(9)):
        footprint = kernel.astype(bool)
        eroded = ops.erode(mask, kernel)
        dilated = ops.dilate(mask, kernel)
        assert eroded.dtype == np.uint8 and eroded.shape == mask.shape
        expected_erode = ndimage.grey_erosion(mask, footprint=footprint, mode="constant", cval=255)
        expected_dilate = ndimage.grey_dilation(mask, footprint=footprint, mode="constant", cval=0)
        assert np.array_equal(eroded, expected_erode)
        assert np.array_equal(dilated, expected_dilate)
        assert np.array_equal(ops.close(mask, kernel), ops.erode(dilated, kernel))
    # An even kernel is anchored at size // 2.
    single = np.zeros((9, 9), dtype=np.float32)
    single[4, 4] = 1
    grown = ops.dilate(single, np.ones((4, 4), np.uint8))
    assert np.array_equal(np.argwhere(grown > 0).min(axis=0), [3, 3])
    assert np.array_equal(np.argwhere(grown > 0).max(axis=0), [6, 6])


def test_distance_transform_is_the_chamfer_distance_to_the_nearest_zero(
    rng: np.random.Generator,
) -> None:
    mask = np.ones((21, 21), dtype=np.uint8)
    mask[10, 10] = 0
    five = ops.distance_transform(mask, mask_size=5)
    three = ops.distance_transform(mask, mask_size=3)
    assert five.dtype == np.float32 and five.shape == mask.shape
    np.testing.assert_allclose(five[10, 10:], np.arange(11), atol=1e-4)  # 5x5: exact on axes
    np.testing.assert_allclose(five[11, 11], 1.4, atol=1e-4)
    np.testing.assert_allclose(three[10, 11], 0.955, atol=1e-4)
    np.testing.assert_allclose(three[11, 11], 1.3693, atol=1e-4)
    random_mask = (rng.random((40, 50)) > 0.02).astype(np.uint8)
    exact = ndimage.distance_transform_edt(random_mask)
    for size, tolerance in ((3, 0.09), (5, 0.03)):
        got = ops.distance_transform(random_mask, mask_size=size)
        assert (got[random_mask == 0] == 0).all()
        inside = random_mask > 0
        relative = np.abs(got[inside] - exact[inside]) / exact[inside]
        assert relative.max() < tolerance, size
    none = ops.distance_transform(np.ones((5, 5), np.uint8), mask_size=3)
    assert (none >= np.finfo(np.float32).max / 2).all()


def test_fill_holes_fills_what_the_mask_encloses(rng: np.random.Generator) -> None:
    for _ in range(20):
        noise = ops.gaussian_blur(rng.random((60, 80)).astype(np.float32), 3.0)
        blobs = noise > np.quantile(noise, 0.45)
        filled = ops.fill_holes(blobs)
        assert filled.dtype == np.uint8 and set(np.unique(filled)) <= {0, 1}
        assert np.array_equal(filled.astype(bool), ndimage.binary_fill_holes(blobs))
    ring = np.zeros((20, 20), dtype=np.uint8)
    ring[5:15, 5:15] = 1
    ring[8:12, 8:12] = 0
    assert ops.fill_holes(ring)[5:15, 5:15].all()


def test_inpaint_fills_only_the_mask(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    mask = np.zeros((24, 24), dtype=np.uint8)
    mask[8:14, 9:16] = 1
    out = ops.inpaint(image, mask, 3)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out[mask == 0], image[mask == 0])
    flat = np.full((24, 24, 3), (30, 140, 220), dtype=np.uint8)
    flat[mask > 0] = 0
    filled = ops.inpaint(flat, mask, 3).astype(int)
    assert np.abs(filled[mask > 0] - (30, 140, 220)).max() <= 2


# Colour -----------------------------------------------------------------------------


_TO_XYZ = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
)


def _lab_reference(bgr: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (sRGB, D65) as OpenCV stores it in 8 bits, in float."""
    c = bgr[..., ::-1].astype(np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    x, y, z = np.moveaxis(linear @ _TO_XYZ.T, -1, 0)
    x, z = x / 0.950456, z / 1.088754

    def f(t: np.ndarray) -> np.ndarray:
        return np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16 / 116)

    lightness = np.where(y > 0.008856, 116 * np.cbrt(y) - 16, 903.3 * y)
    a = 500 * (f(x) - f(y))
    b = 200 * (f(y) - f(z))
    return np.stack([lightness * 255 / 100, a + 128, b + 128], axis=-1)


def test_bgr_to_lab_is_8_bit_cie_lab(rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    lab = ops.bgr_to_lab(pixels)
    assert lab.dtype == np.uint8 and lab.shape == pixels.shape
    difference = np.abs(lab - _lab_reference(pixels))
    assert difference.max() <= 2.5 and difference.mean() < 0.5
    extremes = np.array([[[255, 255, 255], [0, 0, 0], [90, 90, 90]]], dtype=np.uint8)
    assert np.array_equal(ops.bgr_to_lab(extremes)[0, :2], [[255, 128, 128], [0, 128, 128]])
    assert np.array_equal(ops.bgr_to_lab(extremes)[0, 2, 1:], [128, 128])
    # Any leading shape: a row of pixels converts the same as the image.
    row = pixels.reshape(1, -1, 3)
    assert np.array_equal(ops.bgr_to_lab(row).reshape(pixels.shape), lab)


def _bgr_reference(lab8: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit Lab back to BGR (sRGB, D65), in float, clipped to the gamut."""
    lightness = lab8[..., 0] * 100 / 255
    fy = (lightness + 16) / 116
    fx, fz = fy + (lab8[..., 1] - 128) / 500, fy - (lab8[..., 2] - 128) / 200

    def f_inverse(f: np.ndarray) -> np.ndarray:
        return np.where(f**3 > 0.008856, f**3, (f - 16 / 116) / 7.787)

    y = np.where(lightness > 903.3 * 0.008856, fy**3, lightness / 903.3)
    xyz = np.stack([f_inverse(fx) * 0.950456, y, f_inverse(fz) * 1.088754], axis=-1)
    linear = np.clip(xyz @ np.linalg.inv(_TO_XYZ).T, 0, 1)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return (srgb * 255)[..., ::-1]


def test_lab_to_bgr_is_the_inverse_conversion(rng: np.random.Generator) -> None:
    lab = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    bgr = ops.lab_to_bgr(lab)
    assert bgr.dtype == np.uint8 and bgr.shape == lab.shape
    assert np.abs(bgr - _bgr_reference(lab.astype(np.float64))).max() <= 2.0


def test_masked_mean_std_is_the_population_statistics_of_the_mask(
    rng: np.random.Generator,
) -> None:
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    mask = rng.random((30, 40)) > 0.6
    mean, std = ops.masked_mean_std(image, mask)
    assert mean.shape == (3,) and std.shape == (3,)
    assert mean.dtype == np.float64 and std.dtype == np.float64
    np.testing.assert_allclose(mean, image[mask].mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(std, image[mask].std(axis=0, ddof=0), rtol=1e-6)
    weights = mask.astype(np.uint8) * 7  # any nonzero value counts
    np.testing.assert_allclose(ops.masked_mean_std(image, weights)[0], mean)


# Rasterising ------------------------------------------------------------------------


def _twice_area(corners: np.ndarray) -> float:
    (ax, ay), (bx, by) = corners[1] - corners[0], corners[2] - corners[0]
    return float(ax * by - ay * bx)


def _inside_by(points: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """How far points lie inside a convex polygon (negative: outside)."""
    ordered = corners if _twice_area(corners) > 0 else corners[::-1]
    distances = []
    for i in range(len(ordered)):
        a, b = ordered[i], ordered[(i + 1) % len(ordered)]
        edge = b - a
        normal = np.array([-edge[1], edge[0]]) / np.linalg.norm(edge)
        distances.append((points - a) @ normal)
    return np.min(distances, axis=0)


def test_triangle_ids_cover_inside_pixels_and_nearer_ones_win(
    rng: np.random.Generator,
) -> None:
    height, width = 40, 50
    xy = rng.uniform([0, 0], [width - 1, height - 1], (30, 2))
    triangles = []
    while len(triangles) < 12:
        corners = rng.choice(30, 3, replace=False)
        if abs(_twice_area(xy[corners])) > 20:
            triangles.append(corners)
    order = rng.permutation(12)
    ids = ops.triangle_ids(xy, np.array(triangles), order, (height, width))
    assert ids.dtype == np.int32 and ids.shape == (height, width)
    ys, xs = np.mgrid[0:height, 0:width]
    centres = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    # Per pixel, the last triangle that may cover it (its centre within a pixel of it),
    # and whether that one surely does (its centre well inside).
    last = np.full(height * width, -1)
    surely = np.zeros(height * width, dtype=bool)
    for index in order:
        inside = _inside_by(centres, xy[triangles[index]])
        maybe = inside > -1.0
        last[maybe] = index
        surely[maybe] = inside[maybe] > 0.75
    assert np.array_equal(ids.ravel()[surely], last[surely])
    assert (ids.ravel()[last < 0] == -1).all()
    assert surely.sum() > 200  # the check saw a good part of the picture


def test_fill_polygon_fills_inside_in_place(rng: np.random.Generator) -> None:
    square = np.array([[10.3, 8.6], [30.2, 8.6], [30.2, 22.4], [10.3, 22.4]])
    for antialiased in (False, True):
        mask = np.zeros((32, 40), dtype=np.uint8)
        assert ops.fill_polygon(mask, square, 200, antialiased=antialiased) is None
        assert (mask[10:22, 12:29] == 200).all()
        assert (mask[:7] == 0).all() and (mask[24:] == 0).all()
        assert (mask[:, :9] == 0).all() and (mask[:, 32:] == 0).all()
        values = set(np.unique(mask).tolist())
        if antialiased:
            assert len(values - {0, 200}) > 0  # partial coverage along the edges
            assert max(values) <= 200
        else:
            assert values == {0, 200}


def test_fill_convex_hull_covers_the_points_hull(rng: np.random.Generator) -> None:
    points = rng.uniform(5, 35, (12, 2))
    mask = np.zeros((40, 40), dtype=np.uint8)
    ops.fill_convex_hull(mask, points, 3)
    assert set(np.unique(mask).tolist()) == {0, 3}
    rounded = np.round(points).astype(int)
    assert (mask[rounded[:, 1], rounded[:, 0]] == 3).all()
    ys, xs = np.mgrid[0:40, 0:40]
    centres = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    from scipy.spatial import ConvexHull

    hull = rounded[ConvexHull(rounded).vertices].astype(np.float64)
    inside = _inside_by(centres, hull)
    assert (mask.ravel()[inside > 0.01] == 3).all()
    assert (mask.ravel()[inside < -1.0] == 0).all()


# Blending and model inputs ------------------------------------------------------------


def test_alpha_blend_in_place_on_a_view(rng: np.random.Generator) -> None:
    frame = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    before = frame.copy()
    rendered = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    alpha = rng.random((10, 12)).astype(np.float32)
    alpha[0] = 0.0
    alpha[1] = 1.0
    region = frame[5:15, 20:32]  # not contiguous
    assert ops.alpha_blend(region, rendered, alpha) is None
    exact = rendered * alpha[..., None] + before[5:15, 20:32] * (1 - alpha[..., None])
    assert np.abs(frame[5:15, 20:32] - np.round(exact)).max() <= 1
    assert np.array_equal(frame[5, 20:32], before[5, 20:32])
    assert np.array_equal(frame[6, 20:32], rendered[1])
    outside = np.ones(frame.shape[:2], dtype=bool)
    outside[5:15, 20:32] = False
    assert np.array_equal(frame[outside], before[outside])


def test_blob_from_bgr_channels_first_rgb_scaled_into_a_view(
    rng: np.random.Generator,
) -> None:
    image = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    buffer = np.full((3, 10, 12), 99.0, dtype=np.float32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ops.blob_from_bgr(image, buffer[:, :6, :8], scale=1 / 255, mean=mean, std=std)
    rgb = image[:, :, ::-1].astype(np.float64).transpose(2, 0, 1)
    expected = (rgb / 255 - np.reshape(mean, (3, 1, 1))) / np.reshape(std, (3, 1, 1))
    np.testing.assert_allclose(buffer[:, :6, :8], expected, atol=1e-5)
    assert (buffer[:, 6:] == 99).all() and (buffer[:, :, 8:] == 99).all()
    bgr = np.empty((3, 6, 8), dtype=np.float32)
    ops.blob_from_bgr(image, bgr, mean=127.5, std=128.0, rgb=False)
    np.testing.assert_allclose(bgr, (image.transpose(2, 0, 1) - 127.5) / 128.0, atol=1e-6)
    # One float32 rounding per step, in this order: a twin gives the same bits.
    steps = np.empty((3, 6, 8), dtype=np.float32)
    ops.blob_from_bgr(image, steps, scale=2 / 255, mean=1.0)
    rgb32 = image[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)
    assert np.array_equal(steps, rgb32 * np.float32(2 / 255) - np.float32(1))


# Geometry (host) --------------------------------------------------------------------


def test_invert_affine(rng: np.random.Generator) -> None:
    matrix = np.hstack([rng.normal(size=(2, 2)) + np.eye(2) * 2, rng.normal(size=(2, 1))])
    inverse = ops.invert_affine(matrix)
    assert inverse.shape == (2, 3) and inverse.dtype == np.float64
    composed = np.vstack([inverse, [0, 0, 1]]) @ np.vstack([matrix, [0, 0, 1]])
    np.testing.assert_allclose(composed, np.eye(3), atol=1e-9)
    assert not ops.invert_affine(np.zeros((2, 3))).any()


def test_nms_boxes_overlap_without_the_extra_pixel() -> None:
    boxes = np.array([[0, 0, 10, 10], [5, 0, 10, 10], [40, 40, 10, 10], [41, 41, 10, 10]])
    scores = np.array([0.9, 0.8, 0.3, 0.95])
    # Boxes 0 and 1 overlap by 50 / 150 = 0.333 (0.375 with +1 pixel sizes): both kept at
    # 0.35. Box 2 is under the score threshold.
    assert ops.nms_boxes(boxes, scores, 0.5, 0.35) == [3, 0, 1]
    assert ops.nms_boxes(boxes, scores, 0.5, 0.3) == [3, 0]
    assert ops.nms_boxes(boxes, scores, 0.1, 0.3) == [3, 0]  # 2 overlaps 3 (0.68)


# Overlays -----------------------------------------------------------------------------


def _changed_box(before: np.ndarray, after: np.ndarray) -> tuple[int, int, int, int]:
    """x1, y1, x2, y2 (exclusive) around every pixel that changed."""
    ys, xs = np.nonzero((before != after).any(axis=2))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("height", [720, 360])
def test_draw_label_burns_the_text_into_the_top_right_corner_only(height: int) -> None:
    import cv2
    from skimage import data

    width = height * 16 // 9
    frame = cv2.resize(data.astronaut()[:, :, ::-1], (width, height))
    labelled = frame.copy()
    ops.draw_label(labelled, "AI-generated")
    x1, y1, x2, y2 = _changed_box(frame, labelled)
    # In the corner, clear of the edges, its height 5-10% of the frame's at any size.
    assert x1 > width * 0.75 and x2 < width and y1 > 0 and y2 < height * 0.1
    assert 0.05 < (y2 - y1) / height < 0.1
    box, under = labelled[y1:y2, x1:x2].astype(int), frame[y1:y2, x1:x2].astype(int)
    # Semi-transparent: the box darkens what is beneath it, which still shows through;
    # the text (and its anti-aliased edge) is drawn lighter on it, white at its core.
    shaded = (np.abs(box - np.floor(under * 0.35)) <= 1).all(axis=2)
    text = ~shaded
    assert (box[text] > np.floor(under[text] * 0.35)).all()
    assert 0.05 < text.mean() < 0.5
    assert box[shaded].std() > 5
    assert box[text].mean() > box[shaded].mean() + 60 and (box[text] >= 250).all(axis=-1).any()


def test_draw_label_fits_a_narrow_frame() -> None:
    frame = np.full((480, 120, 3), 200, dtype=np.uint8)
    labelled = frame.copy()
    ops.draw_label(labelled, "AI-generated")
    x1, y1, x2, y2 = _changed_box(frame, labelled)
    assert 0 < x1 and x2 < 120 and y1 > 0 and y2 < 48
