"""One-shot device check: every CUDA test and every GPU benchmark, one JSON + one Markdown table.

Run through ``benchmarks/device_check.sh`` (it installs carried wheels, sets loopback EPICS and
PYTHONPATH). Steps, in this order, each a subprocess with its own time limit inside one overall
budget (a step that would not fit is skipped, not started):

1. ``env``        GPU, driver, torch/CuPy/pvapy versions.
2. ``cuda-tests`` ``pytest -m gpu tests/`` (every CUDA test; JUnit XML parsed).
3. ``peakfinder8-gpu`` ``bench_peakfinder8.py --device cuda``: the GPU path vs the CPU path.
4. ``peaks-cupy`` ``bench_peaks.py``: CuPy vs SciPy peaks, CuPy vs the seed's per-panel CuPy loop.
5. ``pipeline``   ``bench_pipeline.py``: buffered vs compute-only vs sequential frames/s, bf16,
   presets peaknet-atto and peaknet-tiny, 512² and 16×352×384, batch 8, 32, 64.
6. ``pva-4-consumers`` ``bench_pva.py``: 4 PeakNet consumers on one GPU through PVA on loopback
   vs pvapy's pass-through processor (needs pvapy: carried as a wheel).

``--mode cpu`` (CI) runs no GPU work: every CUDA step is reported "skipped", but each step's exact
command line is checked against its script's own argument parser, in this process, so a renamed
flag fails here and not on the first lent GPU. It takes a few seconds.

Writes ``device_check.json`` and ``device_check.md`` (ready for docs/BENCHMARKS.md) to ``--out``
and prints the Markdown last.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PY = sys.executable


@dataclass
class Step:
    name: str
    what: str
    argv: list[str]  # after the interpreter
    timeout_s: int
    needs: tuple[str, ...] = ("cuda",)  # "cuda", "cupy", "pvapy"
    script: str | None = None  # a benchmarks/ script whose parser checks argv in --mode cpu
    result: dict[str, Any] = field(default_factory=dict)


def steps(out: Path) -> list[Step]:
    return [
        Step("cuda-tests", "every CUDA test (pytest -m gpu)",
             ["-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", "--continue-on-collection-errors",
              f"--junitxml={out / 'cuda-tests.xml'}", str(ROOT / "tests")], 150),
        Step("peakfinder8-gpu", "GPU peakfinder8 vs the CPU path (3 detector layouts)",
             [str(BENCH / "bench_peakfinder8.py"), "--device", "cuda", "--repeats", "10"], 75,
             script="bench_peakfinder8.py"),
        Step("peaks-cupy", "CuPy vs SciPy peaks; CuPy vs the seed's per-panel CuPy loop",
             [str(BENCH / "bench_peaks.py"), "--repeats", "3"], 75, needs=("cuda", "cupy"),
             script="bench_peaks.py"),
        Step("pipeline", "buffered vs compute-only vs sequential frames/s, bf16",
             [str(BENCH / "bench_pipeline.py"), "--device", "cuda", "--dtype", "bf16",
              "--preset", "peaknet-atto,peaknet-tiny", "--detector", "single,epix10k2m",
              "--batch-size", "8,32,64", "--frames", "192", "--repeats", "3", "--unique", "8"], 170,
             script="bench_pipeline.py"),
        Step("pva-4-consumers", "4 PeakNet consumers on one GPU through PVA vs pass-through",
             [str(BENCH / "bench_pva.py"), "--device", "cuda:0", "--consumers", "4", "--batch-size", "16",
              "--duration", "6"], 150, needs=("cuda", "pvapy"), script="bench_pva.py"),
    ]


# ---- environment ----
def _run_quiet(cmd: list[str], timeout: float = 20) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except Exception as exc:  # missing tool, timeout
        return f"({type(exc).__name__})"


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(),
                           "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda_available"] = bool(torch.cuda.is_available())
        if env["cuda_available"]:
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            env["torch_cuda"] = torch.version.cuda
    except Exception as exc:
        env["torch"] = f"unavailable ({exc})"
        env["cuda_available"] = False
    for mod in ("cupy", "pvapy", "numpy", "scipy"):
        spec = importlib.util.find_spec(mod)
        if spec is None:
            env[mod] = None
            continue
        try:
            from importlib.metadata import version

            env[mod] = version({"cupy": _cupy_dist()}.get(mod, mod))
        except Exception:
            env[mod] = "installed"
    env["cupy_device"] = _cupy_ok()
    env["nvidia_smi"] = _run_quiet(["nvidia-smi", "-L"]) if env.get("cuda_available") else None
    return env


def _cupy_dist() -> str:
    from importlib.metadata import distributions

    for d in distributions():
        name = (d.metadata.get("Name") or "").lower()
        if name.startswith("cupy"):
            return name
    return "cupy"


def _cupy_ok() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


# ---- running ----
def _json_rows(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def _junit(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    res: dict[str, Any] = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "passed": []}
    for s in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            res[key] += int(s.get(key, 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                msg = (bad.get("message") or bad.text or "").strip().splitlines()
                res["failed"].append({"test": name, "message": (msg[0] if msg else "")[:300]})
            elif case.find("skipped") is None:
                res["passed"].append(name)
    res["n_passed"] = len(res.pop("passed"))
    return res


def run_step(step: Step, env: dict[str, Any], budget_left: float, out: Path) -> None:
    missing = [n for n in step.needs if not {"cuda": env.get("cuda_available"), "cupy": env.get("cupy_device"),
                                              "pvapy": env.get("pvapy")}.get(n)]
    if missing:
        step.result = {"status": "skipped", "reason": f"needs {', '.join(missing)}"}
        return
    limit = min(step.timeout_s, budget_left)
    if limit < 20:
        step.result = {"status": "skipped", "reason": f"time budget ({budget_left:.0f} s left)"}
        return
    t0 = time.monotonic()
    log = out / f"{step.name}.log"
    try:
        proc = subprocess.run([PY, *step.argv], capture_output=True, text=True, timeout=limit, cwd=ROOT)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        rc, status = None, "timeout"
    log.write_text(f"$ {PY} {' '.join(step.argv)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    step.result = {"status": status, "rc": rc, "elapsed_s": round(time.monotonic() - t0, 1),
                   "rows": _json_rows(stdout), "stderr_tail": stderr[-1500:] if status != "ok" else ""}
    if step.name == "cuda-tests":
        junit = _junit(out / "cuda-tests.xml")
        step.result["tests"] = junit
        tail = [ln for ln in stdout.strip().splitlines() if ln.strip()][-1:] if stdout.strip() else []
        step.result["summary"] = tail[0] if tail else ""


class _ArgsOK(Exception):
    pass


def check_argv(step: Step) -> dict[str, Any]:
    """Parse ``step.argv`` with the script's own argparse parser (nothing runs)."""
    if step.script is None:
        return {"argv_check": "n/a"}
    path = BENCH / step.script
    orig = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):  # noqa: ANN001
        ns = orig(self, args, namespace)
        raise _ArgsOK(vars(ns))

    name = f"_devcheck_{path.stem}"
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.path.insert(0, str(BENCH))
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    except ImportError as exc:  # e.g. pvapy missing in this environment
        return {"argv_check": f"not checked: {exc}"}
    finally:
        if sys.path and sys.path[0] == str(BENCH):
            sys.path.pop(0)
    argparse.ArgumentParser.parse_args = parse_then_stop  # type: ignore[method-assign]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            mod.main(step.argv[1:])
    except _ArgsOK as ok:
        return {"argv_check": "ok", "parsed": {k: v for k, v in ok.args[0].items()}}
    except SystemExit:
        return {"argv_check": "FAILED", "error": err.getvalue().strip()[-500:]}
    finally:
        argparse.ArgumentParser.parse_args = orig  # type: ignore[method-assign]
    return {"argv_check": "FAILED", "error": "main() returned without parsing its arguments"}


