"""peftlab ui in a real browser (headless Chromium): the runs list, a tiny run started from the
form and watched until it finishes, its live charts, two runs compared (overlaid curves, a
ranked table) and base vs adapter chat -- the replies the page shows are the greedy replies
of the same models loaded in this process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import peftlab
from peftlab.evaluation.generate import generate_replies
from peftlab.ui.app import make_app
from tests.deps import deps_required, import_test_dep
from tests.live_server import live_server
from tests.ui_browser import CHROMIUM, browser_page

pytestmark = pytest.mark.browser

if not CHROMIUM.is_file():
    if deps_required():
        raise RuntimeError(f"{CHROMIUM} is missing and PEFTLAB_REQUIRE_TEST_DEPS=1 "
                           "(apt-get install chromium; .ci/run does)")
    pytest.skip(f"{CHROMIUM} not installed (Debian package chromium)", allow_module_level=True)
import_test_dep("playwright")

RUN_VALUES = {"train.max_steps": "6", "train.log_every": "1", "train.eval_every": "2",
              "train.batch_size": "4", "train.lr": "0.003", "train.precision": "fp32",
              "data.max_rows": "32"}


def _earlier_run(model: Path, data: dict[str, Path], out: Path) -> None:
    peftlab.train({"model": str(model), "method": {"name": "lora", "r": 4, "alpha": 8},
                   "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                            "max_rows": 32},
                   "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-4, "log_every": 1,
                             "eval_every": 2, "precision": "fp32"},
                   "output_dir": str(out)}, progress=False)


def test_ui_end_to_end_in_chromium(diverse_chat_model_dir, demo_data_dir, tmp_path):
    runs = tmp_path / "runs"
    _earlier_run(diverse_chat_model_dir, demo_data_dir, runs / "earlier")
    app = make_app(runs, data_dirs=[demo_data_dir["train"].parent])
    with live_server(app) as url, browser_page() as page:
        page.goto(url)
        row = page.locator("#runs-table tr[data-run='earlier']")
        row.locator(".state-finished").wait_for(timeout=15_000)

        # -- a new run from the form: a bad key first (the CLI's message), then a good one
        page.click("nav button[data-view=new]")
        page.evaluate("document.querySelectorAll('#new-form details').forEach(d => d.open = true)")
        page.fill("#new-form input[name=name]", "from-form")
        page.fill("#new-form input[name=model]", str(diverse_chat_model_dir))
        page.fill("#new-form input[name='data.train']", str(demo_data_dir["train"]))
        page.fill("#new-form input[name='data.validation']", str(demo_data_dir["validation"]))
        for key, value in RUN_VALUES.items():
            if key == "train.precision":
                page.select_option(f"#new-form select[name='{key}']", value)
            else:
                page.fill(f"#new-form input[name='{key}']", value)
        page.fill("#new-form textarea[name=yaml]", "trian: {}")
        page.click("#new-form button[type=submit]")
        page.locator("#new-message.error").wait_for()
        assert page.inner_text("#new-message") == ("config: unknown key 'trian' "
                                                   "(did you mean 'train'?)")
        page.fill("#new-form textarea[name=yaml]", "")
        page.click("#new-form button[type=submit]")
        page.locator("#new-message.ok").wait_for()
        assert page.inner_text("#new-message") == "queued #1: from-form"

        # -- the run finishes; its charts show every logged step
        page.click("nav button[data-view=runs]")
        job = page.locator("#jobs-table tr[data-job='from-form']")
        job.locator(".state-finished, .state-failed").wait_for(timeout=180_000)
        assert job.locator(".state-finished").count() == 1, job.inner_text()
        new_row = page.locator("#runs-table tr[data-run='from-form']")
        new_row.locator(".state-finished").wait_for()
        new_row.click()
        page.locator("#detail-status .state-finished").wait_for()
        loss = page.locator("#detail-charts svg[data-title=loss] polyline")
        assert loss.get_attribute("data-n") == "6"
        assert page.locator("#detail-charts svg[data-title=val_loss] polyline"
                            ).get_attribute("data-n") == "3"

        # -- compare the two: overlaid curves and the table ranked by val_loss
        for name in ("earlier", "from-form"):
            page.check(f"#runs-table tr[data-run='{name}'] .run-pick")
        page.click("#compare-selected")
        page.locator("#compare-table tbody tr:nth-child(2)").wait_for()
        assert page.input_value("#compare-metric") == "val_loss"
        lines = page.locator("#compare-chart polyline")
        assert sorted(lines.nth(i).get_attribute("data-series") for i in range(lines.count())
                      ) == ["earlier", "from-form"]
        ranked = [page.inner_text(f"#compare-table tbody tr:nth-child({i}) td:nth-child(2)")
                  for i in (1, 2)]
        best = {name: min(json.loads(x)["val_loss"] for x in
                          (runs / name / "metrics.jsonl").read_text().splitlines()
                          if "val_loss" in x) for name in ("earlier", "from-form")}
        assert ranked == sorted(best, key=best.get)
        assert best["from-form"] != best["earlier"]

        # -- chat: base vs the new run's adapter, greedy
        page.click("nav button[data-view=chat]")
        page.select_option("#chat-run", "from-form")
        page.fill("#chat-prompt", "What is the capital of Zorbia?")
        page.fill("#chat-tokens", "8")
        page.click("#chat-send")
        page.locator("#chat-message.ok").wait_for(timeout=60_000)
        shown = {side: page.text_content(f"#chat-{side}") for side in ("base", "adapter")}

    messages = [[{"role": "user", "content": "What is the capital of Zorbia?"}]]
    expected = {}
    for side, adapter in (("base", None), ("adapter", runs / "from-form" / "adapter")):
        model, tokenizer = peftlab.load(str(diverse_chat_model_dir), adapter=adapter)
        expected[side] = generate_replies(model, tokenizer, messages, max_new_tokens=8)[0]
    assert shown == expected
    assert expected["base"] != expected["adapter"]
    assert os.listdir(runs / ".peftlab-ui")  # the queued config and its log
