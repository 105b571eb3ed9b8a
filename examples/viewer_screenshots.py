"""The adapted graph in Model Explorer and in Netron, opened in headless Chromium, checked and pictured.

    python examples/viewer_screenshots.py [OUT_DIR]      # default: viewer-screenshots/

Needs the view extra (``pip install 'ia3fx[view]'``: Model Explorer and Netron) and chromium
(``.ci/setup`` installs all three). Adapts the built-in tiny Llama with PEFT's defaults, gives its
vectors values away from ones, and then:

1. writes the Model Explorer files (``ia3fx.view(ia3, dir, base=True, browser=False)``) and starts
   Model Explorer on them the way ``ia3fx view --base`` does (``python -m ia3fx.view DIR PORT``);
   checks that the page's address opens the adapted and the base graph side by side; opens layer 0's
   adapted projections with the k_proj scale node selected, and checks that Model Explorer's node
   panel shows ia3fx's attributes and each overlay's value, equal to the vector's statistics; then,
   side by side, that the base graph's k_proj linear feeds the next op where the adapted one's scale
   node does;
2. exports the unmerged model to ONNX, serves it with Netron, clicks the multiply named
   ``ia3/model.layers.0.self_attn.k_proj/output``, and checks Netron's node panel: the name, the
   vector's initializer, ia3fx's metadata.

Each view is saved as a PNG (``model-explorer.png``, ``model-explorer-base.png``, ``netron.png``):
the pictures in docs/visualization.md come from ``python examples/viewer_screenshots.py docs/images``
(with the Debian font ``fonts-wqy-microhei`` installed: Netron writes shapes in CJK angle brackets,
drawn as boxes without a font that has them). The script exits non-zero if a check fails.

Both viewers are JavaScript applications that lay the graph out after the page has loaded (Model
Explorer in WebGL, drawn here by SwiftShader; Netron in a web worker), so a screenshot taken when the
page has loaded shows a spinner. The browser is driven instead over the DevTools protocol (on a pipe,
standard library only): wait in real time until the view says it is ready, click, then capture.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import warnings

import torch

import ia3fx
from ia3fx.presets import build_preset
from ia3fx.view import OVERLAY_NAMES, OVERLAYS, write_model_explorer_files
from ia3fx.viz_stats import vector_stats

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notices
SIZE = (1400, 900)
LAYER = "model.layers.0.self_attn.k_proj"  # the layer both views open at


class Chromium:
    """Headless Chromium driven over the DevTools protocol on ``--remote-debugging-pipe``: JSON
    messages ending in NUL, commands on the browser's fd 3, replies and events on its fd 4."""

    def __init__(self, executable: str) -> None:
        to_browser, from_browser = os.pipe(), os.pipe()
        # the browser's ends, moved above 4 so that placing them at 3 and 4 cannot overwrite each other
        theirs = [fcntl.fcntl(to_browser[0], fcntl.F_DUPFD_CLOEXEC, 5), fcntl.fcntl(from_browser[1], fcntl.F_DUPFD_CLOEXEC, 5)]
        os.close(to_browser[0])
        os.close(from_browser[1])

        def at_3_and_4() -> None:  # in the child, before exec: dup2 leaves 3 and 4 open across it
            os.dup2(theirs[0], 3)
            os.dup2(theirs[1], 4)

        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--remote-debugging-pipe", "--hide-scrollbars",
             # WebGL (Model Explorer draws its graph with it) in software; --disable-gpu would turn it off
             "--enable-unsafe-swiftshader", "--use-angle=swiftshader", f"--window-size={SIZE[0]},{SIZE[1]}",
             "about:blank"],
            close_fds=False, preexec_fn=at_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in theirs:
            os.close(fd)
        self._out = os.fdopen(to_browser[1], "wb", buffering=0)
        self._in = os.fdopen(from_browser[0], "rb", buffering=0)
        self._buffer, self._id, self._session = b"", 0, None
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self._session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=SIZE[0], height=SIZE[1], deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, **params: object) -> dict:
        """Send one command and return its result (events that arrive meanwhile are dropped)."""
        self._id += 1
        message: dict = {"id": self._id, "method": method, "params": params}
        if self._session and not method.startswith("Target."):
            message["sessionId"] = self._session
        self._out.write(json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = self._in.read(1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium exited during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('exception', result['exceptionDetails'])}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120) -> object:
        """Poll ``expression`` until it is truthy (real time: the viewers lay out after load)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.js(f"(() => {{ try {{ return {expression}; }} catch (e) {{ return null; }} }})()")
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"not within {timeout} s: {expression}")

    def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: str) -> None:
        """The viewport as a PNG, in 64 colours when Pillow is there (small files for the docs)."""
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        try:
            from PIL import Image
        except ImportError:
            return
        Image.open(path).convert("RGB").quantize(64).save(path, optimize=True)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except RuntimeError:
            pass
        self.process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def scale_node(ia3, layer: str) -> str:
    """The FX name of the scale node on ``layer``: the node id in Model Explorer's graph."""
    graph = ia3fx.to_networkx(ia3)
    return next(n for n, a in graph.nodes(data=True) if a["role"] == "scale" and a["layer"] == layer)