# ---- report ----
def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, list):
        return "×".join(str(x) for x in v)
    return str(v)


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for _, k in cols) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    env = report["env"]
    md = [f"### Device check ({report['mode']} mode, {report['date']})", ""]
    md.append(f"Machine: {env.get('gpu') or 'no GPU'}"
              + (f" ({env.get('gpu_memory_gib')} GiB)" if env.get("gpu") else "")
              + f", {env.get('cpu_count')} CPU cores, Python {env.get('python')}, torch {env.get('torch')}"
              + f", CuPy {env.get('cupy')}, pvapy {env.get('pvapy')}. Total {report['elapsed_s']} s."
              + f" Command: `{report['command']}`.")
    md += ["", "| step | what | status | time (s) | note |", "| --- | --- | --- | --- | --- |"]
    for s in report["steps"]:
        r = s["result"]
        note = r.get("reason") or r.get("summary") or ""
        if report["mode"] == "cpu":
            note = (note + "; " if note else "") + f"command line: {r.get('argv_check', 'n/a')}"
        if r.get("status") in ("failed", "timeout") and r.get("stderr_tail"):
            note = (note + "; " if note else "") + r["stderr_tail"].strip().splitlines()[-1][:160]
        md.append(f"| {s['name']} | {s['what']} | {r.get('status')} | {_fmt(r.get('elapsed_s'))} | {note.replace('|', '/')} |")
    by = {s["name"]: s["result"] for s in report["steps"]}
    tests = by.get("cuda-tests", {}).get("tests")
    if tests:
        md += ["", f"CUDA tests: {tests['n_passed']} passed, {tests['failures'] + tests['errors']} failed, "
               f"{tests['skipped']} skipped."]
        for f in tests["failed"]:
            md.append(f"- FAILED `{f['test']}`: {f['message']}")
    sections = [
        ("peakfinder8-gpu", "peakfinder8 on the GPU (dense path, float32) vs the CPU (sparse) path", [
            ("layout", "layout"), ("frame", "frame"), ("peaks", "peaks"), ("same peaks as CPU", "same_as_cpu"),
            ("GPU ms/frame (batch)", "gpu_batch_ms_per_frame"), ("GPU ms (1 frame/call)", "gpu_single_ms"),
            ("CPU ms/frame", "cpu_sparse_ms"), ("speed-up", "speedup_gpu_batch_vs_cpu")]),
        ("peaks-cupy", "Peak extraction: batched CuPy vs SciPy and vs the seed's CuPy loop", [
            ("case", "case"), ("backend", "backend"), ("baseline", "baseline"), ("peaks", "n_peaks"),
            ("baseline median (s)", "seed_median_s"), ("batched median (s)", "batched_median_s"),
            ("speed-up", "speedup")]),
        ("pipeline", "Pipeline frames/s (bf16)", [
            ("preset", "preset"), ("frame", "frame"), ("batch", "batch_size"), ("compute-only", "compute_only"),
            ("sequential", "sequential"), ("buffered", "buffered"),
            ("buffered / compute-only", "ratio_buffered_vs_compute_only"),
            ("buffered / sequential", "ratio_buffered_vs_sequential")]),
        ("pva-4-consumers", "PVA on loopback: 4 consumers on one GPU", [
            ("case", "case"), ("processor", "processor"), ("consumers", "consumers"), ("source fps", "source_fps"),
            ("sent", "sent"), ("published", "published"), ("missed", "missed"), ("ring dropped", "ring_dropped"),
            ("out fps", "out_fps"), ("ratio", "ratio_vs_passthrough")]),
    ]
    for name, title, cols in sections:
        r = by.get(name, {})
        rows = r.get("rows") or []
        if name == "pipeline" and rows:
            rows = _pipeline_rows(rows)
        md += ["", f"**{title}**" + ("" if rows else f": {r.get('status')}"
                                     + (f" ({r['reason']})" if r.get("reason") else "")), ""]
        md += _table(rows, cols) if rows else _table([{k: "skipped" if r.get("status") == "skipped" else "–"
                                                        for _, k in cols}], cols)
    return "\n".join(md) + "\n"


