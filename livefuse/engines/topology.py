"""FaceMesh topology: the 852 triangles over the 468 points and the named contours.

Loaded from `facemesh_topology.json`, which `livefuse models pull` extracts from
MediaPipe's own connection tables. The triangle winding is MediaPipe's, so a triangle's
signed area tells whether it faces the camera.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_POINTS = 468
CHIN, FOREHEAD = 152, 10


def _ordered_loop(edges: list[tuple[int, int]]) -> np.ndarray:
    """Walk a closed contour given as an unordered set of edges."""
    neighbours: dict[int, list[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    start = min(neighbours)
    loop, previous = [start], -1
    while True:
        current = loop[-1]
        following = [n for n in neighbours[current] if n != previous]
        if not following or following[0] == start:
            break
        previous = current
        loop.append(following[0])
    return np.asarray(loop, dtype=np.int32)


def fan_triangles(loop: np.ndarray) -> np.ndarray:
    """Triangles covering a convex-ish opening, fanned out from its first point."""
    return np.stack([np.full(len(loop) - 2, loop[0]), loop[1:-1], loop[2:]], axis=1).astype(
        np.int32
    )


def _split_loops(edges: list[tuple[int, int]]) -> list[np.ndarray]:
    """Separate a set of edges into its closed loops (the lips have an outer and inner one)."""
    remaining = set(map(tuple, edges))
    loops = []
    while remaining:
        # Grow the connected component of any edge, then order it.
        component = {remaining.pop()}
        grew = True
        while grew:
            grew = False
            points = {p for e in component for p in e}
            for edge in list(remaining):
                if edge[0] in points or edge[1] in points:
                    component.add(edge)
                    remaining.discard(edge)
                    grew = True
        loops.append(_ordered_loop(list(component)))  # type: ignore[arg-type]
    return loops


@dataclass(frozen=True)
class MeshTopology:
    triangles: np.ndarray  # (852, 3) int32, MediaPipe's winding
    face_oval: np.ndarray  # ordered loop around the face
    outer_lips: np.ndarray  # ordered loop
    inner_lips: np.ndarray  # ordered loop: the mouth opening
    eye_loops: tuple[np.ndarray, np.ndarray]  # (image-left eye, image-right eye) openings
    brows: np.ndarray  # all eyebrow points
    # Pairs of points mirrored across the face's midline: (subject's left, subject's right).
    mirror_pairs: np.ndarray  # (K, 2)

    @property
    def eye_triangles(self) -> tuple[np.ndarray, np.ndarray]:
        """Triangles over each eye opening, which FaceMesh leaves as a hole.

        A fan from one point of the eye's loop; the opening is convex enough for that.
        """
        return fan_triangles(self.eye_loops[0]), fan_triangles(self.eye_loops[1])

    @property
    def expression_groups(self) -> tuple[np.ndarray, ...]:
        """Point groups whose shape is expression, not identity: each eye opening, the
        mouth opening. The outer lips are not one: how full the lips are is identity, and
        letting them take the source's shape measured better with dlib (302 vs 299 of 343)."""
        return (self.eye_loops[0], self.eye_loops[1], self.inner_lips)

    @classmethod
    def load(cls, path: Path) -> MeshTopology:
        data = json.loads(path.read_text())
        connections = {k: [tuple(e) for e in v] for k, v in data["connections"].items()}
        lips = sorted(_split_loops(connections["lips"]), key=len)
        # The inner loop of the lips is the mouth opening; both loops have 20 points in
        # MediaPipe, so tell them apart by which one contains the outermost corners.
        outer = next(loop for loop in lips if 61 in loop)
        inner = next(loop for loop in lips if 61 not in loop)
        # The LEFT/RIGHT tables list mirrored edges in the same order: pair them up.
        pairs: list[tuple[int, int]] = []
        for left_name, right_name in (("left_eye", "right_eye"), ("left_eyebrow", "right_eyebrow")):
            for left_edge, right_edge in zip(
                connections[left_name], connections[right_name], strict=True
            ):
                pairs.extend(zip(left_edge, right_edge, strict=True))
        mirror_pairs = np.unique(np.asarray(pairs, dtype=np.int32), axis=0)
        return cls(
            triangles=np.asarray(data["triangles"], dtype=np.int32),
            face_oval=_ordered_loop(connections["face_oval"]),
            outer_lips=outer,
            inner_lips=inner,
            # MediaPipe's "right eye" is the subject's right, which is on the image left.
            eye_loops=(
                _ordered_loop(connections["right_eye"]),
                _ordered_loop(connections["left_eye"]),
            ),
            brows=np.unique(
                np.asarray(connections["left_eyebrow"] + connections["right_eyebrow"])
            ).astype(np.int32),
            mirror_pairs=mirror_pairs,
        )
