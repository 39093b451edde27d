"""The gMAD study web app on a real `gmad search` output: a participant in headless chromium
(selenium + chromedriver) answers by keyboard, the server is SIGKILLed and restarted, the
participant resumes; hostile paths and malformed answers get 4xx; concurrent participants; the
schedule; database/pairs mismatches are clear errors. And the gMAD toolbox's study (issue 26) on
generated pairs folders: the slider and the buttons driven in chromium, read back sign-corrected
and analysed; native display size at two device pixel ratios and one recorded shrink factor; an
EXIF-rotated JPEG shown as the model read it; fixed and random schedules; the four practice
pairs; a schema-1 database read and migrated."""

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

import numpy as np
import pytest
from PIL import Image

from gmad_fixtures import browser, make_scored
from liqe_dist.gmad.pairs import read_pairs
from liqe_dist.gmad.search import GMADError
from liqe_dist.gmad.study_db import (PRACTICE, SAME_TOLERANCE, StudyDB, StudyError, StudySettings, practice_plan,
                                     read_study, schedule)

SECRET = "top-secret-do-not-serve"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    """`gmad search` output (pairs.csv + images/) over the shared scored corpus, and a file beside
    it that no request may reach."""
    from liqe_dist.gmad.report import run_gmad  # here: the tests on generated pairs folders do not need them
    from liqe_dist.gmad.search import LevelRule

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


BUTTONS = ("--scale", "buttons", "--schedule", "random")  # the options these tests were written for


@pytest.fixture
def server(pairs_dir, tmp_path):
    # a relative pairs path, as the README's commands give it
    s = Server(Path("pairs.csv"), tmp_path / "study.sqlite", "--repeat-fraction", "0.25", *BUTTONS, cwd=pairs_dir)
    yield s
    s.stop()


def pass_practice(server: Server, participant: str, settings: StudySettings = StudySettings(scale="buttons")) -> None:
    """Answer the participant's four practice pairs right, as the page would."""
    for step in practice_plan(participant, settings):
        answer = ({"value": {"left": "-60", "right": "60", None: "0"}[step.better]} if settings.scale == "slider"
                  else {"answer": step.better or "same"})
        assert server.post(f"/p/{participant}/practice", step=str(step.step), **answer) == 303


def chrome(tmp_path: Path, monkeypatch, *flags: str):
    """Headless chromium under selenium (skipped without them) and a 30 s waiter."""
    chromium, why = browser()
    driver_path, why_driver = browser(driver=True)
    if chromium is None or driver_path is None:
        pytest.skip(f"no chromium/chromedriver: {why or why_driver}")
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900",
                 f"--user-data-dir={tmp_path / 'profile'}", *flags):
        options.add_argument(flag)
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let selenium look for a driver online
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    return driver, WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,))


def wait_ready(driver, wait, position: int, practice: bool = False) -> None:
    """Until the page of trial (or practice pair) ``position`` shows both images, answerable."""
    # one script reads all three, so a page being replaced cannot mix two pages' values
    state = "const b = document.body.dataset; return [b.position, b.practice, b.ready];"
    wait.until(lambda d: d.execute_script(state) == [str(position), "1" if practice else "0", "1"])


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
    settings = StudySettings(repeat_fraction=0.2, repeat_gap=3, seed=7, schedule="random")
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
    for seed, kind in ((s, k) for s in range(50) for k in ("random", "fixed")):  # a long gap: fewer repeats
        short = schedule([0, 1, 2, 3], "x", StudySettings(repeat_fraction=1.0, repeat_gap=2, seed=seed, schedule=kind))
        positions = {(p, rep): k for k, (p, rep, _) in enumerate(short)}
        repeated = [p for p, rep in positions if rep]
        assert len(short) == 6 and len(repeated) == 2
        assert all(positions[p, True] - positions[p, False] > 2 for p in repeated)


