"""`livefuse swap` end to end: real files in, real files out, and every bad input."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from livefuse.cli.main import main
from livefuse.engines.images import ImageTooLargeError, NotAnImageError, decode_image


def swap(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["swap", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_clip(
    path: Path, frame: np.ndarray, *, frames: int = 12, audio: bool = True, lossless: bool = False
) -> None:
    """A short clip of a slowly turning photo, with a 440 Hz tone if `audio`.

    H.264 by default; `lossless` writes FFV1, which also takes odd frame sizes.
    """
    height, width = frame.shape[:2]
    with av.open(str(path), "w") as container:
        video = container.add_stream("ffv1" if lossless else "libx264", rate=24)
        video.width, video.height = width, height
        video.pix_fmt = "yuv444p" if lossless else "yuv420p"
        tone = container.add_stream("aac", rate=48000) if audio else None
        for i in range(frames):
            turn = cv2.getRotationMatrix2D((width / 2, height / 2), i * 0.7, 1.0)
            moved = cv2.warpAffine(frame, turn, (width, height))
            for packet in video.encode(av.VideoFrame.from_ndarray(moved, format="bgr24")):
                container.mux(packet)
        if tone is not None:
            samples = int(48000 * frames / 24)
            wave = (0.2 * np.sin(2 * math.pi * 440 * np.arange(samples) / 48000)).astype(np.float32)
            for start in range(0, samples, 1024):
                chunk = av.AudioFrame.from_ndarray(
                    wave[None, start : start + 1024], format="fltp", layout="mono"
                )
                chunk.sample_rate, chunk.pts = 48000, start
                for packet in tone.encode(chunk):
                    container.mux(packet)
            for packet in tone.encode(None):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)


def test_image_target(capsys, tmp_path, astronaut_path, group_path):
    output = tmp_path / "out.png"
    code, out, _ = swap(
        capsys, "--source", astronaut_path, "--target", group_path, "--output", output
    )
    assert code == 0
    assert "swapped 6 face(s) in 1 image(s)" in out
    result = cv2.imread(str(output))
    original = cv2.imread(str(group_path))
    assert result.shape == original.shape
    assert np.any(result != original)


def test_largest_face_only(capsys, tmp_path, astronaut_path, group_path):
    output = tmp_path / "out.png"
    code, out, _ = swap(
        capsys,
        "--source",
        astronaut_path,
        "--target",
        group_path,
        "--output",
        output,
        "--faces",
        "largest",
    )
    assert code == 0 and "swapped 1 face(s)" in out
    changed = np.any(cv2.imread(str(output)) != cv2.imread(str(group_path)), axis=2)
    ys, xs = np.nonzero(changed)
    # One face only: every changed pixel lies around a single face (t1's largest, at about
    # x=520, y=345), none around the others.
    assert xs.max() - xs.min() < 260 and ys.max() - ys.min() < 260
    assert 380 < xs.mean() < 660 and 220 < ys.mean() < 470


def test_source_with_several_faces_uses_the_largest_and_says_so(
    capsys, tmp_path, group_path, astronaut_path
):
    code, _, err = swap(
        capsys, "--source", group_path, "--target", astronaut_path, "--output", tmp_path / "out.png"
    )
    assert code == 0
    assert "source has 6 faces; using the largest" in err


def test_directory_target_keeps_names_and_reports_every_file(
    capsys, tmp_path, astronaut_path, group_path, hanks_path
):
    target = tmp_path / "in"
    target.mkdir()
    shutil.copy(group_path, target / "group.jpg")
    shutil.copy(hanks_path, target / "hanks.png")
    blank = np.full((120, 160, 3), 90, np.uint8)
    cv2.imwrite(str(target / "empty_room.png"), blank)
    (target / "notes.jpg").write_text("this is not a picture")
    (target / "readme.txt").write_text("not an image name either")
    output = tmp_path / "out"

    code, out, err = swap(
        capsys, "--source", astronaut_path, "--target", target, "--output", output
    )

    assert code == 1  # some inputs failed; the others are all done
    assert sorted(p.name for p in output.iterdir()) == ["empty_room.png", "group.jpg", "hanks.png"]
    assert "swapped 7 face(s) in 2 image(s)" in out
    assert "no face found, written unchanged: empty_room.png" in out
    assert np.array_equal(cv2.imread(str(output / "empty_room.png")), blank)
    assert "notes.jpg" in err and "not an image" in err
    assert "readme.txt" in err


def test_video_target_keeps_frames_and_audio(capsys, tmp_path, astronaut_path, group_bgr):
    clip = tmp_path / "clip.mp4"
    write_clip(clip, cv2.resize(group_bgr[150:500, 350:750], (400, 350)))
    output = tmp_path / "swapped.mp4"
    code, out, err = swap(
        capsys, "--source", astronaut_path, "--target", clip, "--output", output, "--backend", "cpu"
    )
    assert code == 0, err
    assert "swapped 12 face(s) over 12 frame(s)" in out and "audio copied" in out
    assert "fps on cpu)" in out
    assert "failed" not in err
    with av.open(str(clip)) as original:
        before = [f.to_ndarray(format="bgr24") for f in original.decode(video=0)]
    with av.open(str(output)) as result:
        audio = result.streams.audio[0]
        assert audio.codec_context.name == "aac"
        video = result.streams.video[0]
        video_seconds = float(video.duration * video.time_base)
        audio_seconds = float(audio.duration * audio.time_base)
        frames = [f.to_ndarray(format="bgr24") for f in result.decode(video=0)]
    assert len(frames) == 12
    assert abs(video_seconds - audio_seconds) < 0.1  # still in sync
    # Never black, and every frame's face really changed.
    assert min(float(f.mean()) for f in frames) > 40
    assert all(np.abs(a.astype(int) - b).mean() > 1.0 for a, b in zip(frames, before, strict=True))


def test_video_without_audio_and_with_odd_sides(capsys, tmp_path, astronaut_path, group_bgr):
    clip = tmp_path / "silent.mkv"
    write_clip(
        clip,
        cv2.resize(group_bgr[150:500, 350:750], (401, 351)),
        frames=4,
        audio=False,
        lossless=True,
    )
    output = tmp_path / "silent_out.mkv"
    code, out, err = swap(capsys, "--source", astronaut_path, "--target", clip, "--output", output)
    assert code == 0, err
    assert "over 4 frame(s)" in out and "audio none" in out
    with av.open(str(output)) as result:
        assert not result.streams.audio
        sizes = {(f.width, f.height) for f in result.decode(video=0)}
    assert sizes == {(400, 350)}


def test_output_that_is_the_target_is_refused(capsys, tmp_path, astronaut_path, group_bgr):
    clip = tmp_path / "clip.mp4"
    write_clip(clip, cv2.resize(group_bgr[150:500, 350:750], (400, 350)), frames=3)
    before = clip.read_bytes()
    code, _, err = swap(capsys, "--source", astronaut_path, "--target", clip, "--output", clip)
    assert code == 2 and "target itself" in err
    assert clip.read_bytes() == before


def test_failed_run_leaves_an_existing_output_alone(capsys, tmp_path, astronaut_path):
    precious = tmp_path / "precious.mp4"
    precious.write_bytes(b"yesterday's work")
    notes = tmp_path / "notes.txt"
    notes.write_text("no video here")
    code, _, err = swap(capsys, "--source", astronaut_path, "--target", notes, "--output", precious)
    assert code == 2 and "not a readable image or video" in err
    assert precious.read_bytes() == b"yesterday's work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "precious.mp4"]


def test_output_format_without_h264_is_a_clear_error(capsys, tmp_path, astronaut_path, group_bgr):
    clip = tmp_path / "clip.mp4"
    write_clip(clip, cv2.resize(group_bgr[150:500, 350:750], (400, 350)), frames=2)
    code, _, err = swap(
        capsys, "--source", astronaut_path, "--target", clip, "--output", tmp_path / "out.webm"
    )
    assert code == 2 and "cannot write H.264" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_one_pixel_video_is_refused(capsys, tmp_path, astronaut_path):
    clip = tmp_path / "thin.avi"
    with av.open(str(clip), "w") as container:
        # Uncompressed video is the one codec that takes a frame 1 pixel wide.
        stream = container.add_stream("rawvideo", rate=10)
        stream.width, stream.height, stream.pix_fmt = 1, 16, "bgr24"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 1, 3), np.uint8), format="bgr24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    code, _, err = swap(
        capsys, "--source", astronaut_path, "--target", clip, "--output", tmp_path / "o.mkv"
    )
    assert code == 2 and "too small" in err


def test_source_that_is_not_an_image(capsys, tmp_path, group_path):
    bogus = tmp_path / "face.jpg"
    bogus.write_bytes(b"%PDF-1.4 definitely not a jpeg")
    code, _, err = swap(
        capsys, "--source", bogus, "--target", group_path, "--output", tmp_path / "o.png"
    )
    assert code == 2 and "source" in err and "not an image" in err
    assert not (tmp_path / "o.png").exists()


def test_truncated_source_image(capsys, tmp_path, group_path):
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(group_path.read_bytes()[:20_000])
    code, _, err = swap(
        capsys, "--source", truncated, "--target", group_path, "--output", tmp_path / "o.png"
    )
    assert code == 2 and "corrupt or truncated" in err


def test_source_without_a_face(capsys, tmp_path, group_path):
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((300, 300, 3), 180, np.uint8))
    code, _, err = swap(
        capsys, "--source", blank, "--target", group_path, "--output", tmp_path / "o.png"
    )
    assert code == 2 and "no face found" in err


def test_missing_target(capsys, tmp_path, astronaut_path):
    code, _, err = swap(
        capsys,
        "--source",
        astronaut_path,
        "--target",
        tmp_path / "nope.mp4",
        "--output",
        tmp_path / "o.mp4",
    )
    assert code == 2 and "does not exist" in err


def test_unsupported_video(capsys, tmp_path, astronaut_path):
    fake = tmp_path / "movie.mkv"
    fake.write_bytes(b"\x00\x01 not a container at all" * 50)
    output = tmp_path / "o.mp4"
    code, _, err = swap(capsys, "--source", astronaut_path, "--target", fake, "--output", output)
    assert code == 2 and "not a readable image or video" in err
    assert not output.exists()


def test_absurd_image_sizes_are_refused_before_decoding(monkeypatch, capsys, tmp_path, group_path):
    # A real PNG whose header is rewritten to claim 100000x100000 pixels: refused from
    # the header alone, before a byte of pixel data is decoded.
    import struct
    import zlib

    ok, encoded = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    assert ok
    data = bytearray(encoded.tobytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 100_000, 100_000)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    png = bytes(data)
    with pytest.raises(ImageTooLargeError, match="limit"):
        decode_image(png, max_bytes=10_000_000, max_pixels=40_000_000)
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode_image(b"x" * 101, max_bytes=100, max_pixels=10)
    with pytest.raises(NotAnImageError):
        decode_image(b"", max_bytes=100, max_pixels=10)

    # The CLI applies the configured limits to the source.
    monkeypatch.setenv("LIVEFUSE_MAX_IMAGE_PIXELS", "1000")
    code, _, err = swap(
        capsys, "--source", group_path, "--target", group_path, "--output", tmp_path / "o.png"
    )
    assert code == 2 and "limit" in err


def test_missing_model_is_one_clear_line(monkeypatch, capsys, tmp_path, astronaut_path):
    monkeypatch.setenv("LIVEFUSE_HOME", str(tmp_path / "empty-home"))
    code, _, err = swap(
        capsys,
        "--source",
        astronaut_path,
        "--target",
        astronaut_path,
        "--output",
        tmp_path / "o.png",
    )
    assert code == 2
    line = err.strip()
    assert "\n" not in line and "livefuse models pull" in line
