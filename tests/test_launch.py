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
STUBBED = ["gcloud", "sbatch", "srun", "scontrol", "python", "python3", "pip", "env", "tar",
           "mkdir", "git", "nvidia-smi", "ssh", "scp", "cat", "seq", "dirname", "sleep"]
CONFIG = "configs/fashion_mnist.py:tiny"
EXTRA = ["--config.training.batch_size=64", "--config.sampling.steps=10,100"]
PREEMPTED, PEER_LOST = 75, 76  # dmz_jax.preemption.EXIT_PREEMPTED, EXIT_PEER_LOST

# A stub: logs its argv (unit separator joined) to $STUB_LOG, then exits with the next code of
# $STUB_DIR/NAME.codes (one per line, consumed in order; 0 once they are used up). Bash builtins
# only: PATH holds nothing else.
STUB = """#!{bash}
{{ printf '%s' "${{0##*/}}"; printf '\\037%s' "$@"; echo; }} >> "$STUB_LOG"
codes=$STUB_DIR/${{0##*/}}.codes
if [[ -s $codes ]]; then
  mapfile -t next < "$codes"
  printf '%s\\n' "${{next[@]:1}}" > "$codes"
  exit "${{next[0]:-0}}"
fi
"""


@pytest.fixture
def sandbox(tmp_path):
    """Runs a launch script under bash with PATH = stubs that log argv and exit as told:
    sandbox(script, *args, exit_codes={"python": [75, 0]}, **env)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "calls.log"
    for name in STUBBED:
        stub = stubs / name
        stub.write_text(STUB.format(bash=BASH))
        stub.chmod(0o755)

    def run(script, *args, exit_codes=None, **env):
        for name, codes in (exit_codes or {}).items():
            (stubs / f"{name}.codes").write_text("".join(f"{c}\n" for c in codes))
        full_env = {"PATH": str(stubs), "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
                    "STUB_LOG": str(log), "STUB_DIR": str(stubs), **env}
        result = subprocess.run([BASH, str(LAUNCH / script), *args], cwd=ROOT, env=full_env,
                                capture_output=True, text=True, timeout=30)
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        for codes in stubs.glob("*.codes"):
            codes.unlink()
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


def train_calls(result):
    """The training commands among a run's calls (python -m dmz_jax.main, or the ssh that runs
    it on the TPU workers)."""
    return [c for c in result.calls if "dmz_jax.main" in " ".join(c)]


def test_every_script_parses():
    assert {s.name for s in SCRIPTS} >= {"tpu_pod.sh", "gpu_host.sh", "slurm_gpus.sh"}
    for script in SCRIPTS:
        check = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script.name}: {check.stderr}"


@pytest.mark.parametrize("script, args, env", [
    ("tpu_pod.sh", ["--create", "--delete", "t", "z", CONFIG, "gs://b/run"],
     {"ACCELERATOR_TYPE": "v4-32"}),
    ("gpu_host.sh", ["--install", CONFIG, "runs/x"], {}),
    ("slurm_gpus.sh", [CONFIG, "/shared/x"], {"NODES": "2", "GPUS_PER_NODE": "4"}),
])
def test_dry_run_flag_and_variable_agree(sandbox, script, args, env):
    by_flag = sandbox(script, "--dry-run", *args, **env)
    by_variable = sandbox(script, *args, DRY_RUN="1", **env)
    assert by_flag.returncode == by_variable.returncode == 0, by_flag.stderr
    assert by_flag.stdout == by_variable.stdout and len(by_flag.stdout.splitlines()) >= 2
    assert by_flag.calls == by_variable.calls == []


def test_a_failing_step_stops_the_script(sandbox):
    """set -e at work: pip install fails, so training never starts."""
    result = sandbox("gpu_host.sh", "--install", CONFIG, "runs/x", exit_codes={"python": [3]})
    assert result.returncode == 3
    assert [c[:4] for c in result.calls] == [["python", "-m", "pip", "install"]]


def test_tpu_pod(sandbox):
    commands = dry(sandbox, "tpu_pod.sh", "--create", "--delete", "my-tpu", "us-central2-b",
                   CONFIG, "runs/x", *EXTRA, ACCELERATOR_TYPE="v4-8",
                   RUNTIME_VERSION="tpu-ubuntu2204-base", PROJECT="my-project")
    gcloud = [c for c in commands if c[0] == "gcloud"]
    assert all(c[1:4] == ["compute", "tpus", "tpu-vm"] for c in gcloud)
    assert all(c[5] == "my-tpu" for c in gcloud if c[4] != "scp")
    assert all(option(c, "zone") == "us-central2-b" and option(c, "project") == "my-project"
               for c in gcloud)
    verbs = [c[4] for c in gcloud]
    assert verbs[0] == "create" and verbs[-1] == "delete" and verbs[-2] == "scp"
    create = gcloud[0]
    assert option(create, "accelerator-type") == "v4-8"
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


def test_tpu_pod_gs_workdir_dry_run(sandbox):
    """A gs:// WORKDIR on a 4-host slice: accepted, trained into as it is, never scp'd."""
    result = sandbox("tpu_pod.sh", "--dry-run", "--create", "--delete", "t", "z", CONFIG,
                     "gs://bucket/runs/x", ACCELERATOR_TYPE="v4-32")
    assert result.returncode == 0, result.stderr
    assert result.calls == []
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert not any("gs://" in arg for c in commands if c[:5] == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp"] for arg in c)
    assert [c[0] for c in commands].count("mkdir") == 0  # nothing is fetched
    train = option(commands[-2], "command")
    assert train.endswith("--workdir=gs://bucket/runs/x")
    assert [c[4] for c in commands if c[0] == "gcloud"] == [
        "create", "scp", "ssh", "ssh", "ssh", "delete"]
    assert "the results are in gs://bucket/runs/x" in result.stderr

    copied = dry(sandbox, "tpu_pod.sh", "--skip-setup", "t", "z", CONFIG, "gs://bucket/runs/x",
                 ACCELERATOR_TYPE="v4-32", FETCH_TO="here")
    assert copied[1:] == [["mkdir", "-p", "here"],
                          ["gcloud", "storage", "cp", "--recursive", "gs://bucket/runs/x", "here"]]


def test_tpu_pod_git_clone_and_skip_setup(sandbox):
    clone = dry(sandbox, "tpu_pod.sh", "t", "z", CONFIG, "/mnt/shared/run",
                REPO_URL="https://example.com/dmz_jax.git", SHARED_WORKDIR="1")
    assert "git clone https://example.com/dmz_jax.git dmz_jax" in option(clone[0], "command")
    assert not any(c[0] == "tar" or c[4] in ("create", "delete") for c in clone if c[0] != "mkdir")
    assert clone[-1][6] == "t:/mnt/shared/run"  # an absolute WORKDIR is fetched as it is

    skip = dry(sandbox, "tpu_pod.sh", "--skip-setup", "t", "z", CONFIG, "w", HOSTS="1")
    assert [c[4] for c in skip if c[0] == "gcloud"] == ["ssh", "scp"]
    assert "--distributed" in option(skip[0], "command")


@pytest.mark.parametrize("workdir, env, hosts", [
    ("runs/x", {"ACCELERATOR_TYPE": "v4-32"}, "4 hosts"),
    ("runs/x", {"ACCELERATOR_TYPE": "v5litepod-16"}, "4 hosts"),
    ("runs/x", {"ACCELERATOR_TYPE": "v6e-32"}, "8 hosts"),
    ("runs/x", {}, "an unknown number of hosts"),
    ("runs/x", {"HOSTS": "2", "ACCELERATOR_TYPE": "v4-8"}, "2 hosts"),
    ("/mnt/shared/x", {"ACCELERATOR_TYPE": "v4-16"}, "2 hosts"),  # absolute, but not declared
])
def test_tpu_pod_refuses_a_multi_host_slice_without_shared_workdir(sandbox, workdir, env, hosts):
    for flags in (["--dry-run"], []):
        result = sandbox("tpu_pod.sh", *flags, "--skip-setup", "t", "z", CONFIG, workdir, **env)
        assert result.returncode == 2 and result.calls == [] and result.stdout == ""
        assert f"WORKDIR={workdir} is not shared storage" in result.stderr
        assert f"the slice has {hosts}" in result.stderr


@pytest.mark.parametrize("workdir, env", [
    ("runs/x", {"ACCELERATOR_TYPE": "v4-8"}),
    ("runs/x", {"ACCELERATOR_TYPE": "v5litepod-8"}),
    ("runs/x", {"HOSTS": "1"}),
    ("runs/x", {"HOSTS": "1", "ACCELERATOR_TYPE": "v4-32"}),  # HOSTS wins
    ("/mnt/shared/x", {"ACCELERATOR_TYPE": "v4-32", "SHARED_WORKDIR": "1"}),
    ("gs://b/x", {}),
])
def test_tpu_pod_accepts_shared_or_single_host(sandbox, workdir, env):
    commands = dry(sandbox, "tpu_pod.sh", "--skip-setup", "t", "z", CONFIG, workdir, **env)
    assert option(commands[0], "command").endswith(f"--workdir={workdir}")


def test_tpu_pod_reruns_training_after_75_and_76_then_deletes(sandbox):
    # gcloud calls: ssh (train) -> 75, ssh (train) -> 76, ssh (train) -> 0, scp, delete
    result = sandbox("tpu_pod.sh", "--delete", "--skip-setup", "t", "z", CONFIG, "runs/x",
                     HOSTS="1", exit_codes={"gcloud": [PREEMPTED, PEER_LOST, 0]})
    assert result.returncode == 0, result.stderr
    trains = train_calls(result)
    assert len(trains) == 3 and trains[0] == trains[1] == trains[2]
    assert [c[4] for c in result.calls if c[0] == "gcloud"] == ["ssh"] * 3 + ["scp", "delete"]
    assert "restart 2 of 3" in result.stderr and "is kept" not in result.stderr


def test_tpu_pod_gives_up_after_max_restarts_and_keeps_the_tpu(sandbox):
    result = sandbox("tpu_pod.sh", "--delete", "--skip-setup", "t", "z", CONFIG, "runs/x",
                     HOSTS="1", MAX_RESTARTS="1", PROJECT="p",
                     exit_codes={"gcloud": [PREEMPTED, PREEMPTED, 0]})
    assert result.returncode == PREEMPTED
    assert [c[4] for c in result.calls if c[0] == "gcloud"] == ["ssh", "ssh"]  # no scp, no delete
    assert ("gcloud compute tpus tpu-vm delete t --zone=z --project=p --quiet"
            in result.stderr)


@pytest.mark.parametrize("failing_call, rc", [(1, 1), (2, 255), (4, 1)])
def test_tpu_pod_never_deletes_after_a_failed_step(sandbox, failing_call, rc):
    """gcloud calls: create, scp (code), ssh (untar), ssh (pip), ssh (train), scp, delete: the
    failing_call-th fails with rc; the script stops there, and prints how to delete the TPU."""
    codes = [0] * failing_call + [rc]
    result = sandbox("tpu_pod.sh", "--create", "--delete", "t", "z", CONFIG, "runs/x",
                     ACCELERATOR_TYPE="v4-8", exit_codes={"gcloud": codes})
    assert result.returncode == rc
    verbs = [c[4] for c in result.calls if c[0] == "gcloud"]
    assert len(verbs) == failing_call + 1 and "delete" not in verbs
    assert "gcloud compute tpus tpu-vm delete t --zone=z --quiet" in result.stderr


def test_gpu_host(sandbox):
    (install, train) = dry(sandbox, "gpu_host.sh", "--install", CONFIG, "runs/x", *EXTRA,
                           GPUS="0,1,2,3", MEM_FRACTION=".9")
    assert install == ["python", "-m", "pip", "install", "-e", str(ROOT), "jax[cuda12]"]
    assert train == ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3", "XLA_PYTHON_CLIENT_MEM_FRACTION=.9",
                     "python", "-m", "dmz_jax.main", f"--config={CONFIG}", "--workdir=runs/x",
                     *EXTRA]
    (plain,) = dry(sandbox, "gpu_host.sh", CONFIG, "runs/x")
    assert plain == ["python", "-m", "dmz_jax.main", f"--config={CONFIG}", "--workdir=runs/x"]


