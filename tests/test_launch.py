"""launch/*.sh: every script parses; its dry run prints the right commands and runs none of them;
the commands a real run executes are exactly the printed ones; bad arguments get a usage message.

Nothing here imports JAX or needs gcloud, SLURM or a GPU: PATH holds only stubs that record
their calls, so a dry run that executed anything would leave a record.
"""

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
BASH = shutil.which("bash") or "/bin/bash"
STUBBED = ["gcloud", "sbatch", "srun", "python", "python3", "pip", "env", "tar", "mkdir", "git",
           "nvidia-smi", "ssh", "scp", "cat", "seq", "dirname"]
CONFIG = "configs/fashion_mnist.py:tiny"
EXTRA = ["--config.training.batch_size=64", "--config.sampling.steps=10,100"]


@pytest.fixture
def sandbox(tmp_path):
    """Runs a launch script under bash with PATH = stubs that log argv (unit separator joined)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "calls.log"
    for name in STUBBED:
        stub = stubs / name
        stub.write_text(f"#!{BASH}\n"
                        "{ printf '%s' \"${0##*/}\"; printf '\\037%s' \"$@\"; echo; } >> \"$STUB_LOG\"\n")
        stub.chmod(0o755)

    def run(script, *args, **env):
        full_env = {"PATH": str(stubs), "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
                    "STUB_LOG": str(log), **env}
        result = subprocess.run([BASH, str(LAUNCH / script), *args], cwd=ROOT, env=full_env,
                                capture_output=True, text=True, timeout=30)
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        result.calls = [c.split("\x1f") for c in calls]
        return result

    return run


def dry(sandbox, script, *args, **env):
    """The dry run's printed commands as argv lists; asserts that it succeeded and ran nothing."""
    result = sandbox(script, "--dry-run", *args, **env)
    assert result.returncode == 0, result.stderr
    assert result.calls == [], f"a dry run executed {result.calls}"
    return [shlex.split(line) for line in result.stdout.splitlines()]


