"""Fan-out beyond one node: re-publish a stream's swapped video (and its audio) to a media
server over WHIP (`livefuse serve --relay-whip URL`).

One node serves a stream's viewers up to `max_viewers`; a media server (MediaMTX, LiveKit
ingress, another livefuse with no source face) can serve thousands. `URL` may name the
stream: `{name}` becomes the stream's name, or the session's id for an unnamed one, so
`http://mediamtx:8889/{name}/whip` gives each stream a path of its own there (watched at
`http://mediamtx:8889/{name}/whep`, or its HLS).

The publisher is an aiortc peer like any WHEP viewer of the stream: it sends the
channel's one shared H.264 encode (no extra encode) and its audio. A refusal or a
connection that fails is retried with backoff (1 s doubling to 30 s); ending the stream
sends the WHIP DELETE.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urljoin

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription

from livefuse.stream.channel import Channel
from livefuse.stream.feeds import Backoff, error_text, redact
from livefuse.stream.shared_encode import EncodedVideoTrack

log = logging.getLogger("livefuse.whip_client")

_HTTP_TIMEOUT_S = 10.0


def relay_url(template: str, *, name: str) -> str:
    return template.replace("{name}", name)


class WhipRelay:
    """Keeps one WHIP publication of a channel up until `close()`."""

    def __init__(
        self,
        *,
        url: str,
        channel: Channel,
        token: str | None = None,
        configuration: RTCConfiguration | None = None,
    ) -> None:
        self.url = url
        self.shown_url = redact(url)
        self._channel = channel
        self._token = token
        self._configuration = configuration or RTCConfiguration(iceServers=[])
        self._backoff = Backoff()
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self.state = "connecting"
        self.attempts = 0
        self.last_error: str | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"livefuse-relay-whip-{self._channel.name[:8]}"
        )

    def stats(self) -> dict[str, Any]:
        return {
            "url": self.shown_url,
            "state": self.state,
            "attempts": self.attempts,
            "last_error": self.last_error,
        }

    async def _run(self) -> None:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=_HTTP_TIMEOUT_S)
        ) as http:
            while not self._closing.is_set():
                self.attempts += 1
                try:
                    await self._publish_once(http)
                except Exception as error:  # refused, unreachable, an answer aiortc rejects
                    self.last_error = error_text(error, self.url)
                if self._closing.is_set():
                    break
                self.state = "retrying"
                delay = self._backoff.next_delay()
                log.warning(
                    "event=relay_whip_retry url=%s in_s=%.0f error=%r",
                    self.shown_url,
                    delay,
                    self.last_error,
                )
                try:
                    await asyncio.wait_for(self._closing.wait(), delay)
                except TimeoutError:
                    pass
        self.state = "closed"

    async def _publish_once(self, http: aiohttp.ClientSession) -> None:
        """Publish until the connection fails or `close()`; raises on a refusal."""
        pc = RTCPeerConnection(self._configuration)
        resource: str | None = None
        try:
            video = self._channel.video_output(h264=True)
            transceiver = pc.addTransceiver(video, direction="sendonly")
            # The track carries the channel's H.264 packets: offer H.264 alone.
            transceiver.setCodecPreferences(
                [
                    codec
                    for codec in RTCRtpSender.getCapabilities("video").codecs
                    if codec.mimeType.lower() == "video/h264"
                ]
            )
            if isinstance(video, EncodedVideoTrack):
                video.listen_to(transceiver.sender)
            pc.addTransceiver(self._channel.audio_output(), direction="sendonly")
            await pc.setLocalDescription(await pc.createOffer())
            assert pc.localDescription is not None
            headers = {"Content-Type": "application/sdp"}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            async with http.post(self.url, data=pc.localDescription.sdp, headers=headers) as reply:
                text = await reply.text()
                if reply.status != 201:
                    raise ValueError(f"the WHIP server answered {reply.status}: {text[:200]}")
                if "Location" in reply.headers:
                    resource = urljoin(str(reply.url), reply.headers["Location"])
            await pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
            ended = asyncio.Event()

            @pc.on("connectionstatechange")
            def on_state() -> None:
                if pc.connectionState == "connected":
                    self.state = "live"
                    self._backoff.ok()
                    log.info("event=relay_whip_live url=%s", self.shown_url)
                elif pc.connectionState in ("failed", "closed"):
                    ended.set()

            closing = asyncio.ensure_future(self._closing.wait())
            failed = asyncio.ensure_future(ended.wait())
            await asyncio.wait({closing, failed}, return_when=asyncio.FIRST_COMPLETED)
            closing.cancel()
            failed.cancel()
            if not self._closing.is_set():
                self.last_error = f"the connection {pc.connectionState}"
        finally:
            await self._end(pc, http, resource)

    async def _end(
        self, pc: RTCPeerConnection, http: aiohttp.ClientSession, resource: str | None
    ) -> None:
        for transceiver in pc.getTransceivers():
            if transceiver.sender.track is not None:
                transceiver.sender.track.stop()
        await pc.close()
        if resource is not None:
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            try:
                async with http.delete(resource, headers=headers):
                    pass
            except (aiohttp.ClientError, TimeoutError):
                pass  # the server is gone: nothing left to end there

    async def close(self) -> None:
        self._closing.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
