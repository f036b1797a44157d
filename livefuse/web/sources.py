"""Source faces: uploaded once, prepared once, used by any number of sessions.

An upload is read with a byte limit (the Content-Length is checked before the body is
read), sniffed by content (the declared type is only a first filter), size-checked from
the image header before decoding (a decompression bomb is refused, not decoded) and then
prepared by the face pipeline on a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web

from livefuse.engines.images import ImageError, ImageTooLargeError, NotAnImageError, decode_image
from livefuse.engines.pipeline import FacePipeline, NoFaceError
from livefuse.engines.swapper import SourceFace
from livefuse.web.errors import ApiError, json_error

# Declared types let through to the sniffer; anything else is refused unread.
_UPLOAD_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/bmp", "application/octet-stream"}
)


@dataclass(frozen=True)
class Source:
    id: str
    face: SourceFace
    faces: list[dict[str, Any]]
    width: int
    height: int
    created: float

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "faces": self.faces, "width": self.width, "height": self.height}


class SourceStore:
    """Prepared sources by id; the oldest go first past `limit`."""

    def __init__(self, *, limit: int) -> None:
        self._limit = limit
        self._sources: OrderedDict[str, Source] = OrderedDict()

    def add(self, source: Source) -> None:
        self._sources[source.id] = source
        while len(self._sources) > self._limit:
            self._sources.popitem(last=False)

    def get(self, source_id: str) -> Source | None:
        return self._sources.get(source_id)

    def remove(self, source_id: str) -> bool:
        return self._sources.pop(source_id, None) is not None

    def __len__(self) -> int:
        return len(self._sources)


class SourcePreparer:
    """Prepares uploads one at a time on a thread of its own, with a short queue.

    Not the loop's default executor: aiortc encodes every outgoing frame there, and a
    burst of uploads queued in front of the encoder would stall live video. Past
    `max_waiting` uploads waiting, the next is refused (503) rather than held in memory.
    """

    def __init__(self, *, max_waiting: int = 4) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="livefuse-source")
        self._max_waiting = max_waiting
        self._pending = 0

    async def prepare(
        self, pipeline: FacePipeline, data: bytes, *, max_bytes: int, max_pixels: int
    ) -> Source:
        if self._pending >= self._max_waiting + 1:
            raise json_error(
                503,
                "busy",
                "the server is preparing other faces; try again in a few seconds",
                headers={"Retry-After": "3"},
            )
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._executor,
                functools.partial(
                    prepare, pipeline, data, max_bytes=max_bytes, max_pixels=max_pixels
                ),
            )
        finally:
            self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def prepare(pipeline: FacePipeline, data: bytes, *, max_bytes: int, max_pixels: int) -> Source:
    """Decode and prepare an uploaded image (blocking: run it on a worker thread)."""
    image = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    meshes = pipeline.find_faces(image)
    if not meshes:
        raise NoFaceError("no face found in the image; use a photo with one clear, frontal face")
    # For the pipeline's swapper: with inswapper, also its identity embedding.
    face = pipeline.prepare_source_face(image, meshes[0])
    height, width = image.shape[:2]
    faces = [
        {"box": [round(float(v), 1) for v in mesh.box], "size": round(mesh.size, 1)}
        for mesh in meshes
    ]
    return Source(
        id=secrets.token_urlsafe(9),
        face=face,
        faces=faces,
        width=width,
        height=height,
        created=time.time(),
    )


async def read_upload(request: web.Request, *, max_bytes: int) -> bytes:
    """The image bytes of a raw or multipart upload; HTTP errors for what is refused."""
    if request.content_length is not None and request.content_length > max_bytes + 64 * 1024:
        raise _too_large(max_bytes)
    content_type = request.content_type.lower()
    if content_type.startswith("multipart/"):
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                raise json_error(422, "no_image", "the form has no `image` field")
            if isinstance(part, BodyPartReader) and part.name == "image":
                return await _read_limited(part, max_bytes)
            if isinstance(part, BodyPartReader):
                await part.release()
    if content_type not in _UPLOAD_TYPES:
        raise json_error(
            415,
            "unsupported_media_type",
            f"send a PNG, JPEG or WebP image (got Content-Type {content_type or 'none'})",
        )
    data = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(data)


async def _read_limited(part: BodyPartReader, max_bytes: int) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(64 * 1024):
        data += chunk
        if len(data) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(data)


def _too_large(max_bytes: int) -> ApiError:
    return json_error(413, "too_large", f"the image is larger than the limit of {max_bytes} bytes")


async def create_source(
    request: web.Request,
    *,
    pipeline: FacePipeline,
    store: SourceStore,
    preparer: SourcePreparer,
    max_bytes: int,
    max_pixels: int,
) -> web.Response:
    data = await read_upload(request, max_bytes=max_bytes)
    try:
        source = await preparer.prepare(pipeline, data, max_bytes=max_bytes, max_pixels=max_pixels)
    except ImageTooLargeError as error:
        raise json_error(413, "too_large", str(error)) from error
    except NotAnImageError as error:
        raise json_error(415, "not_an_image", str(error)) from error
    except ImageError as error:
        raise json_error(422, "bad_image", str(error)) from error
    except NoFaceError as error:
        raise json_error(422, "no_face", str(error)) from error
    store.add(source)
    return web.json_response(
        source.as_dict(), status=201, headers={"Location": f"/api/v1/sources/{source.id}"}
    )
