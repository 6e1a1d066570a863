"""benchmarks/gpu_bench.py in its CPU rehearsal mode (--tiny --device cpu): the files it writes, the
deadline, a failing measurement, SIGTERM, and its byte formulas against real tensors. The GPU
path itself needs a GPU; these tests run the same steps at tiny sizes with the CPU kernels."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_bench  # noqa: E402

TINY = gpu_bench.TINY
OP_CASES = 2 * 2 * len(TINY.op_shapes) * 2  # (nr_recall, cosine) x (fp32, bf16) x shapes x (fwd, fwdbwd)


def run_tiny(out: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--tiny", "--device", "cpu", *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def load(out: Path) -> dict:
    return json.loads((out / "bench.json").read_text())


def test_tiny_rehearsal_writes_every_measurement(tmp_path):
    proc = run_tiny(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = load(tmp_path)
    assert report["status"] == "done" and report["exit_code"] == 0 and report["errors"] == []
    env = report["environment"]
    assert env["torch"] == torch.__version__ and set(env["memkd_backends"]) == {"nr_recall", "cosine_distance_map", "anomaly_map"}
    assert "build_info" in env["memkd_extension"]

    by_group: dict[str, list[dict]] = {}
    for m in report["measurements"]:
        by_group.setdefault(m["group"], []).append(m)
        assert m["status"] == "ok", (m["id"], m.get("error"))
        for name, r in m["impls"].items():
            assert 0 < r["p10_s"] <= r["median_s"] <= r["p90_s"], (m["id"], name)
            assert r["rounds"] == (TINY.train_rounds if m["group"] == "train" else TINY.rounds)
    ops = by_group["ops"]
    assert ops[0]["id"] == "ops/copy_bandwidth" and report["copy_bandwidth_GBps"] > 0
    assert len(ops) == 1 + OP_CASES + 2  # the copy, the op cases, anomaly_map in fp32 and bf16
    for m in ops[1:]:
        subject = next(n for n in m["impls"] if n != "composite")
        assert set(m["impls"]) == {subject, "composite"}
        assert m["impls"][subject]["speedup_vs_composite"] > 0 and m["impls"][subject]["GBps"] > 0
    # batch 1 fp32 and bf16 eager and the throughput batches; CUDA graphs skipped on the CPU
    assert len(by_group["predict"]) == 2 + len(TINY.throughput_batches)
    assert all(set(m["impls"]) == {"memkd", "rd"} and m["memkd_over_rd"] > 0 for m in by_group["predict"])
    assert set(by_group["train"][0]["impls"]) == {"memkd", "memkd-uncached", "rd"}
    graph_skips = [s for s in report["skipped"] if "cuda_graph" in s["id"]]
    assert len(graph_skips) == 2 and all("CUDA device" in s["reason"] for s in graph_skips)
    assert report["targets"] and all(t["verdict"].startswith("not judged") for t in report["targets"])

    md = (tmp_path / "bench.md").read_text()
    for heading in ("## Targets", "## Ops", "## Predict", "## Training step", "## Skipped", "## Errors"):
        assert heading in md
    assert "| nr_recall | fwdbwd | 2 | 8x8x8 | bf16 |" in md and "| train/resnet18/B2/64x64 | rd |" in md
    assert not list(tmp_path.glob(".*.tmp"))


def run_in_process(out: Path, *extra: str) -> int:
    threads = torch.get_num_threads()  # the rehearsal runs on one thread
    try:
        return gpu_bench.main(["--out", str(out), "--tiny", "--device", "cpu", *extra])
    finally:
        torch.set_num_threads(threads)


def test_past_deadline_skips_every_step_with_a_reason(tmp_path):
    assert run_in_process(tmp_path, "--deadline", str(time.time() - 1)) == 0
    report = load(tmp_path)
    assert report["measurements"] == [] and report["status"] == "done"
    out_of_time = [s for s in report["skipped"] if s["reason"].startswith("out of time")]
    # every step but the two CUDA-graph ones, which are skipped on the CPU for another reason
    assert len(out_of_time) == 1 + OP_CASES + 2 + 2 + len(TINY.throughput_batches) + 1
    assert len(out_of_time) + 2 == len(report["skipped"])
    assert "out of time" in (tmp_path / "bench.md").read_text()


def test_a_failing_measurement_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    def broken_composite(*args):
        raise RuntimeError("injected composite failure")

    def broken_copy(self):
        raise RuntimeError("injected copy failure")

    monkeypatch.setattr(gpu_bench, "nr_recall_composite", broken_composite)
    monkeypatch.setattr(gpu_bench.Bench, "copy_bandwidth", broken_copy)
    assert run_in_process(tmp_path, "--only", "ops") == 1
    report = load(tmp_path)
    assert report["status"] == "done" and report["exit_code"] == 1
    status = {m["id"]: m for m in report["measurements"]}
    copy = status.pop("ops/copy_bandwidth")
    assert copy["status"] == "error" and "injected copy failure" in copy["error"]
    assert len(status) == OP_CASES + 2
    for mid, m in status.items():
        if mid.startswith("ops/nr_recall/"):
            assert m["status"] == "partial" and "injected composite failure" in m["impls"]["composite"]["error"]
            subject = next(n for n in m["impls"] if n != "composite")
            assert m["impls"][subject]["median_s"] > 0 and m["impls"][subject]["speedup_vs_composite"] is None
        else:
            assert m["status"] == "ok", mid
    assert {e["id"] for e in report["errors"]} == {"ops/copy_bandwidth"} | {m for m in status if m.startswith("ops/nr_recall/")}
    assert {s["id"] for s in report["skipped"]} == {"predict", "train"}
    md = (tmp_path / "bench.md").read_text()
    assert "error: RuntimeError: injected composite failure" in md and "not measured" in md


def test_sigterm_keeps_what_was_measured(tmp_path):
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--tiny", "--device", "cpu",
                             "--only", "predict,train"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if (tmp_path / "bench.json").exists() and load(tmp_path)["measurements"]:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    report = load(tmp_path)
    assert report["status"] == "interrupted (SIGTERM)" and report["exit_code"] == 128 + signal.SIGTERM
    assert report["measurements"][-1]["status"] == "interrupted"
    ran = {m["id"] for m in report["measurements"]}
    later = [s for s in report["skipped"] if s["reason"].startswith("interrupted")]
    assert later and ran.isdisjoint(s["id"] for s in later)
    assert later[-1]["id"].startswith("train/")


def test_byte_formulas_count_every_input_and_output():
    """min_bytes against the sizes of the tensors each pass must read and write."""
    torch.manual_seed(0)
    b, (c, h, w), items = 2, (8, 4, 4), 5
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = torch.randn(b, c, h, w, dtype=dtype), torch.randn(items, c, dtype=dtype), torch.randn(items, c, dtype=dtype)
        out = q.new_empty(q.shape)
        fwd = sum(t.nbytes for t in (q, k, v, out))
        assert gpu_bench.min_bytes("nr_recall", "fwd", b, (c, h, w), items, q.element_size()) == fwd
        backward = sum(t.nbytes for t in (out, q, k, v)) + sum(t.nbytes for t in (q, k, v))  # dout, inputs; grads
        assert gpu_bench.min_bytes("nr_recall", "fwdbwd", b, (c, h, w), items, q.element_size()) == fwd + backward
        fs, ft = q, q.clone()
        dmap = fs.new_empty(b, h, w)
        fwd = fs.nbytes + ft.nbytes + dmap.nbytes
        assert gpu_bench.min_bytes("cosine_distance_map", "fwd", b, (c, h, w), items, fs.element_size()) == fwd
        backward = dmap.nbytes + fs.nbytes + ft.nbytes + fs.nbytes + ft.nbytes
        assert gpu_bench.min_bytes("cosine_distance_map", "fwdbwd", b, (c, h, w), items, fs.element_size()) == fwd + backward
    shapes = ((8, 8, 8), (16, 4, 4), (32, 2, 2))
    features = [torch.empty(b, *s, dtype=torch.bfloat16) for s in shapes]
    maps, scores = torch.empty(b, 16, 16), torch.empty(b)
    expected = 2 * sum(f.nbytes for f in features) + maps.nbytes + scores.nbytes
    assert gpu_bench.anomaly_map_min_bytes(b, shapes, 16, 2, 4) == expected


def test_targets_judge_only_shapes_leaving_l2_and_only_on_a_gpu():
    impls = {"cuda": {"median_s": 1e-3, "copy_fraction": 0.80, "speedup_vs_composite": 3.5}, "composite": {"median_s": 3.5e-3}}
    leaving = gpu_bench.op_targets("nr_recall", "fwd", True, impls, ["cuda"], None)
    assert [t["verdict"] for t in leaving] == ["fail"] and leaving[0]["threshold"] == gpu_bench.NR_RECALL_COPY_FRACTION
    impls["cuda"]["copy_fraction"] = 0.9
    assert gpu_bench.op_targets("nr_recall", "fwd", True, impls, ["cuda"], None)[0]["verdict"] == "pass"
    assert gpu_bench.op_targets("nr_recall", "fwd", False, impls, ["cuda"], None) == []
    fwdbwd = gpu_bench.op_targets("nr_recall", "fwdbwd", True, impls, ["cuda"], None)
    assert [t["verdict"] for t in fwdbwd] == ["pass"]
    impls["cuda"]["speedup_vs_composite"] = 2.0
    assert gpu_bench.op_targets("nr_recall", "fwdbwd", True, impls, ["cuda"], None)[0]["verdict"] == "fail"
    rehearsal = gpu_bench.op_targets("nr_recall", "fwdbwd", True, impls, ["cuda"], "rehearsal")
    assert rehearsal[0]["verdict"] == "not judged: rehearsal"
    impls["cuda"]["roofline_ratio"] = 1.6
    assert gpu_bench.op_targets("anomaly_map", "fwd", False, impls, ["cuda"], None)[0]["verdict"] == "fail"


@pytest.mark.parametrize("argv,message", [
    (["--only", "ops,bogus"], "--only: expected a comma-separated subset of ops,predict,train"),
    (["--device", "cpu"], "--device: cpu runs only with --tiny"),
    (["--deadline", "soon", "--tiny", "--device", "cpu"], "--deadline"),
])
def test_bad_arguments_get_a_one_line_error(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_bench.parse_args(["--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_only_a_full_gpu_run_judges_and_the_l2_rule_at_the_full_shapes(tmp_path):
    assert gpu_bench.Bench(tmp_path, "cuda", False, None, gpu_bench.GROUPS).judged is None
    assert gpu_bench.Bench(tmp_path, "cuda", True, None, gpu_bench.GROUPS).judged.startswith("rehearsal")
    assert gpu_bench.Bench(tmp_path, "cpu", True, None, gpu_bench.GROUPS).judged.startswith("rehearsal")
    bench = gpu_bench.Bench(tmp_path, "cuda", False, None, gpu_bench.GROUPS)
    bench.report["l2_bytes"] = gpu_bench.H200_L2_BYTES
    full = gpu_bench.FULL

    def leaves(shape, itemsize):
        return bench.fits_l2(gpu_bench.min_bytes("nr_recall", "fwd", full.batch, shape, full.memory_items, itemsize)) is False

    # B=16 nr_recall forward: 256x64x64 moves 134 MB in fp32 and 67 MB in bf16, 512x32x32 67 / 34 MB
    assert [leaves(s, 4) for s in full.op_shapes] == [True, True, False, False]
    assert [leaves(s, 2) for s in full.op_shapes] == [True, False, False, False]
