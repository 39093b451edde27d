"""The gMAD study web app on a real `gmad search` output: a participant in headless chromium
(selenium + chromedriver) answers by keyboard, the server is SIGKILLed and restarted, the
participant resumes; hostile paths and malformed answers get 4xx; concurrent participants; the
schedule; database/pairs mismatches are clear errors."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from gmad_fixtures import browser, make_scored
from liqe_dist.gmad.pairs import read_pairs
from liqe_dist.gmad.report import run_gmad
from liqe_dist.gmad.search import GMADError, LevelRule
from liqe_dist.gmad.study_db import StudyDB, StudyError, StudySettings, schedule

SECRET = "top-secret-do-not-serve"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    """`gmad search` output (pairs.csv + images/) over the shared scored corpus, and a file beside
    it that no request may reach."""
    root, _ = make_scored(tmp_path_factory.mktemp("study"))
    run_gmad(root / "scores", ["a", "b", "c"], LevelRule(levels=4), root / "g")
    (root / "g" / "secret.txt").write_text(SECRET)
    (root / "secret.txt").write_text(SECRET)
    return root / "g"


class Server:
    """`liqe-dist gmad study` in a subprocess on a free port."""

    def __init__(self, pairs: Path, db: Path, *extra: str, cwd: Path | None = None) -> None:
        self.db = db
        self.tokens: dict[str, str] = {}
        env = dict(os.environ, PYTHONPATH=str(REPO))  # the package of this checkout, whatever the cwd
        self.proc = subprocess.Popen([sys.executable, "-m", "liqe_dist.cli", "gmad", "study", str(pairs),
                                      "--db", str(db), "--port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)
        deadline = time.time() + 60
        self.output = []
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if found:
                self.port = int(found.group(1))
                self.url = found.group(0)
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained
                return
        self.proc.kill()
        raise AssertionError("study server did not start:\n" + "".join(self.output))

    def request(self, method: str, path: str, body: str | bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes, dict]:
        """Send ``path`` exactly as given (no client-side normalisation of ../ or %2e)."""
        con = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        hdrs = dict(headers or {})
        if isinstance(body, str):
            body = body.encode()
            hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
        con.putrequest(method, path, skip_accept_encoding=True, skip_host="Host" in hdrs)  # a Host given replaces it
        for k, v in hdrs.items():
            con.putheader(k, v)
        con.putheader("Content-Length", str(len(body or b"")))
        con.endheaders(body)
        resp = con.getresponse()
        data = resp.read()
        con.close()
        return resp.status, data, dict(resp.getheaders())

    def token(self, path: str) -> str:
        """The form token the page a browser would have open shows ('' if there is no such page):
        the welcome page's for /start, the participant's page's for /p/<id>/..."""
        page = "/" if path == "/start" else "/".join(path.split("/")[:3])
        if page not in self.tokens:
            status, data, _ = self.request("GET", page)
            found = re.search(rb'name="token" value="([0-9a-f]+)"', data) if status == 200 else None
            if found is None:
                return ""
            self.tokens[page] = found.group(1).decode()
        return self.tokens[page]

    def post(self, path: str, **form) -> int:
        """POST ``form`` as the page's form would, with its token."""
        form.setdefault("token", self.token(path))
        return self.request("POST", path, urllib.parse.urlencode(form))[0]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def server(pairs_dir, tmp_path):
    # a relative pairs path, as the README's commands give it
    s = Server(Path("pairs.csv"), tmp_path / "study.sqlite", "--repeat-fraction", "0.25", cwd=pairs_dir)
    yield s
    s.stop()


def db_rows(db: Path, participant: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT a.position, a.answer, a.chosen, t.left, t.pair, a.response_ms FROM answers a "
                           "JOIN trials t USING (participant, position) WHERE participant = ? ORDER BY a.position",
                           (participant,)).fetchall()
    finally:
        con.close()


