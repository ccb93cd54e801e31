"""The recording fake of Mixpanel's and Segment's upstreams, as the tests use it:
the one the package ships (``proxy/fake.py``, ``firstparty fake-upstream``)."""

from proxy.fake import AJS_JS, HOP_BY_HOP, LIB_JS, SEG_EU_WORKSPACES, FakeUpstream, Recorded, segment_settings

__all__ = ["AJS_JS", "HOP_BY_HOP", "LIB_JS", "SEG_EU_WORKSPACES", "FakeUpstream", "Recorded", "segment_settings"]
