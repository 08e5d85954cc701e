"""The rough edges a newcomer hit with the tools (issue 24): output folders that do not exist yet,
bad columns as one `error:` line, a SentencePiece continuation that lost its space, an evaluation
budget that took one file's domain only, data of another tokenizer evaluated without a word,
`--json` that was not JSON alone, DeepSpeed's zero_to_fp32.py, weights written 0600."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from moe_dist.checkpoint import save_consolidated
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from tests.harness import REPO, load_tool

EN = ["the cat sat on the mat", "life is good and the sun is warm", "we walk to the old market",
      "a quiet evening by the river", "the book on the table is mine", "time flies like an arrow"]
DE = ["die Katze sitzt auf der Matte", "das Leben ist schön und warm", "wir gehen zum alten Markt",
      "ein ruhiger Abend am Fluss", "das Buch auf dem Tisch ist meins", "die Zeit vergeht wie im Flug"]


def write_jsonl(path, texts, lang):
    path.write_text("".join(json.dumps({"text": t, "lang": lang}, ensure_ascii=False) + "\n" for t in texts))
    return str(path)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("newcomer")
    return tmp, write_jsonl(tmp / "en.jsonl", EN * 5, "en"), write_jsonl(tmp / "de.jsonl", DE * 5, "de")


@pytest.fixture(scope="module")
def sp_model(corpora):
    tmp, en, de = corpora
    cwd = os.getcwd()
    os.chdir(tmp)
    try:  # the documented relative prefix, in a folder that does not exist yet
        assert load_tool("train_tokenizer").main(["--input", en, de, "--output-prefix", "tok/newcomer",
                                                  "--vocab-size", "300"]) == 0
    finally:
        os.chdir(cwd)
    return str(tmp / "tok" / "newcomer.model")


def tiny_model(vocab_size: int) -> MoETransformer:
    cfg = parse_model_config(dict(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=64,
                                  moe_every=1), dict(num_experts=4, top_k=2, d_ff=16))
    return MoETransformer(cfg, seed=3).eval()


def test_tokenizer_and_preprocess_create_their_output_folders(corpora, sp_model, tmp_path, capsys):
    _, en, de = corpora
    assert os.path.isfile(sp_model)
    prefix = tmp_path / "new" / "data" / "en"
    assert load_tool("preprocess_data").main(["--input", en, "--output-prefix", str(prefix),
                                              "--tokenizer-model", sp_model, "--label-key", "lang"]) == 0
    assert os.path.isfile(f"{prefix}.idx") and os.path.isfile(f"{prefix}.tokenizer.json")
    record = json.loads(open(f"{prefix}.tokenizer.json").read())
    assert record["identifiers"]["cls"] == "SentencePieceTokenizer" and record["vocab_size"] == 300


@pytest.mark.parametrize("tool, flag", [("train_tokenizer", "--text-key"), ("preprocess_data", "--text-key"),
                                        ("preprocess_data", "--label-key")])
def test_a_wrong_column_is_one_error_line_and_exit_2(corpora, tmp_path, capsys, tool, flag):
    _, en, _ = corpora
    extra = ["--vocab-size", "300"] if tool == "train_tokenizer" else []
    rc = load_tool(tool).main(["--input", en, "--output-prefix", str(tmp_path / "o" / "x"), flag, "txt", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "error: column(s) ['txt'] not found" in err and "Traceback" not in err


def test_convert_checkpoint_creates_the_parent_of_out_and_writes_0644(tmp_path):
    ckpt = save_consolidated(tiny_model(257), str(tmp_path / "ckpt"))
    out = tmp_path / "out" / "hf"
    old = os.umask(0o022)
    try:
        from moe_dist.checkpoint.cli import main

        assert main(["export-hf", ckpt, str(out), "--quiet"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out / "model.safetensors").st_mode) == 0o644


def test_generate_keeps_the_space_before_a_sentencepiece_continuation(sp_model, tmp_path):
    from moe_dist.data.tokenizers import SentencePieceTokenizer

    tok = SentencePieceTokenizer(sp_model)
    gen = load_tool("generate")
    prompt, whole = tok.tokenize("life is"), tok.tokenize("life is good")
    assert whole[:len(prompt)] == prompt
    new = whole[len(prompt):]
    assert tok.detokenize(new) == "good"  # decoded alone the space is gone: the bug
    assert gen.continuation_text(tok, prompt, new) == " good"
    # Through the tool: the text of every result continues its prompt as the whole decode does.
    ckpt = save_consolidated(tiny_model(tok.vocab_size), str(tmp_path / "ckpt"),
                             data={"tokenizer": {"kind": "sentencepiece", "model": sp_model}})
    out = tmp_path / "gen" / "out.json"
    assert gen.main([ckpt, "--prompt", "life is", "--prompt", "das Leben", "--max-new-tokens", "6",
                     "--no-stop-at-eod", "--json", str(out)]) == 0
    for r in json.loads(out.read_text()):
        ids = tok.tokenize(r["prompt"])
        assert r["prompt"] + r["text"] == tok.detokenize(ids + r["ids"])


def test_evaluate_budget_takes_every_file(corpora, tmp_path):
    _, en, de = corpora
    ckpt = save_consolidated(tiny_model(257), str(tmp_path / "ckpt"))
    out = tmp_path / "r.json"
    assert load_tool("evaluate").main([ckpt, "--data", en, de, "--label-key", "lang", "--tokens", "200",
                                       "--seq-len", "32", "--no-progress", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["tokens"] == 200
    assert set(got["domains"]) == {"en", "de"} and min(d["tokens"] for d in got["domains"].values()) > 50


def test_evaluate_refuses_data_of_another_tokenizer(corpora, sp_model, tmp_path, capsys):
    from moe_dist.data.preprocess import preprocess_corpus
    from moe_dist.data.tokenizers import ByteTokenizer

    _, en, _ = corpora
    byte_prefix = str(tmp_path / "bytes")
    preprocess_corpus([en], byte_prefix, ByteTokenizer())
    ckpt = save_consolidated(tiny_model(300), str(tmp_path / "ckpt"),
                             data={"tokenizer": {"kind": "sentencepiece", "model": sp_model}})
    assert load_tool("evaluate").main([ckpt, "--data", byte_prefix, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: --data" in err and "ByteTokenizer (vocab 257)" in err
    assert f"SentencePieceTokenizer {sp_model} (vocab 300" in err


def test_evaluate_capacity_choices_are_the_loaders():
    from moe_dist.evaluate.loading import CAPACITY_CHOICES

    assert load_tool("evaluate").CAPACITY_CHOICES == CAPACITY_CHOICES


def test_json_on_stdout_is_json_alone(tmp_path):
    """A fresh process, as a user runs it: DeepSpeed's accelerator line and Megatron-Core's notices
    are not on stdout (nor, for the notices, on stderr); --help answers before those imports."""
    ckpt = save_consolidated(tiny_model(257), str(tmp_path / "ckpt"))
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run([sys.executable, "tools/generate.py", ckpt, "--prompt", "ab", "--max-new-tokens", "3",
                           "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)[0]["prompt"] == "ab"
    assert "Transformer Engine and Apex" not in proc.stderr and "Setting accelerator" not in proc.stderr
    proc = subprocess.run([sys.executable, "-X", "importtime", "tools/evaluate.py", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "usage: evaluate.py" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert not {"torch", "deepspeed", "megatron"} & imported


def test_deepspeed_recovery_scripts_point_to_consolidate(tmp_path):
    from moe_dist.checkpoint.training.recovery_scripts import replace_recovery_scripts

    (tmp_path / "zero_to_fp32.py").write_text("# DeepSpeed's\n")
    replace_recovery_scripts(str(tmp_path))
    proc = subprocess.run([sys.executable, str(tmp_path / "zero_to_fp32.py"), str(tmp_path), "out"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "convert_checkpoint.py consolidate" in proc.stderr
    assert not (tmp_path / "zero_to_torch.py").exists()  # only the scripts DeepSpeed wrote


def test_preprocess_in_a_fresh_process_says_one_line(corpora, tmp_path):
    """As a user runs it: a missing column is the `error:` line alone, without Megatron-Core's
    "Transformer Engine and Apex are not installed" notices or a traceback."""
    _, en, _ = corpora
    proc = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", en, "--output-prefix",
                           str(tmp_path / "x"), "--label-key", "lng"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert proc.returncode == 2
    assert "error: column(s) ['lng'] not found" in proc.stderr and proc.stdout == ""
    assert "Transformer Engine" not in proc.stderr and "Traceback" not in proc.stderr
