"""Source faces: uploaded once, prepared once, used by any number of sessions.

Everything that can refuse an upload without reading it does so first: the declared
type (415), the Content-Length (413), a form without a boundary (400), and the number
of uploads already in memory (503 + Retry-After: at most `max_concurrent_uploads` are
read and prepared at once, so memory stays bounded whatever the number of clients). The
body is then streamed with a hard cap (chunked uploads too), a form's fields before the
image counted against it; sniffed by content (the declared type is only a first
filter), size-checked from the image header before decoding (a decompression bomb is
refused, not decoded) and prepared by the face pipeline on a worker thread. A malformed
form is a 400 in words, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError

from livefuse.engines.images import ImageError, ImageTooLargeError, NotAnImageError, decode_image
from livefuse.engines.pipeline import FacePipeline, NoFaceError
from livefuse.engines.swapper import SourceFace
from livefuse.web.errors import ApiError, json_error

# Declared types let through to the sniffer; anything else is refused unread.
_UPLOAD_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/bmp", "application/octet-stream"}
)
# A form's own bytes (boundaries, part headers, small fields) allowed beyond the image's.
_FORM_OVERHEAD = 64 * 1024
# Fields of a form looked at for `image`; a form is a browser's, with one or two.
_MAX_FORM_PARTS = 8
_CHUNK = 64 * 1024
RETRY_AFTER_BUSY_S = 3


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
    """Admits uploads a few at a time and prepares them one at a time, on a thread of
    its own.

    `admit` holds an upload's place from before its body is read until it is prepared:
    past `max_uploads` in memory, the next is refused (503) unread. Not the loop's
    default executor: aiortc encodes every outgoing frame there, and a burst of uploads
    queued in front of the encoder would stall live video.
    """

    def __init__(self, *, max_uploads: int = 2) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="livefuse-source")
        self.max_uploads = max_uploads
        self._admitted = 0

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """A place for one upload (its body read and prepared inside), or 503."""
        if self._admitted >= self.max_uploads:
            raise json_error(
                503,
                "busy",
                "the server is taking other faces; try again in a few seconds",
                headers={"Retry-After": str(RETRY_AFTER_BUSY_S)},
            )
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def prepare(
        self, pipeline: FacePipeline, data: bytes, *, max_bytes: int, max_pixels: int
    ) -> Source:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor,
            functools.partial(prepare, pipeline, data, max_bytes=max_bytes, max_pixels=max_pixels),
        )

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


def check_declared(request: web.Request, *, max_bytes: int) -> None:
    """Refuse what the headers alone show cannot be taken: 415, 413, or 400 for a form
    with no boundary. Reads nothing."""
    content_type = request.content_type.lower()
    if content_type.startswith("multipart/"):
        if content_type != "multipart/form-data":
            raise json_error(
                415,
                "unsupported_media_type",
                f"send multipart/form-data, not {content_type}",
            )
        if not parse_mimetype(request.headers.get("Content-Type", "")).parameters.get("boundary"):
            raise json_error(400, "bad_form", "the multipart form has no boundary")
        limit = max_bytes + _FORM_OVERHEAD
    elif content_type in _UPLOAD_TYPES:
        limit = max_bytes
    else:
        raise json_error(
            415,
            "unsupported_media_type",
            f"send a PNG, JPEG or WebP image (got Content-Type {content_type or 'none'})",
        )
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(max_bytes)


async def read_upload(request: web.Request, *, max_bytes: int) -> bytes:
    """The image bytes of a raw or multipart upload (`check_declared` first), streamed
    with a hard cap; HTTP errors for what is refused."""
    if request.content_type.lower().startswith("multipart/"):
        return await _read_form(request, max_bytes=max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_form(request: web.Request, *, max_bytes: int) -> bytes:
    """The `image` field of a multipart form; the fields before it count against the
    form's allowance. 400 for a form that is not one (wrong boundary, a header line
    past aiohttp's limit, no end), 422 for a form without `image`."""
    budget = max_bytes + _FORM_OVERHEAD
    try:
        reader = await request.multipart()
        for _ in range(_MAX_FORM_PARTS):
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise json_error(400, "bad_form", "a form inside a form is not taken")
            if part.name == "image":
                return await _read_limited(part, max_bytes)
            # Another field: read through (not kept), counted against the allowance.
            while chunk := await part.read_chunk(_CHUNK):
                budget -= len(chunk)
                if budget < max_bytes:
                    raise json_error(
                        413, "too_large", "the form's other fields are larger than allowed"
                    )
        else:
            raise json_error(
                422, "no_image", f"the form has no `image` among its first {_MAX_FORM_PARTS} fields"
            )
    except (ValueError, AssertionError, HttpProcessingError) as error:
        # aiohttp's multipart reader: a wrong or missing boundary, no end, a line too long.
        reason = " ".join(str(getattr(error, "message", "") or error).split())[:160]
        raise json_error(
            400, "bad_form", f"the multipart form cannot be read: {reason or type(error).__name__}"
        ) from error
    raise json_error(422, "no_image", "the form has no `image` field")


async def _read_limited(part: BodyPartReader, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


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
    check_declared(request, max_bytes=max_bytes)
    with preparer.admit():
        data = await read_upload(request, max_bytes=max_bytes)
        try:
            source = await preparer.prepare(
                pipeline, data, max_bytes=max_bytes, max_pixels=max_pixels
            )
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
