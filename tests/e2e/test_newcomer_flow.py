"""The README's "Your own corpora" flow, as a newcomer runs it on a fresh clone (issue 24): the
commands between the README's newcomer-flow markers, verbatim, in a folder holding only two
labelled corpora (written here) and the repository's tools/, launch/ and configs/; the run is
shortened with --set. Its validation split holds both languages and I(expert; domain) is
non-zero (with one prefix of both corpora it held the last file's language alone, and read 0);
--json under the launcher prints JSON alone on stdout; a resume with nothing to train exits 2
naming train.steps and the checkpoint's step."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import subprocess
import sys

import pytest
from tests.harness.train import REPO, assert_launch_ok, free_port, launch

EN = ("the a cat dog sat on mat life is good and sun warm we walk to old market quiet evening by river book "
      "table mine time flies like an arrow house garden tree water light night day morning bread milk").split()
DE = ("die der das Katze Hund sitzt auf Matte Leben ist schön und Sonne warm wir gehen zum alten Markt ruhiger "
      "Abend am Fluss Buch Tisch meins Zeit vergeht Haus Garten Baum Wasser Licht Nacht Tag Morgen Brot").split()
SHORT = ["--set", "train.steps=12", "--set", "train.eval_interval=6", "--set", "train.log_interval=6",
         "--set", "cpu.threads=1"]


def readme_commands() -> list[list[str]]:
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    block = re.search(r"<!-- newcomer-flow[^>]*-->\s*```bash\n(.*?)```\s*<!-- /newcomer-flow -->", text, re.S)
    assert block, "README.md lost its newcomer-flow block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


def write_corpus(path, lang: str, words: list[str], seed: int) -> None:
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(300):
            text = " ".join(r.choice(words) for _ in range(r.randint(8, 30))) + "."
            f.write(json.dumps({"text": text, "lang": lang}, ensure_ascii=False) + "\n")


def run_step(argv: list[str], cwd, extra: list[str] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    """One README command in `cwd`, with `extra` arguments appended; a python step must succeed."""
    if argv[0] == "deepspeed":
        return launch(["--master_port", str(free_port()), *argv[1:], *extra], cwd=str(cwd),
                      env={"PYTHONPATH": REPO, **(env or {})})
    assert argv[0] == "python", argv
    proc = subprocess.run([sys.executable, *argv[1:], *extra], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": REPO, **(env or {})})
    assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_readme_newcomer_flow_gives_every_language_its_validation(tmp_path):
    for name in ("tools", "launch", "configs"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    write_corpus(tmp_path / "corpus_en.jsonl", "en", EN, 0)
    write_corpus(tmp_path / "corpus_de.jsonl", "de", DE, 1)
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["python", "tools/train_tokenizer.py"], ["python", "tools/preprocess_data.py"],
                                         ["python", "tools/preprocess_data.py"], ["deepspeed", "--num_gpus"],
                                         ["python", "tools/evaluate.py"]]
    for argv in commands[:3]:
        run_step(argv, tmp_path)
    train = run_step(commands[3], tmp_path, SHORT)
    assert_launch_ok(train)
    assert "validation loss" in train.stdout

    result = run_step(commands[4], tmp_path, ["--json", "eval.json", "--no-progress"])
    got = json.loads((tmp_path / "eval.json").read_text())
    assert set(got["domain_names"]) == {"de", "en"}
    assert all(got["domains"][lang]["tokens"] > 0 for lang in ("de", "en")), got["domains"]
    assert all(row["mi_domain"] > 0 for row in got["moe_layers"].values()), got["moe_layers"]
    assert "de" in result.stdout and "en" in result.stdout  # the table, next to the JSON file

    # --json on stdout under the launcher: JSON alone, with the launcher quiet (docs: --quiet, and
    # DS_ACCELERATOR=cpu on a machine without GPUs)
    ev = commands[4]
    proc = launch(["--quiet", "--num_gpus", "2", "--master_port", str(free_port()), *ev[1:], "--json",
                   "--no-progress"], cwd=str(tmp_path), env={"DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO})
    assert_launch_ok(proc)
    assert json.loads(proc.stdout)["tokens"] == got["tokens"]

    # nothing left to train: refused before any work, naming both numbers
    proc = run_step(commands[3], tmp_path, [*SHORT, "--resume"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "train.steps is 12, but checkpoint" in out and "is at step 12: nothing to train" in out
    assert out.count("config error:") == 1, out[-3000:]
