"""Migration parameters and capabilities: QEMU names, defaults, all-or-nothing validation."""

from __future__ import annotations

import pytest

from multifd.migration.params import (
    CAPABILITIES,
    MigrationCapabilities,
    MigrationParameters,
    ParameterError,
)
from multifd.migration.profile import QEMU_7_2, QEMU_10

pytestmark = pytest.mark.timeout(60)

QEMU_DEFAULTS = {
    "multifd-channels": 2,
    "multifd-compression": "none",
    "multifd-zlib-level": 1,
    "multifd-zstd-level": 1,
    "downtime-limit": 300,
    "max-bandwidth": 134217728,
    "avail-switchover-bandwidth": 0,
    "throttle-trigger-threshold": 50,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False,
    "max-cpu-throttle": 99,
    "tls-creds": "",
    "tls-hostname": "",
    "tls-authz": "",
    "zero-page-detection": "multifd",
    "announce-initial": 50,
    "announce-max": 550,
    "announce-rounds": 5,
    "announce-step": 100,
}


def test_defaults_match_qemu() -> None:
    p = MigrationParameters()
    d = p.as_dict()
    for name, value in QEMU_DEFAULTS.items():
        assert d[name] == value, name
        assert p.get(name) == value
    assert p.multifd_channels == 2
    assert p.max_bandwidth == 134217728
    assert p.get("multifd_channels") == 2


def test_set_and_attribute_access() -> None:
    p = MigrationParameters()
    p.set({"multifd-channels": 8, "multifd-compression": "zstd", "max-bandwidth": 0})
    assert p.multifd_channels == 8
    assert p.multifd_compression == "zstd"
    assert p.max_bandwidth == 0  # QEMU: a zero budget disables the rate limit
    p.downtime_limit = 50
    assert p.as_dict()["downtime-limit"] == 50
    assert MigrationParameters(multifd_channels=4).multifd_channels == 4


@pytest.mark.parametrize(
    ("changes", "kind", "text"),
    [
        ({"multifd-channels": 0}, "range",
         "Parameter 'multifd-channels' expects a value between 1 and 255"),
        ({"multifd-channels": 256}, "range", "between 1 and 255"),
        ({"multifd-channels": "4"}, "type",
         "Invalid parameter type for 'multifd-channels', expected: integer"),
        ({"multifd-channels": True}, "type", "expected: integer"),
        ({"multifd-zlib-level": 10}, "range", "between 0 and 9"),
        ({"multifd-zstd-level": 21}, "range", "between 0 and 20"),
        ({"multifd-compression": "lz4"}, "range",
         "Parameter 'multifd-compression' does not accept value 'lz4'"),
        ({"multifd-compression": 1}, "type", "expected: string"),
        ({"downtime-limit": 2000001}, "range", "range of 0 to 2000000 ms"),
        ({"downtime-limit": -1}, "range", "downtime-limit"),
        ({"max-bandwidth": -5}, "range", "bytes/second"),
        ({"max-bandwidth": 1.5}, "type", "expected: integer"),
        ({"throttle-trigger-threshold": 0}, "range", "1 to 100"),
        ({"cpu-throttle-initial": 100}, "range", "1 to 99"),
        ({"cpu-throttle-tailslow": 1}, "type", "expected: boolean"),
        ({"max-cpu-throttle": 10}, "range", "cpu-throttle-initial to 99"),
        ({"zero-page-detection": "fast"}, "range", "does not accept value 'fast'"),
        ({"xbzrle-cache-size": 3 * 4096}, "range", "power of two"),
        ({"tls-creds": 5}, "type", "expected: string"),
        ({"no-such-thing": 1}, "unknown", "Parameter 'no-such-thing' is unexpected"),
        ({"compress-level": 1}, "unknown", "is unexpected"),  # v7.2-only, not in QEMU 10
    ],
)
def test_errors(changes: dict[str, object], kind: str, text: str) -> None:
    p = MigrationParameters()
    with pytest.raises(ParameterError) as info:
        p.set(changes)
    assert info.value.kind == kind
    assert text in info.value.desc
    assert str(info.value) == info.value.desc
    assert p.as_dict()["multifd-channels"] == 2


def test_set_is_all_or_nothing() -> None:
    p = MigrationParameters()
    before = p.as_dict()
    with pytest.raises(ParameterError):
        p.set({"multifd-channels": 4, "downtime-limit": 100, "multifd-zlib-level": 99})
    assert p.as_dict() == before


def test_cross_member_rule_uses_merged_values() -> None:
    p = MigrationParameters()
    p.set({"cpu-throttle-initial": 50, "max-cpu-throttle": 60})
    with pytest.raises(ParameterError, match="cpu-throttle-initial to 99"):
        p.set({"cpu-throttle-initial": 70})
    assert p.cpu_throttle_initial == 50
    p.set({"cpu-throttle-initial": 70, "max-cpu-throttle": 80})  # together it is fine


def test_tls_null_resets() -> None:
    p = MigrationParameters()
    p.set({"tls-creds": "tls0", "tls-authz": "authz0"})
    assert p.tls_creds == "tls0"
    p.set({"tls-creds": None, "tls-authz": None})
    assert p.tls_creds == "" and p.tls_authz == ""


def test_get_unknown() -> None:
    with pytest.raises(ParameterError) as info:
        MigrationParameters().get("nope")
    assert info.value.kind == "unknown"
    with pytest.raises(AttributeError):
        _ = MigrationParameters().nope


def test_set_needs_a_mapping() -> None:
    with pytest.raises(ParameterError) as info:
        MigrationParameters().set([("multifd-channels", 2)])  # type: ignore[arg-type]
    assert info.value.kind == "type"


