"""CLAUDETTE unfair-clause detection: the TF-IDF baseline vs a trained peftlab classifier.

Two measurements, both on ../shared/data/claudette_unfair_tos/train.jsonl (40 documents; the
held-back test documents are not available here):

    # 1. the baseline, document-grouped 5-fold cross-validation over all 40 training documents
    #    (C and the model chosen by an inner grouped CV on each outer training part: no peeking),
    #    plus the baseline on the validation documents of configs/claudette_unfair.yaml
    python benchmarks/claudette_unfair.py baseline

    # 2. a run of configs/claudette_unfair.yaml (its adapter, with the saved threshold) on the
    #    same validation documents
    python benchmarks/claudette_unfair.py adapter --run runs/claudette_unfair --seconds 2400

    # 3. a recipe (configs/claudette_unfair.yaml + overrides) under the SAME outer folds as 1:
    #    each fold trains on its 32 training documents (its own grouped validation documents
    #    choose the best step and the threshold) and scores its held-out documents; also a
    #    TF-IDF logistic regression and the mean of both on the same inner validation
    python benchmarks/claudette_unfair.py cv --name lora --set train.epochs=3 --jobs 2

All report unfair-class F1, macro-F1 and the recall of each unfair category (limitation of
liability, unilateral termination, ...), pooled over the held-out folds. Writes
benchmarks/results/claudette_unfair.{json,md}. Times are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from _common import REPO, RESULTS, read_jsonl, save_part, write_jsonl
from sklearn.model_selection import StratifiedGroupKFold

from peftlab.api import predict
from peftlab.config import load_config
from peftlab.data.classification import LabelledRow
from peftlab.evaluation.metrics import classification_report, tune_threshold
from peftlab.lab.baseline import cross_validate, make_classifier, make_vectorizer, run_baseline
from peftlab.tasks.classification.predict import load_classifier
from peftlab.tasks.classification.task import read_classification_rows
from peftlab.tasks.classification.tfidf import TfidfModel

CONFIG = REPO / "configs" / "claudette_unfair.yaml"
OUT = RESULTS / "claudette_unfair.json"


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _config():
    cwd = os.getcwd()
    os.chdir(REPO)  # the config's data path is relative to the repository
    try:
        cfg = load_config(CONFIG)
        cfg.data.train = str((REPO / cfg.data.train).resolve())
        return cfg
    finally:
        os.chdir(cwd)


def _scores(gold: list[int], pred: list[int], categories: list[list[str]]) -> dict:
    report = classification_report(gold, pred, ["0", "1"])
    per_cat: dict[str, list[int]] = {}
    for cats, p in zip(categories, pred, strict=True):
        for c in cats:
            per_cat.setdefault(c, []).append(p)
    recall = {c: {"recall": round(sum(v) / len(v), 4), "sentences": len(v)}
              for c, v in sorted(per_cat.items(), key=lambda kv: -len(kv[1]))}
    one = report["per_class"]["1"]
    return {"f1_unfair": one["f1"], "precision_unfair": one["precision"],
            "recall_unfair": one["recall"], "macro_f1": report["macro_f1"],
            "accuracy": report["accuracy"], "category_recall": recall,
            "sentences": len(gold), "unfair": sum(gold)}


def _categories(cfg, rows: list[LabelledRow]) -> list[list[str]]:
    """unfair_categories of ``rows`` (matched by row number in the training file)."""
    raw = read_jsonl(Path(cfg.data.train))
    return [raw[r.row - 1]["unfair_categories"] for r in rows]


def _outer_folds(folds: int = 5):
    """(config, all rows, gold 0/1, categories, [(train idx, test idx)]): the document-grouped
    outer folds every CV measurement here shares, so the baseline and each recipe are scored
    on exactly the same held-out documents."""
    cfg = _config()
    cfg.data.validation_split = 0.0
    rows, _, labels, _ = read_classification_rows(cfg)
    y = [labels.index(r.label) for r in rows]
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0)
    splits = list(splitter.split([r.text for r in rows], y, [r.group for r in rows]))
    return cfg, rows, y, _categories(cfg, rows), splits


def baseline_cv(folds: int = 5) -> dict:
    cfg, rows, y, cats, splits = _outer_folds(folds)
    labels = ["0", "1"]  # the unfair field's values, in class order
    texts = [r.text for r in rows]
    pred = [0] * len(rows)
    chosen = []
    t0 = time.perf_counter()
    for train_idx, test_idx in splits:
        inner = cross_validate([rows[i] for i in train_idx], labels, "f1", grouped=True)
        p = inner["grid"][0]
        chosen.append({k: p[k] for k in ("model", "C", "class_weight")})
        vec = make_vectorizer()
        clf = make_classifier(p["model"], p["C"], p["class_weight"], 0, 2)
        clf.fit(vec.fit_transform([texts[i] for i in train_idx]), [y[i] for i in train_idx])
        for i, v in zip(test_idx, clf.predict(vec.transform([texts[i] for i in test_idx])),
                        strict=True):
            pred[i] = int(v)
    return {"folds": folds, "documents": len({r.group for r in rows}), "chosen": chosen,
            "seconds": round(time.perf_counter() - t0, 1), **_scores(y, pred, cats)}


def _p_unfair(adapter: Path, *texts: list[str]) -> tuple[list[list[float]], list[list[float]]]:
    """p(unfair) of the saved classifier for each list of ``texts`` (as predict/serve compute
    it), and of its network alone when it has a TF-IDF ensemble member (else [])."""
    clf = load_classifier(adapter)
    full = [clf.predict_proba(t)[:, 1].tolist() for t in texts]
    if clf.task.tfidf is None:
        return full, []
    clf.task.tfidf = None
    return full, [clf.predict_proba(t)[:, 1].tolist() for t in texts]


def _tfidf_logreg(train: list[str], y: list[int], *others: list[str]) -> list[list[float]]:
    """p(unfair) of ``classification.ensemble: tfidf``'s member (balanced TF-IDF logistic
    regression) fitted on ``train``, for each of ``others``."""
    model = TfidfModel.fit(train, y, 2)
    return [model.proba(t)[:, 1].tolist() for t in others]


def recipe_fold(name: str, k: int, sets: list[str], threads: int, work: Path) -> dict:
    """Train ``configs/claudette_unfair.yaml`` + ``sets`` on outer fold ``k``'s training
    documents (its own grouped validation documents pick the threshold and the best step),
    then score the fold's held-out documents. Writes and returns the fold's record."""
    cfg, rows, y, _, splits = _outer_folds()
    train_idx, test_idx = splits[k]
    raw = read_jsonl(Path(cfg.data.train))
    fold = work / name / f"fold{k}"
    fold.mkdir(parents=True, exist_ok=True)
    write_jsonl(fold / "train.jsonl", [raw[rows[i].row - 1] for i in train_idx])
    overrides = [f"data.train={fold / 'train.jsonl'}", f"output_dir={fold / 'run'}",
                 f"train.num_threads={threads}", *sets]
    t0 = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "peftlab"), "train", str(CONFIG),
                    *(x for o in overrides for x in ("--set", o))],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    fold_cfg = load_config(CONFIG, overrides)
    inner_train, inner_val, _, _ = read_classification_rows(fold_cfg)
    test_texts = [rows[i].text for i in test_idx]
    val_texts, val_y = [r.text for r in inner_val], [int(r.label) for r in inner_val]
    adapter = fold / "run" / "adapter"
    lr_val, lr_test = _tfidf_logreg([r.text for r in inner_train],
                                    [int(r.label) for r in inner_train], val_texts, test_texts)
    record = {"fold": k, "sets": sets, "train_seconds": round(seconds, 1),
              "threshold": json.loads((adapter / "labels.json").read_text()).get("threshold"),
              "test_idx": [int(i) for i in test_idx], "val_y": val_y,
              "lr_val": lr_val, "lr_test": lr_test}
    (record["model_val"], record["model_test"]), network = _p_unfair(adapter, val_texts,
                                                                      test_texts)
    if network:
        record["network_val"], record["network_test"] = network
    (fold / "record.json").write_text(json.dumps(record))
    return record


def recipe_cv(name: str, sets: list[str], folds: int, jobs: int, work: Path) -> dict:
    """The recipe under the same document-grouped outer CV as :func:`baseline_cv`: each fold
    in a worker process (``jobs`` at once, cores split between them), pooled predictions.

    Three rows: the model with its own tuned threshold; TF-IDF logistic regression with a
    threshold tuned on the same inner validation documents; their averaged probabilities
    (threshold tuned likewise) — nothing ever sees the held-out fold before it is scored."""
    _, rows, y, cats, _ = _outer_folds(folds)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending = [k for k in range(folds) if not (work / name / f"fold{k}" / "record.json").exists()]
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < jobs:
            k = pending.pop(0)
            running.append(subprocess.Popen(
                [sys.executable, __file__, "fold", "--name", name, "--fold", str(k),
                 "--threads", str(threads), "--work", str(work), "--set", *sets]))
        time.sleep(5)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            if proc.returncode:
                raise SystemExit(f"fold worker failed ({proc.args})")
    records = [json.loads((work / name / f"fold{k}" / "record.json").read_text())
               for k in range(folds)]
    pred = {"model": [0] * len(rows), "tfidf_lr": [0] * len(rows), "ensemble": [0] * len(rows)}
    if all("network_test" in r for r in records):
        pred["network"] = [0] * len(rows)
    for r in records:
        if "network" in pred:
            net_t, _ = tune_threshold(r["network_val"], r["val_y"])
            for j, i in enumerate(r["test_idx"]):
                pred["network"][i] = int(r["network_test"][j] >= net_t)
        lr_t, _ = tune_threshold(r["lr_val"], r["val_y"])
        mean_val = [(a + b) / 2 for a, b in zip(r["model_val"], r["lr_val"], strict=True)]
        ens_t, _ = tune_threshold(mean_val, r["val_y"])
        model_t = r["threshold"] if r["threshold"] is not None else 0.5
        for j, i in enumerate(r["test_idx"]):
            m, lr = r["model_test"][j], r["lr_test"][j]
            pred["model"][i] = int(m >= model_t)
            pred["tfidf_lr"][i] = int(lr >= lr_t)
            pred["ensemble"][i] = int((m + lr) / 2 >= ens_t)
    return {"sets": sets, "folds": folds, "jobs": jobs,
            "train_seconds": round(sum(r["train_seconds"] for r in records), 1),
            "thresholds": [r["threshold"] for r in records],
            **{key: _scores(y, p, cats) for key, p in pred.items()}}


def baseline_val() -> dict:
    cfg = _config()
    rows, val_rows, labels, report = read_classification_rows(cfg)
    result = run_baseline(cfg, write=False)
    vec = make_vectorizer()
    p = result.params
    clf = make_classifier(p["model"], p["C"], p["class_weight"], cfg.train.seed, 2)
    clf.fit(vec.fit_transform([r.text for r in rows]), [labels.index(r.label) for r in rows])
    pred = [int(v) for v in clf.predict(vec.transform([r.text for r in val_rows]))]
    gold = [labels.index(r.label) for r in val_rows]
    return {"name": result.name, "params": p, "cv_f1": result.cv["score"],
            "seconds": round(result.seconds, 1), "validation_docs": report["validation_groups"],
            **_scores(gold, pred, _categories(cfg, val_rows))}


def adapter_val(run: Path, seconds: float | None, note: str) -> dict:
    cfg = _config()
    _, val_rows, labels, report = read_classification_rows(cfg)
    work = run / "claudette_val.jsonl"
    write_jsonl(work, [{"text": r.text, "unfair": r.label} for r in val_rows])
    result = predict(run / "adapter", work)
    pred = [labels.index(p["prediction"]) for p in result["predictions"]]
    gold = [labels.index(r.label) for r in val_rows]
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = max((h.get("step", 0) for h in history), default=0)
    return {"run": str(run), "threshold": result["threshold"], "steps": steps,
            "train_seconds": seconds, "note": note,
            "validation_docs": report["validation_groups"],
            **_scores(gold, pred, _categories(cfg, val_rows))}


def _row(name: str, r: dict, seconds: float | None) -> str:
    return (f"| {name} | {100 * r['f1_unfair']:.1f} | {100 * r['precision_unfair']:.1f} | "
            f"{100 * r['recall_unfair']:.1f} | {100 * r['macro_f1']:.1f} | "
            + ("-" if seconds is None else f"{seconds:.0f}") + " |")


def tables(results: dict) -> str:
    machine = results.get("machine", {})
    lines = ["# CLAUDETTE unfair-ToS: baseline vs peftlab", "",
             f"CPU: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores shared with "
             "other jobs (times are indicative).", ""]
    if "baseline_cv" in results:
        b = results["baseline_cv"]
        lines += [f"## TF-IDF baseline, document-grouped {b['folds']}-fold CV over "
                  f"{b['documents']} training documents ({b['sentences']} sentences)", "",
                  "| method | unfair F1 | P | R | macro-F1 | s |", "|---|---|---|---|---|---|",
                  _row("TF-IDF + linear (C by inner grouped CV)", b, b["seconds"])]
        for key, r in results.items():
            if key.startswith("cv_"):
                what = " ".join(r["sets"]) or "as shipped"
                lines += [_row(f"{key[3:]}: {what}", r["model"], r["train_seconds"]),
                          _row(f"{key[3:]}: TF-IDF logreg, threshold on inner validation",
                               r["tfidf_lr"], None)]
                if "network" in r:  # the recipe is an ensemble already: show its network
                    lines.append(_row(f"{key[3:]}: its network alone, threshold on inner "
                                      "validation", r["network"], None))
                else:
                    lines.append(_row(f"{key[3:]}: mean of both probabilities",
                                      r["ensemble"], None))
        lines.append("")
    val = [(k, results[k]) for k in ("baseline_val", "adapter_val") if k in results]
    if val:
        r0 = val[0][1]
        lines += [f"## Validation documents of configs/claudette_unfair.yaml ("
                  f"{r0['sentences']} sentences, {r0['unfair']} unfair, "
                  f"{len(r0['validation_docs'])} documents)", "",
                  "| method | unfair F1 | P | R | macro-F1 | s |", "|---|---|---|---|---|---|"]
        for k, r in val:
            name = (f"baseline {r['name']} (C={r['params']['C']}, "
                    f"{r['params']['class_weight'] or 'no'} class weights)" if k == "baseline_val"
                    else f"minilm-l6 + LoRA, threshold {r['threshold']:.3f} ({r['note']})")
            lines.append(_row(name, r, r.get("seconds", r.get("train_seconds"))))
        lines.append("")
    scored = {k: results[k] for k in ("baseline_cv", "baseline_val", "adapter_val")
              if k in results}
    for key, r in results.items():
        if key.startswith("cv_"):  # the recipe as configured, pooled over the same folds
            scored[key[3:]] = r["model"]
    cats = Counter()
    for r in scored.values():
        cats.update(r["category_recall"].keys())
    if cats:
        lines += ["## Recall per unfair category (baseline_cv and the recipes: the same "
                  "held-out folds)", "",
                  "| category | " + " | ".join(scored) + " |", "|---|" + "---|" * len(scored)]
        for c in cats:
            cells = []
            for r in scored.values():
                e = r["category_recall"].get(c)
                cells.append("-" if e is None else f"{100 * e['recall']:.0f} (n={e['sentences']})")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["baseline", "adapter", "cv", "fold"])
    p.add_argument("--run", type=Path, help="output_dir of a configs/claudette_unfair.yaml run")
    p.add_argument("--seconds", type=float, default=None, help="its training time")
    p.add_argument("--note", default="", help="what the run's budget was")
    p.add_argument("--name", default="config", help="cv: the recipe's name in the results")
    p.add_argument("--set", nargs="*", default=[], help="cv: config overrides of the recipe")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=2, help="cv: folds trained at once")
    p.add_argument("--threads", type=int, default=1, help="fold: threads of its training")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/claudette_cv"),
                   help="cv: fold data and runs (a finished fold is reused)")
    args = p.parse_args()
    if args.what == "fold":
        recipe_fold(args.name, args.fold, args.set, args.threads, args.work)
        return
    save_part(OUT, "machine", {"cpu": _cpu(),
                               "cores": os.cpu_count(), "shared": True}, tables)
    if args.what == "baseline":
        save_part(OUT, "baseline_cv", baseline_cv(), tables)
        print(save_part(OUT, "baseline_val", baseline_val(), tables))
    elif args.what == "cv":
        print(save_part(OUT, f"cv_{args.name}",
                        recipe_cv(args.name, args.set, args.folds, args.jobs, args.work), tables))
    else:
        print(save_part(OUT, "adapter_val", adapter_val(args.run, args.seconds, args.note),
                        tables))


if __name__ == "__main__":
    main()