@pytest.mark.slow
def test_participant_answers_by_keyboard_in_chromium_and_resumes_after_the_server_is_killed(pairs_dir, tmp_path,
                                                                                           monkeypatch):
    db = tmp_path / "study.sqlite"
    server = Server(pairs_dir / "pairs.csv", db, "--repeat-fraction", "0.25", *BUTTONS)
    driver, wait = chrome(tmp_path, monkeypatch)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    body = lambda: driver.find_element(By.TAG_NAME, "body")  # noqa: E731
    keys = {"left": Keys.ARROW_LEFT, "right": Keys.ARROW_RIGHT, None: Keys.ARROW_DOWN}

    try:
        driver.get(server.url)
        driver.find_element(By.ID, "participant").send_keys("obs-1" + Keys.ENTER)
        plan = practice_plan("obs-1", StudySettings(scale="buttons"))
        wait_ready(driver, wait, 0, practice=True)
        body().send_keys(keys["right" if plan[0].better == "left" else "left"])  # the degraded one: a hint
        wait.until(lambda d: "Not quite" in d.page_source)
        for step in plan:
            wait_ready(driver, wait, step.step, practice=True)
            body().send_keys(keys[step.better])
        wait_ready(driver, wait, 0)
        total = len(db_rows_trials(db, "obs-1"))
        assert driver.find_element(By.ID, "count").text == f"1 / {total}"
        pressed = [(Keys.ARROW_LEFT, "left"), (Keys.ARROW_RIGHT, "right"), (Keys.ARROW_DOWN, "same"),
                   (Keys.SPACE, "same"), (Keys.ARROW_RIGHT, "right")]
        shown_left = []
        for position, (key, _) in enumerate(pressed):
            wait_ready(driver, wait, position)
            # what the browser shows on the left, byte for byte
            src = driver.find_element(By.ID, "left").get_attribute("src")
            shown_left.append(server.request("GET", urllib.parse.urlsplit(src).path)[1])
            body().send_keys(key)
        wait_ready(driver, wait, 5)
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
        wait_ready(driver, wait, 5)                  # no practice again, straight to pair 6
        assert driver.find_element(By.ID, "count").text == f"6 / {total}"
        body().send_keys(Keys.ARROW_LEFT)
        wait_ready(driver, wait, 6)
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
    pass_practice(server, "zoe")
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
            pass_practice(server, name)
            n = len(db_rows_trials(server_db(server), name))
            for position in range(n):
                assert server.post(f"/p/{name}/answer", answer=("left", "right", "same")[position % 3],
                                   position=str(position)) == 303
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=participant, args=(f"p{i}",)) for i in range(6)]
    # two tabs of one participant racing for the same trial: one answer wins, the other is a 409
    assert server.post("/start", participant="twin") == 303
    pass_practice(server, "twin")
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


# --- issue 26: the study as the gMAD toolbox runs it --------------------------------------------

def make_pairs_folder(root: Path, size: tuple[int, int] = (300, 200), exif_pair: int | None = None) -> Path:
    """A pairs.csv of six pairs (a and b each defending three levels) with images/ of ``size``
    (noise PNGs); ``exif_pair``'s best image a JPEG of the same raw size with EXIF orientation 6
    (a browser honouring it would show it rotated, ``size`` transposed)."""
    (root / "images").mkdir(parents=True)
    rows = ["pair,defender,attacker,level,best_key,worst_key,best_source,worst_source,level_images"]
    rng = np.random.default_rng(1)
    for k, (d, a, level) in enumerate((d, a, level) for d, a in (("a", "b"), ("b", "a")) for level in range(3)):
        rows.append(f"{k},{d},{a},{level},k{k}b,k{k}w,photos/{k}b.png,photos/{k}w.png,{4 + level}")
        for side in ("best", "worst"):
            image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
            if k == exif_pair and side == "best":
                exif = Image.Exif()
                exif[0x0112] = 6  # "rotate 90 CW to show"
                image.save(root / "images" / f"{k:05d}_{side}.jpg", "JPEG", quality=90, exif=exif)
            else:
                image.save(root / "images" / f"{k:05d}_{side}.png")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def trials_of(db: Path, participant: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT position, pair, repeat, left FROM trials WHERE participant = ? ORDER BY position",
                           (participant,)).fetchall()
    finally:
        con.close()


def analyse(db: Path, pairs_csv: Path, out: Path):
    """The analysis (another module, changing): whichever of its two call forms it has."""
    import inspect

    from liqe_dist.gmad.analyse import run_analysis
    params = list(inspect.signature(run_analysis).parameters)
    return run_analysis(pairs_csv, out, db=db) if params[0] != "db" and "db" in params else \
        run_analysis(db, pairs_csv, out)