def test_copy_is_independent() -> None:
    p = MigrationParameters()
    q = p.copy()
    q.set({"multifd-channels": 9})
    assert p.multifd_channels == 2 and q.multifd_channels == 9


# -- zero-page-detection and the profile --------------------------------------------------


def test_zero_page_detection_default_follows_a_bound_profile() -> None:
    assert MigrationParameters(profile=QEMU_10).zero_page_detection == "multifd"
    p = MigrationParameters(profile="qemu-7.2")  # QEMU 7.2: always the migration thread
    assert p.as_dict()["zero-page-detection"] == "legacy"
    assert p.profile is QEMU_7_2
    for mode in ("none", "legacy"):
        p.set({"zero-page-detection": mode})
        assert p.zero_page_detection == mode


def test_zero_page_detection_multifd_refused_for_qemu72() -> None:
    p = MigrationParameters(profile=QEMU_7_2)
    with pytest.raises(ParameterError) as info:
        p.set({"zero-page-detection": "multifd", "multifd-channels": 4})
    assert info.value.kind == "range"
    assert "'zero-page-detection' does not accept value 'multifd'" in info.value.desc
    assert "qemu-7.2" in info.value.desc
    assert p.zero_page_detection == "legacy" and p.multifd_channels == 2  # nothing applied
    with pytest.raises(ParameterError, match=r"qemu-7\.2"):
        MigrationParameters(profile=QEMU_7_2, zero_page_detection="multifd")


def test_bind_profile_keeps_explicit_values_and_refuses_impossible_ones() -> None:
    p = MigrationParameters()
    assert not p.explicit("zero-page-detection")
    p.bind_profile(QEMU_7_2)  # untouched default: becomes 7.2's
    assert p.zero_page_detection == "legacy"
    p.bind_profile("qemu-10")
    assert p.zero_page_detection == "multifd"
    p.set({"zero-page-detection": "none"})
    assert p.explicit("zero_page_detection")
    p.bind_profile(QEMU_7_2)
    assert p.zero_page_detection == "none"  # the user's choice stays
    q = MigrationParameters(zero_page_detection="multifd")
    with pytest.raises(ParameterError, match=r"qemu-7\.2"):
        q.bind_profile(QEMU_7_2)
    assert q.profile is None and q.zero_page_detection == "multifd"


def test_effective_zero_page_detection_for_unbound_parameters() -> None:
    p = MigrationParameters()
    assert p.effective_zero_page_detection(QEMU_10) == "multifd"
    assert p.effective_zero_page_detection(QEMU_7_2) == "legacy"
    p.set({"zero-page-detection": "multifd"})  # explicit: not silently replaced
    with pytest.raises(ParameterError, match=r"with profile qemu-7\.2"):
        p.effective_zero_page_detection(QEMU_7_2)
    copy = p.copy()
    assert copy.explicit("zero-page-detection")
    with pytest.raises(ParameterError):
        copy.effective_zero_page_detection(QEMU_7_2)


# -- capabilities -----------------------------------------------------------------------


def test_capabilities_list_and_defaults() -> None:
    caps = MigrationCapabilities()
    listed = caps.as_list()
    assert [c["capability"] for c in listed] == list(CAPABILITIES)
    assert len(CAPABILITIES) == 21
    assert all(c["state"] is False for c in listed)
    for name in ("switchover-ack", "dirty-limit", "mapped-ram", "zero-copy-send"):
        assert name in CAPABILITIES
    for v72_only in ("zero-blocks", "compress", "block"):
        assert v72_only not in CAPABILITIES


def test_capabilities_set() -> None:
    caps = MigrationCapabilities()
    caps.set([{"capability": "multifd", "state": True}, {"capability": "events", "state": True}])
    assert caps.get("multifd") and caps["events"] and caps.multifd
    assert not caps.auto_converge
    assert caps.enabled() == {"multifd", "events"}
    caps.set([{"capability": "multifd", "state": False}])
    assert not caps.get("multifd")


def test_capabilities_unsupported_only_when_enabling() -> None:
    caps = MigrationCapabilities()
    with pytest.raises(ParameterError, match="capability postcopy-ram is not supported by multifd"):
        caps.set([{"capability": "multifd", "state": True},
                  {"capability": "postcopy-ram", "state": True}])
    assert not caps.get("multifd")  # nothing applied
    caps.set([{"capability": "postcopy-ram", "state": False}])  # turning off is fine


@pytest.mark.parametrize(
    ("entries", "kind", "text"),
    [
        ([{"capability": "warp-speed", "state": True}], "unknown",
         "Parameter 'capability' does not accept value 'warp-speed'"),
        ([{"capability": "compress", "state": False}], "unknown", "'compress'"),
        ([{"capability": "multifd", "state": "on"}], "type", "expected: boolean"),
        ([{"capability": "multifd"}], "type", "'state' is missing"),
        ([{"state": True}], "type", "'capability' is missing"),
        ([{"capability": "multifd", "state": True, "x": 1}], "unknown", "'x' is unexpected"),
        (["multifd"], "type", "expected: object"),
        ({"capability": "multifd", "state": True}, "type", "expected: array"),
    ],
)
def test_capabilities_errors(entries: object, kind: str, text: str) -> None:
    caps = MigrationCapabilities()
    with pytest.raises(ParameterError) as info:
        caps.set(entries)  # type: ignore[arg-type]
    assert info.value.kind == kind
    assert text in info.value.desc
    assert caps.enabled() == frozenset()


def test_capabilities_custom_support() -> None:
    caps = MigrationCapabilities(supported={"multifd", "pause-before-switchover"})
    caps.set([{"capability": "pause-before-switchover", "state": True}])
    assert caps.get("pause-before-switchover")
    with pytest.raises(ParameterError) as info:
        caps.get("bogus")
    assert info.value.kind == "unknown"