def _pipeline_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r.get("preset"), tuple(r.get("frame") or ()), r.get("batch_size"))
        m = merged.setdefault(key, {"preset": r.get("preset"), "frame": r.get("frame"), "batch_size": r.get("batch_size")})
        if "mode" in r:
            m[r["mode"]] = r.get("frames_per_s")
        else:
            m.update({k: v for k, v in r.items() if k.startswith("ratio_")})
    return list(merged.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT or ./device_check_out)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all GPU steps together")
    ap.add_argument("--command", default="bash benchmarks/device_check.sh", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "device_check_out")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    env = environment()
    if args.mode == "cpu":
        env["cuda_available_but_cpu_mode"] = env.get("cuda_available")
    todo = steps(out)
    for step in todo:
        if args.mode == "cpu":
            step.result = {"status": "skipped", "reason": "--cpu: no GPU work", **check_argv(step)}
            continue
        left = args.budget - (time.monotonic() - t_start)
        print(f"[device_check] {step.name}: {step.what} (limit {min(step.timeout_s, left):.0f} s)", flush=True)
        run_step(step, env, left, out)
        print(f"[device_check] {step.name}: {step.result.get('status')} {step.result.get('elapsed_s', '')}",
              flush=True)
    report = {
        "mode": args.mode, "date": time.strftime("%Y-%m-%d %H:%M"), "command": args.command,
        "elapsed_s": round(time.monotonic() - t_start, 1), "env": env,
        "steps": [{"name": s.name, "what": s.what, "argv": s.argv, "result": s.result} for s in todo],
    }
    ok = all(s.result.get("status") in ("ok", "skipped") for s in todo)
    if args.mode == "cpu":  # every command line must parse (or be uncheckable here, e.g. no pvapy)
        ok = ok and all(str(s.result.get("argv_check")).startswith(("ok", "n/a", "not checked")) for s in todo)
    report["ok"] = ok
    (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    (out / "device_check.md").write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
