"""Bad-input sweep: run `rmoe` with malformed inputs and check that each gives one clear line.

Not part of `make test` (it starts ~30 CLI processes). Every case must exit non-zero (or, for a
warning case, zero) with no Python traceback and at most a couple of lines on stderr.

    python benchmarks/bad_inputs.py --out /tmp/bad-inputs        # prints a table, writes JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = [
    "--set", "model.hidden_size=32", "--set", "model.num_hidden_layers=2",
    "--set", "model.num_attention_heads=2", "--set", "model.moe_intermediate_size=32",
    "--set", "model.router_dim=8", "--set", "model.max_position_embeddings=64",
    "--set", "data.seq_len=32", "--set", "data.batch_size=2", "--set", "train.max_steps=4",
    "--set", "train.eval_batches=2", "--set", "train.log_interval=2", "--set", "train.threads=1",
]  # fmt: skip


def rmoe(*argv: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rmoe.cli.main", *argv]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def prepare(root: Path) -> dict[str, Path]:
    """A tiny run, a wider one, damaged copies of its weights and a few bad files."""
    for name, width in (("run", "32"), ("wide", "48")):
        if not (root / name / "model.safetensors").is_file():
            argv = [*TINY, "--set", f"model.hidden_size={width}"]
            r = rmoe("train", "tiny", "--out", str(root / name), "--no-progress", *argv, cwd=root)
            if r.returncode != 0:
                raise SystemExit(f"could not train the fixture run:\n{r.stderr[-2000:]}")
    paths = {"run": root / "run", "wide": root / "wide"}
    weights = (root / "run" / "model.safetensors").read_bytes()
    damaged = {
        "truncated": weights[: len(weights) // 2],
        "header": b"\xff" * 8 + weights[8:],
        "tiny": weights[:4],
        "flipped": weights[:-100] + bytes([weights[-100] ^ 0xFF]) + weights[-99:],
    }
    for kind, data in damaged.items():
        d = root / f"damaged-{kind}"
        d.mkdir(exist_ok=True)
        for f in (root / "run").iterdir():
            if (
                f.is_file()
                and f.suffix in (".json", ".yaml", ".txt", ".model")
                or f.name in ("tokenizer.json",)
            ):
                (d / f.name).write_bytes(f.read_bytes())
        (d / "model.safetensors").write_bytes(data)
        paths[f"damaged-{kind}"] = d
        if kind in ("truncated", "header"):  # a model from elsewhere: no manifest to check
            bare = root / f"damaged-{kind}-bare"
            bare.mkdir(exist_ok=True)
            for f in d.iterdir():
                if f.name != "manifest.json":
                    (bare / f.name).write_bytes(f.read_bytes())
            paths[f"damaged-{kind}-bare"] = bare
    (root / "afile.txt").write_text("not a folder\n")
    (root / "empty.yaml").write_text("")
    (root / "bad.yaml").write_text("model: [unclosed\n")
    paths.update(afile=root / "afile.txt", empty=root / "empty.yaml", bad=root / "bad.yaml")
    return paths


def cases(p: dict[str, Path]) -> list[tuple[str, list[str], bool]]:
    """(name, argv, expect_failure)."""
    run, wide = str(p["run"]), str(p["wide"])
    out = [
        ("train: --out is a file", ["train", "tiny", "--out", str(p["afile"]), *TINY], True),
        ("train: empty YAML", ["train", str(p["empty"]), "--out", "x-empty"], True),
        ("train: broken YAML", ["train", str(p["bad"]), "--out", "x-bad"], True),
        ("train: unknown key", ["train", "tiny", "--out", "x-key", "--set", "model.hiden=3"], True),
        ("train: seq_len > max_position_embeddings",
         ["train", "tiny", "--out", "x-seq", *TINY, "--set", "data.seq_len=128"], True),
        ("train: --init-from another width",
         ["train", "tiny", "--out", "x-init", *TINY, "--init-from", wide], True),
        ("train: unknown preset", ["train", "tinny", "--out", "x-preset"], True),
        ("train: hf corpus offline",
         ["train", "tiny", "--out", "x-hf", *TINY, "--set", "data.corpus=hf:nope/nothing"], True),
        ("eval: missing run", ["eval", "no-such-run"], True),
        ("eval: --seq-len > max_position_embeddings", ["eval", run, "--seq-len", "4096"], True),
        ("generate: --max-new-tokens past the context",
         ["generate", run, "--prompt", "def ", "--max-new-tokens", "5000"], True),
        ("analyze: --out is a file", ["analyze", run, "--out", str(p["afile"])], True),
        # documented: analyze clamps the window to the model's context, with a warning
        ("analyze: --seq-len > max_position_embeddings (warning)",
         ["analyze", run, "--out", "x-an-seq", "--seq-len", "4096", "--tokens", "512", "--no-progress"], False),
        ("continual gap: not a CPT run", ["continual", "gap", run, "--out", "x-gap"], True),
        # a base of another width is continued at its own shape (tests/continual/test_cpt.py)
        ("continual cpt-demo: --base that is not a run",
         ["continual", "cpt-demo", "--base", str(p["afile"]), "--out", "x-cpt", "--steps", "2"],
         True),
        ("verify: damaged run", ["verify", str(p["damaged-flipped"])], True),
    ]  # fmt: skip
    for kind in ("truncated", "header", "tiny", "flipped"):
        d = str(p[f"damaged-{kind}"])
        out += [
            (f"eval: {kind} weights", ["eval", d, "--max-batches", "1"], True),
            (f"generate: {kind} weights", ["generate", d, "--prompt", "a"], True),
            (f"analyze: {kind} weights", ["analyze", d, "--out", f"x-an-{kind}"], True),
            (f"train --init-from: {kind} weights",
             ["train", "tiny", "--out", f"x-if-{kind}", *TINY, "--init-from", d], True),
        ]  # fmt: skip
    for kind in ("truncated-bare", "header-bare"):
        d = str(p[f"damaged-{kind}"])
        out += [
            (f"eval: {kind} weights", ["eval", d, "--max-batches", "1"], True),
            (f"generate: {kind} weights", ["generate", d, "--prompt", "a"], True),
            (f"analyze: {kind} weights", ["analyze", d, "--out", f"x-an-{kind}"], True),
        ]
    return out


def judge(r: subprocess.CompletedProcess, expect_failure: bool) -> tuple[bool, str]:
    err = [line for line in r.stderr.splitlines() if line.strip()]
    if "Traceback" in r.stderr or "Traceback" in r.stdout:
        return False, "traceback"
    if expect_failure and r.returncode == 0:
        return False, "exit 0"
    if any("[Errno" in line or "size mismatch" in line for line in err):
        return False, "raw OS/torch message: " + next(
            x for x in err if "[Errno" in x or "size" in x
        )
    if len(err) > 3:
        return False, f"{len(err)} lines on stderr"
    return True, err[-1] if err else "(no message)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="rmoe-bad-inputs-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    paths = prepare(root)
    rows = []
    for name, cmd, expect_failure in cases(paths):
        t0 = time.perf_counter()
        r = rmoe(*cmd, cwd=root, env=env)
        ok, message = judge(r, expect_failure)
        rows.append({"case": name, "ok": ok, "exit": r.returncode, "message": message[:160],
                     "seconds": round(time.perf_counter() - t0, 1), "argv": cmd})  # fmt: skip
        print(f"{'ok ' if ok else 'BAD'} exit {r.returncode}  {name}: {message[:120]}", flush=True)
    good = sum(r["ok"] for r in rows)
    print(f"\n{good}/{len(rows)} cases gave one clear line and no traceback")
    (root / "bad_inputs.json").write_text(json.dumps(rows, indent=1))
    return 0 if good == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
