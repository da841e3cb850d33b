"""The web playground end to end, in headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by Selenium with explicit paths: nothing is downloaded): the page lists the tasks, streams two
tasks side by side with the API's exact answers, shows the store table and the server's health, and
shows the API's errors as readable messages."""

import os
import shutil
import tempfile
import time

import httpx
import pytest
from conftest import tiny_model
from test_http import Server, make_tasks
from tiny_tokenizer import tiny_tokenizer

from softprompt.serve import Engine
from softprompt.serve.http import ServerConfig, create_app

CHROMIUM = os.environ.get("SOFTPROMPT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SOFTPROMPT_CHROMEDRIVER", "/usr/bin/chromedriver")
KEY = "sk-web"


def browser(tmp):
    """Headless Chromium, or a skip only where it cannot be installed here (not root, or no apt-get);
    where it could be (root with apt-get, as in CI: `.ci/run` installs it), a missing browser fails."""
    why = None
    if not os.path.exists(CHROMIUM) or not os.path.exists(CHROMEDRIVER):
        why = f"Chromium is not installed ({CHROMIUM} / {CHROMEDRIVER} missing: apt-get install chromium chromium-driver)"
        if os.geteuid() == 0 and shutil.which("apt-get"):
            pytest.fail(f"{why}; this machine can install it (root, apt-get), so the web test does not skip: "
                        "run .ci/run, or apt-get install -y chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed (pip install -e .[test])")
    if why:
        print("SKIP web test:", why, "(not root or no apt-get: cannot install it here)")
        pytest.skip(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp}"):
        opts.add_argument(flag)
    # An explicit driver path: Selenium Manager never runs, nothing is downloaded.
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def wait(cond, timeout=20.0, what="condition"):
    deadline = time.time() + timeout
    while True:
        try:
            v = cond()
            if v:
                return v
        except Exception:  # a stale element between two renders: try again
            pass
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server over a prompt store of three tasks; task1's card names a training plot and an inspection."""
    import json

    from softprompt.io.artifact import save_artifact
    from softprompt.loops.train import plot_history
    from softprompt.serve.tasks import TaskRegistry
    from softprompt.store.core import Store

    root = tmp_path_factory.mktemp("web")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    tasks = make_tasks(model, 3)
    store = Store(root / "store")
    store.add("task0", tasks["task0"], model, tags=["nlg"], metrics={"bleu": 41.5})
    art = save_artifact(tasks["task1"], root / "run" / "best", model, metrics={"accuracy": 0.875})
    plot = plot_history([{"step": s, "loss": 3.0 / s} for s in range(1, 20)], root / "run" / "plot.png")
    card = json.loads((art / "card.json").read_text())
    card.update(plot=str(plot), inspection={"nearest_tokens": {"0": ["ba", "be"]}})
    (art / "card.json").write_text(json.dumps(card))
    store.add("task1", art)
    store.add("task2", tasks["task2"], model)
    engine = Engine(model, tok, TaskRegistry(fallback=store.entry), max_batch_size=8)
    app = create_app(engine, store, ServerConfig(base_model_id="tiny-base", api_keys=frozenset({KEY})))
    with Server(app) as url:
        yield url, store, model, tok, tasks