def option(argv, name):
    """The value of --name=VALUE in argv."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, argv
    return values[0]


def test_every_script_parses_and_states_its_needs():
    assert {s.name for s in SCRIPTS} >= {"tpu_pod.sh", "gpu_host.sh", "slurm_gpus.sh"}
    for script in SCRIPTS:
        check = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script.name}: {check.stderr}"
        text = script.read_text()
        assert "set -euo pipefail" in text, script.name
        assert "Needs" in text.split("set -euo pipefail")[0], script.name
        assert "--dry-run" in text and "DRY_RUN" in text, script.name


def test_tpu_pod(sandbox):
    commands = dry(sandbox, "tpu_pod.sh", "--create", "--delete", "my-tpu", "us-central2-b",
                   CONFIG, "runs/x", *EXTRA, ACCELERATOR_TYPE="v4-32",
                   RUNTIME_VERSION="tpu-ubuntu2204-base", PROJECT="my-project")
    gcloud = [c for c in commands if c[0] == "gcloud"]
    assert all(c[1:4] == ["compute", "tpus", "tpu-vm"] for c in gcloud)
    assert all(c[5] == "my-tpu" for c in gcloud if c[4] != "scp")
    assert all(option(c, "zone") == "us-central2-b" and option(c, "project") == "my-project"
               for c in gcloud)
    verbs = [c[4] for c in gcloud]
    assert verbs[0] == "create" and verbs[-1] == "delete" and verbs[-2] == "scp"
    create = gcloud[0]
    assert option(create, "accelerator-type") == "v4-32"
    assert option(create, "version") == "tpu-ubuntu2204-base"

    on_all = [option(c, "command") for c in gcloud if c[4] == "ssh"]
    assert all(option(c, "worker") == "all" for c in gcloud if c[4] == "ssh")
    copy = next(c for c in gcloud if c[4] == "scp")
    assert option(copy, "worker") == "all" and copy[6] == "my-tpu:dmz_jax.tar.gz"
    assert ["tar", "-czf"] == next(c for c in commands if c[0] == "tar")[:2]
    install = next(c for c in on_all if "pip install" in c)
    assert "-e ." in install and "jax[tpu]" in install
    train = on_all[-1]
    assert train == ("cd dmz_jax && python3 -m dmz_jax.main --distributed "
                     f"--config={CONFIG} --workdir=runs/x " + " ".join(EXTRA))
    assert on_all.index(install) < on_all.index(train)
    fetch = gcloud[-2]
    assert option(fetch, "worker") == "0" and "--recurse" in fetch
    assert fetch[6:8] == ["my-tpu:dmz_jax/runs/x", "runs/tpu-my-tpu"]


def test_tpu_pod_git_clone_and_skip_setup(sandbox):
    clone = dry(sandbox, "tpu_pod.sh", "t", "z", CONFIG, "/mnt/shared/run",
                REPO_URL="https://example.com/dmz_jax.git")
    assert "git clone https://example.com/dmz_jax.git dmz_jax" in option(clone[0], "command")
    assert not any(c[0] == "tar" or c[4] in ("create", "delete") for c in clone if c[0] != "mkdir")
    assert clone[-1][6] == "t:/mnt/shared/run"  # an absolute WORKDIR is fetched as it is

    skip = dry(sandbox, "tpu_pod.sh", "--skip-setup", "t", "z", CONFIG, "w")
    assert [c[4] for c in skip if c[0] == "gcloud"] == ["ssh", "scp"]
    assert "--distributed" in option(skip[0], "command")


def test_gpu_host(sandbox):
    (install, train) = dry(sandbox, "gpu_host.sh", "--install", CONFIG, "runs/x", *EXTRA,
                           GPUS="0,1,2,3", MEM_FRACTION=".9")
    assert install == ["python", "-m", "pip", "install", "-e", str(ROOT), "jax[cuda12]"]
    assert train == ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3", "XLA_PYTHON_CLIENT_MEM_FRACTION=.9",
                     "python", "-m", "dmz_jax.main", f"--config={CONFIG}", "--workdir=runs/x",
                     *EXTRA]
    (plain,) = dry(sandbox, "gpu_host.sh", CONFIG, "runs/x")
    assert plain == ["python", "-m", "dmz_jax.main", f"--config={CONFIG}", "--workdir=runs/x"]


def test_slurm_gpus(sandbox):
    sbatch, srun = dry(sandbox, "slurm_gpus.sh", CONFIG, "/shared/x", *EXTRA, NODES="2",
                       GPUS_PER_NODE="4", EXTRA_SBATCH="--time=24:00:00 --partition=gpu")
    assert sbatch[0] == "sbatch" and sbatch[-3 - len(EXTRA):] == [
        str(LAUNCH / "slurm_gpus.sh"), CONFIG, "/shared/x", *EXTRA]
    assert option(sbatch, "nodes") == "2" and option(sbatch, "gpus-per-node") == "4"
    assert option(sbatch, "ntasks-per-node") == "1" and option(sbatch, "signal") == "TERM@120"
    assert "--time=24:00:00" in sbatch and "--partition=gpu" in sbatch
    train = ["python", "-m", "dmz_jax.main", "--distributed", f"--config={CONFIG}",
             "--workdir=/shared/x", *EXTRA]
    assert srun == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "env",
                    "JAX_LOCAL_DEVICE_IDS=0,1,2,3", *train]

    sbatch, srun = dry(sandbox, "slurm_gpus.sh", CONFIG, "/shared/x", *EXTRA, NODES="2",
                       GPUS_PER_NODE="4", TASKS_PER="gpu")
    assert option(sbatch, "ntasks-per-node") == "4"
    assert srun == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=4", *train]

    # Inside the job (SLURM_JOB_ID set): only the job step, sized from SLURM's variables.
    (srun,) = dry(sandbox, "slurm_gpus.sh", CONFIG, "/shared/x", *EXTRA, SLURM_JOB_ID="7",
                  SLURM_GPUS_ON_NODE="2")
    assert srun == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "env",
                    "JAX_LOCAL_DEVICE_IDS=0,1", *train]


@pytest.mark.parametrize("script, args, env", [
    ("tpu_pod.sh", [], {}),
    ("tpu_pod.sh", ["my-tpu", "us-central2-b", CONFIG], {}),
    ("tpu_pod.sh", ["--create", "my-tpu", "us-central2-b", CONFIG, "w"], {}),
    ("tpu_pod.sh", ["--bogus", "my-tpu", "us-central2-b", CONFIG, "w"], {}),
    ("tpu_pod.sh", ["my-tpu", "us-central2-b", "configs/missing.py", "w"], {}),
    ("gpu_host.sh", [], {}),
    ("gpu_host.sh", [CONFIG], {}),
    ("gpu_host.sh", [CONFIG, "w"], {"GPUS": "zero"}),
    ("gpu_host.sh", [CONFIG, "w"], {"MEM_FRACTION": "1.5"}),
    ("slurm_gpus.sh", [], {"NODES": "2", "GPUS_PER_NODE": "4"}),
    ("slurm_gpus.sh", [CONFIG, "w"], {"GPUS_PER_NODE": "4"}),
    ("slurm_gpus.sh", [CONFIG, "w"], {"NODES": "2"}),
    ("slurm_gpus.sh", [CONFIG, "w"], {"NODES": "2", "GPUS_PER_NODE": "4", "TASKS_PER": "x"}),
])
def test_bad_arguments_get_a_usage_message(sandbox, script, args, env):
    for result in (sandbox(script, "--dry-run", *args, **env),
                   sandbox(script, *args, DRY_RUN="1", **env)):
        assert result.returncode != 0
        assert "Usage:" in result.stderr and f"{script}:" in result.stderr
        assert result.stdout == "" and result.calls == []


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_host.sh", "slurm_gpus.sh"])
def test_help(sandbox, script):
    result = sandbox(script, "--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage:") and result.calls == []


@pytest.mark.parametrize("script, args, env", [
    ("tpu_pod.sh", ["--create", "--delete", "t", "z", CONFIG, "runs/it's mine", *EXTRA],
     {"ACCELERATOR_TYPE": "v5litepod-16", "SPOT": "1"}),
    ("gpu_host.sh", ["--install", CONFIG, "runs/x y", *EXTRA], {"GPUS": "1,3"}),
    ("slurm_gpus.sh", [CONFIG, "/shared/x", *EXTRA], {"NODES": "3", "GPUS_PER_NODE": "8"}),
    ("slurm_gpus.sh", [CONFIG, "/shared/x", *EXTRA],
     {"SLURM_JOB_ID": "7", "GPUS_PER_NODE": "8", "TASKS_PER": "gpu"}),
])
def test_a_real_run_executes_exactly_the_printed_commands(sandbox, script, args, env):
    printed = dry(sandbox, script, *args, **env)
    if script == "slurm_gpus.sh" and "SLURM_JOB_ID" not in env:
        printed = printed[:1]  # the srun line runs later, inside the job
    result = sandbox(script, *args, **env)
    assert result.returncode == 0, result.stderr
    assert result.calls == printed
