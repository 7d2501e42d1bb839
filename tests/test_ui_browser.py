"""End to end in a real browser: ``medimesh demo`` (real Ray, oracle on Serve, PostgreSQL) and
its dashboard, driven by Selenium through Debian's headless Chromium.

One test walks every view while the federation trains; a second checks the page with the
oracle stopped. Screenshots of each view are saved (quantized, well under 200 KB) to
``$MEDIMESH_SCREENSHOTS`` when set (``docs/screenshots`` is made that way), else to the
test's temporary directory. Skipped only when Chromium or its driver is not installed
(``apt-get install chromium chromium-driver``).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium not installed (apt-get install chromium chromium-driver)",
)
ROUNDS = 12
MAX_SHOT_BYTES = 200_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, fn: Callable[[], T | None], timeout: float, proc: Any = None) -> T:
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` (and the demo's log)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except Exception:  # the page re-renders under us: stale or missing elements
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited ({proc.returncode})\n{_tail(proc)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{_tail(proc)}")
        time.sleep(0.25)


def _tail(proc: Any) -> str:
    log = getattr(proc, "log_path", None)
    if log is None or not Path(log).exists():
        return ""
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-25:])


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc), so the test can check they all stop."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _spawn(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "medimesh.cli", *args], cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    proc.log_path = log  # type: ignore[attr-defined]
    return proc


def _url(proc: subprocess.Popen[bytes], timeout: float) -> str:
    def find() -> str | None:
        m = re.search(r"^ui: (http://\S+)", Path(proc.log_path).read_text(errors="replace"),  # type: ignore[attr-defined]
                      re.MULTILINE)
        return m.group(1) if m else None

    return _wait("the UI URL on the command's output", find, timeout, proc)


def _run_id(proc: subprocess.Popen[bytes]) -> str:
    """The run id the demo printed ("run 20261129-1612-ab12 started in …")."""
    text = Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
    m = re.search(r"^run (\S+) started in", text, re.MULTILINE)
    assert m, f"no run id on the demo's output\n{text[-2000:]}"
    return m.group(1)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 45.0) -> int:
    """Ctrl-C, then make sure every process it started (Ray, Serve, workers) is gone."""
    family = _descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail(f"did not stop within {timeout:.0f} s of Ctrl-C\n{_tail(proc)}")
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.25)
    left = [p for p in family if _alive(p)]
    for p in left:  # ours: clean up before failing
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes left behind after Ctrl-C: {left}"
    return int(code)


# ------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[dev]'")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download drivers
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1200", "--lang=en-US"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("MEDIMESH_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _shot(driver: Any, folder: Path, name: str) -> Path:
    """A quantized PNG of the viewport (small enough to commit)."""
    from PIL import Image

    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)
    img = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    path = folder / f"{name}.png"
    img.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    assert path.stat().st_size < MAX_SHOT_BYTES, (path, path.stat().st_size)
    return path


def _css(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def _attr(driver: Any, selector: str, name: str) -> str | None:
    value = _css(driver, selector).get_attribute(name)
    return None if value is None else str(value)


def _tab(driver: Any, label: str) -> None:
    from selenium.webdriver.common.by import By

    tab = next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']")
               if b.text.strip() == label)
    tab.click()
    time.sleep(0.3)


# ---------------------------------------------------------------------------------- tests


def test_every_view_against_a_live_demo(
    browser: Any, shots: Path, start_pg: Callable[[Path], Any], tmp_path: Path
) -> None:
    """Diagnose, watch rounds arrive, draw the network, verify the audit chain — no reload."""
    pg = start_pg(tmp_path / "pg")
    demo = _spawn(
        ["demo", "--dataset", "rare", "--hospitals", "4", "--rounds", str(ROUNDS), "--pace",
         "1.5", "--port", str(_free_port()), "--ui-port", str(_free_port()),
         "--database-url", pg.get_uri()],
        tmp_path, tmp_path / "demo.log",
    )
    try:
        url = _url(demo, timeout=120)
        d = browser
        d.get(url)
        d.execute_script("window.__medimesh_same_page = true")
        _wait("the status banner to say connected",
              lambda: _attr(d, "#mm-status [data-status]", "data-status") == "connected", 30,
              demo)
        # The banner names the run the terminal printed (a reused store holds older runs).
        assert _attr(d, "#mm-status [data-status]", "data-run") == _run_id(demo)

        # Training: rounds arrive in the chart without a reload.
        _tab(d, "Training")

        def rounds() -> int:
            return int(_attr(d, "#mm-accuracy svg", "data-rounds") or 0)

        first = _wait("a first closed round in the chart", rounds, 40, demo)
        assert first < ROUNDS, "training finished before the browser could watch it"
        seen = _wait("two more rounds to appear",
                     lambda: rounds() if rounds() >= first + 2 else None, 30, demo)
        assert seen >= first + 2
        assert d.execute_script("return window.__medimesh_same_page === true")
        points = d.find_elements("css selector",
                                 "#mm-accuracy circle[data-series='top1']")
        assert len(points) >= 2
        _shot(d, shots, "training")

        # Network: hospitals, router, validator, coordinator; a metadata-only feed.
        _tab(d, "Network")
        roles = _wait("the topology drawing", lambda: sorted(
            {e.get_attribute("data-role") for e in
             d.find_elements("css selector", "#mm-topology .mm-node")}), 15, demo)
        assert {"hospital", "router", "validator", "coordinator"} <= set(roles)
        hospitals = d.find_elements("css selector", "#mm-topology .mm-node[data-role='hospital']")
        assert len(hospitals) == 4
        assert all(h.get_attribute("data-status") in ("live", "slow", "quarantined")
                   for h in hospitals)
        rows = int(_wait("routed messages in the feed",
                         lambda: _attr(d, "#mm-feed table", "data-feed-rows"), 15, demo) or 0)
        assert rows > 0
        header = [th.text for th in d.find_elements("css selector", "#mm-feed th")]
        assert header == ["time", "from", "to", "type", "size", "verdict"]
        _shot(d, shots, "network")

        # Wait for the last round, then diagnose with the final model.
        _wait("training to finish",
              lambda: "training done" in Path(tmp_path / "demo.log").read_text(), 60, demo)
        _tab(d, "Diagnose")
        example = _wait("the worked examples",
                        lambda: _css(d, "#mm-example-0") if _css(d, "#mm-example-0").is_displayed()
                        else None, 15, demo)
        assert "Gaucher" in example.text
        example.click()
        _wait("the example to fill the form",
              lambda: "Loaded" in _css(d, "#mm-result").text, 10, demo)
        _css(d, "#mm-diagnose").click()
        top = _wait("a ranked diagnosis",
                    lambda: _attr(d, "#mm-result .mm-dx", "data-top"), 15, demo)
        assert top == "Gaucher disease type 1"
        bars = d.find_elements("css selector", "#mm-result .mm-bar")
        probs = [float(b.get_attribute("data-probability")) for b in bars]
        assert len(probs) == 11 and probs == sorted(probs, reverse=True) and probs[0] > 0.5
        assert int(_attr(d, "#mm-result .mm-dx", "data-model-round") or 0) >= 1
        assert "findings that support it" in _css(d, "#mm-result").text
        _shot(d, shots, "diagnose")

        # Audit: verify the chain, search it, follow a model's provenance.
        _tab(d, "Audit")
        _css(d, "#mm-verify").click()
        verdict = _wait("the Verify result",
                        lambda: _attr(d, "#mm-verify-result [data-verify]", "data-verify"), 30,
                        demo)
        assert verdict == "ok" and "Chain verifies" in _css(d, "#mm-verify-result").text
        box = _css(d, "#mm-audit-query textarea, #mm-audit-query input")
        box.send_keys("setup_completed")
        _css(d, "#mm-audit-search").click()
        matches = _wait("audit search results",
                        lambda: _attr(d, "#mm-audit-table [data-matches]", "data-matches"), 15,
                        demo)
        assert int(matches or 0) >= 1
        updates = _wait("the newest model's provenance",
                        lambda: _attr(d, "#mm-provenance .mm-prov", "data-updates"), 15, demo)
        assert int(updates or 0) >= 1
        _shot(d, shots, "audit")
        assert d.execute_script("return window.__medimesh_same_page === true")
    finally:
        try:
            code = _stop(demo)
        finally:
            pg.cleanup()
    assert code == 0, _tail(demo)


def test_training_chart_compares_isolated_models_on_all_sites(
    browser: Any, shots: Path, start_pg: Callable[[Path], Any], tmp_path: Path
) -> None:
    """The chart draws each hospital alone on all sites' test patients beside the federated
    line (own-site score in the tooltip); the banner names the demo's run."""
    pg = start_pg(tmp_path / "pg")
    demo = _spawn(
        ["demo", "--dataset", "rare", "--hospitals", "3", "--rounds", "3", "--pace", "0",
         "--port", str(_free_port()), "--ui-port", str(_free_port()),
         "--database-url", pg.get_uri()],
        tmp_path, tmp_path / "demo.log",
    )
    try:
        url = _url(demo, timeout=120)
        d = browser
        d.get(url)
        _wait("the banner to name the demo's run",
              lambda: _attr(d, "#mm-status [data-status]", "data-run") == _run_id(demo), 30,
              demo)
        assert _run_id(demo) in _css(d, "#mm-status").text
        _tab(d, "Training")
        lines = _wait(
            "the isolated-on-all-sites reference lines",
            lambda: d.find_elements("css selector",
                                    "#mm-accuracy g.mm-baseline[data-series='isolated-all-sites']"),
            40, demo)
        assert len(lines) == 3
        legend = _css(d, "#mm-accuracy g.mm-legend[data-series='isolated-all-sites']")
        assert legend.text == "one hospital alone (top-1)"
        tips = [line.find_element("css selector", "title").get_attribute("textContent")
                for line in lines]
        assert all("on all sites' test patients" in t and "on its own test patients" in t
                   for t in tips), tips
        assert all(0.0 <= float(line.get_attribute("data-top1")) <= 1.0 for line in lines)
        table = _css(d, "#mm-rounds table[data-table='baselines']")
        assert len(table.find_elements("css selector", "tr[data-site]")) == 3
        assert _css(d, "#mm-accuracy g.mm-legend[data-series='top1']").text.startswith(
            "top-1 (federated")
        _shot(d, shots, "training-baselines")
    finally:
        try:
            code = _stop(demo)
        finally:
            pg.cleanup()
    assert code == 0, _tail(demo)