@pytest.mark.slow
def test_slider_and_buttons_in_chromium_record_sign_corrected_values_that_the_analysis_reads(tmp_path, monkeypatch):
    pairs_csv = make_pairs_folder(tmp_path / "pairs")
    driver, wait = chrome(tmp_path, monkeypatch)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    L, R, SR = Keys.ARROW_LEFT, Keys.ARROW_RIGHT, "shift+right"

    def press(*keys: str) -> None:  # to whatever has the focus, as a keyboard does
        chain = ActionChains(driver)
        for key in keys:
            if key == SR:
                chain.key_down(Keys.SHIFT).send_keys(R).key_up(Keys.SHIFT)
            else:
                chain.send_keys(key)
        chain.perform()

    def slider_answer(keys: list[str], how: str) -> None:
        press(*keys)
        if how == "click":
            driver.find_element(By.ID, "submit").click()
        else:
            press(Keys.ENTER)

    def start(server: Server, who: str) -> None:
        driver.get(server.url)
        driver.find_element(By.ID, "participant").send_keys(who + Keys.ENTER)

    servers = []
    try:
        # the slider, and the toolbox's fixed schedule: the defaults
        slider_db = tmp_path / "slider.sqlite"
        servers.append(server := Server(pairs_csv, slider_db))
        start(server, "s1")
        plan = practice_plan("s1", StudySettings())
        for step in plan:
            wait_ready(driver, wait, step.step, practice=True)
            assert driver.find_element(By.ID, "slider").get_attribute("value") == "0"
            if step.step in (0, 1):  # wrong first: the far wrong side, or 30 off the middle of a same pair
                slider_answer([Keys.END if step.better == "left" else Keys.HOME] if step.better else [R, R, R],
                              "enter")
                wait.until(lambda d: "Not quite" in d.page_source)
                wait_ready(driver, wait, step.step, practice=True)
            if step.better:
                slider_answer([Keys.HOME if step.better == "left" else Keys.END], "enter")
            else:
                slider_answer([SR, SR, SR], "click")                           # 3: within the tolerance
        moves = [([L, L, L], "click", -30), ([Keys.END], "enter", 100), ([SR] * 5, "click", 5),
                 ([Keys.HOME, R], "enter", -90), ([], "click", 0), ([R] * 12, "enter", 100),
                 ([L, L, SR], "click", -19)]
        trials = trials_of(slider_db, "s1")
        assert len(trials) == len(moves)                                       # 6 pairs + 1 repeat
        for position, (keys, how, _) in enumerate(moves):
            wait_ready(driver, wait, position)
            slider_answer(keys, how)
        wait.until(lambda d: d.execute_script("return document.body.dataset.finished") == "1")

        # the buttons, each participant's own schedule
        buttons_db = tmp_path / "buttons.sqlite"
        servers.append(server := Server(pairs_csv, buttons_db, *BUTTONS))
        start(server, "b1")
        keys = {"left": L, "right": R, None: Keys.ARROW_DOWN}
        for step in practice_plan("b1", StudySettings(scale="buttons")):
            wait_ready(driver, wait, step.step, practice=True)
            press(keys[step.better])
        pressed = [(L, "left"), (R, "right"), (Keys.ARROW_DOWN, "same"), (Keys.SPACE, "same"), (R, "right"),
                   (L, "left"), (Keys.ARROW_DOWN, "same")]
        for position, (key, _) in enumerate(pressed):
            wait_ready(driver, wait, position)
            press(key)
        wait.until(lambda d: d.execute_script("return document.body.dataset.finished") == "1")
    finally:
        driver.quit()
        for server in servers:
            server.stop()

    slider = read_study(slider_db)
    assert (slider.meta["scale"], slider.meta["schedule"], slider.meta["schema"]) == ("slider", "fixed", "2")
    for j, (position, pair, repeat, left), (_, _, shown) in zip(slider.judgments, trials, moves):
        assert (j["position"], j["pair"], j["repeat"], j["left"]) == (position, pair, repeat, left)
        assert j["value"] == float(-shown if left == "best" else shown)        # positive: the best image won
        assert isinstance(j["value"], float)
        assert j["answer"] == ("left" if shown < 0 else "right" if shown > 0 else "same")
        assert j["chosen"] == ("best" if j["value"] > 0 else "worst" if j["value"] < 0 else "same")
        assert (j["left_w"], j["left_h"], j["right_w"], j["right_h"]) == (300, 200, 300, 200)
        assert (j["dpr"], j["display_scale"]) == (1.0, 1.0) and j["window_w"] > 600 and j["window_h"] > 200
    assert len(slider.judgments) == len(moves)

    buttons = read_study(buttons_db)
    assert (buttons.meta["scale"], buttons.meta["schedule"]) == ("buttons", "random")
    assert [j["answer"] for j in buttons.judgments] == [a for _, a in pressed]
    for j in buttons.judgments:
        assert j["chosen"] == ({"left": j["left"], "same": "same"}.get(j["answer"]) or
                               ("worst" if j["left"] == "best" else "best"))
        assert j["value"] == {"best": 100.0, "worst": -100.0, "same": 0.0}[j["chosen"]]
        assert j["display_scale"] == 1.0 and j["left_w"] == 300
    for db in (slider_db, buttons_db):
        analyse(db, pairs_csv, tmp_path / f"{db.stem}_analysis")
        assert (tmp_path / f"{db.stem}_analysis" / "pairs_judged.csv").is_file()


