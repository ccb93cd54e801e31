import pytest
from tests.conftest import SEG_KEY
from tests.e2e.harness import drive, serve_segment_cdn, segment_calls
from tests.e2e.test_browser import goto, js, wait
pytestmark = pytest.mark.browser

@pytest.mark.parametrize("site", ["sync"], indirect=True)
async def test_dbg(site):
    serve_segment_cdn(site.upstream)
    pre = "window.__log=[]; (function(f){ window.fetch=function(u,i){ window.__log.push(['start',String(u), JSON.stringify(Object.keys(i||{})), String(i && i.keepalive)]); return f.apply(this,arguments).then(function(r){window.__log.push(['done',String(u),r.status]); return r;}, function(e){window.__log.push(['err',String(u),String(e)]); throw e;}); }; })(window.fetch);"
    page = site.segment_page("seg", SEG_KEY, post=pre + "analytics.page('Pricing');")
    run = await drive([goto(site, "www.site-a.test", page), {"op": "sleep", "ms": 3000},
        js("return window.__log;", "log")])
    print(run.describe())
    print(run.results)
    print(run.console)
