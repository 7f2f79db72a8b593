import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import fxmerge
from fxmerge.cli import main


def test_groups_json(capsys):
    assert main(["groups", "resnet18", "--input-size", "3,32,32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "resnet18" and len(d["groups"]) == 12
    assert all(g["members"] for g in d["groups"])
    assert d["pinned"] == []



def test_groups_verify_and_dot(capsys, tmp_path):
    dot = tmp_path / "g.dot"
    assert main(["groups", "resnet18", "--input-size", "3,32,32", "--verify", "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert "residual" in out and "verified" in out
    assert dot.read_text().startswith("graph permutation_groups")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["groups", "no_such_model_xyz"], "unknown model"),
        (["groups", "torchvision:nope"], "unknown torchvision model"),
        (["groups", "resnet18", "--input-size", "3,32"], "bad --input-size"),
        (["groups", "--arch", "resnet18", "--checkpoint", "/nonexistent.pth"], "does not exist"),
        (["demo", "--methods", "pleas,magic"], "unknown method 'magic'"),
        (["demo", "--norm-policy", "wide"], "invalid choice: 'wide'"),
    ],
)
def test_bad_input_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_checkpoint_roundtrip_and_errors(tmp_path, capsys):
    import timm

    good = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", num_classes=5).state_dict(), good)
    assert main(["groups", "--arch", "resnet18", "--checkpoint", str(good), "--input-size", "3,32,32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["groups"]) == 12
    garbage = tmp_path / "bad.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["groups", "--arch", "resnet18", "--checkpoint", str(garbage)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    wrong = tmp_path / "r34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), wrong)
    assert main(["groups", "--arch", "resnet18", "--checkpoint", str(wrong)]) == 2
    assert "does not fit architecture" in capsys.readouterr().err


def test_dot_to_unwritable_path_leaves_nothing(tmp_path, capsys):
    target = tmp_path / "missing_dir" / "g.dot"
    assert main(["groups", "resnet18", "--input-size", "3,32,32", "--dot", str(target)]) == 2
    assert not target.exists()


def test_verify_failure_exit_1(monkeypatch, capsys):
    import operator

    from fxmerge.analysis.rules import RULES

    monkeypatch.setitem(RULES.functions, operator.add, lambda ctx, a, b: ctx.like(a))
    assert main(["groups", "resnet18", "--input-size", "3,32,32", "--verify"]) == 1
    assert "UNSOUND" in capsys.readouterr().out


def test_untraceable_input_size_is_one_line_with_user_source(capsys):
    # a fixed-size ViT asserts on the input size inside its patch embedding
    assert main(["groups", "vit_tiny_patch16_224", "--input-size", "3,32,32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "patch_embed" in err and "patch_embed.py" in err and "/torch/fx/" not in err


def _ckpts(tmp_path, arch="resnet18"):
    import timm

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        p = tmp_path / f"{arch}-{seed}.pt"
        torch.save(timm.create_model(arch, num_classes=4).state_dict(), p)
        paths.append(str(p))
    return paths


def test_merge_command_writes_a_loadable_model(tmp_path, capsys):
    import fxmerge

    a, b = _ckpts(tmp_path)
    out = tmp_path / "merged.pt"
    rc = main(["merge", "--arch", "resnet18", "--a", a, "--b", b, "--data", "generic", "--calib", "16",
               "--input-size", "3,32,32", "--budget", "1.2", "--method", "perm", "--quiet", "-o", str(out)])
    assert rc == 0 and out.exists()
    gm, plan, report = fxmerge.load(str(out))
    assert gm(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert abs(report["cost_measured"] - 1.2) < 0.012


def test_merge_keep_bn_stats_keeps_the_sources_statistics(tmp_path):
    # a self-merge at 1x: the merged statistics are the source's own with the
    # flag, and re-estimated on the (generic) calibration images without it
    import fxmerge

    a, _ = _ckpts(tmp_path)
    source = torch.load(a, weights_only=True)
    outs = {}
    for flag in ([], ["--keep-bn-stats"]):
        out = tmp_path / f"merged{len(flag)}.pt"
        assert main(["merge", "--arch", "resnet18", "--a", a, "--b", a, "--data", "generic", "--calib", "16",
                     "--input-size", "3,32,32", "--method", "perm", "--quiet", *flag, "-o", str(out)]) == 0
        outs[bool(flag)] = fxmerge.load(str(out))[0].state_dict()
    kept, reset = outs[True], outs[False]
    for key in ("bn1.running_mean", "layer1.0.bn2.running_var", "layer4.1.bn2.running_mean"):
        torch.testing.assert_close(kept[key], source[key])
        assert not torch.allclose(reset[key], source[key])


@pytest.mark.parametrize("problem", ["budget", "arch", "checkpoint", "output", "nan", "method", "positions"])
def test_merge_bad_input_exits_2_with_one_line_and_no_output(tmp_path, capsys, problem):
    a, b = _ckpts(tmp_path)
    out = tmp_path / "merged.pt"
    args = {"--arch": "resnet18", "--a": a, "--b": b, "--budget": "1.0", "--method": "perm", "-o": str(out)}
    if problem == "budget":
        args["--budget"] = "2.5"
    elif problem == "arch":
        state = torch.load(b, weights_only=True)
        state["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
        torch.save(state, b)
    elif problem == "checkpoint":
        with open(b, "w") as f:
            f.write("not a checkpoint")
    elif problem == "output":
        args["-o"] = str(tmp_path / "missing" / "merged.pt")
    elif problem == "nan":
        state = torch.load(b, weights_only=True)
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
        torch.save(state, b)
    elif problem == "method":
        args["--method"] = "magic"
    elif problem == "positions":
        args["--positions"] = "-3"
    argv = ["merge", "--data", "generic", "--calib", "8", "--input-size", "3,32,32", "--quiet"]
    for k, v in args.items():
        argv += [k, v]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("fxmerge: error:") and "\n" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".fxmerge-*"))


def test_a_budget_that_cannot_be_met_is_one_warning_line_and_exit_2_under_strict(tmp_path, capsys):
    # resnest's split attention reads the radix splits as blocks of a grouped
    # convolution: they widen whole, so 2x is not the ensemble
    a, b = _ckpts(tmp_path, "resnest14d")
    out = tmp_path / "m.pt"
    argv = ["merge", "--arch", "resnest14d", "--a", a, "--b", b, "--data", "generic", "--calib", "8",
            "--batch-size", "4", "--input-size", "3,64,64", "--method", "perm", "--budget", "2", "--quiet"]
    assert main(argv + ["-o", str(out)]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines()
               if line.startswith("fxmerge: warning: at 2.00x the merged model is not the ensemble")]
    assert len(warning) == 1 and "widen whole" in warning[0]
    assert out.exists()
    strict = tmp_path / "s.pt"
    assert main(argv + ["--strict", "-o", str(strict)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fxmerge: error: at 2.00x the merged model is not the ensemble")
    assert not strict.exists()


def test_a_two_x_merge_runs_what_channels_fold_into_per_model_view(tmp_path, capsys):
    # mobilevit folds channels into the batch to unfold its patches: the
    # layers from the fold to the unfold run once per model view, so 2x is
    # the ensemble with nothing to warn about, under --strict too
    a, b = _ckpts(tmp_path, "mobilevit_xxs")
    argv = ["merge", "--arch", "mobilevit_xxs", "--a", a, "--b", b, "--data", "generic", "--calib", "8",
            "--batch-size", "4", "--input-size", "3,64,64", "--method", "perm", "--budget", "2", "--quiet"]
    assert main(argv + ["--strict", "-o", str(tmp_path / "s.pt")]) == 0
    assert "warning" not in capsys.readouterr().err
    merged, _, report = fxmerge.load(str(tmp_path / "s.pt"))
    assert report["budget_reachable"] and any("fxm_views" in name for name, _ in merged.named_children())


@pytest.mark.parametrize("argv", [["--help"], ["groups", "--help"], ["merge", "--help"], ["demo", "--help"],
                                  ["--version"]])
def test_help_and_version_print_and_exit_0(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_the_command_line_allocator_setting_applies_unless_told_not_to():
    code = "from fxmerge.runtime.memory import keep_freed_memory; print(keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if k != "FXMERGE_MALLOC"}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,  # noqa: E731
                                   check=True).stdout.strip()
    assert run(env) == "True"
    assert run({**env, "FXMERGE_MALLOC": "system"}) == "False"


RELEASE_PROBE = """
import torch
from fxmerge.runtime.memory import keep_freed_memory, release_freed_memory

def resident_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

keep_freed_memory()
blocks = [torch.ones(1 << 20) for _ in range(256)]  # 256 x 4 MB, touched
del blocks[::2]  # holes between live blocks: nothing at the heap's top to trim
before = resident_mb()
release_freed_memory()
print(before - resident_mb())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_released_memory_leaves_the_process_though_freed_blocks_lie_between_live_ones():
    run = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, check=True)
    assert float(run.stdout.strip()) > 400  # of the 512 MB freed
