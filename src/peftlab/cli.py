"""Command line: ``peftlab train|sweep|baseline|eval|predict|chat|serve|export|merge-adapters|ui|demo``. Thin: every command calls peftlab.api."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peftlab.config import PRECISIONS
from peftlab.errors import describe_error

# Each command imports what it runs inside its function: torch, transformers and the API take
# ~10 s to import on 2 cores, which `peftlab --help` and a mistyped flag should not wait for.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftlab", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of any error (also: PEFTLAB_DEBUG=1)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the libraries' own output (transformers' loading bars "
                        "and load reports, deprecation warnings)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune as a YAML config says")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in output_dir (or the one given)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in output_dir (without it, that is an error)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("sweep", help="hyper-parameter search / method comparison: one run per "
                       "grid point, or an Optuna search with pruning (--space); ranked by "
                       "train.best_metric")
    p.add_argument("config")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="values to try for a config key, e.g. --grid train.lr=1e-4,3e-4 "
                        "--grid method.name=lora,ia3 (repeatable; all combinations)")
    p.add_argument("--space", default=None, metavar="SPACE.yaml",
                   help="search space (ranges/choices per config key) for an Optuna study "
                        "stored in OUTPUT_DIR/study.db (resumed when run again)")
    p.add_argument("--sampler", default=None, help="--space: tpe | random | grid (default tpe)")
    p.add_argument("--pruner", default=None,
                   help="--space: median | asha | none (default none): stop hopeless trials "
                        "at an evaluation")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="--space: start no new trial after this many seconds")
    p.add_argument("--workers", type=int, default=None,
                   help="--space: trials in parallel, as processes sharing the study, each "
                        "with cores/workers threads")
    p.add_argument("--trials", type=int, default=None,
                   help="--grid: train only this many grid points, a seeded random sample; "
                        "--space: trials in the study in total")
    p.add_argument("--seed", type=int, default=None, help="seed of the sample / the sampler")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config key for every trial")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("baseline", help="TF-IDF + linear model on a classification config's "
                       "data: the bar a fine-tuned model must beat")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--folds", type=int, default=5,
                   help="cross-validation folds choosing the model and C (grouped by "
                        "data.group_field when set)")

    p = sub.add_parser("eval", help="validation loss and perplexity, base vs adapter")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--adapter", default=None, help="adapter dir (default: OUTPUT_DIR/adapter)")

    p = sub.add_parser("predict", help="classify a data file with a trained classifier")
    p.add_argument("--adapter", required=True, help="adapter dir of a task: classification run")
    p.add_argument("--input", required=True, help="JSONL/JSON/CSV/TSV/Parquet file to classify")
    p.add_argument("--model", default=None,
                   help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--output", default=None,
                   help="write one JSON line per row here (default: print them)")
    p.add_argument("--text-field", default=None, help="default: the training text field")
    p.add_argument("--text-pair-field", default=None)
    p.add_argument("--batch-size", type=int, default=32)

    p = sub.add_parser("chat", help="chat with a model (and an adapter)")
    p.add_argument("--model", required=True, help="embedded alias, HF id, directory or .gguf")
    p.add_argument("--adapter", default=None)
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="weights for generation: auto (default) = bf16 where bf16 matmuls are "
                        "clearly faster, else fp32")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API: one base model, many LoRA "
                       "adapters chosen by the request's model name; classifiers too")
    p.add_argument("--model", default=None,
                   help="embedded alias, HF id, directory or .gguf (optional with --classifier)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter served as model NAME (repeatable)")
    p.add_argument("--classifier", action="append", default=[], metavar="NAME=DIR",
                   help="a task: classification adapter served as NAME at POST /v1/classify, "
                        "deciding by its saved threshold (repeatable)")
    p.add_argument("--name", default=None, help="model name of the base (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens-limit", type=int, default=2048,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded together (continuous batching)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a batch slot; more get 429")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per step (a long prompt cannot stall streams)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds after which a request is dropped (504)")
    p.add_argument("--api-key", default=os.environ.get("PEFTLAB_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $PEFTLAB_API_KEY; none)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (repeatable; default: none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; 1 on a busy machine)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="weights for generation: auto (default) = bf16 where bf16 matmuls are "
                        "clearly faster (decoding ~2x faster), else fp32")
    p.add_argument("--no-packed-weights", dest="packed_weights", action="store_false",
                   help="do not keep a copy of the weights packed for the CPU's matmul kernel "
                        "(saves the weights' size in RAM; decoding is slower)")

    p = sub.add_parser("export", help="fold an adapter into the model; write GGUF and/or a "
                       "plain transformers directory")
    p.add_argument("--model", required=True, help="embedded alias, HF id, directory or .gguf")
    p.add_argument("--adapter", default=None, help="LoRA/IA3 adapter dir to fold in")
    p.add_argument("--gguf", default=None, metavar="FILE", help="write a GGUF file here")
    p.add_argument("--gguf-adapter", default=None, metavar="FILE",
                   help="write the LoRA --adapter alone as a llama.cpp GGUF adapter (--lora)")
    p.add_argument("--dtype", default="f16",
                   help="GGUF weights: f32 | f16 | bf16 | q8_0 | q5_1 | q5_0 | q4_1 | q4_0")
    p.add_argument("--tokenizer-pre", default="default",
                   help="llama.cpp pre-tokenizer name (e.g. smollm, llama-bpe; default: GPT-2)")
    p.add_argument("--hf", default=None, metavar="DIR",
                   help="write a merged transformers model (safetensors + tokenizer) here")

    p = sub.add_parser("merge-adapters", help="combine LoRA adapters of one base model into "
                       "one (linear, TIES, DARE), e.g. multi-task from single-task adapters")
    p.add_argument("--adapter", action="append", required=True, metavar="DIR",
                   help="a LoRA adapter directory (repeat for each adapter)")
    p.add_argument("--output", required=True, metavar="DIR", help="write the merged adapter here")
    p.add_argument("--weights", default=None, metavar="W1,W2,...",
                   help="one weight per adapter (default: 1/n each for linear and dare_linear, "
                        "1 each for ties and dare_ties)")
    p.add_argument("--combination", default="linear",
                   help="linear (weighted sum, exact) | ties | dare_linear | dare_ties")
    p.add_argument("--density", type=float, default=None,
                   help="ties/dare: share of each adapter's update kept, in (0, 1]")
    p.add_argument("--majority-sign", default="total", help="ties: total | frequency")
    p.add_argument("--rank", type=int, default=None,
                   help="rank of the merged adapter (default: the sum of the input ranks; "
                        "linear below that is a truncated SVD)")
    p.add_argument("--seed", type=int, default=0, help="dare: seed of the random masks")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --output directory")

    p = sub.add_parser("ui", help="local web app: runs, live metrics, compare, new run, chat")
    p.add_argument("--runs", default=None, metavar="DIR",
                   help="folder of run folders to show; new runs are written here (default: runs)")
    p.add_argument("--data", action="append", default=None, metavar="DIR",
                   help="folder of data sets offered in the new-run form (repeatable; default: "
                        "data and ../shared/data where they exist)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host: anyone who reaches it can start runs and "
                        "read run files (there is no login)")

    p = sub.add_parser("demo", help="LoRA-tune the embedded SmolLM2 on generated facts")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("PEFTLAB_DEBUG", "") not in ("", "0")
    try:
        with quiet_libraries(enabled=not args.verbose):
            return _COMMANDS[args.command](args)
    except EXPECTED_ERRORS as exc:  # bad input, a bad file, the OS: one line, exit 2
        if debug:
            traceback.print_exc()
        print(f"peftlab {args.command}: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    # anything else is a bug in peftlab: Python prints its traceback


@contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """peftlab's terminal output is peftlab's: transformers' "Loading weights" bars, its LOAD
    REPORT tables (e.g. a classifier head that peftlab restores right after) and libraries'
    deprecation warnings are hidden unless ``--verbose``. Restored afterwards, so a caller
    of ``main()`` (a test, a notebook) keeps its own settings."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging  # see the imports' comment

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category,
                                        module=r"(transformers|torch|peft|huggingface_hub)\b")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# Raised for what a user can fix (config, data, files, permissions, ports). ValueError covers