def test_schedule_shows_every_pair_and_repeats_after_a_gap():
    ids = list(range(40))
    settings = StudySettings(repeat_fraction=0.2, repeat_gap=3, seed=7)
    trials = schedule(ids, "ann", settings)
    assert schedule(ids, "ann", settings) == trials                 # reproducible
    assert schedule(ids, "bob", settings) != trials                 # each participant has their own order
    firsts = [p for p, rep, _ in trials if not rep]
    repeats = [(k, p) for k, (p, rep, _) in enumerate(trials) if rep]
    assert sorted(firsts) == ids and len(repeats) == 8 and len(trials) == 48
    for k, p in repeats:
        first = next(i for i, (q, rep, _) in enumerate(trials) if q == p and not rep)
        assert k - first > 3
    lefts = [left for _, _, left in trials]
    assert 12 < lefts.count("best") < 36                            # both sides used, at random
    assert not [t for t in schedule(ids, "ann", StudySettings(repeat_fraction=0)) if t[1]]
    for seed in range(50):  # few pairs, a long gap: fewer repeats, never a shorter gap
        short = schedule([0, 1, 2, 3], "x", StudySettings(repeat_fraction=1.0, repeat_gap=2, seed=seed))
        positions = {(p, rep): k for k, (p, rep, _) in enumerate(short)}
        repeated = [p for p, rep in positions if rep]
        assert len(short) == 6 and len(repeated) == 2
        assert all(positions[p, True] - positions[p, False] > 2 for p in repeated)


@pytest.mark.slow
def test_participant_answers_by_keyboard_in_chromium_and_resumes_after_the_server_is_killed(pairs_dir, tmp_path,
                                                                                           monkeypatch):
    chromium, why = browser()
    driver_path, why_driver = browser(driver=True)
    if chromium is None or driver_path is None:
        pytest.skip(f"no chromium/chromedriver: {why or why_driver}")
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    db = tmp_path / "study.sqlite"
    server = Server(pairs_dir / "pairs.csv", db, "--repeat-fraction", "0.25")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let selenium look for a driver online
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    body = lambda: driver.find_element(By.TAG_NAME, "body")  # noqa: E731
    wait = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,))

    def ready_at(position: int, practice: str = "0") -> None:
        # one script reads all three, so a page being replaced cannot mix two pages' values
        state = "const b = document.body.dataset; return [b.position, b.practice, b.ready];"
        wait.until(lambda d: d.execute_script(state) == [str(position), practice, "1"])

    try:
        driver.get(server.url)
        driver.find_element(By.ID, "participant").send_keys("obs-1" + Keys.ENTER)
        ready_at(0, practice="1")
        body().send_keys(Keys.ARROW_RIGHT)       # the blurred one: a hint, the practice again
        wait.until(lambda d: "Not quite" in d.page_source)
        ready_at(0, practice="1")
        body().send_keys(Keys.ARROW_LEFT)
        ready_at(0)
        total = len(db_rows_trials(db, "obs-1"))
        assert driver.find_element(By.ID, "count").text == f"1 / {total}"
        pressed = [(Keys.ARROW_LEFT, "left"), (Keys.ARROW_RIGHT, "right"), (Keys.ARROW_DOWN, "same"),
                   (Keys.SPACE, "same"), (Keys.ARROW_RIGHT, "right")]
        shown_left = []
        for position, (key, _) in enumerate(pressed):
            ready_at(position)
            # what the browser shows on the left, byte for byte
            src = driver.find_element(By.ID, "left").get_attribute("src")
            shown_left.append(server.request("GET", urllib.parse.urlsplit(src).path)[1])
            body().send_keys(key)
        ready_at(5)
        assert driver.find_element(By.ID, "progress").get_attribute("value") == "5"

        rows = db_rows(db, "obs-1")
        assert [r[0] for r in rows] == [0, 1, 2, 3, 4]
        assert [r[1] for r in rows] == [answer for _, answer in pressed]
        pairs = read_pairs(pairs_dir / "pairs.csv").by_id()
        for (position, answer, chosen, left, pair, response_ms), image in zip(rows, shown_left):
            assert image == pairs[pair].images[left].read_bytes()       # the recorded side is the one shown
            right = "worst" if left == "best" else "best"
            assert chosen == {"left": left, "right": right, "same": "same"}[answer]
            assert response_ms is not None and 0 <= response_ms < 60_000

        server.kill()                                # SIGKILL: no shutdown code runs
        server = Server(pairs_dir / "pairs.csv", db)  # settings come from the database
        driver.get(server.url)
        driver.find_element(By.ID, "participant").send_keys("obs-1" + Keys.ENTER)
        ready_at(5)                                  # no practice again, straight to pair 6
        assert driver.find_element(By.ID, "count").text == f"6 / {total}"
        body().send_keys(Keys.ARROW_LEFT)
        ready_at(6)
        assert len(db_rows(db, "obs-1")) == 6
    finally:
        driver.quit()
        server.stop()