def test_page_loads_and_says_so_when_the_oracle_is_down(
    browser: Any, shots: Path, tmp_path: Path
) -> None:
    """No oracle listening: the page still loads and shows 'Oracle unreachable'."""
    dead = f"http://127.0.0.1:{_free_port()}"
    ui = _spawn(["ui", "--api", dead, "--port", str(_free_port())], tmp_path,
                tmp_path / "ui.log")
    try:
        browser.get(_url(ui, timeout=60))
        status = _wait("the unreachable banner",
                       lambda: _attr(browser, "#mm-status [data-status]", "data-status")
                       == "unreachable" and _css(browser, "#mm-status").text, 20, ui)
        assert "Oracle unreachable" in status and dead in status
        _css(browser, "#mm-diagnose").click()
        result = _wait("the diagnose error", lambda: _css(browser, "#mm-result .mm-error").text,
                       10, ui)
        assert result.startswith(f"Oracle unreachable at {dead}") and "Traceback" not in result
        _shot(browser, shots, "unreachable")
    finally:
        code = _stop(ui, timeout=20)
    assert code == 0, _tail(ui)


def _pick(driver: Any, elem_id: str, text: str, option: str) -> None:
    """Type into a Gradio multiselect dropdown and click the option labelled ``option``."""
    from selenium.webdriver.common.keys import Keys

    box = _css(driver, f"#{elem_id} input")
    box.click()
    box.send_keys(text)
    item = _wait(f"the option {option!r}",
                 lambda: _css(driver, f"#{elem_id} li[aria-label='{option}']"), 10)
    item.click()
    time.sleep(0.3)
    box.send_keys(Keys.ESCAPE)