@pytest.mark.parametrize("codes, max_restarts, calls, rc", [
    ([PREEMPTED, 0], "3", 2, 0),                       # preempted once, then finished
    ([PEER_LOST, PREEMPTED, 0], "3", 3, 0),
    ([PREEMPTED, PEER_LOST, PREEMPTED, 0], "2", 3, PREEMPTED),  # gives up after 2 restarts
    ([PREEMPTED], "0", 1, PREEMPTED),
    ([1, 0], "3", 1, 1),                               # a crash is not restarted
    ([130, 0], "3", 1, 130),
])
def test_gpu_host_restarts_on_75_and_76(sandbox, codes, max_restarts, calls, rc):
    result = sandbox("gpu_host.sh", CONFIG, "runs/x", *EXTRA, MAX_RESTARTS=max_restarts,
                     exit_codes={"python": codes})
    assert result.returncode == rc, result.stderr
    expected = ["python", "-m", "dmz_jax.main", f"--config={CONFIG}", "--workdir=runs/x", *EXTRA]
    assert result.calls == [expected] * calls


def test_slurm_gpus(sandbox):
    sbatch, srun = dry(sandbox, "slurm_gpus.sh", CONFIG, "/shared/x", *EXTRA, NODES="2",
                       GPUS_PER_NODE="4", EXTRA_SBATCH="--time=24:00:00 --partition=gpu")
    assert sbatch[0] == "sbatch" and sbatch[-3 - len(EXTRA):] == [
        str(LAUNCH / "slurm_gpus.sh"), CONFIG, "/shared/x", *EXTRA]
    assert option(sbatch, "nodes") == "2" and option(sbatch, "gpus-per-node") == "4"
    assert option(sbatch, "ntasks-per-node") == "1" and option(sbatch, "signal") == "TERM@120"
    assert "--requeue" in sbatch and option(sbatch, "open-mode") == "append"
    assert option(sbatch, "export").endswith(",MAX_RESTARTS=3")
    assert "--time=24:00:00" in sbatch and "--partition=gpu" in sbatch
    train = ["python", "-m", "dmz_jax.main", "--distributed", f"--config={CONFIG}",
             "--workdir=/shared/x", *EXTRA]
    assert srun == ["srun", "--kill-on-bad-exit=0", "--ntasks-per-node=1", "env",
                    "JAX_LOCAL_DEVICE_IDS=0,1,2,3", *train]

    sbatch, srun = dry(sandbox, "slurm_gpus.sh", CONFIG, "/shared/x", *EXTRA, NODES="2",
                       GPUS_PER_NODE="4", TASKS_PER="gpu")
    assert option(sbatch, "ntasks-per-node") == "4"
    assert srun == ["srun", "--kill-on-bad-exit=0", "--ntasks-per-node=4", *train]

    # Inside the job (SLURM_JOB_ID set): only the job step, sized from SLURM's variables.
    (srun,) = dry(sandbox, "slurm_gpus.sh", CONFIG, "/shared/x", *EXTRA, SLURM_JOB_ID="7",
                  SLURM_GPUS_ON_NODE="2")
    assert srun == ["srun", "--kill-on-bad-exit=0", "--ntasks-per-node=1", "env",
                    "JAX_LOCAL_DEVICE_IDS=0,1", *train]


