"""Blending a rendered source face into the target frame so no seam shows.

Three steps, all on the face's box only:
- mask: the swapper's coverage (the mesh's silhouette, which already leaves out the
  mouth opening, the eyes while the target blinks, and whatever of the source was
  unusable), inside the face oval with its top pulled down towards the brows and faded
  softly across the forehead (the source's hairline never comes along); past the oval,
  where a turned face's nose and far side stand out, the silhouette's rim only over the
  target's skin; eroded and feathered in proportion to the face's size;
- colour: the rendered face takes the target's skin tone and lighting (Lab mean and
  spread inside the mask, then the difference of the two faces' blurred lightness);
- alpha blend in place.

Each step takes the `ops` module its pixel work goes through (the CPU's by default);
mesh points stay host NumPy.
"""

from __future__ import annotations

import numpy as np

from livefuse.engines import ops as cpu_ops
from livefuse.engines.ops_protocol import Ops
from livefuse.engines.swapper import face_axes
from livefuse.engines.topology import MeshTopology

# How much of the forehead above the brows the mask keeps (0: cut at the brows).
FOREHEAD_KEEP = 0.85
# Erosion and feather radius as fractions of the face size. Kept narrow on purpose: every
# pixel of feather is a pixel where the target's identity still shows through, and the
# colour transfer already hides the seam (measured with dlib's recogniser).
ERODE_FRACTION = 0.008
FEATHER_FRACTION = 0.02
# Limits on how much the Lab spread (lightness, a, b) of the rendered face may be scaled
# to the target's.
SPREAD_GAIN_LOW = np.array([0.6, 0.0, 0.0], dtype=np.float32)
SPREAD_GAIN_HIGH = np.array([1.6, 1.6, 1.6], dtype=np.float32)
# Blur radius of the lighting field carried over, as a fraction of the face size.
LIGHT_SIGMA_FRACTION = 0.25


def mask_outline(points: np.ndarray, topology: MeshTopology) -> np.ndarray:
    """The face oval (frame xy) with the part above the brows pulled down towards them."""
    axes = face_axes(points, topology)
    centre = points.mean(axis=0)
    oval = (points[topology.face_oval] - centre) @ axes.T
    brow_height = float(((points[topology.brows] - centre) @ axes[1]).mean())
    above = oval[:, 1] > brow_height
    oval[above, 1] = brow_height + (oval[above, 1] - brow_height) * FOREHEAD_KEEP
    return (oval @ axes + centre)[:, :2].astype(np.float32)


def forehead_ramp(
    points: np.ndarray,
    topology: MeshTopology,
    box: tuple[int, int, int, int],
    outline: np.ndarray | None = None,
    *,
    ops: Ops = cpu_ops,
) -> np.ndarray:
    """1 below the brows fading to 0 at the mask's top edge, over the box.

    The cut across the forehead runs through plain skin, where a wide soft edge costs
    no identity and hides the seam a narrow feather would leave.
    """
    axes = face_axes(points, topology)
    up = axes[1, :2] / max(float(np.linalg.norm(axes[1, :2])), 1e-6)
    centre = points[:, :2].mean(axis=0)
    brow = float(((points[topology.brows, :2] - centre) @ up).max())
    if outline is None:
        outline = mask_outline(points, topology)
    top = float(((outline - centre) @ up).max())
    x1, y1, x2, y2 = box
    ys, xs = ops.xp.mgrid[y1:y2, x1:x2].astype(np.float32)
    height = (xs - centre[0]) * up[0] + (ys - centre[1]) * up[1]
    fade_start = brow + (top - brow) * 0.25
    ramp = (top - height) / max(top - fade_start, 1e-3)
    return ramp.clip(0.0, 1.0).astype(np.float32)


