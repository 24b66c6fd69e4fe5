"""``cifar-exp launch slurm|k8s NAME``: write (and for Slurm, with ``--submit``, submit) the job
that runs a sweep on a cluster: a Slurm job array or a Kubernetes Indexed Job, each task or pod
one ``cifar-exp sweep NAME --workers 1`` against one database storage and one MLflow server."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cifar_exp.cli import arguments
from cifar_exp.config import DEFAULT_STORE, UserError, check_storage, check_tracking_uri, mask_credentials
from cifar_exp.config.sweepfile import available_sweeps, load_sweep

DESCRIPTION = ("Write the job that runs a sweep on a cluster: a Slurm job array (sbatch script; --submit "
               "submits it) or a Kubernetes Indexed Job (YAML), every task one worker of the study on a "
               "database storage all nodes reach, logging to one MLflow server.")
SUMMARY = "run a sweep on Slurm or Kubernetes"  # its line in cifar-exp --help
_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d\d){0,2}$")  # Slurm's --time: [D-]HH[:MM[:SS]] or minutes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scheduler", choices=("slurm", "k8s"), help="slurm: an sbatch script; k8s: a Job manifest")
    p.add_argument("name", help="sweep name or path to its .yaml file (every node must read it)")
    p.add_argument("--storage", required=True, help="Optuna storage every node reaches: a database URL "
                                                    "(postgresql://USER@HOST/DB)")
    p.add_argument("--tracking-uri", required=True, help="MLflow tracking server every node reaches (http://HOST:5000)")
    p.add_argument("--checkpoint-dir", required=True,
                   help="a folder every node shares: a trial stopped on one node resumes on another from it")
    p.add_argument("--tasks", type=arguments.positive(int, "--tasks"), default=2,
                   help="array tasks or Job indexes (default 2); each works until the budget is met")
    p.add_argument("--at-once", type=arguments.positive(int, "--at-once"),
                   help="how many run together (default: all of --tasks)")
    p.add_argument("--gpus", type=arguments.number(int, "--gpus", lambda v: v >= 0, "0 or more"), default=1,
                   help="GPUs per task (default 1; 0 for a CPU-only cluster)")
    p.add_argument("--out", help="the file to write (default mlruns/launch/NAME.sbatch or NAME.yaml)")
    slurm = p.add_argument_group("slurm")
    slurm.add_argument("--time", default="4:00:00", help="each task's time limit (default 4:00:00)")
    slurm.add_argument("--cpus", type=arguments.positive(int, "--cpus"), default=4, help="cores per task (default 4)")
    slurm.add_argument("--partition", default="", help="Slurm partition")
    slurm.add_argument("--account", default="", help="Slurm account")
    slurm.add_argument("--submit", action="store_true", help="submit the script with sbatch and print the job id")
    k8s = p.add_argument_group("k8s")
    k8s.add_argument("--image", default="", help="the container image with cifar-exp installed (required for k8s)")
    k8s.add_argument("--namespace", default="", help="the Job's namespace")
    k8s.add_argument("--queue", default="", help="a Kueue LocalQueue that admits the Job (its queue-name label)")
    k8s.add_argument("--secret", default="", help="a Secret whose keys become the pods' environment variables")
    k8s.add_argument("--checkpoint-claim", default="",
                     help="a ReadWriteMany PersistentVolumeClaim mounted at --checkpoint-dir")


def _shared(args: argparse.Namespace) -> str:
    """The sweep as the nodes will name it (a shipped name, or an absolute path), after checking
    that the stores are ones other nodes can reach; ``UserError`` otherwise."""
    check_storage(args.storage)
    check_tracking_uri(args.tracking_uri)
    if "://" not in args.storage or args.storage.startswith("sqlite"):
        raise UserError(f"--storage {args.storage}: a file on this machine, which tasks on other nodes cannot share: "
                        f"pass a database every node reaches, e.g. --storage postgresql://USER@HOST/DB")
    if not args.tracking_uri.startswith(("http://", "https://", "postgresql", "mysql")):
        raise UserError(f"--tracking-uri {mask_credentials(args.tracking_uri)}: a store on this machine: pass the "
                        f"MLflow server every node reaches, e.g. --tracking-uri http://HOST:5000")
    if not os.path.isabs(args.checkpoint_dir):
        raise UserError(f"--checkpoint-dir {args.checkpoint_dir}: give the absolute path of a folder every node mounts")
    sweep = load_sweep(args.name)  # a bad sweep is refused here, not on a hundred nodes
    return sweep.name if args.name in available_sweeps() else str(Path(args.name).resolve())


def _write(path: Path, text: str) -> None:
    """``text`` to ``path`` (readable by its owner only: the URIs may hold credentials), whole or
    not at all."""
    if not path.parent.is_dir() and path.parent != DEFAULT_STORE / "launch":
        raise UserError(f"--out {path}: the folder {path.parent} does not exist: create it, or name another file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    sweep = _shared(args)
    at_once = args.tasks if args.at_once is None else min(args.at_once, args.tasks)
    if args.scheduler == "slurm":
        return _slurm(args, sweep, at_once)
    return _k8s(args, sweep, at_once)


def _slurm(args: argparse.Namespace, sweep: str, at_once: int) -> int:
    from cifar_exp.cluster import slurm

    if not _TIME.match(args.time):
        raise UserError(f"--time {args.time}: give Slurm's format, e.g. --time 4:00:00 or --time 1-00:00:00")
    if args.submit and shutil.which("sbatch") is None:
        raise UserError("--submit: no sbatch on this machine: run this on a Slurm login node, or submit the script "
                        "there with sbatch")
    workdir = os.getcwd()
    job = slurm.ArrayJob(sweep, args.storage, args.tracking_uri, args.checkpoint_dir, args.tasks, at_once, args.gpus,
                         args.cpus, args.time, workdir, str(Path(workdir) / DEFAULT_STORE / "logs" / "slurm"),
                         sys.executable, args.partition, args.account)
    path = Path(args.out or DEFAULT_STORE / "launch" / f"{job.name}.sbatch")
    _write(path, slurm.script(job))
    Path(job.logs).mkdir(parents=True, exist_ok=True)
    print(f"wrote {path}: a job array of {args.tasks} tasks ({at_once} at once, {args.gpus} GPU(s) and "
          f"{args.cpus} cores each, {args.time}); logs in {job.logs}")
    if not args.submit:
        print(f"submit it: sbatch {path}")
    else:
        done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"sbatch refused {path}: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
        print(f"submitted job {done.stdout.strip().split(';')[0]}")
    print(f"watch it: squeue --me --name {job.name}; the study: cifar-exp report {args.name} --storage ... "
          f"--tracking-uri ...; a stopped task requeues itself and its trial resumes")
    return 0


def _k8s(args: argparse.Namespace, sweep: str, at_once: int) -> int:
    import yaml

    from cifar_exp.cluster import k8s

    if not args.image:
        raise UserError("launch k8s: give --image, a container image with cifar-exp installed")
    if args.submit:
        raise UserError("--submit submits to Slurm: apply the Job with kubectl apply -f FILE")
    job = k8s.IndexedJob(sweep, args.storage, args.tracking_uri, args.checkpoint_dir, args.tasks, at_once, args.image,
                         args.gpus, args.namespace, args.queue, args.secret, args.checkpoint_claim)
    path = Path(args.out or DEFAULT_STORE / "launch" / f"{job.name}.yaml")
    _write(path, yaml.safe_dump(k8s.manifest(job), sort_keys=False))
    print(f"wrote {path}: an Indexed Job of {args.tasks} pods ({at_once} at once, {args.gpus} GPU(s) each) "
          f"from {args.image}")
    namespace = f" -n {args.namespace}" if args.namespace else ""
    print(f"start it: kubectl apply{namespace} -f {path}")
    print(f"watch it: kubectl get pods{namespace} -l job-name={job.name} -w; "
          f"logs: kubectl logs{namespace} -l job-name={job.name} -f")
    return 0
