"""WHIP ingest and WHEP egress (RFC 9725 and the WHEP draft) on aiortc.

The SDP endpoints answer errors in plain text (`sdp_error`), as WHIP/WHEP clients such as
OBS print the body as it is. aiortc gathers every local candidate before it answers, so
the answer carries them all; a client's own candidates may trickle in by PATCH.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, cast

from aiohttp import web
from aiortc import MediaStreamTrack, RTCIceCandidate, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import SessionDescription, candidate_from_sdp
from yarl import URL

from livefuse.engines.pipeline import FaceSelection
from livefuse.stream import codecs
from livefuse.stream.quality import QUALITY_MODES, QualityMode
from livefuse.stream.shared_encode import EncodedVideoTrack
from livefuse.web import ice, tickets
from livefuse.web.errors import ApiError, sdp_error
from livefuse.web.peers import publisher_target
from livefuse.web.service import (
    NAME_PATTERN,
    Broadcast,
    LiveSession,
    close_peer,
    watch_ice_deadline,
)
from livefuse.web.sources import Source

if TYPE_CHECKING:
    from livefuse.web.service import Service

log = logging.getLogger("livefuse.webrtc")

SDP_TYPE = "application/sdp"
SDPFRAG_TYPE = "application/trickle-ice-sdpfrag"
FACE_SELECTIONS = ("all", "largest")
# `?label=` on a WHIP URL: burn the disclosure label into the session's video, or not.
LABEL_VALUES = {"1": True, "true": True, "0": False, "false": False}


async def read_sdp_body(request: web.Request, *, max_bytes: int, content_type: str) -> str:
    """The request's SDP (or SDP fragment) text; 415/413/400 for what cannot be one."""
    if request.content_type.lower() != content_type:
        raise sdp_error(
            415,
            "unsupported_media_type",
            f"send the offer as Content-Type: {content_type} "
            f"(got {request.content_type or 'none'})",
        )
    if request.content_length is not None and request.content_length > max_bytes:
        raise _sdp_too_large(max_bytes)
    data = bytearray()
    async for chunk in request.content.iter_chunked(16 * 1024):
        data += chunk
        if len(data) > max_bytes:
            raise _sdp_too_large(max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise sdp_error(400, "bad_sdp", "the SDP is not UTF-8 text") from error


def _sdp_too_large(max_bytes: int) -> ApiError:
    return sdp_error(413, "sdp_too_large", f"the SDP is larger than the limit of {max_bytes} bytes")


def parse_offer(text: str) -> SessionDescription:
    """A parsed offer that can work, or a 400 that says in one line what is wrong.

    aiortc's parser asserts, raises StopIteration and more on malformed lines, and
    builds a peer it cannot close from some offers it reads (a media section outside
    BUNDLE, a mid it cannot put in a header extension); those are refused here, before
    any peer exists. An offer that could never carry video to us is refused too, rather
    than holding a slot: no DTLS fingerprint, the video section disabled (port 0) or
    with none of the codecs aiortc speaks."""
    if not text.strip().startswith("v=0"):
        raise sdp_error(400, "bad_sdp", "this is not an SDP offer (it must start with v=0)")
    try:
        description = SessionDescription.parse(text)
    except Exception as error:  # aiortc's parser raises whatever the bad line trips on
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise sdp_error(400, "bad_sdp", f"the SDP offer cannot be read: {reason}") from error
    media = [m for m in description.media if m.kind in ("audio", "video")]
    if len(description.media) > _MAX_MEDIA_SECTIONS:
        raise sdp_error(
            400,
            "bad_sdp",
            f"the offer has {len(description.media)} media sections; at most "
            f"{_MAX_MEDIA_SECTIONS} are taken",
        )
    video = next((m for m in media if m.kind == "video"), None)
    if video is None:
        raise sdp_error(400, "no_video", "the offer has no video section")
    bundle = next((g.items for g in description.group if g.semantic == "BUNDLE"), None)
    mids: set[str] = set()
    for section in media:
        mid = section.rtp.muxId or ""
        if not _MID.fullmatch(mid):
            raise sdp_error(
                400,
                "bad_sdp",
                f"the offer's {section.kind} section has no usable a=mid (1 to 16 letters, "
                "digits or -._)",
            )
        if mid in mids:
            raise sdp_error(400, "bad_sdp", f"the offer uses a=mid:{mid} twice")
        mids.add(mid)
        if bundle is not None and mid not in bundle:
            raise sdp_error(400, "bad_sdp", f"the offer's a=mid:{mid} is not in its BUNDLE group")
        if section.ice is None or not section.ice.usernameFragment or not section.ice.password:
            raise sdp_error(
                400, "bad_sdp", f"the offer's {section.kind} section lacks ICE credentials"
            )
        if section.dtls is None or not section.dtls.fingerprints:
            raise sdp_error(
                400,
                "no_fingerprint",
                f"the offer's {section.kind} section has no DTLS fingerprint (a=fingerprint)",
            )
    if video.port == 0 and "a=bundle-only" not in _section_text(text, video.rtp.muxId):
        raise sdp_error(400, "no_video", "the offer's video section is disabled (port 0)")
    names = {codec.name.upper() for codec in video.rtp.codecs}
    if not names & _VIDEO_CODECS:
        raise sdp_error(
            400,
            "no_video",
            "the offer's video section has none of the codecs this server speaks "
            f"({', '.join(sorted(_VIDEO_CODECS))})",
        )
    return description


# A mid goes in every RTP packet's header extension: RFC 8843 keeps it short; aiortc
# takes ASCII only.
_MID = re.compile(r"[A-Za-z0-9._-]{1,16}")
_MAX_MEDIA_SECTIONS = 8
# A client trickles a handful; each one is checked against every local candidate.
_MAX_TRICKLED_CANDIDATES = 32
_VIDEO_CODECS = frozenset({"H264", "VP8"})


def _section_text(sdp: str, mid: str) -> str:
    """The lines of the media section with this mid (for attributes aiortc does not keep)."""
    for section in sdp.split("\nm=")[1:]:
        if f"a=mid:{mid}\r" in section or f"a=mid:{mid}\n" in section:
            return section
    return ""


def video_direction(description: SessionDescription) -> str:
    return next(m.direction or "sendrecv" for m in description.media if m.kind == "video")


def etag_for(session_key: str) -> str:
    return '"' + hashlib.sha256(session_key.encode()).hexdigest()[:16] + '"'


class VideoOutput(Protocol):
    """`StreamSession.video_output`: a track of the processed video for a sender whose
    codec is H.264 (`h264=True`, packets of the shared encode) or not (raw frames)."""

    def __call__(self, *, h264: bool) -> MediaStreamTrack: ...


async def answer(
    pc: RTCPeerConnection,
    offer_sdp: str,
    *,
    video: VideoOutput | None = None,
    send: Sequence[MediaStreamTrack] = (),
) -> str:
    """Apply the offer, prefer H.264, add the processed video (from `video`, in the form
    the negotiated codec takes) and the tracks of `send` on its m-lines and return the
    answer's SDP; a 400 when aiortc cannot take the offer."""
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        h264 = False
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video":
                h264 = codecs.prefer_h264(transceiver)
                # Before media flows: one PLI a second, decoding failures counted.
                codecs.watch_receiver(transceiver.receiver)
        if video is not None:
            # A sender with H.264 gets the session's shared encode; one without (VP8
            # only) encodes the raw frames itself.
            track = video(h264=h264)
            sender = pc.addTrack(track)
            if isinstance(track, EncodedVideoTrack):
                track.listen_to(sender)
        for track in send:
            pc.addTrack(track)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as error:  # aiortc raises several types for offers it cannot take
        raise sdp_error(
            400, "bad_sdp", f"cannot negotiate this offer: {type(error).__name__}: {error}"
        ) from error
    local = pc.localDescription
    assert local is not None
    return codecs.with_bitrate_hints(local.sdp)


async def whip_post(request: web.Request, service: Service) -> web.Response:
    settings = service.settings
    offer_sdp = await read_sdp_body(
        request, max_bytes=settings.max_sdp_bytes, content_type=SDP_TYPE
    )
    description = parse_offer(offer_sdp)
    service.require_ready()
    source = None
    if source_id := request.query.get("source"):
        source = service.sources.get(source_id)
        if source is None:
            raise sdp_error(
                422,
                "unknown_source",
                f"no source face with id {source_id!r}: upload one to /api/v1/sources first",
            )
    quality = request.query.get("quality", "auto")
    if quality not in QUALITY_MODES:
        raise sdp_error(422, "bad_quality", f"quality must be one of {', '.join(QUALITY_MODES)}")
    face_selection = request.query.get("faces", "all")
    if face_selection not in FACE_SELECTIONS:
        raise sdp_error(422, "bad_faces", "faces must be all or largest")
    label = request.query.get("label")
    if label is not None and label not in LABEL_VALUES:
        raise sdp_error(422, "bad_label", "label must be 1 or 0 (or true or false)")
    direction = video_direction(description)
    if direction not in ("sendonly", "sendrecv"):
        raise sdp_error(400, "bad_direction", f"a WHIP offer must send video (it is {direction})")

    name = request.match_info.get("name")
    if name is not None and not NAME_PATTERN.fullmatch(name):
        raise sdp_error(400, "bad_name", "a stream name is 1 to 64 letters, digits, '-' or '_'")
    if service.peers is not None:
        # Scale-out (web/peers.py): a full node, or one a peer beats, sends the offer on.
        target = publisher_target(service.capacity(), service.peers, name=name)
        if target is not None:
            return _redirect(service, request, target)
    # Counted from the offer until its connection is up (or the ICE deadline ends it).
    release_pending = service.pending_publishers.hold(
        _client(request), retry_after_s=settings.ice_connect_timeout_s
    )
    with _released_on_error(release_pending):
        session_id, session, pc, answer_sdp = await _open_whip_session(
            service,
            name=name,
            quality=quality,
            face_selection=cast(FaceSelection, face_selection),
            source=source,
            label=label,
            direction=direction,
            offer_sdp=offer_sdp,
        )

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            service.schedule_end(session_id, reason=f"publisher connection {pc.connectionState}")

    watch_ice_deadline(
        pc,
        timeout_s=settings.ice_connect_timeout_s,
        on_settled=release_pending,
        on_timeout=lambda: service.schedule_end(
            session_id, reason=f"not connected within {settings.ice_connect_timeout_s:g} s"
        ),
    )
    location = _location(request, service, f"/whip/{session_id}")
    log.info(
        "event=session_start session=%s name=%s mode=%s source=%s quality=%s",
        session_id,
        name or "-",
        session.mode,
        source.id if source else "none",
        quality,
    )
    return web.Response(
        status=201,
        text=answer_sdp,
        content_type=SDP_TYPE,
        headers={
            "Location": location,
            "ETag": etag_for(session_id),
            **_ice_server_links(service),
        },
    )


async def _open_whip_session(
    service: Service,
    *,
    name: str | None,
    quality: QualityMode,
    face_selection: FaceSelection,
    source: Source | None,
    label: str | None,
    direction: str,
    offer_sdp: str,
) -> tuple[str, LiveSession, RTCPeerConnection, str]:
    """The publisher's session, its peer connection answered: (id, session, pc, answer)."""
    # A named stream: its broadcast (viewers, pushes) is the name's; 409 while live.
    async with service.opening_session(
        name=name, quality=quality, face_selection=face_selection
    ) as (session_id, stream, broadcast):
        stream.engine_session.source = source.face if source else None
        if label is not None:  # else the server's default (`label_default`)
            stream.engine_session.label = LABEL_VALUES[label]
        pc = service.new_peer_connection()
        try:

            @pc.on("track")
            def on_track(track: MediaStreamTrack) -> None:
                if track.kind == "video":
                    stream.attach_video(track)
                elif track.kind == "audio":
                    stream.attach_audio(track)

            # A sendrecv publisher gets the processed video back on the same m-line; its
            # audio is not echoed back to it.
            video = stream.video_output if direction == "sendrecv" else None
            answer_sdp = await answer(pc, offer_sdp, video=video)
            session = LiveSession(
                id=session_id,
                stream=stream,
                broadcast=broadcast,
                pc=pc,
                source=source,
                mode="sendrecv" if direction == "sendrecv" else "sendonly",
            )
            service.add_session(session)
        except BaseException:
            await close_peer(pc)
            raise
    return session_id, session, pc, answer_sdp


def _redirect(service: Service, request: web.Request, peer: str) -> web.Response:
    """307 to the same path on `peer`: the client sends the same request, body and
    method, there (RFC 9725 4.5). With tokens, the URL carries a ticket standing in for
    the Authorization header, which clients do not send on to another host."""
    url = URL(peer).join(request.rel_url.with_query(None))
    query = {k: v for k, v in request.query.items() if k != "ticket"}
    key = tickets.ticket_key(service.settings)
    if key is not None:
        query["ticket"] = tickets.issue(key, request.method, request.path)
    url = url.with_query(query)
    return web.Response(
        status=307, headers={"Location": str(url)}, text=f"this node is full: go to {url}\n"
    )


def _location(request: web.Request, service: Service, path: str) -> str:
    """A resource's Location: absolute when the node has peers, since PATCH and DELETE
    (which do not follow redirects) must reach this node, not the entry URL's."""
    if service.peers is None:
        return path
    base = service.settings.public_url or str(request.url.origin())
    return base.rstrip("/") + path


def _client(request: web.Request) -> str:
    """The address pending offers are counted by (behind a proxy: the proxy's)."""
    return request.remote or "unknown"


@contextlib.contextmanager
def _released_on_error(release: Callable[[], None]) -> Iterator[None]:
    try:
        yield
    except BaseException:
        release()
        raise


def _ice_server_links(service: Service) -> dict[str, str]:
    """RFC 9725 `Link: rel="ice-server"` headers (OBS reads them), TURN with a fresh
    short-lived credential."""
    return ice.link_header(ice.ice_servers(service.settings))


def _session_or_404(service: Service, session_id: str) -> LiveSession:
    session = service.sessions.get(session_id)
    if session is None:
        raise sdp_error(404, "unknown_session", f"no live session {session_id!r}")
    return session


async def whip_delete(request: web.Request, service: Service) -> web.Response:
    session_id = request.match_info["session"]
    if not await service.end_session(session_id, reason="DELETE"):
        raise sdp_error(404, "unknown_session", f"no live session {session_id!r}")
    return web.Response(status=200)


async def trickle(
    request: web.Request, service: Service, pc: RTCPeerConnection, etag: str
) -> web.Response:
    """PATCH with an SDP fragment: the client's late ICE candidates (RFC 9725 4.3)."""
    if_match = request.headers.get("If-Match")
    if if_match is not None and if_match not in ("*", etag):
        raise sdp_error(412, "etag_mismatch", "If-Match does not name this session")
    fragment = await read_sdp_body(
        request, max_bytes=service.settings.max_sdp_bytes, content_type=SDPFRAG_TYPE
    )
    remote = pc.remoteDescription
    current_ufrag = None
    if remote is not None:
        parsed = SessionDescription.parse(remote.sdp)
        current_ufrag = next((m.ice.usernameFragment for m in parsed.media if m.ice), None)
    # Read the whole fragment before applying any of it: a bad line refuses it all.
    mid: str | None = None
    candidates: list[RTCIceCandidate] = []
    ended = False
    for raw in fragment.splitlines():
        line = raw.strip()
        if line.startswith("a=ice-ufrag:") and line.split(":", 1)[1] != current_ufrag:
            raise sdp_error(
                422, "ice_restart", "ICE restarts are not supported: end the session and start anew"
            )
        if line.startswith("a=mid:"):
            mid = line.split(":", 1)[1]
            if not _MID.fullmatch(mid):
                raise sdp_error(400, "bad_candidate", f"no such media section: {line[:80]!r}")
        elif line.startswith("a=candidate:"):
            text = line[len("a=candidate:") :]
            try:
                if len(text.split()) < 8:
                    raise ValueError("a candidate has at least 8 fields")
                candidate = candidate_from_sdp(text)
            except Exception as error:  # aiortc's parser asserts, int() raises, ...
                reason = " ".join(str(error).split())[:120] or type(error).__name__
                raise sdp_error(
                    400, "bad_candidate", f"cannot read {line[:80]!r}: {reason}"
                ) from error
            candidate.sdpMid = mid
            candidate.sdpMLineIndex = None if mid is not None else 0
            candidates.append(candidate)
            if len(candidates) > _MAX_TRICKLED_CANDIDATES:
                raise sdp_error(
                    400,
                    "bad_candidate",
                    f"more than {_MAX_TRICKLED_CANDIDATES} candidates in one fragment",
                )
        elif line == "a=end-of-candidates":
            ended = True
    try:
        for candidate in candidates:
            await pc.addIceCandidate(candidate)
        if ended:
            await pc.addIceCandidate(None)
    except Exception as error:  # aiortc/aioice refuse: candidates already ended, no such mid
        reason = " ".join(str(error).split())[:120] or type(error).__name__
        raise sdp_error(422, "bad_candidate", f"cannot take these candidates: {reason}") from error
    return web.Response(status=204)


async def whip_patch(request: web.Request, service: Service) -> web.Response:
    session_id = request.match_info["session"]
    session = _session_or_404(service, session_id)
    if session.pc is None:
        raise sdp_error(
            405, "not_webrtc", f"session {session_id!r} is an ingest: no ICE to trickle"
        )
    return await trickle(request, service, session.pc, etag_for(session_id))


async def whep_post(request: web.Request, service: Service) -> web.Response:
    """A viewer of a named stream (following whoever publishes there) or of a session."""
    settings = service.settings
    key = request.match_info["session"]
    offer_sdp = await read_sdp_body(
        request, max_bytes=settings.max_sdp_bytes, content_type=SDP_TYPE
    )
    description = parse_offer(offer_sdp)
    if service.find_broadcast(key) is None and service.peers is not None:
        # A named stream held by another node: its viewers go there.
        holder = service.peers.holder_of(key)
        if holder is not None:
            return _redirect(service, request, holder)
    broadcast = _broadcast_or_404(service, key)
    if video_direction(description) not in ("recvonly", "sendrecv"):
        raise sdp_error(400, "bad_direction", "a WHEP offer must receive video (recvonly)")
    if len(broadcast.viewers) >= settings.max_viewers:
        service.metrics.refused.labels(reason="viewers").inc()
        raise sdp_error(
            503,
            "too_many_viewers",
            f"this stream already has its limit of {settings.max_viewers} viewers",
            headers={"Retry-After": "10"},
        )
    release_pending = service.pending_viewers.hold(
        _client(request), retry_after_s=settings.ice_connect_timeout_s
    )
    pc = service.new_peer_connection()
    viewer_id = service.new_id()
    try:
        send: list[MediaStreamTrack] = []
        publisher = service.sessions.get(broadcast.publisher or "")
        # A named stream's next publisher may bring audio even if this one has none.
        with_audio = broadcast.named or (publisher is not None and publisher.stream.has_audio)
        if with_audio and any(m.kind == "audio" for m in description.media):
            send.append(broadcast.channel.audio_output())
        answer_sdp = await answer(pc, offer_sdp, video=broadcast.channel.video_output, send=send)
    except BaseException:
        release_pending()
        await close_peer(pc)
        raise
    if broadcast.channel.closed:  # it ended while we negotiated
        release_pending()
        await close_peer(pc)
        raise sdp_error(404, "unknown_stream", f"nothing is published as {key!r}")
    broadcast.viewers[viewer_id] = pc
    log.info("event=viewer_start stream=%s viewer=%s", key, viewer_id)

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            task = asyncio.get_running_loop().create_task(service.end_viewer(key, viewer_id))
            service.keep(task)

    def not_connected() -> None:
        log.info("event=viewer_not_connected stream=%s viewer=%s", key, viewer_id)
        service.keep(asyncio.get_running_loop().create_task(service.end_viewer(key, viewer_id)))

    watch_ice_deadline(
        pc,
        timeout_s=settings.ice_connect_timeout_s,
        on_settled=release_pending,
        on_timeout=not_connected,
    )
    return web.Response(
        status=201,
        text=answer_sdp,
        content_type=SDP_TYPE,
        headers={
            "Location": _location(request, service, f"/whep/{key}/{viewer_id}"),
            "ETag": etag_for(viewer_id),
            **_ice_server_links(service),
        },
    )


def _broadcast_or_404(service: Service, key: str) -> Broadcast:
    broadcast = service.live_broadcast(key)
    if broadcast is None:
        raise sdp_error(
            404,
            "unknown_stream",
            f"nothing is published as {key!r} (no live session or named stream of that name)",
        )
    return broadcast


async def whep_delete(request: web.Request, service: Service) -> web.Response:
    session_id, viewer_id = request.match_info["session"], request.match_info["viewer"]
    if not await service.end_viewer(session_id, viewer_id):
        raise sdp_error(404, "unknown_viewer", f"no viewer {viewer_id!r} on {session_id!r}")
    return web.Response(status=200)


async def whep_patch(request: web.Request, service: Service) -> web.Response:
    key, viewer_id = request.match_info["session"], request.match_info["viewer"]
    pc = _broadcast_or_404(service, key).viewers.get(viewer_id)
    if pc is None:
        raise sdp_error(404, "unknown_viewer", f"no viewer {viewer_id!r} on {key!r}")
    return await trickle(request, service, pc, etag_for(viewer_id))