def face_mask(
    points: np.ndarray,
    topology: MeshTopology,
    coverage: np.ndarray,
    box: tuple[int, int, int, int],
    face_size: float,
    *,
    target: np.ndarray | None = None,
    ops: Ops = cpu_ops,
) -> np.ndarray:
    """Feathered 0..1 float32 alpha over the box.

    The coverage is kept inside the face oval (its top lowered, see `mask_outline`). The
    mesh swapper's coverage is the drawn mesh's silhouette, and on a turned face that
    reaches past the oval: the nose, the far eye and the far cheek stand out beyond the far
    outline, and clipping them leaves the target's own nose profile in the picture. Given
    `target`, the frame's pixels over the box, the coverage past the oval is kept too,
    except along the silhouette's rim where those pixels do not look like the face's own
    skin: the fitted outline can lie a few pixels past the real profile, over the
    background. A square patch (inswapper's) passes no target and stays inside the oval.
    """
    xp = ops.xp
    x1, y1, x2, y2 = box
    outline = mask_outline(points, topology)
    ramp = forehead_ramp(points, topology, box, outline, ops=ops)
    allowed = (coverage * ramp * 255).astype(np.uint8)
    inside_oval = xp.zeros((y2 - y1, x2 - x1), dtype=np.uint8)
    ops.fill_polygon(inside_oval, outline - (x1, y1), 255, antialiased=True)
    within = xp.minimum(inside_oval, allowed)
    if target is not None:
        # Past the oval: deep inside the silhouette (a turned face's far eye and brow lie
        # there) always; along its rim only over the target's skin; and only below the
        # forehead's fade, where the lowered oval decides as for a square patch, so no
        # hairline comes along. The oval's anti-aliased edge counts as past it: split
        # between the two, a pixel there would get about half of each and leave a faint
        # line across the nose.
        beyond = allowed.copy()
        beyond[(inside_oval == 255) | (ramp < 1)] = 0
        rim = beyond > 0
        if ops.to_host(rim.any()):
            rim &= _silhouette_depth(coverage, ops=ops) < face_size * RIM_FRACTION
            reference = (inside_oval == 255) & (coverage > 0.5)
            beyond[rim & ~skin_like(target, reference, where=rim, ops=ops)] = 0
        allowed = xp.maximum(within, beyond)
    else:
        allowed = within
    erode = max(1, round(face_size * ERODE_FRACTION))
    mask = ops.erode(allowed, ops.ellipse_kernel(2 * erode + 1))
    sigma = max(1.0, face_size * FEATHER_FRACTION)
    alpha = ops.gaussian_blur(mask.astype(np.float32) * np.float32(1 / 255), sigma)
    # Blurring lets the alpha bleed past the hard mask by about a sigma; pull it back in so
    # the feather lies inside the face, never over hair or background.
    return (alpha * 2 - 1).clip(0.0, 1.0)


# The rim of the silhouette where coverage past the oval must lie over the target's skin,
# as a fraction of the face size: the fitted outline of a turned face was seen up to 4-5%
# past the real profile (t1.jpg's fifth person).
RIM_FRACTION = 0.05
# How far (in robust spreads of the face's own skin) a pixel's colour may lie from it and
# still count as skin: chroma, and lightness darker or brighter (a lit nose tip is
# brighter than the cheek, hair and shadowed background darker).
_SKIN_CHROMA, _SKIN_DARKER, _SKIN_BRIGHTER = 2.5, 4.0, 5.0
_SKIN_SAMPLES = 600


def _silhouette_depth(coverage: np.ndarray, *, ops: Ops = cpu_ops) -> np.ndarray:
    """Per pixel, its distance (px) inside the outer edge of the coverage's silhouette."""
    return ops.distance_transform(ops.fill_holes(coverage > 0), mask_size=3)


