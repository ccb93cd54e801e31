"""Identity, completed, in a real browser (mixpanel-browser in chromium): a
visitor lands on site A from a search with a campaign, `register()`s a
carried property, and goes to site B through /mp/go. Site B's events reach
Mixpanel with the carried property and site A's first touch (the search, not
site A); an unrelated browser on B never receives the first one's property."""

from __future__ import annotations

import pytest

from tests.e2e.harness import Site, drive, event_named
from tests.support import A_HOST, B_HOST, FAST, LANDING, browser_clean, event, go_href, goto, js, wait

pytestmark = pytest.mark.browser

SEARCH = "https://www.google.com/search?q=running+shoes"


@pytest.mark.parametrize(
    "xsite", [{"mode": "spool", "identity": {"carry_properties": ["plan", "ab_*"]}}], indirect=True, ids=["spool"]
)
async def test_carried_property_and_first_touch_reach_site_b(xsite: Site) -> None:
    site = xsite
    a = site.page("a", FAST, body=f'<a id="go" href="{go_href(site)}">Checkout</a>')
    site.page("b", FAST)
    landing = a + "?utm_source=google&utm_medium=cpc&utm_campaign=spring"
    run = await drive(
        [
            {**goto(site, A_HOST, landing), "referer": SEARCH},
            js("mixpanel.register({plan: 'pro', ab_checkout: 'blue'}); mixpanel.track('Page A');"
               " return {ref: mixpanel.get_property('$initial_referring_domain')};", "a"),
            wait("/mp/track/", event("Page A")),
            {"op": "click", "selector": "#go"},
            {"op": "wait_url", "pattern": LANDING},
            js("mixpanel.track('Page B');"
               " return {ref: mixpanel.get_property('$initial_referring_domain'), plan: mixpanel.get_property('plan')};", "b"),
            wait("/mp/track/", event("Page B")),
            # Someone else, on B.
            {"op": "new_context"},
            goto(site, B_HOST, "/e2e/b"),
            js("mixpanel.track('Stranger');"),
            wait("/mp/track/", event("Stranger")),
        ]
    )
    browser_clean(run)
    # What the SDK on B itself holds: its own first touch is site A, and no plan.
    assert run["b"]["ref"] == f"{A_HOST}:{site.port}" and run["b"].get("plan") is None  # the SDK keeps the port
    assert run["a"]["ref"] == "www.google.com"
    page_b = (await event_named(site.upstream, "Page B"))["properties"]
    assert page_b["plan"] == "pro" and page_b["ab_checkout"] == "blue"  # carried from A
    assert page_b["$initial_referring_domain"] == "www.google.com"  # A's first touch, not A
    assert page_b["$initial_referrer"].startswith("https://www.google.com/")
    stranger = (await event_named(site.upstream, "Stranger"))["properties"]
    assert "plan" not in stranger and "ab_checkout" not in stranger
    assert stranger["$device_id"] != page_b["$device_id"]