# ConfigError, DataError and CorruptFileError; everything else propagates with a traceback.
EXPECTED_ERRORS = (ValueError, KeyError, OSError)


def _train(args: argparse.Namespace) -> int:
    from peftlab.api import train  # on first use (see the imports' comment)

    summary = train(args.config, args.overrides, resume=args.resume,
                    progress=not args.no_progress, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(f"done: {summary.result.steps} steps, adapter in {summary.adapter_dir}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from peftlab.api import sweep  # on first use (see the imports' comment)
    from peftlab.lab.sweep import table

    if bool(args.grid) == (args.space is not None):
        raise ValueError("give either --grid KEY=V1,V2 (repeatable) or --space SPACE.yaml")
    result = sweep(args.config, args.grid or None, overrides=args.overrides, trials=args.trials,
                   seed=args.seed, progress=not args.no_progress, space=args.space,
                   sampler=args.sampler, pruner=args.pruner, timeout=args.timeout,
                   workers=args.workers)
    counts = result.counts()
    print(f"{counts['done']} finished, {counts['pruned']} pruned, {counts['failed']} failed")
    print(table(result))
    best = result.best
    if best is None:
        print(f"no trial produced {result.metric}; see {result.output_dir / 'sweep.md'}")
        return 1
    print(f"best: {best.overrides} ({result.metric} {best.best_value:.4f}), adapter in "
          f"{best.directory}/adapter; report {result.output_dir / 'sweep.md'}")
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from peftlab.api import baseline  # on first use (see the imports' comment)
    from peftlab.lab.baseline import describe as describe_baseline

    result = baseline(args.config, args.overrides, folds=args.folds)
    for line in describe_baseline(result):
        print(line)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from peftlab.api import evaluate  # on first use (see the imports' comment)
    from peftlab.evaluation.sft_eval import describe_forgetting, generation_table

    results = evaluate(args.config, args.overrides, adapter=args.adapter)
    print(f"{'model':<10} {'val_loss':>9} {'perplexity':>11}   ({results['examples']} examples)")
    for name in ("base", "adapter"):
        if name in results:
            r = results[name]
            print(f"{name:<10} {r['val_loss']:>9.4f} {r['perplexity']:>11.2f}")
    report = results.get("adapter", {}).get("report")
    if report and "macro_f1" in report:
        print(classification_line(report))
    if "forgetting" in results:
        print(describe_forgetting(results["forgetting"]))
    if "generation" in results:
        print(f"generation on {results['generation']['examples']} validation prompts:")
        print("\n".join(generation_table(results["generation"])))
    print(json.dumps(results))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from peftlab.api import predict  # on first use (see the imports' comment)

    result = predict(args.adapter, args.input, model=args.model, output=args.output,
                     text_field=args.text_field, text_pair_field=args.text_pair_field,
                     batch_size=args.batch_size)
    if args.output is None:
        for item in result["predictions"]:
            print(json.dumps(item))
    summary = f"predicted {result['rows']} rows"
    if result["threshold"] is not None:
        summary += f" (decision threshold {result['threshold']:.4f})"
    if result["truncated"]:
        summary += f" ({result['truncated']} truncated to max_length)"
    if result["accuracy"] is not None:
        summary += f"; accuracy {result['accuracy']:.4f} on {result['labelled']} labelled rows"
    if args.output:
        summary += f"; wrote {args.output}"
    print(summary, file=sys.stderr if args.output is None else sys.stdout)
    return 0


def classification_line(report: dict) -> str:
    """One line of a classification report: accuracy, macro-F1 and every class's F1."""
    per_class = ", ".join(f"{label} {s['f1']:.4f}" for label, s in report["per_class"].items())
    threshold = report.get("decision", {}).get("threshold")
    return (f"adapter: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}, "
            f"F1 per class: {per_class}"
            + (f" (decision threshold {threshold:.4f})" if threshold is not None else ""))


def _chat(args: argparse.Namespace) -> int:
    from peftlab.api import load  # on first use (see the imports' comment)
    from peftlab.evaluation.generate import generate_replies
    from peftlab.runtime.precision import prepare_inference  # on first use

    model, tokenizer = load(args.model, adapter=args.adapter)
    prepare_inference(model, args.precision)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []

    def reply(text: str) -> str:
        history.append({"role": "user", "content": text})
        answer = generate_replies(model, tokenizer, [history], max_new_tokens=args.max_new_tokens,
                                  do_sample=args.sample, temperature=args.temperature)[0]
        history.append({"role": "assistant", "content": answer})
        return answer

    if args.prompt is not None:
        print(reply(args.prompt))
        return 0
    print("chat: type a message; /reset clears the conversation, /quit leaves.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            del history[1 if args.system else 0:]
            continue
        if text:
            print(f"bot> {reply(text)}")


def _named_dirs(flag: str, specs: list[str], taken: set[str]) -> dict[str, str]:
    """``NAME=DIR`` items of a repeatable flag; a name may be used once across flags."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"{flag} {spec!r}: expected NAME=DIR, e.g. support=runs/x/adapter")
        if name in out or name in taken:
            raise ValueError(f"{flag}: name {name!r} given twice")
        out[name] = directory
    taken.update(out)
    return out


def _serve(args: argparse.Namespace) -> int:
    import torch  # on first use (see the imports' comment)

    from peftlab.serve.classify import Classifiers  # on first use, as torch
    from peftlab.serve.engine import Engine
    from peftlab.serve.server import (  # on first use, as torch
        bind,
        is_loopback,
        make_app,
        make_server,
    )

    taken: set[str] = set()
    adapters = _named_dirs("--adapter", args.adapter, taken)
    classifier_dirs = _named_dirs("--classifier", args.classifier, taken)
    if args.model is None and not classifier_dirs:
        raise ValueError("serve needs --model (a chat model), --classifier NAME=DIR, or both")
    if args.model is None and adapters:
        raise ValueError("--adapter needs --model (the base model the adapters were trained on)")
    base_name = args.name or args.model
    if base_name in classifier_dirs:
        raise ValueError(f"--classifier: name {base_name!r} is the base model's name")
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--prefill-chunk", args.prefill_chunk),
                        ("--max-tokens-limit", args.max_tokens_limit)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    sock = bind(args.host, args.port)  # before the model loads, not after
    try:
        classifiers = Classifiers(classifier_dirs)
        engine = None if args.model is None else Engine(
            args.model, adapters, base_name=args.name, max_tokens_limit=args.max_tokens_limit,
            max_batch=args.max_batch, max_queue=args.max_queue,
            prefill_chunk=args.prefill_chunk, request_timeout=args.request_timeout,
            precision=args.precision, packed_weights=args.packed_weights)
        app = make_app(engine, api_key=args.api_key, cors_origins=args.cors_origin,
                       loopback_only=is_loopback(args.host), classifiers=classifiers)
        ids = [*(engine.model_ids() if engine else []), *classifiers.names()]
        host, port = sock.getsockname()[:2]
        dtype = f", generating in {engine.precision}" if engine else ""
        print(f"serving {ids} at http://{host}:{port}/v1{dtype} (Ctrl-C stops)", flush=True)
        make_server(app).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def _export(args: argparse.Namespace) -> int:
    from peftlab.api import export  # on first use (see the imports' comment)

    written = export(args.model, adapter=args.adapter, gguf=args.gguf, hf=args.hf,
                     dtype=args.dtype, tokenizer_pre=args.tokenizer_pre,
                     gguf_adapter=args.gguf_adapter)
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return 0


def _merge_adapters(args: argparse.Namespace) -> int:
    from peftlab.api import merge_adapters  # on first use (see the imports' comment)

    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ValueError(f"--weights {args.weights!r}: expected numbers separated by "
                             "commas, e.g. 0.5,0.5") from None
    summary = merge_adapters(args.adapter, args.output, weights=weights,
                             combination=args.combination, density=args.density,
                             majority_sign=args.majority_sign, rank=args.rank, seed=args.seed,
                             overwrite=args.overwrite)
    print(f"merged {len(args.adapter)} adapters ({summary['combination']}, weights "
          f"{summary['weights']}) into {summary['output']}: rank {summary['rank']}, "
          f"{summary['modules']} modules, relative error of the rank truncation "
          f"max {summary['max_relative_error']:.4f}, mean {summary['mean_relative_error']:.4f}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from peftlab.serve.server import bind, is_loopback, make_server  # on first use, as above
    from peftlab.ui.app import make_app as make_ui_app

    if not is_loopback(args.host) and not args.allow_remote:
        raise ValueError(f"--host {args.host}: the UI starts training runs and reads run files "
                         "with no login; it binds to 127.0.0.1 unless you add --allow-remote")
    if args.runs is not None and not Path(args.runs).is_dir():  # a typo would show no runs
        raise ValueError(f"--runs {args.runs}: not a folder (omit --runs to use ./runs)")
    args.runs = args.runs or "runs"
    data_dirs = [Path(d) for d in (args.data or ["data", "../shared/data"])]
    for d in data_dirs if args.data else []:
        if not d.is_dir():
            raise ValueError(f"--data {d}: not a folder")
    sock = bind(args.host, args.port)  # a busy port fails here, with one line
    try:
        app = make_ui_app(args.runs, data_dirs=data_dirs)
        host, port = sock.getsockname()[:2]
        print(f"peftlab ui: runs in {Path(args.runs).resolve()} at http://{host}:{port}/ "
              "(Ctrl-C stops)", flush=True)
        make_server(app).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from peftlab.lab.demo import run_demo  # on first use (see the imports' comment)

    run_demo(args.output_dir, overrides=args.overrides)
    return 0


_COMMANDS = {"train": _train, "sweep": _sweep, "baseline": _baseline, "eval": _eval,
             "predict": _predict, "chat": _chat, "serve": _serve, "export": _export,
             "merge-adapters": _merge_adapters, "ui": _ui, "demo": _demo}

if __name__ == "__main__":
    raise SystemExit(main())