def test_diagnose_marks_a_finding_absent_and_reads_ood_next_tests_and_against(
    browser: Any, shots: Path, live_oracle: str, tmp_path: Path
) -> None:
    """The dashboard (``medimesh ui``) on a real oracle: mark a finding ABSENT, say genetic
    testing was not done, submit a record with no observed finding (no training patient had
    none, so the out-of-distribution flag must be up), and read the flag, the suggested next
    tests and an "argues against" row naming the absent finding."""
    from selenium.webdriver.common.by import By

    ui = _spawn(["ui", "--api", live_oracle, "--port", str(_free_port())], tmp_path,
                tmp_path / "ui.log")
    try:
        d = browser
        d.get(_url(ui, timeout=60))
        _wait("the status banner to say connected",
              lambda: _attr(d, "#mm-status [data-status]", "data-status") == "connected", 30, ui)
        _wait("the vocabulary (worked examples shown)",
              lambda: _css(d, "#mm-example-0").is_displayed(), 20, ui)
        _pick(d, "mm-excluded", "HP:0001744", "Splenomegaly (HP:0001744)")
        chosen = _wait("the absent finding to be chosen",
                       lambda: "Splenomegaly" in _css(d, "#mm-excluded").text, 10, ui)
        assert chosen
        no = next(e for e in d.find_elements(By.CSS_SELECTOR, "#mm-genetic label")
                  if e.text.strip() == "not done")
        no.click()
        _css(d, "#mm-diagnose").click()
        _wait("a ranked diagnosis", lambda: _attr(d, "#mm-result .mm-dx", "data-top"), 20, ui)
        assert _attr(d, "#mm-result [data-ood]", "data-ood") == "true"
        reasons = [e.get_attribute("data-ood-kind")
                   for e in d.find_elements(By.CSS_SELECTOR, "#mm-result [data-ood-kind]")]
        assert "few_findings" in reasons, reasons
        assert "Outside what the model was trained on" in _css(d, "#mm-result .mm-ood").text
        tests = d.find_elements(By.CSS_SELECTOR, "#mm-result [data-next-test]")
        assert 1 <= len(tests) <= 5
        assert "Suggested next tests" in _css(d, "#mm-result").text
        kinds = {t.get_attribute("data-kind") for t in tests}
        assert kinds <= {"symptom", "biomarker", "genetic_test"}
        against = d.find_elements(By.CSS_SELECTOR, "#mm-result tr[data-evidence='against']")
        assert against and "Argues against" in _css(d, "#mm-result").text
        # The absent finding is accounted for in every explained candidate (its own row when
        # it weighs among the top five, and always in the totals by kind).
        groups = d.find_elements(By.CSS_SELECTOR, "#mm-result tr[data-group='excluded']")
        assert len(groups) == 3 and all("symptoms marked absent (1)" in g.text for g in groups)
        absent = [r for r in d.find_elements(By.CSS_SELECTOR, "#mm-result tr[data-evidence]")
                  if r.get_attribute("data-status") == "excluded"]
        assert all("Splenomegaly" in r.text and "absent (excluded)" in r.text for r in absent)
        text = _css(d, "#mm-result").text
        assert "logit" not in text and re.search(r"odds [×÷]", text)
        # The biomarker table shows full names and no internal key column.
        headers = [th.text.strip() for th in d.find_elements(By.CSS_SELECTOR, "#mm-markers th")]
        assert "key" not in headers
        assert "Hexosaminidase A (% of total hexosaminidase)" in _css(d, "#mm-markers").text
        _shot(d, shots, "diagnose-absent")
    finally:
        code = _stop(ui, timeout=20)
    assert code == 0, _tail(ui)