PANES = "[...document.querySelectorAll('div.pane-container')].map(pane => pane.innerText)"


def show_panes(browser: Chromium, address: str, data: dict, panes: list[dict], wait_for: list[list[str]],
               out: str) -> list[str]:
    """Open Model Explorer with ``panes`` as its URL state; once each pane's text holds its
    ``wait_for`` strings, screenshot; return each pane's text (one line per label or value)."""
    page = f"{address}?data={urllib.parse.quote(json.dumps(dict(data, uiState={'paneStates': panes})))}"
    browser.call("Page.navigate", url=page)
    start = time.monotonic()
    ready = " && ".join(f"{PANES}[{i}].includes({json.dumps(t)})" for i, texts in enumerate(wait_for) for t in texts)
    browser.wait_for(f"{PANES}.length === {len(panes)} && {ready}")
    time.sleep(2)  # the panels fill in steps, and the canvas draws after them
    texts = [re.sub(r"[ \t]*\n\s*", "\n", t) for t in browser.js(PANES)]
    browser.screenshot(out)
    print(f"   {out}: drawn, opened and selected in {time.monotonic() - start:.1f} s")
    return texts


def model_explorer(browser: Chromium, ia3, directory: str, out: str, check) -> None:
    layer = LAYER
    files = write_model_explorer_files(ia3, directory, base=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ia3fx.view", directory, str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in server.stdout:  # Model Explorer prints the page's address once it serves
            if m := re.search(rf"http://localhost:{port}/\?data=\S+", line):
                url = m.group(0)
                break
        if url is None:
            raise RuntimeError(f"Model Explorer exited ({server.wait()}) without serving")
        address, query = url.split("?", 1)
        data = json.loads(urllib.parse.unquote(query[len("data="):]))
        adapted, base = data["uiState"]["paneStates"]  # what `ia3fx view --base` opens: adapted | base
        check([adapted["selectedGraphId"], base["selectedGraphId"]] == ["LlamaForCausalLM (adapted)",
                                                                        "LlamaForCausalLM (base)"],
              "ia3fx view --base: the adapted graph and the base graph side by side")
        # the same state, with layer 0's adapted projections open and the k_proj scale node selected
        opened = [f"model/layers/0/{p}" for p in ("self_attn/k_proj", "self_attn/v_proj", "mlp/down_proj")]
        adapted = dict(adapted, deepestExpandedGroupNodeIds=opened, selectedNodeId=scale_node(ia3, layer))
        (panel,) = show_panes(browser, address, data, [dict(adapted, widthFraction=1)],
                              [["ia3fx.placement", "NODE DATA PROVIDERS", *OVERLAY_NAMES.values()]], out)
        with open(files.graphs[1], encoding="utf-8") as f:
            base_nodes = len(json.load(f)["graphs"][0]["nodes"])
        site = next(s.node for s in ia3.call_sites if s.name == layer)  # the k_proj linear, in the base too
        base = dict(base, deepestExpandedGroupNodeIds=opened[:1], selectedNodeId=site)
        side = show_panes(browser, address, data, [dict(adapted, deepestExpandedGroupNodeIds=opened[:1]), base],
                          [["ia3fx.placement"], ["call_site", "OUTPUTS"]], out.replace(".png", "-base.png"))
    finally:
        server.terminate()
        server.wait(timeout=30)
    check(f"ia3fx.layer\n{layer}" in panel and "ia3fx.placement\noutput" in panel,
          f"Model Explorer's node panel: ia3fx.layer {layer}, ia3fx.placement output")
    check(f"{OVERLAY_NAMES['role']}\nattention-type scale (output)" in panel, "overlay 'ia3fx role': attention-type scale")
    stats = vector_stats(ia3.get_vector(layer))
    for overlay, key in OVERLAYS.items():
        if key is None:
            continue
        m = re.search(rf"{re.escape(OVERLAY_NAMES[overlay])}\n(-?[\d.]+(?:e-?\d+)?)", panel)
        shown = float(m.group(1)) if m else float("nan")
        check(abs(shown - stats[key]) < 1e-5, f"overlay {OVERLAY_NAMES[overlay]!r}: {shown} (the vector's {stats[key]:.6f})")
    check(side[1].startswith("LlamaForCausalLM_base | LlamaForCausalLM (base)")
          and "OUTPUTS (1)\n0\nview" in side[1] and "ia3" not in side[1].split("OUTPUTS")[1],
          f"side by side: in the base graph ({base_nodes} nodes) the k_proj linear feeds the view directly")
    check(side[0].startswith("LlamaForCausalLM_adapted |") and "OUTPUTS (1)\n0\nview" in side[0],
          "... and in the adapted graph the scale node does")


def netron_view(browser: Chromium, ia3, onnx_path: str, out: str, check) -> None:
    import netron

    layer = LAYER
    ia3fx.export(ia3, onnx_path, "onnx", merged=False, overwrite=True)
    port = free_port()
    netron.serve(onnx_path, None, ("localhost", port), browse=False)
    try:
        # Netron asks for consent to its usage statistics in a dialog that waits for a click
        browser.call("Network.enable")
        browser.call("Network.setCookie", name="consent", value="1", url=f"http://localhost:{port}/")
        browser.call("Page.navigate", url=f"http://localhost:{port}/")
        browser.wait_for("document.body.className === 'default' && document.querySelector('g.node') !== null")
        node = f"document.getElementById('node-name-ia3/{layer}/output')"
        browser.js(f"{node}.scrollIntoView({{block: 'center', inline: 'center'}})")
        time.sleep(0.5)
        x, y, w, _ = browser.js(f"(() => {{ const r = {node}.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }})()")
        browser.click(x + w / 2, y + 8)  # the node's title row
        # the panel's rows: a name (a read-only <input>) and its value
        rows = ("[...document.querySelectorAll('#sidebar .sidebar-item')].map(item => ["
                "item.querySelector('.sidebar-item-name input')?.value, "
                "item.querySelector('.sidebar-item-value-list')?.innerText])")
        rows = browser.wait_for(f"{rows}.some(r => r[0] === 'ia3fx.layer') && {rows}")
        browser.screenshot(out)
    finally:
        netron.stop(("localhost", port))
    shown = {name: (value or "").strip() for name, value in rows}
    check(shown.get("name") == f"ia3/{layer}/output", f"Netron's node panel: the Mul named ia3/{layer}/output")
    check(shown.get("B", "").endswith(f"name: ia3_l.{layer}.output"), f"... its input B: the initializer ia3_l.{layer}.output")
    check([shown.get(f"ia3fx.{k}") for k in ("role", "layer", "placement")] == ["scale", layer, "output"],
          "... and ia3fx's metadata: ia3fx.role scale, ia3fx.layer, ia3fx.placement output")


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = args[0] if args else "viewer-screenshots"
    os.makedirs(out, exist_ok=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("needs chromium (apt install chromium; .ci/setup installs it)")
        return 1
    failures: list[str] = []

    def check(cond: bool, what: str) -> None:
        print(f"  {'ok ' if cond else 'FAIL'} {what}")
        if not cond:
            failures.append(what)

    torch.manual_seed(0)
    ia3 = ia3fx.get_ia3_model(build_preset("tiny-llama"), ia3fx.IA3Config())
    with torch.no_grad():  # as if trained: each layer's vector away from ones, by its own amount
        for i, p in enumerate(ia3.ia3_l.parameters()):
            p.copy_(1 + (0.05 + 0.05 * i) * torch.randn_like(p))
    scratch = tempfile.mkdtemp(prefix="ia3fx-viewers-")  # the files the viewers open
    browser = Chromium(chromium)
    try:
        print("1. Model Explorer")
        model_explorer(browser, ia3, os.path.join(scratch, "model-explorer"),
                       os.path.join(out, "model-explorer.png"), check)
        print("2. Netron")
        netron_view(browser, ia3, os.path.join(scratch, "tiny-llama-unmerged.onnx"),
                    os.path.join(out, "netron.png"), check)
    finally:
        browser.close()
    shutil.rmtree(scratch, ignore_errors=True)  # this script's own temporary directory
    print(f"screenshots in {out}: model-explorer.png, model-explorer-base.png, netron.png")
    if failures:
        print(f"FAILED: {len(failures)} check(s) did not hold")
        return 1
    print("OK: Model Explorer and Netron show the adapter's nodes, attributes and vector statistics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
