"""bench/identity_eval.py's held-out photos: pinned like the fixtures, and a failed fetch
is one clear line and exit status 2, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import identity_eval
from livefuse.engines.fetch import FetchError


def test_heldout_photos_are_pinned_members_of_the_pinned_sdist() -> None:
    sdist = identity_eval.FACE_RECOGNITION
    assert sdist.filename == f"face_recognition-{sdist.version}.tar.gz"
    assert len(sdist.sha256) == 64
    for image in identity_eval.HELDOUT_IMAGES.values():
        assert image.member.startswith(f"face_recognition-{sdist.version}/tests/test_images/")
        assert image.member.endswith(image.filename)
        assert len(image.sha256) == 64
    # Two people, four photos: none of them anyone the tests or the dev set use.
    assert not set(identity_eval.HELDOUT_IMAGES) & set(identity_eval.IDENTITIES)


def test_a_failed_fetch_of_the_heldout_photos_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def no_network(*args: object, **kwargs: object) -> list[Path]:
        # What the fetch raises when the package index cannot be reached.
        raise FetchError("`pip download face-recognition==1.3.0` failed: no network")

    monkeypatch.setattr(identity_eval, "fetch_images", no_network)
    status = identity_eval.main(
        ["--targets", "heldout", "--sources", "t1_1", "--command", "true", "--keep", str(tmp_path)]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "face-recognition==1.3.0" in err and "Traceback" not in err