def sbatch_directives(script: Path) -> list[str]:
    """The options sbatch reads from a script: #SBATCH lines before the first command."""
    options = []
    for line in script.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            options += line.split()[1:]
        elif line.strip() and not line.startswith("#"):
            break
    return options


def test_slurm_script_asks_sbatch_for_requeue():
    """`sbatch launch/slurm_gpus.sh ...` (without this script's submit step) reads these."""
    assert {"--requeue", "--signal=TERM@120", "--open-mode=append"} <= set(
        sbatch_directives(LAUNCH / "slurm_gpus.sh"))


@pytest.mark.parametrize("srun_rc, restart_count, requeued, rc", [
    (PREEMPTED, None, True, 0),
    (PEER_LOST, "2", True, 0),
    (PREEMPTED, "3", False, PREEMPTED),  # MAX_RESTARTS=3 requeues done
    (1, None, False, 1),
    (0, None, False, 0),
])
def test_slurm_job_requeues_itself_on_75_and_76(sandbox, srun_rc, restart_count, requeued, rc):
    env = {"SLURM_JOB_ID": "7", "GPUS_PER_NODE": "4"}
    if restart_count is not None:
        env["SLURM_RESTART_COUNT"] = restart_count
    result = sandbox("slurm_gpus.sh", CONFIG, "/shared/x", exit_codes={"srun": [srun_rc]}, **env)
    assert result.returncode == rc, result.stderr
    assert [c[0] for c in result.calls] == ["srun"] + ["scontrol"] * requeued
    if requeued:
        assert result.calls[1] == ["scontrol", "requeue", "7"]


