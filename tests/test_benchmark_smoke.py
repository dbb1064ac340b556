"""Smoke test of benchmarks/train_throughput.py on tiny random models (no timing assertions).

Runs the benchmark's worker functions in-process for a few steps, to prove its code paths work,
and checks the comparison is apples to apples: on identical weights and batches the candidate
(peftlab's Trainer + SFTTask, whose LM head runs on labelled positions only) and the reference
(transformers + peft, full-vocabulary logits and the model's own loss) compute the same loss.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch.testing import assert_close
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from peftlab.lab.demo_data import generate_demo_data
from peftlab.models import load_tokenizer
from tests.bench_scripts import load_bench_script
from tests.deps import import_test_dep

import_test_dep("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

STEPS = 3


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("train_throughput.py", "train_throughput")


@pytest.fixture(scope="module")
def sft_setup(bench, tiny_chat_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-sft")
    tokenizer = load_tokenizer(str(tiny_chat_model_dir))
    records = generate_demo_data(seed=0)["train"]
    batches = bench.build_sft_batches(tokenizer, records, n_batches=STEPS, batch_size=2,
                                      seq_len=96, source="demo")
    save_file(batches, str(tmp / "batches.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench.make_init_adapter(str(tiny_chat_model_dir), tmp / "adapter", seed=0)
    return tmp, batches


def _train(bench, model_dir, tmp, name, **extra):
    cfg = {"name": name, "model": str(model_dir), "batches": str(tmp / "batches.safetensors"),
           "adapter": str(tmp / "adapter"), "steps": STEPS, "lr": 1e-3, "seed": 0,
           "out_dir": str(tmp / f"out-{name}"), **extra}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bench.train_worker(cfg)


def test_batches_are_packed_with_completion_only_labels(bench, sft_setup):
    _, b = sft_setup
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (STEPS, 2, 96)
    labelled = b["labels"] != bench.IGNORE
    assert labelled.any() and (~labelled).any()  # answers labelled, prompts not
    assert torch.equal(b["labels"][labelled], b["input_ids"][labelled])
    assert not (labelled & (b["attention_mask"] == 0)).any()  # padding is never labelled
    mask = b["attention_mask"]
    assert (mask[..., 1:] <= mask[..., :-1]).all()  # padding only at the end of a row


def test_candidate_and_reference_losses_agree_in_fp32(bench, sft_setup, tiny_chat_model_dir):
    tmp, _ = sft_setup
    ours = _train(bench, tiny_chat_model_dir, tmp, bench.CANDIDATE, precision="fp32")
    ref = _train(bench, tiny_chat_model_dir, tmp, bench.REF_FP32)
    for res in (ours, ref):
        assert len(res["losses"]) == len(res["step_seconds"]) == len(res["step_tokens"]) == STEPS
        assert all(s > 0 for s in res["step_seconds"])
        assert res["peak_rss_mb"] > 0 and set(res["matmul_gflops"]) == {"fp32", "bf16"}
        assert (tmp / f"out-{res['name']}" / "adapter" / "adapter_model.safetensors").is_file()
    assert ours["precision"] == "fp32"
    # Step 1 runs on identical weights: label-only head == full logits + transformers' loss.
    assert_close(torch.tensor(ours["losses"][0]), torch.tensor(ref["losses"][0]))
    # Same optimiser, same batches: the runs stay together (and the loss moves).
    assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=1e-5)
    assert ours["losses"][0] != ours["losses"][-1]
    assert ours["step_tokens"] == ref["step_tokens"]


def test_bf16_reference_and_summary(bench, sft_setup, tiny_chat_model_dir):
    tmp, _ = sft_setup
    names = (*bench.CONFIGS, bench.REF_BF16_COMPILE)
    runs = {name: [_train(bench, tiny_chat_model_dir, tmp, name, precision="fp32")]
            for name in names}
    assert runs[bench.REF_BF16][0]["precision"] == "bf16-autocast"
    assert_close(torch.tensor(runs[bench.REF_BF16][0]["losses"]),
                 torch.tensor(runs[bench.REF_FP32][0]["losses"]), rtol=2e-2, atol=2e-2)
    # the compiled peer is the same bf16 computation, compiled (not silently eager)
    compiled = runs[bench.REF_BF16_COMPILE][0]
    assert compiled["compiled"] and not runs[bench.REF_BF16][0]["compiled"]
    assert_close(torch.tensor(compiled["losses"]),
                 torch.tensor(runs[bench.REF_BF16][0]["losses"]), rtol=1e-2, atol=1e-2)
    assert runs[bench.CANDIDATE][0]["compiled"] is False  # auto: a tiny model is not compiled
    n_flop = bench.flop_params(str(tiny_chat_model_dir))
    # 2 blocks of a 64-wide Llama (q 64x64, k/v 64x32, o 64x64, MLP 3 x 64x128, 2 norms) + norm
    assert n_flop == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64
    summary = bench.summarize_training(runs, STEPS, n_flop, {"fp32": 100.0, "bf16": 50.0})
    tps = summary["tokens_per_s"]
    assert summary["ratio_vs_bf16"] == pytest.approx(tps[bench.CANDIDATE] / tps[bench.REF_BF16])
    assert summary["ratio_vs_bf16_compile"] == pytest.approx(
        tps[bench.CANDIDATE] / tps[bench.REF_BF16_COMPILE])
    assert summary["mfu_target"] == 0.70  # fp32 is the faster precision in these fake peaks
    assert summary["mfu_real_limit"] == "fp32"
    assert summary["mfu"] == pytest.approx(tps[bench.CANDIDATE] * 6 * n_flop / 100e9)
    assert summary["mfu_vs_bf16_peak"] == pytest.approx(2 * summary["mfu"])
    result = {**summary, "training": summary, "e2e": None, "classification": None,
              "generation": None}
    rows = {row["key"]: row for row in bench.targets(result)}
    assert rows["e2e_vs_bf16"]["status"] == "n/a"
    # end to end from the same runs: their walls, and what the candidate's memory did
    e2e = bench.run_e2e(SimpleNamespace(e2e_steps=None, steps=STEPS), tmp, None, None, runs)
    assert e2e["ratio_vs_bf16"] == pytest.approx(
        runs[bench.CANDIDATE][0]["wall_seconds"] / runs[bench.REF_BF16][0]["wall_seconds"])
    assert e2e["candidate_compiled_from_step"] == [None]
    assert e2e["candidate_heap_trims"] == [0]  # a few tiny steps grow nothing
    assert e2e["peak_rss_mb"][bench.CANDIDATE] == runs[bench.CANDIDATE][0]["peak_rss_mb"]
    result["e2e"] = e2e
    assert rows["train_vs_bf16"]["status"] in ("MET", "MISSED")
    assert rows["mfu"]["target"] == ">= 0.7"
    md = bench.markdown({**result, "machine": {"cpu": "test", "cores": 2, "torch_threads": 2,
                                               "torch": "x", "transformers": "x", "peft": "x",
                                               "loadavg_start": [0.0], "loadavg_end": [0.0],
                                               "amx_bf16": False},
                         "targets": bench.targets(result), "steps": STEPS, "repeats": 1,
                         "warmup_steps": 1, "batch_size": 2, "seq_len": 96, "quick": True,
                         "optimizer": {"lr": 1e-3}, "bf16_matmul_gflops": 50.0,
                         "fp32_matmul_gflops": 100.0,
                         "data": {"pad_fraction": 0.1, "labelled_fraction": 0.5}})
    assert "torch.compile(model)" in md and "| first step s (per round) |" in md
    assert "(compiled from step [None], heap trims [0])" in md


def test_without_bf16_instructions_the_fp32_peers_stand_in(bench, sft_setup,
                                                          tiny_chat_model_dir):
    """An AVX2-only CPU multiplies bf16 ~100x slower than fp32: the bf16 peers are not run
    (a step would take tens of minutes), the compiled fp32 peer is, and the goals move to it."""
    assert bench.skipped_peers({"fp32": 300.0, "bf16": 165.0}, 2048) == {}  # slow bf16, runs
    skipped = bench.skipped_peers({"fp32": 130.0, "bf16": 1.2}, 2048)
    assert set(skipped) == set(bench.BF16_PEERS) and "1.2 GFLOP/s" in skipped[bench.REF_BF16]
    tmp, _ = sft_setup
    runs = {name: [_train(bench, tiny_chat_model_dir, tmp, name, precision="fp32")]
            for name in bench.FP32_TRAIN_CONFIGS}
    compiled = runs[bench.REF_FP32_COMPILE][0]
    assert compiled["compiled"] and compiled["precision"] == "fp32"
    assert_close(torch.tensor(compiled["losses"]),
                 torch.tensor(runs[bench.REF_FP32][0]["losses"]), rtol=1e-4, atol=1e-5)
    n_flop = bench.flop_params(str(tiny_chat_model_dir))
    summary = bench.summarize_training(runs, STEPS, n_flop, {"fp32": 130.0, "bf16": 1.2})
    tps = summary["tokens_per_s"]
    assert summary["ratio_vs_bf16"] is None and summary["mfu_target"] == 0.70
    assert summary["ratio_vs_fp32_compile"] == pytest.approx(
        tps[bench.CANDIDATE] / tps[bench.REF_FP32_COMPILE])
    args = SimpleNamespace(e2e_steps=None, steps=STEPS, skipped_peers=skipped)
    e2e = bench.run_e2e(args, tmp, None, None, runs)
    assert e2e["ratio_vs_bf16"] is None and e2e["ratio_vs_fp32_compile"] == pytest.approx(
        runs[bench.CANDIDATE][0]["wall_seconds"] / compiled["wall_seconds"])
    gen = {lab: {"tokens_per_s": {bench.CANDIDATE: 2.0, "ref": 1.0}, "new_tokens": 4,
                 "replies_match": True} for lab in ("b1", "b8")}
    result = {**summary, "training": summary, "e2e": e2e, "classification": None,
              "generation": {**gen, "max_new_tokens": 4}, "skipped_peers": skipped}
    rows = {row["key"]: row for row in bench.targets(result)}
    assert rows["train_vs_bf16"]["status"] == rows["e2e_vs_bf16_compile"]["status"] == "n/a"
    for key in ("train_vs_fp32", "train_vs_fp32_compile", "e2e_vs_fp32", "e2e_vs_fp32_compile"):
        assert rows[key]["status"] in ("MET", "MISSED")
    assert rows["train_vs_fp32_compile"]["value"] == summary["ratio_vs_fp32_compile"]
    md = bench.markdown({**result, "machine": {"cpu": "test", "cores": 2, "torch_threads": 2,
                                               "torch": "x", "transformers": "x", "peft": "x",
                                               "loadavg_start": [0.0], "loadavg_end": [0.0],
                                               "amx_bf16": False},
                         "targets": bench.targets(result), "steps": STEPS, "repeats": 1,
                         "warmup_steps": 1, "batch_size": 2, "seq_len": 96, "quick": True,
                         "optimizer": {"lr": 1e-3}, "bf16_matmul_gflops": 1.2,
                         "fp32_matmul_gflops": 130.0,
                         "data": {"pad_fraction": 0.1, "labelled_fraction": 0.5}})
    assert "Not run: ref_bf16 -- bf16 matmuls run at 1.2 GFLOP/s" in md
    assert "| transformers+peft fp32, torch.compile(model) | fp32 |" in md
    # a peer that did not run shows n/a, never "n/ax", "nan" or an MFU against the bf16 peak
    assert "n/ax" not in md and "nan" not in md and "bf16 n/a tokens/s" in md
    peftlab_row = next(line for line in md.splitlines() if line.startswith("| peftlab (Trainer"))
    assert peftlab_row.split(" | ")[10] == "n/a"


def test_generation_worker_matches_transformers(bench, sft_setup, diverse_chat_model_dir):
    tmp, _ = sft_setup
    convs = [[{"role": "user", "content": r["instruction"]}]
             for r in generate_demo_data(seed=0)["heldout"][:8]]
    # the diverse tiny model (same shapes as the adapter's): real, different replies to compare
    cfg = {"model": str(diverse_chat_model_dir), "adapter": str(tmp / "adapter"),
           "max_new_tokens": 5, "conversations": convs, "b1_prompts": 2}
    ours = bench.gen_worker(dict(cfg, name=bench.CANDIDATE))
    # peftlab decodes in what `precision: auto` picks here; the peer in the same precision
    same = {"fp32": "ref", "bf16": "ref_bf16"}[ours["precision"]]
    ref = bench.gen_worker(dict(cfg, name=same))
    assert ref["precision"] == ours["precision"]
    for label, n in (("b1", 2), ("b8", 8)):
        assert ours[label]["replies"] == ref[label]["replies"]
        assert ours[label]["new_tokens"] == ref[label]["new_tokens"]
        assert len(ref[label]["new_tokens"]) == n
        assert all(1 <= c <= 5 for c in ref[label]["new_tokens"])
        assert all(ref[label]["replies"]) and len(set(ref[label]["replies"])) > 1


def _tiny_bert_dir(directory: Path) -> Path:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "a", "the",
             "film", "very", "not", "fun", "dull"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=2,
        # no dropout: peftlab draws its masks differently (fast_dropout), and the test
        # compares the two workers' losses step by step
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def test_classification_worker(bench, tmp_path):
    model_dir = _tiny_bert_dir(tmp_path / "bert")
    tsv = tmp_path / "train.tsv"
    rows = ["a good film", "the dull movie", "very fun", "not good"] * 4
    tsv.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(rows)))
    batches = bench.build_cls_batches(load_tokenizer(str(model_dir)), tsv, n_batches=STEPS,
                                      batch_size=4, seq_len=8)
    assert batches["input_ids"].shape == (STEPS, 4, 8) and batches["labels"].shape == (STEPS, 4)
    grouped = bench.build_cls_batches(load_tokenizer(str(model_dir)), tsv, n_batches=STEPS,
                                      batch_size=4, seq_len=8, by_length=True)
    lengths = grouped["attention_mask"].sum(dim=2).flatten().tolist()
    assert lengths == sorted(lengths) and lengths != batches["attention_mask"].sum(2).flatten().tolist()
    save_file(batches, str(tmp_path / "cls.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench.make_init_adapter(str(model_dir), tmp_path / "adapter", seed=0,
                                kind="sequence_classification", r=4, alpha=8,
                                targets=["query", "value"])
    cfg = {"model": str(model_dir), "batches": str(tmp_path / "cls.safetensors"),
           "adapter": str(tmp_path / "adapter"), "steps": STEPS, "lr": 1e-3, "seed": 0,
           "padding": "longest"}
    ours = bench.cls_worker(dict(cfg, name=bench.CANDIDATE, precision="fp32"))
    ref = bench.cls_worker(dict(cfg, name=bench.REF_FP32))
    # Same LoRA init and the same (saved) classifier head: identical losses at step 1 and after.
    assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=1e-5)
    longest = [4 * int(m.sum(dim=1).max()) for m in batches["attention_mask"]]
    assert ours["step_tokens"] == ref["step_tokens"] == longest[:STEPS] and max(longest) < 4 * 8
    padded = bench.cls_worker(dict(cfg, name=bench.CANDIDATE, precision="fp32",
                                   padding="max_length"))
    assert padded["step_tokens"] == [4 * 8] * STEPS
    assert_close(torch.tensor(padded["losses"]), torch.tensor(ours["losses"]))


def test_rms_norm_benchmark_measures_both_sides_and_reports(tmp_path, monkeypatch):
    rms = load_bench_script("rms_norm.py", "rms_norm_bench")
    ms = rms.norm_times(batch=1, rounds=2, repeats=1)
    assert set(ms) == {"transformers", "peftlab"} and all(len(v) == 2 for v in ms.values())
    monkeypatch.setattr(rms.tt, "best_matmul_gflops", lambda trials: {"bf16": 1.0, "fp32": 99.0})
    rms.main(["--pairs", "0", "--batch-size", "1", "--rounds", "1", "--repeats", "1",
              "--out", str(tmp_path)])
    result = json.loads((tmp_path / "rms_norm.json").read_text())
    assert result["steps"] == {"skipped": "--pairs 0"} and result["peaks"]["fp32"] == 99.0
    report = (tmp_path / "rms_norm.md").read_text()
    assert "fp32 99 GFLOP/s" in report and "Training steps: skipped (--pairs 0)" in report
