"""The `mesh` swapper: the source face's texture carried onto the target's FaceMesh.

The source is prepared once. Its mesh is turned to face the camera, giving a frontal
layout (`uv`) for the 468 points; the source photo is unwrapped into a texture `atlas`
in that layout. Wherever the source photo shows a triangle badly (turned away,
foreshortened, hidden behind the nose) the atlas takes the mirrored triangle from the
other side of the face instead: FaceMesh is left/right symmetric, so flipping the
frontal atlas about its midline swaps the two sides.

Per target face, every pixel of the face's box is mapped through its target triangle
into the atlas (see `raster`), nearest triangles winning, so the hidden side of a
turned face never smears over the visible one.

Pixels (frames, the atlas and its maps) go through the swapper's `ops`; the mesh
geometry stays host NumPy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from livefuse.engines import ops as cpu_ops
from livefuse.engines.ops_protocol import Ops
from livefuse.engines.raster import (
    rasterize_ids,
    signed_areas,
    source_coordinates,
)
from livefuse.engines.topology import CHIN, FOREHEAD, NUM_POINTS, MeshTopology, fan_triangles
from livefuse.engines.types import FaceMesh

ATLAS_SIZE = 256
_ATLAS_MARGIN = 8
# A horizontal flip mirrors pixel i onto pixel size-1-i, i.e. about (size - 1) / 2: the midline
# goes there so flipping the atlas swaps the face's sides exactly.
_ATLAS_CENTRE = (ATLAS_SIZE - 1) / 2
# Source visibility (0..1, see `_source_visibility`) under which a triangle's texture is
# not used at all, and above which it is used fully.
_POOR_TEXTURE, _GOOD_TEXTURE = 0.12, 0.4
# The ring around the face that stays put while the target's face is reshaped, as a
# scale of the face oval about its centre.
_RESHAPE_RING = 1.35
# Renders `warp` keeps: a few faces of each stream a swap worker serves, between refits.
_WARPS_KEPT = 32
# Sideways component of the face's towards-camera axis (sine of the yaw) up to which the
# shape transfer applies to the whole face, and from which the far side holds still (see
# `_far_side_hold`).
_RESHAPE_YAW_FULL, _RESHAPE_YAW_OFF = 0.3, 0.55
# On a turned face, how far towards the far edge (0 midline, 1 the far outline) a point
# lies before it starts to hold still. Measured with dlib over 343 swaps: 0.6 and 0.4
# scored alike, 0.0 (the whole far half held) lower.
_FAR_HOLD_START = 0.6


def face_axes(points: np.ndarray, topology: MeshTopology) -> np.ndarray:
    """Rows: the face's left-right, up and towards-camera axes in frame coordinates.

    Left-right comes from the mirrored eye/brow pairs, up from chin to forehead, so the
    estimate is the face's own symmetry rather than a fitted head model.
    """
    left, right = topology.mirror_pairs[:, 0], topology.mirror_pairs[:, 1]
    lateral = (points[left] - points[right]).mean(axis=0)
    lateral /= max(float(np.linalg.norm(lateral)), 1e-6)
    vertical = points[FOREHEAD] - points[CHIN]
    vertical -= lateral * float(vertical @ lateral)
    vertical /= max(float(np.linalg.norm(vertical)), 1e-6)
    # The cross product written out: np.cross costs more than the rest of this function.
    towards = np.array(
        [
            lateral[1] * vertical[2] - lateral[2] * vertical[1],
            lateral[2] * vertical[0] - lateral[0] * vertical[2],
            lateral[0] * vertical[1] - lateral[1] * vertical[0],
        ]
    )
    return np.stack([lateral, vertical, towards]).astype(np.float32)


# Eye openness (opening area over eye width squared, measured face-on) below which an
# eye counts as closed, and above which as fully open; an open eye reads about 0.2.
EYE_CLOSED, EYE_OPEN = 0.07, 0.13


def eye_open_weights(points: np.ndarray, topology: MeshTopology) -> np.ndarray:
    """Per eye (image left, image right), 0 when closed to 1 when open."""
    frontal = (points - points.mean(axis=0)) @ face_axes(points, topology).T
    weights = []
    for loop, fan in zip(topology.eye_loops, topology.eye_triangles, strict=True):
        area = abs(float(signed_areas(frontal[:, :2], fan).sum())) / 2
        width = float(np.ptp(frontal[loop, 0]))
        openness = area / max(width * width, 1e-6)
        weights.append((openness - EYE_CLOSED) / (EYE_OPEN - EYE_CLOSED))
    return np.clip(np.asarray(weights, dtype=np.float32), 0.0, 1.0)


# Cheek points (subject's right, left) where the skin colour is sampled.
_CHEEKS = (50, 280)
_NOSE_TIP = 1


def source_skin(
    atlas: np.ndarray,
    face_area: np.ndarray,
    uv: np.ndarray,
    topology: MeshTopology,
    *,
    ops: Ops = cpu_ops,
) -> np.ndarray:
    """0..1 map of the atlas: 0 where the source photo shows something other than skin.

    Skin colour is learnt from the cheeks (mean and spread in Lab). Outside the features
    (brows, eyes, lips and what lies between them, which are meant to come from the
    source), a pixel far from that colour, much darker (hair) or much brighter (a bright
    background past the cheek's edge) is not skin. Hair over the temples and forehead
    and background along the rim would otherwise be carried onto the target, and a
    turned target shows the rim large.
    """
    xp = ops.xp
    lab = ops.bgr_to_lab(atlas).astype(np.float32)
    radius = ATLAS_SIZE * 0.05
    ys, xs = xp.mgrid[0:ATLAS_SIZE, 0:ATLAS_SIZE].astype(np.float32)
    near_cheek = xp.zeros((ATLAS_SIZE, ATLAS_SIZE), dtype=bool)
    for point in _CHEEKS:
        near_cheek |= (xs - uv[point, 0]) ** 2 + (ys - uv[point, 1]) ** 2 < radius**2
    samples = lab[near_cheek]
    mean, spread = samples.mean(axis=0), samples.std(axis=0) + np.float32(4.0)
    distance = (lab - mean) / spread
    chroma_far = xp.hypot(distance[..., 1], distance[..., 2]) > 4.5
    darker = -distance[..., 0] > 3.5
    brighter = distance[..., 0] > 4.0
    not_skin = (chroma_far | darker | brighter).astype(np.uint8)

    features = np.concatenate(
        [topology.brows, topology.eye_loops[0], topology.eye_loops[1], topology.outer_lips]
    )
    feature_hull = xp.zeros((ATLAS_SIZE, ATLAS_SIZE), dtype=np.uint8)
    ops.fill_convex_hull(feature_hull, uv[features], 1)
    grow = ops.ellipse_kernel(9)
    not_skin[ops.dilate(feature_hull, grow) > 0] = 0
    # Below the forehead only the rim along the sides is judged, down to the nose tip:
    # that is where hair and background lie; lower down, stubble and shadows are the
    # source's own face and must come along.
    inside = ops.dilate(face_area.astype(np.uint8), grow)
    from_edge = ops.distance_transform(inside, mask_size=5)
    brow_top = int(max(0.0, float(uv[topology.brows, 1].min()) - ATLAS_SIZE * 0.01))
    nose_tip_row = int(uv[_NOSE_TIP, 1])
    rim = from_edge < ATLAS_SIZE * 0.08
    rim[nose_tip_row:] = False
    rim[:brow_top] = True
    not_skin[~rim] = 0
    # Close small gaps between hair strands, then grow a little past the hair's edge.
    kernel = ops.ellipse_kernel(7)
    not_skin = ops.dilate(ops.close(not_skin, kernel), kernel)
    # Over the forehead, everything above a hair pixel in its column is hair or beyond: a
    # running maximum up each column (the map holds 0 and 1 only).
    hair_below = xp.cumsum(not_skin[:brow_top][::-1], axis=0)[::-1] > 0
    not_skin[:brow_top] = hair_below
    skin = 1.0 - not_skin.astype(np.float32)
    # A wide soft edge: where the source's usable skin ends, the target's own skin takes
    # over, and the two must meet gradually.
    return ops.gaussian_blur(skin, ATLAS_SIZE * 0.03)


def draw_order(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Triangles far to near (FaceMesh's z grows away from the camera)."""
    depth = points[triangles, 2].mean(axis=1)
    return np.argsort(-depth, kind="stable")


@dataclass(frozen=True)
class MeshRaster:
    """Triangle ids drawn over a frame box whose top-left corner is `origin`."""

    ids: np.ndarray  # (H, W) int32, -1 where no triangle lies
    origin: tuple[int, int]

    def crop(self, box: tuple[int, int, int, int]) -> np.ndarray | None:
        """The ids over `box` (x1, y1, x2, y2), or None if the box reaches outside."""
        x1, y1, x2, y2 = box
        ox, oy = self.origin
        height, width = self.ids.shape
        if x1 < ox or y1 < oy or x2 - ox > width or y2 - oy > height:
            return None
        return self.ids[y1 - oy : y2 - oy, x1 - ox : x2 - ox]


@dataclass(frozen=True)
class SourceFace:
    """A source identity ready to be swapped in: texture atlas plus its layout."""

    atlas: np.ndarray  # (ATLAS_SIZE, ATLAS_SIZE, 3) uint8 BGR
    # 0..1 per atlas pixel: how much of it may be shown. Zero where the source photo had
    # nothing good to give (hair over the forehead; the rim of the face, seen edge-on on
    # both sides): the target keeps its own skin there.
    usable: np.ndarray  # (ATLAS_SIZE, ATLAS_SIZE) float32
    uv: np.ndarray  # (468, 2) float32 atlas coordinates of each mesh point
    # Per triangle (mesh + eye fans), the sign of its area in the frontal layout: a target
    # triangle winding the other way faces away from the camera.
    uv_winding: np.ndarray  # (T,) float32, +1 or -1
    frontal: np.ndarray  # (468, 3) the source's shape, turned to face the camera
    eyes_open: np.ndarray  # (2,) 0..1 per eye: can the source's eyes be shown at all


class MeshSwapper:
    def __init__(self, topology: MeshTopology, *, ops: Ops = cpu_ops) -> None:
        self.topology = topology
        self.ops = ops
        # Recent renders by (source, box, points), see `warp`; the source is kept with
        # each so its id cannot be reused by another while the render is here.
        self._warps: OrderedDict[
            tuple[int, tuple[int, int, int, int], bytes], tuple[SourceFace, np.ndarray, np.ndarray]
        ] = OrderedDict()
        self._warp_lock = threading.Lock()
        # The mesh's own triangles, then one fan over each eye opening (see `warp`).
        left_eye, right_eye = topology.eye_triangles
        self.triangles = np.concatenate([topology.triangles, left_eye, right_eye])
        mesh_count = len(topology.triangles)
        # For reshaping the target: the mesh, its eye fans and a fan over the mouth
        # opening, then a band of triangles between the face oval and a ring around it
        # (ring point i is vertex 468 + i).
        mouth_fan = fan_triangles(topology.inner_lips)
        oval = topology.face_oval
        ring = NUM_POINTS + np.arange(len(oval))
        following = np.roll(np.arange(len(oval)), -1)
        band = np.concatenate(
            [
                np.stack([oval, oval[following], ring], axis=1),
                np.stack([oval[following], ring[following], ring], axis=1),
            ]
        )
        self._reshape_triangles = np.concatenate([self.triangles, mouth_fan, band]).astype(np.int32)
        self._eye_ranges = (
            (mesh_count, mesh_count + len(left_eye)),
            (mesh_count + len(left_eye), len(self.triangles)),
        )

    def prepare_source(self, image_bgr: np.ndarray, mesh: FaceMesh) -> SourceFace:
        ops, xp = self.ops, self.ops.xp
        topology = self.topology
        points = mesh.points
        axes = face_axes(points, topology)
        centred = points - points.mean(axis=0)
        # Frontal shape: x to the subject's left, y up, z towards the camera.
        frontal = centred @ axes.T
        # Centre the layout on the midline so flipping the atlas swaps left and right.
        left, right = topology.mirror_pairs[:, 0], topology.mirror_pairs[:, 1]
        midline = float((frontal[left, 0] + frontal[right, 0]).mean() / 2)
        u = frontal[:, 0] - midline
        v = -frontal[:, 1]
        half_extent = max(np.abs(u).max(), np.abs(v - v.mean()).max())
        scale = (ATLAS_SIZE / 2 - _ATLAS_MARGIN) / half_extent
        uv = np.stack(
            [u * scale + _ATLAS_CENTRE, (v - v.mean()) * scale + _ATLAS_CENTRE], axis=1
        ).astype(np.float32)

        triangles = self.triangles
        atlas_order = np.argsort(frontal[triangles, 2].mean(axis=1), kind="stable")
        atlas_ids = rasterize_ids(uv, triangles, atlas_order, (ATLAS_SIZE, ATLAS_SIZE), ops=ops)
        map_x, map_y = source_coordinates(atlas_ids, uv, points[:, :2], triangles, ops=ops)
        atlas = ops.remap(image_bgr, map_x, map_y, border="replicate")
        # Extend the face's own colours past its outline: a target pixel at the edge of the
        # mesh samples a little outside it, and the mirrored atlas does not share the
        # outline exactly, so whatever lies there must look like skin, not background.
        outside = ops.dilate((atlas_ids < 0).astype(np.uint8), np.ones((3, 3), np.uint8))
        atlas = ops.inpaint(atlas, outside, 3)

        visibility = ops.from_host(self._source_visibility(points, uv, image_bgr.shape[:2]))
        visible_map = xp.where(atlas_ids >= 0, visibility[xp.maximum(atlas_ids, 0)], 0.0)
        visible_map = ops.gaussian_blur(visible_map.astype(np.float32), 3)
        mirrored_visible = ops.flip_horizontal(visible_map)
        # Take the mirror where it is seen clearly better than the triangle itself.
        use_mirror = ((mirrored_visible - visible_map) * 2.5).clip(0.0, 1.0)[..., None]
        mirrored = ops.flip_horizontal(atlas)
        completed = atlas * (1 - use_mirror) + mirrored * use_mirror
        atlas = completed.clip(0, 255).astype(np.uint8)
        best_seen = xp.maximum(visible_map, mirrored_visible)
        quality = ((best_seen - _POOR_TEXTURE) / (_GOOD_TEXTURE - _POOR_TEXTURE)).clip(0, 1)
        return SourceFace(
            atlas=atlas,
            usable=source_skin(atlas, atlas_ids >= 0, uv, topology, ops=ops) * quality,
            uv=uv,
            uv_winding=np.sign(signed_areas(uv, self.triangles)).astype(np.float32),
            frontal=frontal.astype(np.float32),
            eyes_open=eye_open_weights(points, topology),
        )

    def _source_visibility(
        self, points: np.ndarray, uv: np.ndarray, image_shape: tuple[int, int]
    ) -> np.ndarray:
        """Per triangle, 0..1: how well the source photo shows it.

        Foreshortening is the ratio of its area in the photo to its frontal area
        (negative when it faces away); occlusion is the share of its pixels that survive
        nearer triangles in a depth-ordered fill of the photo.
        """
        triangles = self.triangles
        photo_area = signed_areas(points[:, :2], triangles)
        frontal_area = signed_areas(uv, triangles)
        ratio = photo_area / np.where(np.abs(frontal_area) > 1e-6, frontal_area, 1e-6)
        ratio /= np.median(ratio[ratio > 0]) if np.any(ratio > 0) else 1.0
        foreshortening = np.clip(ratio, 0.0, 1.0)

        x1, y1 = np.floor(points[:, :2].min(axis=0)).astype(int)
        x2, y2 = np.ceil(points[:, :2].max(axis=0)).astype(int) + 1
        local = points[:, :2] - (x1, y1)
        ids = rasterize_ids(
            local, triangles, draw_order(points, triangles), (y2 - y1, x2 - x1), ops=self.ops
        )
        xp = self.ops.xp
        pixel_counts = self.ops.to_host(xp.bincount(ids[ids >= 0], minlength=len(triangles)))
        expected = np.maximum(np.abs(photo_area) / 2, 1.0)
        unoccluded = np.clip(pixel_counts / expected, 0.0, 1.0)
        # Tiny triangles rasterise to few pixels whatever their visibility: trust the
        # foreshortening for those.
        unoccluded = np.where(expected < 4, 1.0, unoccluded)
        # A triangle reaching past the photo's edge has no texture there at all.
        height, width = image_shape
        vertex_inside = (
            (points[:, 0] >= 0)
            & (points[:, 0] <= width - 1)
            & (points[:, 1] >= 0)
            & (points[:, 1] <= height - 1)
        )
        in_photo = vertex_inside[triangles].all(axis=1)
        return (foreshortening * unoccluded * in_photo).astype(np.float32)

    def transfer_shape(
        self, source: SourceFace, target_points: np.ndarray, strength: float
    ) -> np.ndarray:
        """Target points moved towards the source's face shape, in the target's pose.

        Identity lives in geometry as much as in texture (eye spacing, nose length, jaw),
        so the source's frontal shape is scaled to the target, turned into the target's
        pose, and the target's points move `strength` of the way to it. The eye and mouth
        openings move as rigid groups: where they sit is identity, how open they are is
        the target's expression and stays.
        """
        if strength <= 0:
            return target_points
        axes = face_axes(target_points, self.topology)
        centre = target_points.mean(axis=0)
        target_frontal = (target_points - centre) @ axes.T
        source_frontal = source.frontal - source.frontal.mean(axis=0)
        scale = float((target_frontal * source_frontal).sum() / (source_frontal**2).sum())
        displacement = (source_frontal * scale - target_frontal) * strength
        for group in self.topology.expression_groups:
            displacement[group] = displacement[group].mean(axis=0)
        displacement *= self._far_side_hold(target_frontal, axes)[:, None]
        return ((target_frontal + displacement) @ axes + centre).astype(np.float32)

    def _far_side_hold(self, frontal: np.ndarray, axes: np.ndarray) -> np.ndarray:
        """Per point 0..1: how much of the shape transfer it may take, given the turn.

        A turned face's far-side outline runs inside its silhouette (the nose and lips
        stick out past it), so moving it would drag them along. The far side's points
        therefore hold still in proportion to how far the face is turned and how far out
        towards the far edge they lie; the near side, the nose and the mouth still take
        the source's shape, which is where a three-quarter view shows identity.
        """
        yaw = abs(float(axes[2, 0]))
        turned = float(
            np.clip((yaw - _RESHAPE_YAW_FULL) / (_RESHAPE_YAW_OFF - _RESHAPE_YAW_FULL), 0, 1)
        )
        if turned <= 0:
            return np.ones(len(frontal), dtype=np.float32)
        # The lateral axis's depth component says which side recedes (frame z grows away
        # from the camera).
        far_sign = 1.0 if axes[0, 2] > 0 else -1.0
        # Measured on the far side alone: a turned face's near half shows wider, and
        # scaling by it would leave the far outline short of 1, never fully held.
        far_half_width = max(float((frontal[self.topology.face_oval, 0] * far_sign).max()), 1e-6)
        farness = frontal[:, 0] * far_sign / far_half_width
        hold = np.clip((farness - _FAR_HOLD_START) / (1.0 - _FAR_HOLD_START), 0.0, 1.0)
        return (1.0 - turned * hold).astype(np.float32)

    def reshape_target(
        self,
        frame_bgr: np.ndarray,
        original: np.ndarray,
        moved: np.ndarray,
    ) -> MeshRaster | None:
        """Move the target's own pixels from its mesh to the moved mesh, in place.

        After `transfer_shape` the source is rendered on the moved mesh, but wherever the
        target still shows (its eyes and mouth seen through the openings, the jaw line
        and cheeks around the mask) it must follow: otherwise the target's eyes sit beside
        the openings and its old jaw line stays. A band out to a fixed ring around the
        face absorbs the motion, so nothing moves beyond it.

        Returns the triangle ids it drew the moved mesh with, which `warp` reuses for
        the same mesh rather than rasterising it again; None if the face is off-frame.
        """
        height, width = frame_bgr.shape[:2]
        oval = self.topology.face_oval
        centre = original[oval, :2].mean(axis=0)
        ring = centre + (original[oval, :2] - centre) * _RESHAPE_RING
        source_xy = np.concatenate([original[:, :2], ring]).astype(np.float32)
        dest_xy = np.concatenate([moved[:, :2], ring]).astype(np.float32)
        x1, y1 = np.floor(np.minimum(source_xy.min(axis=0), dest_xy.min(axis=0))).astype(int)
        x2, y2 = np.ceil(np.maximum(source_xy.max(axis=0), dest_xy.max(axis=0))).astype(int) + 1
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
        if x2 - x1 < 2 or y2 - y1 < 2:
            return None
        triangles = self._reshape_triangles
        local = dest_xy - (x1, y1)
        # The band lies behind the face; the face's own triangles nearest last.
        order = np.concatenate(
            [np.arange(len(self.triangles), len(triangles)), draw_order(moved, self.triangles)]
        )
        ids = rasterize_ids(local, triangles, order, (y2 - y1, x2 - x1), ops=self.ops)
        map_x, map_y = source_coordinates(ids, local, source_xy, triangles, ops=self.ops)
        covered = ids >= 0
        # The maps hold frame coordinates: sample the whole frame, then write the box.
        moved_pixels = self.ops.remap(frame_bgr, map_x, map_y, border="replicate")
        frame_bgr[y1:y2, x1:x2][covered] = moved_pixels[covered]
        return MeshRaster(ids=ids, origin=(int(x1), int(y1)))

    def warp(
        self,
        source: SourceFace,
        target_points: np.ndarray,
        box: tuple[int, int, int, int],
        *,
        raster: MeshRaster | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Render the source face onto `target_points` over the frame box (x1, y1, x2, y2).

        Returns the rendered BGR patch and a 0..1 float32 coverage map of the same size.
        Triangles facing away from the camera are skipped: nearer ones cover them. The
        source's eyes cover the target's only while both are open, fading out as the
        target blinks; a closing eye shows the target's own lids, never a squashed eye.
        `raster`, from `reshape_target` on the same points, saves drawing the mesh again.

        The same source on the same points over the same box renders the same patch: a
        tracked face between two landmark refits (the cheaper quality levels refit every
        second or third frame) keeps its points, so the last few renders are kept and
        handed out again, read-only.
        """
        key = None
        if raster is None:
            key = (id(source), box, target_points.tobytes())
            with self._warp_lock:
                kept = self._warps.get(key)
                if kept is not None and kept[0] is source:
                    self._warps.move_to_end(key)
                    return kept[1], kept[2]
        patch, coverage = self._warp(source, target_points, box, raster=raster)
        if key is not None:
            patch.setflags(write=False)
            coverage.setflags(write=False)
            with self._warp_lock:
                self._warps[key] = (source, patch, coverage)
                while len(self._warps) > _WARPS_KEPT:
                    self._warps.popitem(last=False)
        return patch, coverage

    def _warp(
        self,
        source: SourceFace,
        target_points: np.ndarray,
        box: tuple[int, int, int, int],
        *,
        raster: MeshRaster | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        ops, xp = self.ops, self.ops.xp
        triangles = self.triangles
        x1, y1, x2, y2 = box
        local = target_points[:, :2] - (x1, y1)
        areas = signed_areas(local, triangles)
        drawn = np.sign(areas) == source.uv_winding
        eye_weights = eye_open_weights(target_points, self.topology) * source.eyes_open
        triangle_weight = np.ones(len(triangles), dtype=np.float32)
        for (start, stop), weight in zip(self._eye_ranges, eye_weights, strict=True):
            triangle_weight[start:stop] = weight
        drawn &= triangle_weight > 0
        ids = raster.crop(box) if raster is not None else None
        if ids is not None:
            # The shared ids cover every triangle (and the reshape band): keep the drawn ones.
            keep = np.zeros(len(self._reshape_triangles), dtype=bool)
            keep[: len(triangles)] = drawn
            kept = ops.from_host(keep)[xp.maximum(ids, 0)] & (ids >= 0)
            ids = xp.where(kept, ids, -1)
        else:
            order = draw_order(target_points, triangles)
            order = order[drawn[order]]
            ids = rasterize_ids(local, triangles, order, (y2 - y1, x2 - x1), ops=ops)
        map_x, map_y = source_coordinates(ids, local, source.uv, triangles, ops=ops)
        patch = ops.remap(source.atlas, map_x, map_y, border="replicate")
        weights = ops.from_host(triangle_weight)
        coverage = xp.where(ids >= 0, weights[xp.maximum(ids, 0)], 0.0)
        coverage *= ops.remap(source.usable, map_x, map_y, border="constant", border_value=0.0)
        return patch, coverage.astype(np.float32)