def test_playground_side_by_side_and_errors(server, tmp_path):
    from selenium.webdriver.common.by import By

    from softprompt.loops.generate import generate

    url, store, model, tok, tasks = server
    prompt, max_tokens = "ba be bi bo", 12
    tmp = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    drv = browser(tmp)
    try:
        drv.get(url + "/")
        # The API key goes in its field (kept in localStorage); until then the API refuses and the page says so.
        wait(lambda: "API key" in drv.find_element(By.ID, "banner").text, what="the 401 message")
        key = drv.find_element(By.ID, "api-key")
        key.send_keys(KEY)
        drv.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        wait(lambda: len(drv.find_elements(By.CSS_SELECTOR, "#models input")) == 4, what="the model list")
        assert drv.find_element(By.ID, "banner").get_attribute("hidden") is not None
        assert drv.execute_script("return localStorage.getItem('softprompt-api-key')") == KEY
        rows = drv.execute_script("return [...document.querySelectorAll('#tasks tbody tr')].map("
                                  "r => [r.dataset.name, r.innerText])")
        assert [r[0] for r in rows] == ["task0", "task1", "task2"]
        assert "prefix_tuning" in rows[0][1] and "KiB" in rows[0][1] and "bleu 41.5" in rows[0][1] and "accuracy 0.875" in rows[1][1]

        # Two tasks, one prompt, greedy (the default): both panels stream the API's exact answers.
        chosen = ["task0", "task2"]
        for name in chosen:
            drv.find_element(By.CSS_SELECTOR, f"#models input[value='{name}']").click()
        drv.find_element(By.ID, "prompt").send_keys(prompt)
        mt = drv.find_element(By.ID, "max-tokens")
        mt.clear()
        mt.send_keys(str(max_tokens))
        drv.find_element(By.ID, "send").click()
        wait(lambda: len(drv.find_elements(By.CSS_SELECTOR, ".panel[data-done]")) == 2, what="both outputs")
        panels = {p.get_attribute("data-model"): p for p in drv.find_elements(By.CSS_SELECTOR, ".panel")}
        assert sorted(panels) == chosen
        for name in chosen:
            want = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                              timeout=30).json()["choices"][0]["text"]
            got = drv.execute_script("return arguments[0].querySelector('.text').textContent", panels[name])
            assert want and got == want, (name, got, want)
            # and the continuation the task's prefix gives here, without the server (greedy, no eos in 12)
            assert got == generate(model, tok, [prompt], tasks[name].to_kv_prefix(model), max_new_tokens=max_tokens)[0]
            assert "tok/s" in panels[name].find_element(By.CLASS_NAME, "stats").text
            assert not panels[name].find_elements(By.CLASS_NAME, "err")
        assert panels["task0"].find_element(By.CLASS_NAME, "text").text != panels["task2"].find_element(
            By.CLASS_NAME, "text").text  # two tasks, two different answers to one prompt

        # The health panel reads /metrics.
        wait(lambda: drv.find_element(By.ID, "h-hits").text not in ("", "–"), what="the health panel")
        assert "ok" in drv.find_element(By.ID, "h-state").get_attribute("class")

        # A row opens the task's card.
        drv.find_element(By.CSS_SELECTOR, "#tasks tr[data-name='task1']").click()
        wait(lambda: drv.find_elements(By.CSS_SELECTOR, "#detail img"), what="the training plot")
        detail = drv.find_element(By.ID, "detail").text
        assert '"method": "prompt_tuning"' in detail and "nearest_tokens" in detail
        assert drv.execute_script("const i = document.querySelector('#detail img'); return i.complete && i.naturalWidth") > 0

        if os.environ.get("SOFTPROMPT_WEB_SCREENSHOT"):  # a look at the page (outputs side by side, a card)
            drv.set_window_size(1400, 1500)
            drv.save_screenshot(os.environ["SOFTPROMPT_WEB_SCREENSHOT"])

        # API errors show as readable messages: a bad parameter (400) and a task removed meanwhile (404).
        mt.clear()
        mt.send_keys("99999")
        store.rm("task2")
        drv.find_element(By.ID, "send").click()
        wait(lambda: len(drv.find_elements(By.CSS_SELECTOR, ".panel[data-done]")) == 2, what="the error panels")
        errs = {p.get_attribute("data-model"): p.find_element(By.CLASS_NAME, "err").text
                for p in drv.find_elements(By.CSS_SELECTOR, ".panel")}
        assert errs["task0"].startswith("400") and "max_tokens" in errs["task0"], errs
        mt.clear()
        mt.send_keys("4")
        drv.find_element(By.ID, "send").click()
        wait(lambda: len(drv.find_elements(By.CSS_SELECTOR, ".panel[data-done]")) == 2, what="the 404 panel")
        p = drv.find_element(By.CSS_SELECTOR, ".panel[data-model='task2']")
        assert p.find_element(By.CLASS_NAME, "err").text.startswith("404") and "'task2' does not exist" in p.text
        assert not drv.find_element(By.CSS_SELECTOR, ".panel[data-model='task0']").find_elements(By.CLASS_NAME, "err")
        if os.environ.get("SOFTPROMPT_WEB_SCREENSHOT"):
            drv.save_screenshot(os.environ["SOFTPROMPT_WEB_SCREENSHOT"].removesuffix(".png") + "-error.png")
    finally:
        drv.quit()
        shutil.rmtree(tmp, ignore_errors=True)
