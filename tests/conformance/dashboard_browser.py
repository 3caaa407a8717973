"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Run by .ci/dashboard.sh in a throwaway virtual environment; seeds a room on its own broker,
checks what a human would see, clicks Pause, and saves a screenshot to artifacts/dashboard.png.
"""
import os
import sys
import tempfile

from playwright.sync_api import sync_playwright

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
from helpers import BrokerProcess  # noqa: E402

MARKUP = '<img src=x onerror="document.title=1"><b>bold</b>'
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def check(condition, what):
    if not condition:
        raise SystemExit(f"FAILED: {what}")
    print(f"  ok: {what}")


def seed(broker):
    """An architect, two workers, a graph with done, claimed, ready and blocked tasks, a blocker, a lock."""
    root = tempfile.mkdtemp(prefix="ctl-dash-")
    architect = broker.join("planner", role="architect", root=root, summary="planning the checkout flow")
    builder = broker.join("builder", root=root, summary=MARKUP)
    tester = broker.join("tester", root=root, summary="writing tests")
    schema = architect.ok("POST", "/tasks", {"title": "Design the schema"})
    api = architect.ok("POST", "/tasks", {"title": "Build the API", "depends_on": [schema["id"]]})
    ui = architect.ok("POST", "/tasks", {"title": "Build the UI", "depends_on": [schema["id"]]})
    architect.ok("POST", "/tasks", {"title": "End-to-end tests", "depends_on": [api["id"], ui["id"]]})
    builder.ok("POST", "/tasks/claim", {"task_id": schema["id"]})
    builder.ok("POST", "/tasks/complete", {"task_id": schema["id"], "summary": "schema.sql with orders and items"})
    builder.ok("POST", "/tasks/claim", {"task_id": api["id"]})
    builder.ok("POST", "/locks", {"path": "api/orders.py", "reason": "building the API"})
    architect.ok("POST", "/memory", {"key": "db", "value": "SQLite, one file"})
    tester.ok("POST", "/messages", {"to": "builder", "content": "Which port does the API use?", "category": "question"})
    tester.ok("POST", "/messages", {"to": "builder", "content": "Cannot run tests: fixtures missing", "category": "blocker"})
    return root


def main():
    broker = BrokerProcess(env={"CTL_RATE_LIMIT": "1000"}).start()
    artifacts = os.path.join(ROOT, "artifacts")
    os.makedirs(artifacts, exist_ok=True)
    try:
        seed(broker)
        other = tempfile.mkdtemp(prefix="ctl-dash-other-")
        broker.join("solo", root=other, summary="another project entirely")
        rooms = {r["name"]: r["id"] for r in broker.rooms()}
        shop = next(room for name, room in rooms.items() if "other" not in name)
        elsewhere = next(room for name, room in rooms.items() if "other" in name)
        operator = broker.secret("operator.token")
        base = f"http://127.0.0.1:{broker.port}/"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            problems = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
            response = page.goto(f"{base}#token={operator}")
            csp = response.headers.get("content-security-policy", "")
            check("default-src 'none'" in csp and "unsafe-inline" not in csp, "served with a strict CSP")
            page.wait_for_selector("#rooms tr[data-room]", timeout=10_000)
            check("token" not in page.url, "the token is dropped from the address bar")
            overview = page.locator("#rooms").inner_text()
            check(len(rooms) == 2 and all(name in overview for name in rooms), "the overview lists both rooms")
            check("1/4" in page.locator(f"#rooms tr[data-room='{shop}']").inner_text(), "with tasks done of total")
            check(page.locator("#viewer").inner_text() == "operator", "the operator is named as such")
            page.screenshot(path=os.path.join(artifacts, "dashboard-rooms.png"), full_page=True)
            page.locator(f"#rooms tr[data-room='{shop}'] a").click()
            page.wait_for_selector("tr[data-peer='tester']", timeout=10_000)
            check(page.url.endswith(f"#room={shop}"), "the URL names the room")
            names = page.locator("#peers tr").all_inner_texts()
            check(all(any(n in row for row in names) for n in ("planner", "builder", "tester")), "all three peers shown")
            check(not any("solo" in row for row in names), "another room's peer is not shown")
            statuses = {t: page.locator(f".card[data-task] >> text={t}").count() for t in ("Design the schema", "End-to-end tests")}
            check(all(statuses.values()), "the tasks appear in the graph")
            for status in ("done", "claimed", "ready", "blocked"):
                check(page.locator(f".card.st-{status}").count() >= 1, f"a {status} task is shown as {status}")
            check("waiting on" in page.locator(".card.st-blocked").first.inner_text(), "blocked tasks say what they wait on")
            blocker = page.locator(".msg.blocker")
            check(blocker.count() == 1 and "fixtures missing" in blocker.inner_text(), "the blocker is highlighted")
            builder_row = page.locator("tr[data-peer='builder']")
            check(MARKUP in builder_row.inner_text(), "markup in a peer summary is shown as text")
            check(builder_row.locator("b, img").count() == 0 and page.title() == "Control Tower Lite",
                  "markup in a peer summary is not rendered or run")
            check("api/orders.py" in page.locator("#locks").inner_text(), "the lock is listed")
            check(page.locator("#blockers").is_visible() and page.locator("label[for=filter]").inner_text() == "Show messages of",
                  "the filter is labelled and the blocker pill shows only with blockers")
            page.screenshot(path=os.path.join(artifacts, "dashboard.png"), full_page=True)
            pause = page.get_by_role("button", name="Pause").element_handle()
            seen_before = page.locator("tr[data-peer='tester'] td:nth-child(4)").inner_text()
            page.wait_for_timeout(2500)
            check(pause.evaluate("button => button.isConnected"), "buttons survive polls (no click lost to a redraw)")
            check(page.locator("tr[data-peer='tester'] td:nth-child(4)").inner_text() != seen_before, "last seen keeps ticking")
            page.get_by_role("button", name="Pause").click()
            page.wait_for_selector("#roomstate.st-paused", timeout=5_000)
            check("PAUSED" in page.locator("#roomstate").inner_text(), "a paused room is unmistakable: a banner")
            state = broker.operator(shop).ok("GET", "/state")
            check(state["room"]["state"] == "paused", "clicking Pause pauses that room's broker state")
            check(broker.operator(elsewhere).ok("GET", "/state")["room"]["state"] == "running", "and not the other room")
            broker.join("late", root=state["room"]["root"]).send("planner", "sent while paused")
            page.wait_for_selector(".msg.held", timeout=5_000)
            check("held until resumed" in page.locator(".msg.held").first.inner_text(), "held messages are marked held")
            page.screenshot(path=os.path.join(artifacts, "dashboard-paused.png"), full_page=True)
            check(not problems, f"no console errors or dialogs ({problems})")
            observer = browser.new_page()
            observer.goto(f"{base}#token={broker.secret('observer.token')}&room={shop}")
            observer.wait_for_selector("tr[data-peer='tester']", timeout=10_000)
            check(observer.locator("#controls button").count() == 0 and observer.locator("#inject").is_hidden()
                  and observer.locator("#peers button, #locks button, #graph button").count() == 0,
                  "an observer sees no controls at all")
            observer.screenshot(path=os.path.join(artifacts, "dashboard-observer.png"), full_page=True)
            stranger = browser.new_page()
            stranger.goto(f"{base}#token=not-a-real-token")
            stranger.wait_for_selector("#gate:not([hidden])", timeout=10_000)
            text = stranger.locator("#gate").inner_text().lower()
            check("no longer works" in text and "launch.py" in text and "rejoin" not in text
                  and stranger.locator("#app").is_hidden(), "a bad token gets a clear page for a person")
            stranger.screenshot(path=os.path.join(artifacts, "dashboard-bad-token.png"))
            local = browser.new_page()
            local.goto("file://" + os.path.join(ROOT, "ctl", "dashboard.html"))
            check("launch.py" in local.locator("#gate").inner_text(), "opened from disk, it says how to open it")
            broker.stop()
            page.wait_for_selector("#banner.show", timeout=10_000)
            check("not answering" in page.locator("#banner").inner_text(), "an unreachable broker is shown")
            broker.start()
            page.wait_for_selector("#banner:not(.show)", state="attached", timeout=10_000)
            check(True, "the page recovers by itself when the broker is back")
            browser.close()
    finally:
        broker.cleanup()
    print(f"Dashboard browser check: 1 passed, 0 failed (screenshots in {artifacts})")


if __name__ == "__main__":
    main()