@pytest.mark.slow
def test_images_are_shown_native_unrotated_and_shrunk_by_one_recorded_factor(tmp_path, monkeypatch):
    pairs_csv = make_pairs_folder(tmp_path / "pairs", exif_pair=0)
    db = tmp_path / "d.sqlite"
    server = Server(pairs_csv, db, "--scale", "buttons", "--repeat-fraction", "0")
    driver, wait = chrome(tmp_path, monkeypatch, "--force-device-scale-factor=1", "--window-size=1200,900")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    body = lambda: driver.find_element(By.TAG_NAME, "body")  # noqa: E731
    measure = ("return [innerWidth, innerHeight, devicePixelRatio, ...[left, right].flatMap(i => "
               "[i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width, i.getBoundingClientRect().height])]")
    seen = []
    try:
        driver.get(server.url)
        driver.find_element(By.ID, "participant").send_keys("d1" + Keys.ENTER)
        keys = {"left": Keys.ARROW_LEFT, "right": Keys.ARROW_RIGHT, None: Keys.ARROW_DOWN}
        for step in practice_plan("d1", StudySettings(scale="buttons")):
            wait_ready(driver, wait, step.step, practice=True)
            body().send_keys(keys[step.better])
        # trials 0, 1: device pixel ratio 1; 2, 3: 2; 4, 5: a window too small for the pair
        metrics = {2: (1200, 900, 2), 4: (400, 600, 1)}
        for position in range(6):
            wait_ready(driver, wait, position)
            if position in metrics:
                width, height, dpr = metrics[position]
                driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                    "width": width, "height": height, "deviceScaleFactor": dpr, "mobile": False})
                driver.refresh()
                wait_ready(driver, wait, position)
            seen.append(driver.execute_script(measure))
            body().send_keys(Keys.ARROW_LEFT)
        wait.until(lambda d: d.execute_script("return document.body.dataset.finished") == "1")
        # the control: the stored JPEG, opened as it is, is shown rotated by this browser
        jpeg = pairs_csv.parent / "images" / "00000_best.jpg"
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        driver.get(jpeg.as_uri())
        assert driver.execute_script("const i = document.images[0]; return [i.naturalWidth, i.naturalHeight]") == \
            [200, 300]
    finally:
        driver.quit()
        server.stop()

    judgments = read_study(db).judgments
    assert len(judgments) == 6
    for position, (j, m) in enumerate(zip(judgments, seen)):
        inner_w, inner_h, dpr, lnw, lnh, lw, lh, rnw, rnh, rw, rh = m
        assert (lnw, lnh, rnw, rnh) == (300, 200, 300, 200), (position, m)     # raw pixels, EXIF pair included
        factor = lw / 300
        if position < 2:
            assert (dpr, lw, lh, rw, rh) == (1, 300, 200, 300, 200)             # 1 CSS px = 1 image px
        elif position < 4:
            assert (dpr, lw, lh, rw, rh) == (2, 150, 100, 150, 100)             # 1 device px = 1 image px
            factor = 1.0
        else:
            assert dpr == 1 and 0.3 < factor < 0.9
            for size, native in ((lw, 300), (lh, 200), (rw, 300), (rh, 200)):
                assert size == pytest.approx(native * factor, abs=0.02)      # one factor for both images
            assert lw + rw + 32 <= inner_w - 48 + 0.01                          # the gap and the page's margins
            assert lw + rw + 32 >= inner_w - 48 - 1                             # as large as fits
        assert (j["window_w"], j["window_h"], j["dpr"]) == (inner_w, inner_h, dpr)
        for key, size in (("left_w", lw), ("left_h", lh), ("right_w", rw), ("right_h", rh)):
            assert j[key] == pytest.approx(size, abs=1e-3), (position, key)
        assert j["display_scale"] == pytest.approx(factor, abs=1e-4), position
    assert {pair for _, pair, _, _ in trials_of(db, "d1")} == set(range(6))  # the EXIF pair 0 among them


