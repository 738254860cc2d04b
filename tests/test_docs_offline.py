"""/docs (Swagger UI) and /redoc (ReDoc) work offline: every asset comes from the server itself
(the fastapi-offline package's copies), and the pages render in a browser that can reach nothing
else."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest
from test_demo_page import WAIT_MS, browser  # noqa: F401  (the module's chromium fixture)

from server.app import DOCS_ASSETS

REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


class _Refs(HTMLParser):
    """Every URL a page loads by itself: src and href attributes, and url('…') in the script."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "spec-url") and value:
                self.urls.append(value)

    def handle_data(self, data):
        self.urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", data)


def page_urls(html: str) -> list[str]:
    p = _Refs()
    p.feed(html)
    return p.urls


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_only_the_servers_own_assets(client, page):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = page_urls(r.text)
    assert "/openapi.json" in urls and any(u.endswith(".js") for u in urls), urls
    for u in urls:
        assert urlsplit(u).scheme == "" and urlsplit(u).netloc == "" and u.startswith("/"), u
        asset = client.get(urljoin(str(client.base_url), u))
        ext = "." + u.rsplit(".", 1)[-1]
        assert asset.status_code == 200, u
        assert CONTENT_TYPES[ext] in asset.headers["content-type"], (u, asset.headers["content-type"])
        if ext == ".js":
            assert len(asset.content) > 100_000  # the real bundle, not a stub
    assert "cdn" not in r.text.lower() and "googleapis" not in r.text.lower()
    assert any(u.startswith(DOCS_ASSETS + "/") for u in urls)


def _offline_page(browser, url: str):  # noqa: F811
    """A page whose every request to another origin is aborted (and recorded)."""
    context = browser.new_context()
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
    outside: list[str] = []

    def route(r):
        if r.request.url.startswith(origin + "/"):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return context, page, outside, errors


def test_swagger_ui_renders_with_no_network_beyond_the_server(browser, server):  # noqa: F811
    context, page, outside, errors = _offline_page(browser, server.url)
    try:
        page.goto(server.url + "/docs")
        page.wait_for_selector(".swagger-ui .info .title", timeout=WAIT_MS)
        assert "s4serve" in page.text_content(".swagger-ui .info .title")
        page.wait_for_selector(".opblock-summary-path", timeout=WAIT_MS)
        paths = {p.strip() for p in page.locator(".opblock-summary-path").all_text_contents()}
        assert {"/v1/generate", "/v1/models", "/v1/sessions/{session_id}"} <= {
            p.replace("\u200b", "") for p in paths
        }
        # an operation opens and shows its request body schema
        page.locator(".opblock-summary-path", has_text="/v1/generate").first.click()
        page.wait_for_selector(
            ".opblock.is-open .body-param, .opblock.is-open .model-example", timeout=WAIT_MS
        )
        assert outside == [] and errors == []
    finally:
        context.close()


def test_redoc_renders_with_no_network_beyond_the_server(browser, server):  # noqa: F811
    context, page, outside, errors = _offline_page(browser, server.url)
    try:
        page.goto(server.url + "/redoc")
        page.wait_for_selector("h1", timeout=WAIT_MS)
        page.wait_for_function("() => document.body.innerText.includes('/v1/generate')", timeout=WAIT_MS)
        assert "s4serve" in page.text_content("h1")
        # The one request ReDoc 2's bundle makes elsewhere is the logo of its "API docs by Redocly" menu
        # footer (an <img> that hides itself when it cannot load); nothing the page needs.
        assert set(outside) <= {REDOC_LOGO}, outside
        assert [e for e in errors if "Failed to load resource" not in e] == []
        assert page.locator("img[alt='redocly logo']").count() == 0  # hidden offline
    finally:
        context.close()
