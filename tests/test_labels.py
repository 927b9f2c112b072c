"""Label schemes: conversions through canonical compartments, lossy-conversion errors, BraTS regions."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.labels import SCHEMES, check_labels, convert_labels, get_scheme, region_channels, regions
from common.io import DataError


def _all_compartment_volume(scheme_name: str) -> np.ndarray:
    """A 1-D 'volume' holding every value of a scheme, twice."""
    values = sorted(get_scheme(scheme_name).values)
    return np.array(values * 2, dtype=np.uint8)


def test_known_values():
    assert dict(get_scheme("brats2019").values) == {0: "background", 1: "NETC", 2: "SNFH", 4: "ET"}
    assert get_scheme("brats2021") is get_scheme("brats2019")
    assert get_scheme("msd").value_of["SNFH"] == 1 and get_scheme("msd").value_of["NETC"] == 2
    assert get_scheme("six_label").value_of["RC"] == 5 and get_scheme("six_label").num_classes == 6
    assert get_scheme("brats2019").num_classes == 5
    with pytest.raises(ValueError, match="unknown label scheme"):
        get_scheme("brats1999")


def test_explicit_conversions():
    brats19 = np.array([0, 1, 2, 4])
    np.testing.assert_array_equal(convert_labels(brats19, "brats2019", "brats2023"), [0, 1, 2, 3])
    np.testing.assert_array_equal(convert_labels(brats19, "brats2019", "msd"), [0, 2, 1, 3])
    np.testing.assert_array_equal(convert_labels(brats19, "brats2019", "six_label"), [0, 2, 3, 4])
    np.testing.assert_array_equal(convert_labels(np.array([0, 1, 2, 3, 4]), "brats2024", "six_label"), [0, 2, 3, 4, 5])
    # head (six_label 1) is not tumor: it becomes background in schemes without it
    np.testing.assert_array_equal(convert_labels(np.array([0, 1, 2, 5]), "six_label", "brats2024"), [0, 0, 1, 4])


@pytest.mark.parametrize("src", ["brats2019", "brats2023", "msd"])
@pytest.mark.parametrize("dst", sorted(SCHEMES))
def test_round_trip_without_loss(src, dst):
    volume = _all_compartment_volume(src)
    there = convert_labels(volume, src, dst)
    back = convert_labels(there, dst, src)
    np.testing.assert_array_equal(back, volume)
    assert there.dtype == np.uint8


def test_round_trip_with_rc():
    volume = _all_compartment_volume("brats2024")
    six = convert_labels(volume, "brats2024", "six_label")
    np.testing.assert_array_equal(convert_labels(six, "six_label", "brats2024"), volume)


def test_float_labels_accepted_when_integral():
    np.testing.assert_array_equal(convert_labels(np.array([0.0, 4.0]), "brats2019", "brats2023"), [0, 3])


def test_values_outside_scheme_raise_with_location():
    with pytest.raises(DataError, match=r"caseA.*\[3\].*brats2019"):
        convert_labels(np.array([0, 3]), "brats2019", "brats2023", where="caseA")
    with pytest.raises(DataError, match="resection cavity"):
        check_labels(np.array([0, 1, 3, 4]), "brats2023")
    with pytest.raises(DataError, match="non-integer"):
        check_labels(np.array([0.0, 0.5]), "brats2023")


def test_lossy_conversion_raises_or_drops():
    volume = np.array([0, 1, 4, 4, 3])  # brats2024 with a cavity
    with pytest.raises(DataError, match=r"lose \['RC'\]"):
        convert_labels(volume, "brats2024", "brats2023")
    np.testing.assert_array_equal(convert_labels(volume, "brats2024", "brats2023", lossy="background"), [0, 1, 0, 0, 3])
    # a cavity-free brats2024 volume converts without complaint
    np.testing.assert_array_equal(convert_labels(np.array([0, 3]), "brats2024", "brats2019"), [0, 4])


def test_regions_on_constructed_volume():
    vol = np.zeros((10, 10, 10), dtype=np.uint8)
    vol[1:9, 1:9, 1:9] = 2  # SNFH shell (brats2023)
    vol[3:7, 3:7, 3:7] = 1  # NETC
    vol[4:6, 4:6, 4:6] = 3  # ET
    reg = regions(vol, "brats2023")
    assert set(reg) == {"ET", "TC", "WT"}
    assert reg["ET"].sum() == 8
    assert reg["TC"].sum() == 64
    assert reg["WT"].sum() == 512
    assert not (reg["ET"] & ~reg["TC"]).any() and not (reg["TC"] & ~reg["WT"]).any()
    # same anatomy in the msd and six_label schemes gives the same regions
    for scheme in ("msd", "six_label", "brats2019"):
        other = regions(convert_labels(vol, "brats2023", scheme), scheme)
        for name in ("ET", "TC", "WT"):
            np.testing.assert_array_equal(other[name], reg[name])
    # the resection cavity is its own region, outside TC and WT; head is never tumor
    post = vol.copy()
    post[0, 0, 0:3] = 4
    reg24 = regions(post, "brats2024")
    assert reg24["RC"].sum() == 3 and reg24["WT"].sum() == 512
    six = convert_labels(post, "brats2024", "six_label")
    six[9, 9, 9] = 1
    assert regions(six, "six_label")["WT"].sum() == 512
    channels = region_channels(vol, "brats2023")
    assert channels.shape == (3, 10, 10, 10) and channels.sum(axis=(1, 2, 3)).tolist() == [64, 512, 8]
