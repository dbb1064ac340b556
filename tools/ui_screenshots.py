"""Screenshots of peftlab ui's views for the README (docs/ui/*.png), taken in headless Chromium.

Trains two short LoRA runs of a small sweep on the demo facts, starts the UI on them, queues a
third run from the form and photographs: the new-run form, the live run, the runs list with the
queue, the comparison of the sweep and base-vs-adapter chat.

    PYTHONPATH=src python tools/ui_screenshots.py            # the embedded SmolLM2 (minutes)
    PYTHONPATH=src python tools/ui_screenshots.py --tiny     # a tiny random model (seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/: the tiny model, the live server and the browser

import peftlab  # noqa: E402
from peftlab.lab.demo_data import write_demo_data  # noqa: E402
from peftlab.ui.app import make_app  # noqa: E402
from tests.conftest import build_diverse_chat_model  # noqa: E402
from tests.live_server import live_server  # noqa: E402
from tests.ui_browser import browser_page  # noqa: E402


def train_run(model: str, data: dict[str, Path], out: Path, lr: float, steps: int) -> None:
    peftlab.train({"model": model, "method": {"name": "lora", "r": 8, "alpha": 16},
                   "data": {"train": str(data["train"]), "validation": str(data["validation"])},
                   "train": {"max_steps": steps, "batch_size": 8, "lr": lr, "log_every": 2,
                             "eval_every": max(steps // 4, 1), "max_length": 128,
                             "precision": "fp32", "seed": 0},
                   "output_dir": str(out)}, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (fast)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", default=str(ROOT / "docs" / "ui"))
    args = parser.parse_args()
    shots = Path(args.out)
    shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peftlab-ui-shots-") as tmp:
        work = Path(tmp)
        data = write_demo_data(work / "data")
        model = (str(build_diverse_chat_model(work / "tiny-model")) if args.tiny
                 else "smollm2-135m-instruct")
        runs = work / "runs"
        for lr in (1e-3, 3e-4):
            train_run(model, data, runs / "sweep-lr" / f"lora-lr{lr:g}", lr, args.steps)
        prompt = json.loads(data["validation"].read_text().splitlines()[0])["instruction"]
        with live_server(make_app(runs, data_dirs=[work / "data"])) as url, \
                browser_page(1280, 860) as page:
            page.goto(url)
            page.locator("#runs-table tbody tr").nth(1).wait_for()
            # new run: the form, filled in
            page.click("nav button[data-view=new]")
            page.fill("#new-form input[name=name]", "live-run")
            page.fill("#new-form input[name=model]", model)
            page.fill("#new-form input[name='data.train']", str(data["train"]))
            page.fill("#new-form input[name='data.validation']", str(data["validation"]))
            for key, value in {"train.max_steps": str(args.steps * 3), "train.lr": "0.001",
                               "train.log_every": "2", "train.eval_every": "6",
                               "train.max_length": "128", "train.batch_size": "8"}.items():
                page.fill(f"#new-form input[name='{key}']", value)
            page.screenshot(path=str(shots / "new_run.png"), full_page=True)
            page.click("#new-form button[type=submit]")
            page.locator("#new-message.ok").wait_for()
            # the live run, part-way
            page.click("nav button[data-view=runs]")
            page.locator("#runs-table tr[data-run='live-run'] .state-running").wait_for(
                timeout=600_000)
            page.click("#runs-table tr[data-run='live-run']")
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                n = page.locator("#detail-charts svg[data-title=loss] polyline")
                if n.count() and int(n.get_attribute("data-n")) >= args.steps // 2:
                    break
                time.sleep(1)
            page.locator("#run-detail").scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "live_run.png"), full_page=True)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(shots / "runs.png"))
            # compare the sweep
            page.click("nav button[data-view=compare]")
            page.select_option("#sweep-select", "sweep-lr")
            page.locator("#compare-table tbody tr:nth-child(2)").wait_for()
            page.screenshot(path=str(shots / "compare.png"), full_page=True)
            # chat: base vs adapter
            page.click("nav button[data-view=chat]")
            page.select_option("#chat-run", "sweep-lr/lora-lr0.001")
            page.fill("#chat-prompt", prompt)
            page.click("#chat-send")
            page.locator("#chat-message.ok").wait_for(timeout=300_000)
            page.screenshot(path=str(shots / "chat.png"))
    print("wrote", ", ".join(sorted(p.name for p in shots.glob("*.png"))), "to", shots)


if __name__ == "__main__":
    main()