def test_slurm_job_exits_with_the_code_when_requeue_fails(sandbox):
    result = sandbox("slurm_gpus.sh", CONFIG, "/shared/x", SLURM_JOB_ID="7", GPUS_PER_NODE="4",
                     exit_codes={"srun": [PREEMPTED], "scontrol": [1]})
    assert result.returncode == PREEMPTED
    assert "scontrol requeue failed" in result.stderr


@pytest.mark.parametrize("script, args, env", [
    ("tpu_pod.sh", [], {}),
    ("tpu_pod.sh", ["my-tpu", "us-central2-b", CONFIG], {}),
    ("tpu_pod.sh", ["--create", "my-tpu", "us-central2-b", CONFIG, "w"], {}),
    ("tpu_pod.sh", ["--bogus", "my-tpu", "us-central2-b", CONFIG, "w"], {}),
    ("tpu_pod.sh", ["my-tpu", "us-central2-b", "configs/missing.py", "w"], {}),
    ("tpu_pod.sh", ["my-tpu", "us-central2-b", CONFIG, "w"], {"HOSTS": "one"}),
    ("tpu_pod.sh", ["my-tpu", "us-central2-b", CONFIG, "w"], {"HOSTS": "1", "MAX_RESTARTS": "x"}),
    ("gpu_host.sh", [], {}),
    ("gpu_host.sh", [CONFIG], {}),
    ("gpu_host.sh", [CONFIG, "w"], {"GPUS": "zero"}),
    ("gpu_host.sh", [CONFIG, "w"], {"MEM_FRACTION": "1.5"}),
    ("gpu_host.sh", [CONFIG, "w"], {"MAX_RESTARTS": "-1"}),
    ("slurm_gpus.sh", [], {"NODES": "2", "GPUS_PER_NODE": "4"}),
    ("slurm_gpus.sh", [CONFIG, "w"], {"GPUS_PER_NODE": "4"}),
    ("slurm_gpus.sh", [CONFIG, "w"], {"NODES": "2"}),
    ("slurm_gpus.sh", [CONFIG, "w"], {"NODES": "2", "GPUS_PER_NODE": "4", "TASKS_PER": "x"}),
    ("slurm_gpus.sh", [CONFIG, "w"], {"NODES": "2", "GPUS_PER_NODE": "4", "MAX_RESTARTS": "3x"}),
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
    assert "--dry-run" in result.stdout


@pytest.mark.parametrize("script, args, env", [
    ("tpu_pod.sh", ["--create", "--delete", "t", "z", CONFIG, "runs/it's mine", *EXTRA],
     {"ACCELERATOR_TYPE": "v5litepod-8", "SPOT": "1"}),
    ("tpu_pod.sh", ["--create", "--delete", "t", "z", CONFIG, "gs://b/it's mine", *EXTRA],
     {"ACCELERATOR_TYPE": "v5litepod-16", "FETCH_TO": "a b"}),
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
