"""Opens an HTML page in headless Chromium and reports what a reader would meet: its images
(loaded or not) and its console messages (errors included)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from html import unescape
from pathlib import Path

#: Flags that work as root in a container: no sandbox, GPU, network or profile reuse.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=10000",
]

# Runs first: records console.error/warn calls and uncaught errors; after load, writes the
# images and what it recorded into the body's data-check attribute for --dump-dom.
PROBE = """<script>
window.__seen = [];
for (const level of ["error", "warn"]) {
  const original = console[level];
  console[level] = (...args) => {
    window.__seen.push(level + ": " + args.join(" "));
    original(...args);
  };
}
window.addEventListener(
  "error", (e) => window.__seen.push("error: " + (e.message || e.target.src)), true
);
window.addEventListener("load", () => {
  const images = [...document.images].map((i) => [i.getAttribute("src"), i.naturalWidth]);
  document.body.setAttribute("data-check", JSON.stringify({images, seen: window.__seen}));
});
</script>"""


@dataclass
class PageCheck:
    images: list[tuple[str, int]]  # src, naturalWidth (0: not loaded)
    console: list[str]  # what the page wrote to the console or threw


def chromium() -> str:
    """The Chromium binary; AssertionError (not a skip) when it is missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Chromium is missing: 'make setup' installs Debian's chromium package"
    return found


def open_page(page: Path, timeout: float = 60.0) -> PageCheck:
    """Load ``page`` (a copy with the probe, beside it so relative links resolve) and check it."""
    copy = page.with_name(f".check-{page.name}")
    text = page.read_text()
    copy.write_text(re.sub(r"(<head[^>]*>)", lambda m: m.group(1) + PROBE, text, count=1))
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", copy.as_uri()],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    copy.unlink()
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'data-check="([^"]*)"', done.stdout)
    assert found, f"the page never finished loading: {done.stdout[:500]!r}"
    check = json.loads(unescape(found.group(1)))
    logged = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return PageCheck([(src, int(w)) for src, w in check["images"]], [*check["seen"], *logged])
