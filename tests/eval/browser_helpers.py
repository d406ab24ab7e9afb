"""Test helpers: parse generated HTML, and render pages in a real headless browser (Debian's chromium).

Rendering uses `chromium --headless --dump-dom URL`, which prints the DOM after the page's scripts
ran, with `--enable-logging=stderr --v=0` so that console messages and uncaught errors show on
stderr as lines like `[...:INFO:CONSOLE:12] "Uncaught ReferenceError: ...", source: file:///... (12)`.
No Python websocket client is needed (the DevTools protocol is not used).
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM_INSTALL_HINT = "install it with `apt-get install -y chromium` (Debian's package) to run the browser tests"

# Flags that keep a headless chromium quiet and quick on a closed network: no sandbox (root in a
# container), no GPU, no QUIC, no first-run UI, no background fetches, component updates or sync.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def chromium_executable() -> str | None:
    """Path of the chromium binary, or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class RenderedPage:
    """What the browser made of a page: its DOM after scripts ran, and its console output."""

    dom: str
    console: list[str]
    """stderr lines with console messages (CONSOLE) or uncaught errors."""


def render_pages(paths: list[Path], profile_root: Path, timeout: float = 60) -> list[RenderedPage]:
    """Load each local file in its own headless chromium (all at once, to save time) and return the
    rendered DOMs and console messages, in the order of `paths`."""
    executable = chromium_executable()
    if executable is None:
        raise RuntimeError(f"chromium not found; {CHROMIUM_INSTALL_HINT}")
    processes = []
    for index, path in enumerate(paths):
        command = [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile_root / f'profile-{index}'}",
                   "--enable-logging=stderr", "--v=0", "--dump-dom", Path(path).resolve().as_uri()]
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          encoding="utf-8", errors="replace"))
    pages = []
    for process in processes:
        try:
            dom, log = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"chromium exited with {process.returncode}:\n{log[-3000:]}")
        console = [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
        pages.append(RenderedPage(dom, console))
    return pages


@dataclass
class Element:
    """A start tag seen by `parse_html`, with the text directly and indirectly inside it."""

    tag: str
    attributes: dict[str, str | None]
    text: str = ""
    children: list[Element] = field(default_factory=list)


class _TreeParser(HTMLParser):
    """Builds a light element list and checks that every non-void element is closed in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.open: list[Element] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        element = Element(tag, dict(attrs))
        self.elements.append(element)
        if self.open:
            self.open[-1].children.append(element)
        if tag not in VOID_ELEMENTS:
            self.open.append(element)

    def handle_startendtag(self, tag, attrs):
        element = Element(tag, dict(attrs))
        self.elements.append(element)
        if self.open:
            self.open[-1].children.append(element)

    def handle_endtag(self, tag):
        if not self.open or self.open[-1].tag != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1].tag if self.open else 'nothing'}")
            return
        self.open.pop()

    def handle_data(self, data):
        for element in self.open:
            element.text += data


def parse_html(text: str) -> list[Element]:
    """Every element of an HTML document, in document order; AssertionError if tags are unbalanced."""
    parser = _TreeParser()
    parser.feed(text)
    parser.close()
    assert not parser.errors, parser.errors[:5]
    assert not parser.open, f"unclosed elements: {[element.tag for element in parser.open]}"
    return parser.elements


def svg_fragments(text: str) -> list[ElementTree.Element]:
    """Each inline <svg>...</svg> of a page, parsed as XML (so malformed SVG fails here)."""
    fragments, start = [], text.find("<svg")
    while start != -1:
        end = text.index("</svg>", start) + len("</svg>")
        fragments.append(ElementTree.fromstring(text[start:end]))
        start = text.find("<svg", end)
    return fragments