def test_an_exif_rotated_image_is_served_as_the_model_reads_it(tmp_path):
    import io

    from liqe_dist.data.images import decode_image
    from liqe_dist.gmad.study_app import as_model_reads

    pairs_csv = make_pairs_folder(tmp_path / "pairs", exif_pair=0)
    jpeg = (pairs_csv.parent / "images" / "00000_best.jpg").read_bytes()
    served, media = as_model_reads(jpeg, "image/jpeg")
    assert media == "image/png"
    with Image.open(io.BytesIO(served)) as img:
        assert img.size == (300, 200) and img.getexif().get(0x0112) is None
        assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(decode_image(jpeg)))
    png = (pairs_csv.parent / "images" / "00000_worst.png").read_bytes()
    assert as_model_reads(png, "image/png") == (png, "image/png")              # no EXIF: byte for byte
    plain = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 1
    Image.new("RGB", (4, 3)).save(plain, "JPEG", exif=exif)
    assert as_model_reads(plain.getvalue(), "image/jpeg")[0] == plain.getvalue()  # orientation 1: as it is


def test_fixed_schedule_is_every_participants_and_random_is_each_ones(tmp_path):
    pairs_csv = make_pairs_folder(tmp_path / "pairs")
    pairs = read_pairs(pairs_csv)
    order = {}
    for kind in ("fixed", "random"):
        db = StudyDB(tmp_path / f"{kind}.sqlite", pairs, StudySettings(schedule=kind, repeat_fraction=0.5,
                                                                       repeat_gap=1))
        for who in ("ann", "bob"):
            db.register(who)
            order[kind, who] = [t[1:] for t in trials_of(db.path, who)]
    assert order["fixed", "ann"] == order["fixed", "bob"]                      # order, sides and repeats
    assert [r for _, r, _ in order["fixed", "ann"]].count(1) == 3
    assert order["random", "ann"] != order["random", "bob"]
    assert order["fixed", "ann"] != order["random", "ann"] or order["fixed", "bob"] != order["random", "bob"]
    ids = [p.pair for p in pairs.pairs]
    fixed = StudySettings(schedule="fixed", seed=3)
    assert {str(schedule(ids, who, fixed)) for who in ("x", "y", "z")} == {str(schedule(ids, "x", fixed))}
    assert schedule(ids, "x", fixed) != schedule(ids, "x", StudySettings(schedule="fixed", seed=4))
    with pytest.raises(StudyError, match="made with --schedule fixed"):
        StudyDB(tmp_path / "fixed.sqlite", pairs, StudySettings(schedule="random", repeat_fraction=0.5, repeat_gap=1))
    with pytest.raises(StudyError, match="made with --scale slider"):
        StudyDB(tmp_path / "fixed.sqlite", pairs, StudySettings(scale="buttons", repeat_fraction=0.5, repeat_gap=1))
    proc = subprocess.run([sys.executable, "-m", "liqe_dist.cli", "gmad", "study", str(pairs_csv), "--db",
                           str(tmp_path / "fixed.sqlite"), "--schedule", "random", "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "made with --schedule fixed" in proc.stderr, proc.stderr


class Client:
    """Flask's test client on the study's pages, with their tokens."""

    def __init__(self, app) -> None:
        self.client = app.test_client()
        self.tokens: dict[str, str] = {}

    def get(self, path: str):
        return self.client.get(path, base_url="http://127.0.0.1:8080")

    def post(self, path: str, **form):
        page = "/" if path == "/start" else "/".join(path.split("/")[:3])
        if page not in self.tokens:
            self.tokens[page] = re.search(r'name="token" value="([0-9a-f]+)"', self.get(page).get_data(True)).group(1)
        return self.client.post(path, data={"token": self.tokens[page], **form}, base_url="http://127.0.0.1:8080")


def test_practice_is_four_pairs_answered_right_with_hints_and_sides_drawn_per_participant(tmp_path):
    from liqe_dist.gmad.study_app import create_app, practice_images

    pairs_csv = make_pairs_folder(tmp_path / "pairs", size=(120, 80))
    pairs = read_pairs(pairs_csv)
    plans = {who: practice_plan(who, StudySettings()) for who in (f"p{i}" for i in range(8))}
    assert all([(s.kind, s.image) for s in plan] == [("obvious", "blurred"), ("same", "identical"),
                                                    ("obvious", "noisy"), ("same", "near")] for plan in plans.values())
    assert plans["p0"] == practice_plan("p0", StudySettings())                # reproducible
    assert len({tuple(s.original_left for s in plan) for plan in plans.values()}) > 1  # sides differ between people
    assert any(practice_plan(w, StudySettings(seed=1)) != plans[w] for w in plans)       # and between seeds
    images = practice_images(pairs.pairs[0].images["best"])
    assert images["identical"] == images["original"] and images["near"] != images["original"]

    for scale in ("buttons", "slider"):
        settings = StudySettings(scale=scale)
        app = create_app(pairs, tmp_path / f"{scale}.sqlite", settings)
        db = app.extensions["study_db"]
        c = Client(app)
        assert c.post("/start", participant="ann").status_code == 303
        plan = practice_plan("ann", settings)
        value = ("value", "answer")[scale == "buttons"]
        for step in plan:
            page = c.get("/p/ann").get_data(True)
            assert f"practice {step.step + 1} of {len(PRACTICE)}" in page and 'data-practice="1"' in page
            served = {side: c.get(f"/p/ann/practice/{step.step}/{side}").get_data() for side in ("left", "right")}
            assert served == {side: images[step.side_image(side)][0] for side in ("left", "right")}
            if scale == "buttons":
                wrong = ["same", "right" if step.better == "left" else "left"] if step.better else ["left", "right"]
                right = [step.better or "same"]
            elif step.better:
                sign = -1 if step.better == "left" else 1
                wrong, right = ["0", str(-sign * 50)], [str(sign)]
            else:
                wrong, right = [str(SAME_TOLERANCE + 1), str(-SAME_TOLERANCE - 1)], [str(SAME_TOLERANCE)]
            for answer in wrong:
                response = c.post("/p/ann/practice", step=str(step.step), **{value: answer})
                assert response.status_code == 303 and response.location.endswith("/p/ann?hint=1"), answer
                assert db.status("ann").practice_step == step.step                # the same pair again
            hint = c.get("/p/ann?hint=1").get_data(True)
            assert "Not quite" in hint and ("the same" in hint or "middle" in hint if not step.better
                                            else f"the {step.better} one is better" in hint)
            assert c.post("/p/ann/practice", step=str(step.step + 1 if step.step < 3 else 0),
                          **{value: right[0]}).status_code == 409                 # not the pair shown
            assert c.post("/p/ann/practice", step=str(step.step), **{value: right[0]}).status_code == 303
        assert db.status("ann").practice_done and 'data-practice="0"' in c.get("/p/ann").get_data(True)
        assert read_study(db.path).judgments == []                              # practice is not recorded
        assert c.post("/p/ann/practice", step="3", **{value: right[0]}).status_code == 409
        assert c.get("/p/ann/practice/4/left").status_code == 404
        # the other scale's field is refused
        other = {"answer": "left"} if scale == "slider" else {"value": "10"}
        assert c.post("/p/ann/answer", position="0", **other).status_code == 400


SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS participants (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    practice_done INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS trials (
    participant TEXT NOT NULL REFERENCES participants(id),
    position INTEGER NOT NULL,
    pair INTEGER NOT NULL,
    repeat INTEGER NOT NULL CHECK (repeat IN (0, 1)),
    left TEXT NOT NULL CHECK (left IN ('best', 'worst')),
    PRIMARY KEY (participant, position)
);
CREATE TABLE IF NOT EXISTS answers (
    participant TEXT NOT NULL,
    position INTEGER NOT NULL,
    answer TEXT NOT NULL CHECK (answer IN ('left', 'right', 'same')),
    chosen TEXT NOT NULL CHECK (chosen IN ('best', 'worst', 'same')),
    response_ms INTEGER,
    answered_at REAL NOT NULL,
    PRIMARY KEY (participant, position),
    FOREIGN KEY (participant, position) REFERENCES trials(participant, position)
);
"""  # the previous version's SCHEMA, as it made databases


def test_a_schema_1_database_is_read_and_migrated(tmp_path):
    from liqe_dist.gmad.study_db import Display

    pairs_csv = make_pairs_folder(tmp_path / "pairs")
    pairs = read_pairs(pairs_csv)
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(SCHEMA_1)
    con.executemany("INSERT INTO meta VALUES (?, ?)", [
        ("schema", "1"), ("pairs_sha256", pairs.sha256), ("pairs", "6"), ("repeat_fraction", "0.1"),
        ("repeat_gap", "3"), ("seed", "0"), ("form_secret", "ab" * 32)])
    con.executemany("INSERT INTO participants VALUES (?, ?, ?)", [("ann", 1.0, 1), ("bob", 2.0, 0)])
    old = schedule([p.pair for p in pairs.pairs], "ann", StudySettings(schedule="random"))
    con.executemany("INSERT INTO trials VALUES ('ann', ?, ?, ?, ?)",
                    [(i, p, int(r), s) for i, (p, r, s) in enumerate(old)])
    chosen = ["best", "worst", "same"]
    con.executemany("INSERT INTO answers VALUES ('ann', ?, ?, ?, 700, 5.0)", [
        (i, "same" if c == "same" else ("left" if old[i][2] == c else "right"), c) for i, c in enumerate(chosen)])
    con.commit()
    con.close()

    keys = {"participant", "position", "pair", "repeat", "left", "answer", "chosen", "response_ms", "answered_at",
            "value", "left_w", "left_h", "right_w", "right_h", "window_w", "window_h", "dpr", "display_scale"}
    before = read_study(path)                                                    # read as it is, without writing
    assert before.meta["schema"] == "1" and [set(j) for j in before.judgments] == [keys] * 3
    assert [j["value"] for j in before.judgments] == [100.0, -100.0, 0.0]
    assert all(j["left_w"] is None and j["display_scale"] is None for j in before.judgments)
    assert StudyDB.settings_of(path) == StudySettings(scale="buttons", schedule="random")   # what it did
    with pytest.raises(StudyError, match="made with --scale buttons, --schedule random"):
        StudyDB(path, pairs, StudySettings())
    assert read_study(path).meta["schema"] == "1"                                # a refused open changes nothing

    db = StudyDB(path, pairs, StudyDB.settings_of(path))                         # the server's open migrates
    after = read_study(path)
    assert after.meta["schema"] == "2" and after.meta["scale"] == "buttons" and after.meta["schedule"] == "random"
    assert after.judgments == before.judgments
    assert db.status("ann").practice_done and db.status("ann").done == 3
    assert not db.status("bob").practice_done and db.status("bob").practice_step == 0
    db.answer("ann", 3, "left", 500, display=Display(300, 200, 300, 200, 1200, 800, 1.0, 1.0))
    last = read_study(path).judgments[-1]
    assert last["value"] == (100.0 if old[3][2] == "best" else -100.0) and last["window_w"] == 1200
    StudyDB(path, pairs, StudyDB.settings_of(path))                              # opening again: nothing to do
    assert len(read_study(path).judgments) == 4
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    con.commit()
    con.close()
    with pytest.raises(StudyError, match="schema '3'"):
        StudyDB(path, pairs, StudyDB.settings_of(path))
