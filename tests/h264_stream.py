"""An H.264 stream read as a receiver meets it, to check what a sender sent.

Frames are Annex B access units (start-code-prefixed NAL units), one per picture, in the
order sent. `problems` says where a receiver could not have decoded them correctly: a
stream that does not open with a keyframe, or a P-frame whose reference it never got
(`frame_num` does not follow on). FFmpeg's decoder conceals such a gap without an error,
so the slice headers are read here.
"""

from __future__ import annotations

import av

NAL_SLICE, NAL_IDR, NAL_SPS = 1, 5, 7


def nal_units(frame: bytes) -> list[bytes]:
    units = []
    for chunk in frame.split(b"\x00\x00\x01"):
        unit = chunk.rstrip(b"\x00")  # a 4-byte start code leaves a zero behind
        if unit:
            units.append(unit)
    return units


def nal_types(frame: bytes) -> list[int]:
    return [unit[0] & 0x1F for unit in nal_units(frame)]


def is_keyframe(frame: bytes) -> bool:
    return NAL_IDR in nal_types(frame)


class _Bits:
    """Exp-Golomb reader over a NAL unit's payload (emulation prevention removed)."""

    def __init__(self, payload: bytes) -> None:
        self._data = payload.replace(b"\x00\x00\x03", b"\x00\x00")
        self._pos = 0

    def u(self, count: int) -> int:
        value = 0
        for _ in range(count):
            byte = self._data[self._pos // 8]
            value = value << 1 | (byte >> (7 - self._pos % 8)) & 1
            self._pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
        return (1 << zeros) - 1 + self.u(zeros)


def _log2_max_frame_num(sps: bytes) -> int:
    bits = _Bits(sps[1:])
    profile = bits.u(8)
    bits.u(16)  # constraint flags, level
    bits.ue()  # seq_parameter_set_id
    if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        raise ValueError(f"profile {profile}: only Baseline/Main streams are read here")
    return bits.ue() + 4


def _frame_num(slice_unit: bytes, log2_max: int) -> int:
    bits = _Bits(slice_unit[1:])
    bits.ue()  # first_mb_in_slice
    bits.ue()  # slice_type
    bits.ue()  # pic_parameter_set_id
    return bits.u(log2_max)


def problems(frames: list[bytes]) -> list[str]:
    """What a receiver of exactly these frames could not decode; empty when all is well."""
    found: list[str] = []
    if not frames:
        return ["no frames"]
    if not is_keyframe(frames[0]):
        found.append(f"the first frame is not a keyframe (NAL types {nal_types(frames[0])})")
    log2_max: int | None = None
    previous: tuple[int, bool] | None = None  # frame_num, was a reference
    for index, frame in enumerate(frames):
        for unit in nal_units(frame):
            kind = unit[0] & 0x1F
            if kind == NAL_SPS:
                log2_max = _log2_max_frame_num(unit)
            if kind not in (NAL_SLICE, NAL_IDR) or log2_max is None:
                continue
            number = _frame_num(unit, log2_max)
            if kind == NAL_SLICE and previous is not None:
                last, was_reference = previous
                expected = (last + was_reference) % (1 << log2_max)
                if number != expected:
                    found.append(f"frame {index}: frame_num {number} after {last} (a gap)")
            previous = (number, unit[0] >> 5 & 3 != 0)
            break  # one slice per picture is enough
    return found


def decode(frames: list[bytes]) -> int:
    """Pictures FFmpeg decodes from the frames; FFmpegError where it cannot."""
    codec = av.CodecContext.create("h264", "r")
    pictures = 0
    for frame in frames:
        pictures += len(codec.decode(av.Packet(frame)))
    pictures += len(codec.decode(None))
    return pictures
