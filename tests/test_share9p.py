"""Where a share is mounted: with the command's root in one mount program (its mount
point is a directory of the build root as it is), or by the share9p step, which makes
the directory first. Pure functions on a real directory tree standing for a build root;
the runs in tests/test_scripts.py and tests/test_run.py mount both kinds for real."""

from __future__ import annotations

from pathlib import Path

import pytest
from hshelper.plugins import devlinks, share9p

from hshelper import guestabi
from hshelper.model import RunSpec, Share


def spec_for(root: Path, *guests: str, mode: str = "image", path: str = "/usr/bin:/bin"
             ) -> RunSpec:
    shares = (Share(root, guestabi.ROOT_DIR, readonly=True, tag="hshroot", automount=False),
              *(Share(root / "elsewhere", g, tag=f"hsh{i}") for i, g in enumerate(guests)))
    return RunSpec(argv=("true",), cwd=guests[0] if guests else "/", env=(("PATH", path),),
                   shares=shares, mode=mode)


@pytest.fixture
def root(tmp_path):
    (tmp_path / "home/builder/src/sub").mkdir(parents=True)
    (tmp_path / "tmp/work").mkdir(parents=True)
    (tmp_path / "srv").mkdir()
    (tmp_path / "link").symlink_to("home/builder")
    (tmp_path / "afile").write_text("x")
    return tmp_path


@pytest.mark.parametrize(("guest", "with_root"), [
    ("/home/builder/src", True),  # a directory of the build root
    ("/home/builder/missing", False),  # made by the step first
    ("/afile", False),  # not a directory
    ("/link/src", False),  # a symlink on the way: mount(2) would follow it outside
    ("/tmp/work", False),  # below the root's own /tmp: not there once that is mounted
])
def test_a_share_is_mounted_with_the_root_only_on_a_plain_directory(root, guest, with_root):
    spec = spec_for(root, guest)
    mounted = share9p.hshelper_root_mounts(spec)
    steps = share9p.hshelper_guest_setup(spec, share9p.hshelper_root_mounts(spec))
    assert [m[1] for m in mounted] == ([guestabi.NEWROOT + guest] if with_root else [])
    assert bool(steps) != with_root
    if mounted:
        tag, _, kind, opts = mounted[0]
        assert (tag, kind) == ("hsh0", "9p") and "trans=virtio" in opts


def test_a_share_inside_another_and_the_image_alone_go_through_the_step(root):
    spec = spec_for(root, "/home/builder", "/home/builder/src/sub")
    assert [m[1] for m in share9p.hshelper_root_mounts(spec)] == [
        guestabi.NEWROOT + "/home/builder"]
    step = share9p.hshelper_guest_setup(spec, share9p.hshelper_root_mounts(spec))[0][1]
    assert "/home/builder/src/sub" in step and "'/home/builder'" not in step
    isolated = spec_for(root, "/srv", mode="isolated")
    assert share9p.hshelper_root_mounts(isolated) == []
    step = share9p.hshelper_guest_setup(isolated, share9p.hshelper_root_mounts(isolated))
    assert "/srv" in step[0][1]


def test_the_udevadm_stand_in_is_bound_over_the_first_on_path_in_mode_image_only(root):
    for d in ("usr/sbin", "usr/bin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    real = root / "usr/bin/udevadm"
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    (root / "usr/sbin/udevadm").write_text("not executable")
    spec = spec_for(root, "/srv", path="/usr/sbin:/usr/bin:/hshelper/bb")
    n = guestabi.NEWROOT
    assert devlinks.hshelper_root_mounts(spec) == [
        (f"{n}/usr/bin/udevadm", f"{n}{devlinks.REAL}", "none", "bind"),
        (f"{n}{devlinks.STAND_IN}", f"{n}/usr/bin/udevadm", "none", "bind")]
    # The build root alone has no stand-in in it; without udevadm there is nothing to
    # stand in for (the stand-in is last on PATH then).
    assert devlinks.hshelper_root_mounts(spec_for(root, "/srv", mode="root")) == []
    real.unlink()
    assert devlinks.hshelper_root_mounts(spec) == []
