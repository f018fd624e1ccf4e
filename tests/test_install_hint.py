"""The "install X" part of error messages: the package by the build root's distribution."""

from __future__ import annotations

import pytest

from hshelper import packages


@pytest.mark.parametrize("os_release, expected", [
    ({"ID": "debian"}, "install mount in the build root"),
    ({"ID": "ubuntu", "ID_LIKE": "debian"}, "install mount in the build root"),
    ({"ID": "fedora"}, "install util-linux-core in the build root"),
    ({"ID": "altlinux"}, "install util-linux in the build root"),
])
def test_a_base_program_names_its_package(os_release, expected):
    assert packages.install_hint("mount", os_release) == expected


def test_an_unknown_program_says_how_to_find_its_package():
    assert packages.install_hint("frobnicate", {"ID": "fedora"}) == (
        "install the package that provides it in the build root "
        "(dnf provides frobnicate)")
    assert "search frobnicate" in packages.install_hint("frobnicate", {"ID": "gentoo"})
