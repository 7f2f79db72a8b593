"""Data-parallel merging over torch.distributed (gloo, two processes on two
cores): the same merged weights as one process, and bad input ends every
rank with the same one-line error and exit status 2, without hanging."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import fxmerge

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list, n: int, timeout: float = 300) -> list:
    """Start ``n`` ranks of ``python argv...`` as torchrun would (the
    environment names the group), one BLAS thread each; returns each rank's
    (exit status, stderr)."""
    port = _free_port()
    procs = []
    for rank in range(n):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), OMP_NUM_THREADS="1", FXMERGE_DIST_TIMEOUT="60",
                   PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank hung")
        out.append((p.returncode, err))
    return out


def test_two_ranks_give_the_weights_of_one_process(tmp_path):
    worker = os.path.join(HERE, "dist_worker.py")
    single = launch([worker, str(tmp_path)], 1)
    double = launch([worker, str(tmp_path)], 2)
    assert all(code == 0 for code, _ in single + double), single + double
    one = torch.load(tmp_path / "weights-1.pt", weights_only=True)
    two = torch.load(tmp_path / "weights-2.pt", weights_only=True)
    for method, w1 in one.items():
        w2 = two[method]
        for k, v in w1.items():
            if v.is_floating_point():
                rel = ((v - w2[k]).abs().max() / (v.abs().max() + 1e-12)).item()
                assert rel <= 1e-5, (method, k, rel)
    for rank in (0, 1):
        report = json.load(open(tmp_path / f"report-2-{rank}.json"))
        for method, r in report.items():
            assert r["world_size"] == 2 and r["images_per_rank"] == [24, 24] and r["calibration_inputs"] == 48


def _ckpts(tmp_path):
    import timm

    paths = {}
    for name, classes, seed in (("a", 4, 0), ("b", 4, 1), ("other", 5, 2)):
        torch.manual_seed(seed)
        paths[name] = str(tmp_path / f"{name}.pt")
        torch.save(timm.create_model("resnet18", num_classes=classes).state_dict(), paths[name])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    paths["garbage"] = str(tmp_path / "garbage.pt")
    return paths


@pytest.mark.parametrize("problem", ["unreadable checkpoint", "no data on one rank", "mismatched models"])
def test_bad_input_under_torchrun_ends_every_rank_with_the_same_error(tmp_path, problem):
    p = _ckpts(tmp_path)
    a, b, calib = p["a"], p["b"], "32"
    if problem == "unreadable checkpoint":
        b = p["garbage"]
    elif problem == "mismatched models":
        b = p["other"]
    else:
        calib = "16"  # one batch of 16: rank 1 has none
    out = tmp_path / "merged.pt"
    argv = ["-m", "fxmerge.cli", "merge", "--arch", "resnet18", "--a", a, "--b", b, "--data", "generic",
            "--calib", calib, "--batch-size", "16", "--input-size", "3,32,32", "--method", "perm", "--quiet",
            "-o", str(out)]
    ranks = launch(argv, 2)
    lines = [err.strip().splitlines() for _, err in ranks]
    assert [code for code, _ in ranks] == [2, 2], ranks
    assert all(len(l) == 1 and l[0].startswith("fxmerge: error: ") for l in lines), lines
    assert lines[0] == lines[1]
    assert not out.exists()


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(fxmerge.InputError, match="no CUDA GPU"):
        fxmerge.merge(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), [torch.randn(4, 2)], device="cuda")