def skin_like(
    image_bgr: np.ndarray,
    reference: np.ndarray,
    *,
    where: np.ndarray | None = None,
    ops: Ops = cpu_ops,
) -> np.ndarray:
    """Bool per pixel: does it look like the skin sampled at `reference` (a bool map)?
    Judged only at `where` (a bool map; every pixel if None), False elsewhere.

    Median and spread (1.4826 x median absolute deviation) in Lab: the sample may hold
    brows, eyes and lips as well, which robust statistics ignore. `_SKIN_SAMPLES` pixels
    of it, drawn at random (seeded, so a frame always gives the same answer), give the
    same statistics as all of them, and only those and the judged ones are converted to
    Lab: this runs per face per frame. With too small a sample nothing counts as skin.
    """
    xp = ops.xp
    height, width = image_bgr.shape[:2]
    judged = xp.ones((height, width), dtype=bool) if where is None else where
    # The sample is drawn on the host: the same seeded draw whatever the backend.
    sampled = ops.to_host(xp.flatnonzero(reference))
    if len(sampled) < 16:
        return xp.zeros((height, width), dtype=bool)
    if len(sampled) > _SKIN_SAMPLES:
        sampled = np.random.default_rng(0).choice(sampled, _SKIN_SAMPLES, replace=False)
    judged_at = xp.flatnonzero(judged)
    at = xp.concatenate([ops.from_host(sampled), judged_at])
    pixels = image_bgr[at // width, at % width][None]  # one row of BGR pixels
    lab = ops.bgr_to_lab(pixels)[0].astype(np.float32)
    samples, candidates = lab[: len(sampled)], lab[len(sampled) :]
    centre = xp.median(samples, axis=0)
    spread = 1.4826 * xp.median(xp.abs(samples - centre), axis=0) + np.float32(2.0)
    distance = (candidates - centre) / spread
    chroma = xp.hypot(distance[:, 1], distance[:, 2])
    skin = (chroma < _SKIN_CHROMA) & (distance[:, 0] > -_SKIN_DARKER)
    skin &= distance[:, 0] < _SKIN_BRIGHTER
    result = xp.zeros((height, width), dtype=bool)
    result.reshape(-1)[judged_at] = skin
    return result


def match_colour(
    rendered: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    face_size: float,
    *,
    ops: Ops = cpu_ops,
) -> np.ndarray:
    """Give the rendered face the target's skin tone and lighting, inside `mask`."""
    xp = ops.xp
    weights = mask > 0.5
    if ops.to_host(xp.count_nonzero(weights)) < 16:
        return rendered
    rendered_lab8 = ops.bgr_to_lab(rendered)
    target_lab8 = ops.bgr_to_lab(target)
    # Masked statistics of the 8-bit Lab images: no float copies of the selected pixels.
    src_mean, src_std = (v.astype(np.float32) for v in ops.masked_mean_std(rendered_lab8, weights))
    dst_mean, dst_std = (v.astype(np.float32) for v in ops.masked_mean_std(target_lab8, weights))
    src_std, dst_std = src_std + 1e-3, dst_std + 1e-3
    rendered_lab = rendered_lab8.astype(np.float32)
    target_lab = target_lab8.astype(np.float32)
    # Limit the lightness spread change: a flat-lit target must not flatten the source's
    # features. Colour spread may go to nothing: a grayscale target gets a grayscale face.
    gain = xp.clip(
        dst_std / src_std, ops.from_host(SPREAD_GAIN_LOW), ops.from_host(SPREAD_GAIN_HIGH)
    )
    # Matching tone and spread only partly (identity lives in skin tone too) measured no
    # better with dlib, and matching fully hides the seam best.
    matched = (rendered_lab - src_mean) * gain + dst_mean

    # Directional light (one cheek brighter) is low-frequency: carry the target's
    # lightness field over by the difference of heavily blurred lightness maps, measured
    # inside the mask only (normalised convolution) so the background does not leak in.
    sigma = max(2.0, face_size * LIGHT_SIGMA_FRACTION)
    inside = weights.astype(np.float32)
    light = _low_pass(
        xp.dstack([inside, target_lab[..., 0] * inside, matched[..., 0] * inside]), sigma, ops=ops
    )
    density = light[..., 0] + 1e-4
    matched[..., 0] += ((light[..., 1] - light[..., 2]) / density).clip(-40, 40)
    return ops.lab_to_bgr(matched.clip(0, 255).astype(np.uint8))


# A blur this wide keeps nothing finer than a few pixels of a grid this much coarser, so
# the lighting field is blurred on a reduced copy: the same field at a fraction of the cost.
_LOW_PASS_SIGMA = 3.0


def _low_pass(image: np.ndarray, sigma: float, *, ops: Ops = cpu_ops) -> np.ndarray:
    """Gaussian blur of `sigma` pixels, computed at reduced size when that is cheaper."""
    height, width = image.shape[:2]
    factor = sigma / _LOW_PASS_SIGMA
    if factor < 2:
        return ops.gaussian_blur(image, sigma)
    small_size = (max(1, round(width / factor)), max(1, round(height / factor)))
    small = ops.resize(image, small_size, interpolation="area")
    blurred = ops.gaussian_blur(small, _LOW_PASS_SIGMA)
    return ops.resize(blurred, (width, height), interpolation="linear")


def alpha_blend(
    region: np.ndarray, rendered: np.ndarray, alpha: np.ndarray, *, ops: Ops = cpu_ops
) -> None:
    """region <- region * (1 - alpha) + rendered * alpha, in place (rounded)."""
    ops.alpha_blend(region, rendered, alpha)