def db_rows_trials(db: Path, participant: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT position FROM trials WHERE participant = ?", (participant,)).fetchall()
    finally:
        con.close()


@pytest.mark.slow
def test_only_the_pairs_images_are_served(server):
    assert server.post("/start", participant="eve") == 303
    status, data, headers = server.request("GET", "/p/eve/image/0/left")
    assert status == 200 and headers["Content-Type"].startswith("image/") and data[:4] == b"\x89PNG"
    hostile = ["/p/eve/image/../../../../etc/passwd", "/p/eve/image/0/../../../secret.txt",
               "/p/eve/image/0/..%2f..%2f..%2fsecret.txt", "/p/eve/image/0/%2e%2e%2fsecret.txt",
               "/p/eve/image/%2e%2e/%2e%2e/secret.txt", "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd",
               "/etc/passwd", "/secret.txt", "/images/00000_best.png", "/pairs.csv", "/static/../secret.txt",
               "/practice/../secret.txt", "/practice/..%2fsecret.txt", "/practice/original/../../secret.txt",
               "/p/..%2f..%2fsecret.txt/image/0/left", "/p/eve/image/-1/left", "/p/eve/image/0/up",
               "/p/eve/image/0/%2fetc%2fpasswd", "/p/eve/image/0/left%00.png", "/p/eve/image/99999/left",
               "/p/eve/image/0/left/", "/p/eve/image/0x0/left", "/p/eve/image/1e3/left",
               f"/p/eve/image/0/{'..%5c' * 6}secret.txt", "/p/mallory/image/0/left",
               "/p/%00/image/0/left", "http://127.0.0.1/../secret.txt"]
    for path in hostile:
        status, data, _ = server.request("GET", path)
        assert 400 <= status < 500, (path, status)
        assert SECRET.encode() not in data and b"root:" not in data and b"best_key" not in data, path


@pytest.mark.slow
def test_malformed_requests_get_4xx_and_change_nothing(server):
    assert server.post("/start", participant="zoe") == 303
    assert server.post("/start", participant="../zoe") == 400
    assert server.post("/start", participant="") == 400
    assert server.post("/start", participant="x" * 65) == 400
    bad = [{}, {"answer": "up", "position": "0"}, {"answer": "left"}, {"answer": "left", "position": "-1"},
           {"answer": "left", "position": "abc"}, {"answer": "left", "position": "1e3"},
           {"answer": "left", "position": "99999999999"}, {"answer": "left", "position": "０"},
           {"answer": "left", "position": "0", "response_ms": "-5"},
           {"answer": "left", "position": "0", "response_ms": "soon"},
           {"answer": "LEFT", "position": "0"}, {"answer": ["left", "right"], "position": "0"}]
    token = server.token("/p/zoe/answer")
    for form in bad:
        body = urllib.parse.urlencode(form | {"token": token}, doseq=True)
        status = server.request("POST", "/p/zoe/answer", body)[0]
        assert status == 400, (form, status)
    assert server.post("/p/zoe/answer", answer="left", position="0") == 409          # the practice comes first
    assert server.post("/p/zoe/practice", answer="left") == 303
    assert server.post("/p/zoe/answer", answer="left", position="3") == 409          # not shown yet
    assert server.post("/p/zoe/answer", answer="left", position="99999") == 404      # no such trial
    assert server.post("/p/nobody/answer", answer="left", position="0") == 404
    assert server.post("/p/bad%20id/answer", answer="left", position="0") == 404
    assert server.request("GET", "/p/zoe/answer")[0] == 405
    assert server.request("POST", "/p/zoe/answer", '{"answer": "left", "position": 0}',
                          {"Content-Type": "application/json"})[0] == 403             # not a form: no token
    assert server.request("POST", "/p/zoe/answer", "answer=left&position=0&pad=" + "x" * 40_000)[0] == 413
    assert server.request("POST", "/p/zoe/practice", f"answer=sideways&token={token}")[0] == 400
    assert db_rows(server_db(server), "zoe") == []                                     # nothing recorded
    assert server.post("/p/zoe/answer", answer="same", position="0") == 303
    status, page, _ = server.request("POST", "/p/zoe/answer", f"answer=left&position=0&token={token}")  # answered
    assert status == 409 and b'href="/p/zoe"' in page                                  # with the way on
    assert [r[1] for r in db_rows(server_db(server), "zoe")] == ["same"]


def server_db(server: Server) -> Path:
    return server.db


@pytest.mark.slow
def test_concurrent_participants_do_not_clash(server):
    total = None
    errors = []

    def participant(name: str) -> None:
        try:
            assert server.post("/start", participant=name) == 303
            assert server.post(f"/p/{name}/practice", answer="left") == 303
            n = len(db_rows_trials(server_db(server), name))
            for position in range(n):
                assert server.post(f"/p/{name}/answer", answer=("left", "right", "same")[position % 3],
                                   position=str(position)) == 303
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=participant, args=(f"p{i}",)) for i in range(6)]
    # two tabs of one participant racing for the same trial: one answer wins, the other is a 409
    assert server.post("/start", participant="twin") == 303
    assert server.post("/p/twin/practice", answer="left") == 303
    results = []
    racers = [threading.Thread(target=lambda a=a: results.append(server.post("/p/twin/answer", answer=a,
                                                                            position="0")))
              for a in ("left", "right", "same", "left")]
    for t in threads + racers:
        t.start()
    for t in threads + racers:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == [303, 409, 409, 409]
    db = server_db(server)
    for i in range(6):
        rows = db_rows(db, f"p{i}")
        total = total or len(db_rows_trials(db, f"p{i}"))
        assert [r[0] for r in rows] == list(range(total))
        assert [r[1] for r in rows] == [("left", "right", "same")[k % 3] for k in range(total)]
    assert len(db_rows(db, "twin")) == 1


