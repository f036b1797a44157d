"""What a stream's audience receives: its newest processed frame, its one shared H.264
encode, its audio, and the tracks each sender pulls from them.

A publisher's `StreamSession` feeds a `Channel`; viewers (WHEP, the publisher's own
return video) and RTMP pushes read from it. An unnamed session has a channel of its own,
closed with it. A named stream's channel belongs to the name: it outlives its
publishers, so a viewer's peer connection and a push keep running across a publisher's
restart, with the last picture held (repeated) in between.
"""

from __future__ import annotations

import asyncio

from aiortc import MediaStreamTrack

from livefuse.stream.audio import AudioFanout
from livefuse.stream.shared_encode import EncodedVideoTrack, EncoderStats, SharedH264Encoder
from livefuse.stream.tracks import OutputFrame, OutputSlot, ProcessedVideoTrack


class Channel:
    def __init__(self, *, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.name = name
        """For thread names and logs (a stream name or a session id)."""
        self.output = OutputSlot()
        self.audio = AudioFanout()
        self._loop = loop
        self._vp8_tracks: list[ProcessedVideoTrack] = []
        self._h264: SharedH264Encoder | None = None
        self.closed = False

    def publish(self, frame: OutputFrame) -> None:
        """A new processed frame (on the event loop)."""
        self.output.publish(frame)

    def video_output(self, *, h264: bool = False) -> EncodedVideoTrack | ProcessedVideoTrack:
        """A new track of the processed video for one more sender: with `h264` (the
        sender's codec is H.264), packets of the channel's one shared encode; else raw
        frames that the sender's own encoder (VP8) compresses."""
        if h264:
            if self._h264 is None:
                self._h264 = SharedH264Encoder(
                    self.output, loop=self._loop, name=f"livefuse-{self.name[:8]}-h264"
                )
            return self._h264.track()
        track = ProcessedVideoTrack(self.output)
        self._vp8_tracks = [t for t in self._vp8_tracks if t.readyState == "live"]
        self._vp8_tracks.append(track)
        return track

    def audio_output(self) -> MediaStreamTrack:
        """A new track of the stream's audio for one more sender (silent until a
        publisher sends some)."""
        return self.audio.track()

    def encoder_stats(self) -> EncoderStats | None:
        return self._h264.stats() if self._h264 is not None else None

    @property
    def repeats(self) -> int:
        """Frames re-sent because no new one was ready (the shared encode's and each VP8
        track's)."""
        encode = self.encoder_stats()
        return sum(t.repeats for t in self._vp8_tracks) + (encode.repeats if encode else 0)

    async def close(self) -> None:
        """End every track. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.output.close()
        self.audio.close()
        for track in self._vp8_tracks:
            track.stop()
        if self._h264 is not None:
            await self._h264.close()
