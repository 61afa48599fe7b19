"""auto-update's decisions (cli/autoupdate.py) on a real cache directory; the pull and
systemctl are replaced: the system test (tests/system/test_images_system.py) runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_unit.cli import autoupdate
from qemu_unit.config import settings
from qemu_unit.config.imagesource import ImageSource
from qemu_unit.images.cache import Cache, Ref

GOOD = "sha256:" + "a" * 64
BAD = "sha256:" + "b" * 64


class FakeVM:
    name = "web"
    auto_update = settings.AutoUpdate.YES


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    cache = Cache(tmp_path / "images")
    for d in (cache.blobs, cache.refs, cache.locks):
        d.mkdir(parents=True)
    src = ImageSource(url="http://127.0.0.1:9/disk.qcow2")
    key = src.key()
    for digest in (GOOD, BAD):
        cache.blob(digest).write_bytes(b"x")
    cache.write_ref(key, Ref(src, GOOD, "qcow2", 1, "", 0.0))
    state: dict[str, object] = {"cache": cache, "key": key, "restarts": [], "ready": {GOOD}}

    def pull(_src: ImageSource, c: Cache) -> None:  # the sums name BAD from now on
        old = c.read_ref(key)
        assert old is not None
        c.write_ref(key, Ref(src, BAD, "qcow2", 1, "", 1.0, old.digest, old.rejected))

    def restart(_vm: object) -> bool:
        ref = cache.read_ref(key)
        assert ref is not None
        state["restarts"].append(ref.digest)  # type: ignore[attr-defined]
        return ref.digest in state["ready"]  # type: ignore[operator]

    monkeypatch.setattr(autoupdate, "candidates",
                        lambda _path=None: {key: autoupdate.Source(src, [FakeVM()])})  # type: ignore[list-item]
    monkeypatch.setattr(autoupdate, "_pull_update", pull)
    monkeypatch.setattr(autoupdate, "_restart", restart)
    monkeypatch.setattr(autoupdate, "_active", lambda _unit: True)
    return state


def test_an_image_that_never_became_ready_is_rolled_back_and_not_tried_again(
    world: dict[str, object]
) -> None:
    cache, key = world["cache"], world["key"]
    assert isinstance(cache, Cache) and isinstance(key, str)
    assert autoupdate.run(cache=cache) == 1
    assert world["restarts"] == [BAD, GOOD]  # tried, then back on the previous image
    ref = cache.read_ref(key)
    assert ref is not None and ref.digest == GOOD and ref.rejected == BAD
    # The next timer run: the sums still name BAD. No restart, and the ref stays on GOOD,
    # so a later start of the VM boots the image that worked.
    assert autoupdate.run(cache=cache) == 0
    assert world["restarts"] == [BAD, GOOD]
    ref = cache.read_ref(key)
    assert ref is not None and ref.digest == GOOD and ref.rejected == BAD


def test_a_ready_update_is_kept(world: dict[str, object]) -> None:
    cache, key = world["cache"], world["key"]
    assert isinstance(cache, Cache) and isinstance(key, str)
    world["ready"] = {GOOD, BAD}
    assert autoupdate.run(cache=cache) == 0
    assert world["restarts"] == [BAD]
    ref = cache.read_ref(key)
    assert ref is not None and ref.digest == BAD and ref.previous == GOOD and ref.rejected is None