def test_database_belongs_to_one_pairs_file_and_one_setting(pairs_dir, tmp_path):
    pairs = read_pairs(pairs_dir / "pairs.csv")
    db = tmp_path / "s.sqlite"
    StudyDB(db, pairs, StudySettings(repeat_fraction=0.2))
    StudyDB(db, pairs, StudySettings(repeat_fraction=0.2))            # reopening is fine
    assert StudyDB.settings_of(db) == StudySettings(repeat_fraction=0.2)
    with pytest.raises(StudyError, match="made with --repeat-fraction 0.2"):
        StudyDB(db, pairs, StudySettings(repeat_fraction=0.5))
    other = tmp_path / "other.csv"
    other.write_text((pairs_dir / "pairs.csv").read_text().replace(",a,", ",A,", 1))
    (tmp_path / "images").symlink_to(pairs_dir / "images")
    with pytest.raises(GMADError, match=r"no image file|made for another pairs file"):
        StudyDB(db, read_pairs(other), StudySettings(repeat_fraction=0.2))
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StudyError, match="not a study database"):
        StudyDB(junk, pairs, StudySettings())
    proc = subprocess.run([sys.executable, "-m", "liqe_dist.cli", "gmad", "study", str(pairs_dir / "pairs.csv"),
                           "--db", str(db), "--repeat-gap", "-1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--repeat-gap" in proc.stderr
    with socket.socket() as taken:  # a port in use: one line saying so, not a traceback
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run([sys.executable, "-m", "liqe_dist.cli", "gmad", "study", str(pairs_dir / "pairs.csv"),
                               "--db", str(db), "--port", str(taken.getsockname()[1])],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot listen on 127.0.0.1" in proc.stderr, proc.stderr


def test_pairs_file_errors_name_the_file_and_line(pairs_dir, tmp_path):
    text = (pairs_dir / "pairs.csv").read_text()
    header, first, *rest = text.splitlines()
    cases = {"no_column.csv": (text.replace("worst_key", "wk", 1), "columns ['worst_key'] missing"),
             "twice.csv": ("\n".join([header, first, first]), "line 3: pair 0 appears twice"),
             "bad_pair.csv": ("\n".join([header, "x" + first[1:]]), "line 2: pair and level must be integers"),
             "empty.csv": (header, "no pairs")}
    for name, (content, message) in cases.items():
        path = pairs_dir / name
        path.write_text(content)
        try:
            with pytest.raises(GMADError, match=re.escape(message)):
                read_pairs(path)
        finally:
            path.unlink()
    # an image missing beside the pairs: named, with how to get it
    lonely = tmp_path / "pairs.csv"
    lonely.write_text(text)
    with pytest.raises(GMADError, match=r"no image file for pair 0 \(best\)"):
        read_pairs(lonely)
    # sources and keys are only text: a hostile source never becomes a path
    hostile = tmp_path / "h"
    hostile.mkdir()
    (hostile / "images").symlink_to(pairs_dir / "images")
    (hostile / "pairs.csv").write_text(text.replace(first.split(",")[9], "/etc/passwd", 1))
    p = read_pairs(hostile / "pairs.csv").pairs[0]
    assert p.images["best"].parent == hostile / "images" and p.images["best"].name.startswith("00000_best.")
