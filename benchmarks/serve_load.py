"""Load test of ``peftlab serve``: 1 client vs 16 concurrent clients, base + 2 LoRA adapters.

The server runs as its own process (``peftlab serve``, exactly as a user starts it) with the
embedded SmolLM2-135M-Instruct and two LoRA adapters made here (r=8 on every projection,
seeded, B small and non-zero so every adapter changes the model). Clients are threads of this
process speaking plain HTTP/1.1 to 127.0.0.1; request i of a client asks for model
``[base, a1, a2][i % 3]`` (shifted per client, so every decode step mixes all three), one
Alpaca instruction as the user turn, ``max_tokens`` 32, greedy. A client sends its next
request as soon as the last one returns (closed loop). Each phase loads the server for
``--warmup`` seconds (15: the batch fills up) and then measures a ``--seconds`` window (60):
tokens/s is the server's count of tokens generated in the window, latencies those of the
requests that started and finished in it; the whole-phase figures (ramp-up and the drain of
the last requests included) are reported next to them.

Phases, in one run on one machine (so the ratios compare like with like):

* ``1 client``: one request at a time — the single-request latency and tokens/s;
* ``16 clients``: continuous batching with mixed adapters (``--max-batch 16``);
* ``16 clients, serial`` (the reference, skip with ``--no-reference``): the same server
  with ``--max-batch 1``, i.e. one request at a time as before continuous batching;
* ``1 client`` and ``16 clients, unpacked weights`` (skip with ``--no-unpacked``): the batched
  server with ``--no-packed-weights``, the lever's own effect.

Targets: 0 errors; aggregate completion tokens/s at 16 clients >= 4x the 1-client figure;
p50 latency at 16 clients <= 4x the 1-client p50.

    python benchmarks/serve_load.py                 # 15 + 60 s per phase (~6 min in all)
    python benchmarks/serve_load.py --seconds 20    # quicker, noisier
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from peftlab.methods.lora import LoraConfig, apply_lora, save_lora
from peftlab.models import load_model
from peftlab.runtime.precision import matmul_gflops

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.jsonl"
RESULTS = REPO / "benchmarks" / "results"
MODEL = "smollm2-135m-instruct"
MODELS = ("base", "a1", "a2")
TARGETS = {"tokens_per_s_ratio": 4.0, "p50_ratio": 4.0}
FALLBACK_PROMPTS = [
    "Name three primary colours.", "What is the capital of France?",
    "Give one tip for staying healthy.", "Explain what a noun is in one sentence.",
    "Write a haiku about the sea.", "What does a thermometer measure?",
]


def make_adapters(model: str, directory: Path, seed: int = 0) -> dict[str, Path]:
    out = {}
    for i, name in enumerate(MODELS[1:]):
        base, _ = load_model(model)
        torch.manual_seed(seed + i)
        apply_lora(base, LoraConfig(r=8, alpha=16, init="gaussian", target_modules="all-linear"))
        with torch.no_grad():
            for n, p in base.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.002)
        out[name] = directory / name
        save_lora(base, out[name], base_model_name_or_path=model)
    return out


def prompts(n: int) -> tuple[list[str], str]:
    if not ALPACA.is_file():
        return FALLBACK_PROMPTS, "built-in prompts (Alpaca not found)"
    rows = [json.loads(line) for line in ALPACA.open(encoding="utf-8")][:n]
    texts = [(r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")) for r in rows]
    return texts, f"first {len(texts)} Alpaca instructions ({ALPACA.name})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, adapters: dict[str, Path], port: int, threads: int,
                 max_batch: int, log: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "peftlab.cli", "serve", "--model", model, "--name", "base",
           "--port", str(port), "--threads", str(threads), "--max-batch", str(max_batch),
           "--max-queue", "256", "--max-tokens-limit", "256", *extra]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log}")
        try:
            if get(port, "/health")[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("the server did not come up in 600 s")


def get(port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def run_phase(port: int, clients: int, seconds: float, texts: list[str], max_tokens: int,
              warmup: float = 0.0) -> dict:
    """Closed-loop clients for ``warmup + seconds``. The measured window is the last
    ``seconds``: tokens/s is the server's count of tokens generated in it (every running
    request's, finished or not), latencies are those of requests that started and ended in
    it. Whole-phase figures (ramp-up and the drain after the last request included) too."""
    done: list[tuple[float, float, int, str]] = []  # (start, end, completion tokens, model)
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    start = time.monotonic()
    window = (start + warmup, start + warmup + seconds)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        i = 0
        while time.monotonic() < window[1]:
            with lock:
                n = next(counter)
            model = MODELS[(i + k) % len(MODELS)]
            body = json.dumps({"model": model, "max_tokens": max_tokens, "temperature": 0,
                               "messages": [{"role": "user", "content": texts[n % len(texts)]}]})
            t0 = time.monotonic()
            try:
                conn.request("POST", "/v1/chat/completions", body,
                             {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = json.loads(r.read())
                if r.status != 200:
                    raise RuntimeError(f"{r.status}: {data}")
                with lock:
                    done.append((t0, time.monotonic(), data["usage"]["completion_tokens"], model))
            except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            i += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, window[0] - time.monotonic()))
    first = get(port, "/health")[1]
    time.sleep(max(0.0, window[1] - time.monotonic()))
    last = get(port, "/health")[1]
    measured = window[1] - window[0]
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    inside = sorted(e - s for s, e, _, _ in done if s >= window[0] and e <= window[1])
    total = sum(r[2] for r in done)

    def delta(key: str) -> float:
        return round(last.get(key, 0) - first.get(key, 0), 3)

    steps = delta("steps")
    return {
        "clients": clients, "requests": len(done), "errors": len(errors),
        "error_samples": errors[:5], "window_s": round(measured, 2),
        "tokens_per_s": round(delta("generated_tokens") / measured, 2),
        "p50_latency_s": _pct(inside, 0.5), "p95_latency_s": _pct(inside, 0.95),
        "requests_in_window": len(inside),
        "decode_steps": steps,
        "mean_rows_per_step": round(delta("generated_tokens") / steps, 2) if steps else None,
        "mixed_adapter_steps": delta("mixed_steps"),
        "decode_seconds": delta("decode_seconds"), "prefill_seconds": delta("prefill_seconds"),
        "prefill_tokens": delta("prefill_tokens"),
        "prefix_tokens_reused": delta("prefix_tokens_reused"),
        "max_rows_seen": last.get("max_rows_seen"),
        "by_model": {m: sum(1 for r in done if r[3] == m) for m in MODELS},
        "whole_phase": {"wall_s": round(wall, 2), "completion_tokens": total,
                        "tokens_per_s": round(total / wall, 2),
                        "p50_latency_s": _pct(sorted(e - s for s, e, _, _ in done), 0.5)},
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1_5_15": os.getloadavg(),
            "matmul_gflops": {k: round(v, 1) for k, v in matmul_gflops().items()},
            "python": platform.python_version(), "torch": torch.__version__,
            "note": "shared machine: other engineers' jobs ran at the same time"}


def table(result: dict) -> str:
    rows = ["| phase | clients | requests | errors | tokens/s | p50 s | p95 s | tokens/step "
            "| whole phase: tokens/s, p50 s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, p in result["phases"].items():
        w = p["whole_phase"]
        rows.append(f"| {name} | {p['clients']} | {p['requests']} | {p['errors']} | "
                    f"{p['tokens_per_s']} | {p['p50_latency_s']} | {p['p95_latency_s']} | "
                    f"{p['mean_rows_per_step']} | {w['tokens_per_s']}, {w['p50_latency_s']} |")
    r = result["ratios"]
    rows += ["", f"- tokens/s and latencies: the {result['seconds_per_phase']:.0f} s window after "
             f"{result['warmup_s']:.0f} s of load; whole phase: ramp-up and drain included",
             f"- tokens/s, 16 clients / 1 client: **{r['tokens_per_s_ratio']}x** (target "
             f">= {TARGETS['tokens_per_s_ratio']}x)",
             f"- p50 latency, 16 clients / 1 client: **{r['p50_ratio']}x** (target <= "
             f"{TARGETS['p50_ratio']}x)"]
    if "vs_serial_tokens_per_s" in r:
        rows.append(f"- tokens/s, continuous batching / serial server at 16 clients: "
                    f"**{r['vs_serial_tokens_per_s']}x**")
    if "vs_unpacked_tokens_per_s" in r:
        rows.append(f"- tokens/s, packed / unpacked weights: 1 client "
                    f"**{r['vs_unpacked_1_client']}x**, 16 clients "
                    f"**{r['vs_unpacked_tokens_per_s']}x**")
    m = result["machine"]
    peaks = m.get("matmul_gflops", {})
    rows.append(f"- machine: {m['cpu']}, {m['cores']} cores, matmul peaks bf16 "
                f"{peaks.get('bf16')} / fp32 {peaks.get('fp32')} GFLOP/s, load average at start "
                f"{m['load_avg_1_5_15'][0]:.1f}, at end {result['load_avg_end'][0]:.1f} — "
                f"{m['note']}")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window per phase")
    ap.add_argument("--warmup", type=float, default=15.0,
                    help="seconds of load before the window (the batch fills up)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--no-reference", action="store_true", help="skip the serial server phase")
    ap.add_argument("--no-unpacked", action="store_true",
                    help="skip the phases of a server with --no-packed-weights")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    texts, source = prompts(500)
    result: dict = {"model": args.model, "adapters": "a1, a2: LoRA r=8 all-linear, random B",
                    "prompts": source, "max_tokens": args.max_tokens, "greedy": True,
                    "seconds_per_phase": args.seconds, "warmup_s": args.warmup,
                    "server_threads": args.threads,
                    "machine": machine(), "phases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, Path(tmp))
        # (server, --max-batch, extra flags, phases: (clients, name))
        many = f"{args.clients} clients"
        plan = [("batched", args.clients, (), [(1, "1 client"), (args.clients, many)])]
        if not args.no_reference:
            plan.append(("serial", 1, (), [(args.clients, f"{many}, serial server")]))
        if not args.no_unpacked:
            plan.append(("unpacked", args.clients, ("--no-packed-weights",),
                         [(1, "1 client, unpacked weights"),
                          (args.clients, f"{many}, unpacked weights")]))
        for kind, max_batch, extra, phases in plan:
            port = free_port()
            log = Path(tmp) / f"server-{kind}.log"
            server = start_server(args.model, adapters, port, args.threads, max_batch, log,
                                  extra)
            try:
                run_phase(port, 1, 0.1, texts, args.max_tokens)  # warm-up
                for clients, name in phases:
                    print(f"phase: {name} for {args.seconds:.0f} s", flush=True)
                    result["phases"][name] = run_phase(port, clients, args.seconds, texts,
                                                       args.max_tokens, args.warmup)
                    print(json.dumps(result["phases"][name]), flush=True)
            finally:
                server.terminate()
                server.wait(timeout=60)
    one, many = result["phases"]["1 client"], result["phases"][f"{args.clients} clients"]
    ratios = {"tokens_per_s_ratio": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
              "p50_ratio": round(many["p50_latency_s"] / one["p50_latency_s"], 2)}
    serial = result["phases"].get(f"{args.clients} clients, serial server")
    if serial:
        ratios["vs_serial_tokens_per_s"] = round(many["tokens_per_s"] / serial["tokens_per_s"], 2)
    unpacked = result["phases"].get(f"{args.clients} clients, unpacked weights")
    if unpacked:
        ratios["vs_unpacked_tokens_per_s"] = round(
            many["tokens_per_s"] / unpacked["tokens_per_s"], 2)
        ratios["vs_unpacked_1_client"] = round(
            one["tokens_per_s"] / result["phases"]["1 client, unpacked weights"]["tokens_per_s"],
            2)
    result["ratios"] = ratios
    result["targets_met"] = {
        "no_errors": all(p["errors"] == 0 for p in result["phases"].values()),
        "tokens_per_s": ratios["tokens_per_s_ratio"] >= TARGETS["tokens_per_s_ratio"],
        "p50": ratios["p50_ratio"] <= TARGETS["p50_ratio"]}
    result["load_avg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(result, indent=2))
    text = table(result)
    (args.out / "serve_load.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
